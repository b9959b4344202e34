"""The house's layout: the import graph of the library and of the benchmarks beside it has no circle, counting
imports written inside function bodies (which only hide a circle, they do not remove it), except the module
`__getattr__` shims that keep a moved name's old import path working for a release; and the product never imports
the benchmarks."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "streaming_engine"
#: The top-level benchmark package (not the product; the `eval` extra's console scripts run it).
BENCHMARKS = ROOT / "benchmarks"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its code, but inside a module-level `__getattr__`."""
    tree = ast.parse(path.read_text())
    shims = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
             for n in ast.walk(f)}
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in shims:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {c for c in [target] + [f"{target}.{a.name}" for a in node.names] if c in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = sorted([*PACKAGE.rglob("*.py"), *BENCHMARKS.rglob("*.py")])
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_package_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the walk really saw the package
    assert circles(graph) == []


def test_the_torch_free_leaves_import_only_leaves():
    """`defaults` and `modelfiles` answer `--help` and the machine records without torch: they import nothing
    from the package but each other."""
    graph = import_graph()
    leaves = {"streaming_engine.defaults", "streaming_engine.modelfiles"}
    for leaf in leaves:
        assert graph[leaf] <= leaves, (leaf, graph[leaf])


#: Modules that may import the llama.cpp pieces: the backend seam and the pieces themselves (the benchmarks in
#: `benchmarks/` compare against llama.cpp's own generation, and are not the product).
LLAMACPP_HOMES = ("streaming_engine.backends", "streaming_engine.llamacpp", "benchmarks")
#: The backend's clients: they hold a `Backend` and ask it, never which one they have.
BACKEND_CLIENTS = ("engine.py", "session.py", "scheduler.py")


def function_body_imports(path: Path) -> list[str]:
    """`from .x import y` / `import x` written inside a function body, as `line: source`."""
    tree = ast.parse(path.read_text())
    found = []
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [f"{node.lineno}: {ast.unparse(node)}" for node in ast.walk(function)
                      if isinstance(node, (ast.Import, ast.ImportFrom))]
    return found


#: The product modules allowed to import the benchmarks: their old paths, kept one release (the load test's, and
#: `streaming_engine.eval`, which aliases by name and so imports nothing the walk can see).
EVAL_SHIMS = ("streaming_engine.loadtest", "streaming_engine.eval")


def is_benchmark(module: str) -> bool:
    return module == "benchmarks" or module.startswith("benchmarks.")


def test_the_product_never_imports_the_benchmarks():
    graph = import_graph()
    importers = {module for module, targets in graph.items() if any(is_benchmark(t) for t in targets)}
    assert "benchmarks.ppl" in importers  # the walk sees the benchmarks' own imports
    assert "streaming_engine.loadtest" in importers  # and an absolute import of them
    assert {m for m in importers if not is_benchmark(m)} <= set(EVAL_SHIMS)
    outside = [ROOT / "app.py", *sorted((ROOT / "webui").rglob("*.py"))]
    assert [p.name for p in outside if any(is_benchmark(m) for m in absolute_imports(p))] == []


def absolute_imports(path: Path) -> set[str]:
    """The modules `path` imports by absolute name, anywhere in its code (docstrings that name a module do not count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_only_the_backends_package_imports_the_llamacpp_pieces():
    graph = import_graph()
    importers = {module for module, targets in graph.items()
                 if any(t == "streaming_engine.llamacpp" or t.startswith("streaming_engine.llamacpp.") for t in targets)}
    assert "streaming_engine.backends.llama" in importers  # the walk really saw the seam
    assert {m for m in importers if not m.startswith(LLAMACPP_HOMES)} == set()
    outside = [PACKAGE.parent / "app.py", *sorted((PACKAGE.parent / "webui").glob("*.py"))]
    assert [p.name for p in outside if "streaming_engine.llamacpp" in p.read_text()] == []


@pytest.mark.parametrize("path", [PACKAGE / name for name in BACKEND_CLIENTS] + [PACKAGE.parent / "app.py"],
                         ids=lambda p: p.name)
def test_the_backend_clients_never_ask_which_backend_they_have(path):
    text = path.read_text()
    assert "llamacpp" not in text and "is_llamacpp_model" not in text and "LlamaCpp" not in text


@pytest.mark.parametrize("name", BACKEND_CLIENTS)
def test_the_backend_clients_import_nothing_inside_a_function(name):
    assert function_body_imports(PACKAGE / name) == []


#: The package's own modules imported inside a function, each with the reason it cannot be at the top: the
#: torch-free `--help` of the command-line chat, and the old import path kept one release beside the module that
#: took its name away (importing it at the top would be the circle its move removed).
LATE_OWN_IMPORTS = {
    "chat.py": {".engine", ".loading", ".placement"},  # `--help` answers before torch is imported
    "cache.py": {".hf_integration"},  # `streaming_engine.cache.enable_streaming_llm`, deprecated
}


def late_imports(path: Path) -> tuple[set[str], set[str]]:
    """(the package's own modules, the standard library's) that `path` imports inside a function body."""
    own, stdlib = set(), set()
    for function in ast.walk(ast.parse(path.read_text())):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.level:
                    own.add("." * node.level + (node.module or ""))
                elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in sys.stdlib_module_names:
                    stdlib.add(node.module)
                elif isinstance(node, ast.Import):
                    stdlib |= {a.name for a in node.names if a.name.split(".")[0] in sys.stdlib_module_names}
    return own, stdlib


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_function_imports_only_optional_or_heavy_packages(path):
    """Inside a function body only third-party packages are imported (optional ones such as psycopg and
    llama_cpp, or torch/transformers kept off a torch-free path); the package's own modules and the standard
    library are imported at the top, where the import graph (and a reader) sees them."""
    own, stdlib = late_imports(path)
    assert stdlib == set()
    assert own == LATE_OWN_IMPORTS.get(str(path.relative_to(PACKAGE)), set())


def test_the_function_body_import_finder_finds_one(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import os\n\ndef f():\n    from .llamacpp import context\n    return context\n")
    assert function_body_imports(sample) == ["4: from .llamacpp import context"]
    sample.write_text("def f():\n    import json, psycopg\n    from os import path\n    from ..x import y\n")
    assert late_imports(sample) == ({"..x"}, {"json", "os"})


def test_the_benchmarks_old_command_still_runs_and_names_the_new_one():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # Python's default filters, as a user has
    done = subprocess.run([sys.executable, "-m", "streaming_engine.eval.ppl", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m benchmarks.ppl")
    assert "DeprecationWarning: streaming_engine.eval.ppl moved to benchmarks.ppl" in done.stderr


def test_the_benchmarks_old_import_path_is_the_new_module_and_warns():
    import benchmarks.stats

    sys.modules.pop("streaming_engine.eval.stats", None)  # a fresh import, which is the one that warns
    with pytest.warns(DeprecationWarning, match=r"streaming_engine\.eval\.stats moved to benchmarks\.stats"):
        from streaming_engine.eval.stats import percentile
    assert percentile is benchmarks.stats.percentile
    assert sys.modules["streaming_engine.eval.stats"] is benchmarks.stats  # one module under both names
    with pytest.raises(ModuleNotFoundError):
        import streaming_engine.eval.no_such_benchmark  # noqa: F401


#: How a refusal of a value's type or range reads; only `validate.py` may write it (every other module calls it).
RANGE_WORDINGS = ("must be an integer", "must be a number", "must be one of", "must be True or False",
                  "must be true or false", "is too long:", "is empty: type something first")


def range_wordings(path: Path) -> list[str]:
    """The string constants (f-string parts included) in `path` that spell one of `RANGE_WORDINGS`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [f"line {node.lineno}: {w!r}" for w in RANGE_WORDINGS if w in node.value]
    return found


@pytest.mark.parametrize("path", sorted(p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "webui").glob("*.py"),
                                                  ROOT / "app.py"] if p.name != "validate.py"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_a_type_or_range_refusal_is_worded_in_one_module(path):
    assert range_wordings(path) == [], "call streaming_engine.validate (check_int, check_number, check_choice, …)"


def test_the_wording_finder_finds_one(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('def f(n):\n    raise ValueError(f"n must be an integer >= 1, got {n}")\n')
    assert range_wordings(module) == ["line 2: 'must be an integer'"]
