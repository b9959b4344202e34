"""The documentation stays true to the tree: README.md is a short front door that still configures the Space,
every relative link in README.md, CONTRIBUTING.md and docs/*.md reaches a file (and a heading, when it names
one), every file path and every test they name (`test_x.py::test_name`, or its beginning before a "…") exists,
and every path and `module.symbol` that CONTRIBUTING.md names exists.

Static only: modules are parsed, never imported, so this runs in a second and needs neither gradio nor a model.
`make docs` (mkdocs build --strict) checks the built site on top of this.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
#: The front door's size limit (issue 23): what does not fit belongs in a page under docs/.
README_MAX_CHARS = 15_000
#: Where a bare `module.symbol` in CONTRIBUTING.md is looked for, in this order.
MODULE_PREFIXES = ("", "streaming_engine.", "benchmarks.", "webui.")
#: Endings that make a backticked word a file path.
PATH_SUFFIXES = (".py", ".md", ".txt", ".toml", ".yml", ".yaml", ".json", ".css", ".conf", ".png", ".svg", ".sh")
#: Files at the top of the tree without a suffix.
BARE_FILES = {"Makefile", "Dockerfile", "LICENSE"}

LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def heading_slugs(path: Path) -> set[str]:
    """GitHub's (and mkdocs') anchor for each heading: lower case, punctuation dropped, spaces become '-'."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    slugs = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M):
        plain = re.sub(r"[`*]", "", heading).strip().lower()
        slugs.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", plain)))
    return slugs


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z+.-]*:", t)]


def test_the_readme_is_a_front_door_within_its_size_limit():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    print(f"README.md: {len(text):,} characters (limit {README_MAX_CHARS:,})")
    assert len(text) <= README_MAX_CHARS, f"README.md has {len(text):,} characters; move sections into docs/"


def test_the_readme_starts_with_the_space_front_matter_that_preloads_the_default_model():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "the Hugging Face Space configuration must be the README's first lines"
    front, sep, _ = text[4:].partition("\n---\n")
    assert sep, "the front matter is not closed by a '---' line"
    config = yaml.safe_load(front)
    assert config["sdk"] == "gradio"
    assert config["app_file"] == "app.py" and (ROOT / config["app_file"]).is_file()
    assert config["license"] == "mit"
    # The Space lists and preloads the app's default hub model, with the files `load` reads.
    from webui import settings as app_settings

    assert config["models"] == [app_settings.HUB_DEFAULT_MODEL]
    repo, files = config["preload_from_hub"][0].split()
    assert repo == app_settings.HUB_DEFAULT_MODEL and {"config.json", "model.safetensors", "tokenizer.json"} <= set(
        files.split(","))


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_its_heading(page):
    broken = []
    for target in relative_links(page):
        where, _, anchor = target.partition("#")
        dest = (page.parent / where).resolve() if where else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in heading_slugs(dest):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


#: Where a path a page names is looked for: the tree, then the package (`backends/hf.py` in docs/backends.md).
PATH_ROOTS = (ROOT, ROOT / "streaming_engine")


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_path_a_page_names_exists(page):
    """A backticked file path with a folder in it (`webui/chat_tab.py`, `assets/eval/ppl.json`) names a file of
    the tree, so a moved module or a renamed result cannot leave a page pointing at nothing. Paths in code blocks
    are commands' arguments (they may be made by the command) and are not checked."""
    words = [w for w in CODE.findall(FENCE.sub("", page.read_text(encoding="utf-8")))
             if is_path(w) and "/" in w and w.endswith(PATH_SUFFIXES) and not w.startswith(".")]
    missing = []
    for word in words:
        pattern = re.sub(r"<[^>]*>", "*", word)
        if not any(list(root.glob(pattern)) if "*" in pattern else (root / pattern).exists() for root in PATH_ROOTS):
            missing.append(word)
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def contributing_words() -> list[str]:
    return CODE.findall((ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8"))


def is_path(word: str) -> bool:
    if word in BARE_FILES:
        return True
    if not re.fullmatch(r"[\w./<>*-]+", word) or word.startswith(("/", "-")) or "..." in word:
        return False
    return "/" in word or word.endswith(PATH_SUFFIXES) or (word.startswith(".") and len(word) > 1)


def test_every_path_contributing_names_exists():
    words = [w for w in contributing_words() if is_path(w)]
    assert len(words) > 40, "the parser found too few paths: has CONTRIBUTING.md's layout table moved?"
    missing = []
    for word in words:
        pattern = re.sub(r"<[^>]*>", "*", word)  # `webui/<name>_tab.py`: some file must fit the pattern
        found = list(ROOT.glob(pattern.rstrip("/"))) if "*" in pattern else [ROOT / pattern]
        if not any(p.exists() for p in found):
            missing.append(word)
    assert not missing, f"CONTRIBUTING.md names paths that do not exist: {missing}"


def module_file(dotted: str) -> Path | None:
    base = ROOT / dotted.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defined_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body binds: functions, classes, assignments, imports."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try)):
            names.update(defined_names(node.body))
    return names


def resolves(dotted: str) -> bool:
    """`module.symbol[.member]`: the longest module prefix found under MODULE_PREFIXES, then each remaining part a
    name bound at module level, then inside the class it names (a method or class attribute)."""
    parts = dotted.split(".")
    for prefix in MODULE_PREFIXES:
        for cut in range(len(parts) - 1, 0, -1):
            source = module_file(prefix + ".".join(parts[:cut]))
            if source is None:
                continue
            body = ast.parse(source.read_text(encoding="utf-8")).body
            for name in parts[cut:]:
                node = defined_names(body).get(name)
                if node is None:
                    break
                body = node.body if isinstance(node, ast.ClassDef) else []
            else:
                return True
    return False


def test_every_module_symbol_contributing_names_exists():
    words = [w for w in contributing_words() if not is_path(w) and DOTTED.fullmatch(w)]
    assert len(words) > 15, "the parser found too few dotted names"
    missing = [w for w in words if not resolves(w)]
    assert not missing, f"CONTRIBUTING.md names symbols that do not exist: {missing}"


def test_the_symbol_check_can_tell_a_missing_name():
    assert resolves("families.SUPPORTED_FAMILIES") and resolves("cache.StartRecentKVCache.evict_range")
    assert not resolves("families.NO_SUCH_NAME") and not resolves("cache.StartRecentKVCache.no_such_method")
    assert not resolves("no_such_module.anything")


#: A test named in the docs: its module (or "…" for the module named just before), then its name or (before "…")
#: the beginning of its name.
TEST_REFERENCE = re.compile(r"(?:(test_\w+)\.py|…)::(test_\w+)(…)?")


def functions_of(module: str) -> set[str]:
    """The names of the test functions (any depth: class methods too) of `tests/<module>.py`, parsed."""
    path = ROOT / "tests" / f"{module}.py"
    if not path.exists():
        return set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def names_a_test(module: str, name: str, abridged: bool) -> bool:
    functions = functions_of(module)
    return any(f.startswith(name) for f in functions) if abridged else name in functions


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_test_a_page_names_exists(page):
    """A page that says "tested by X" must name a test that runs: a renamed or deleted test fails here."""
    missing, module = [], None
    for found in TEST_REFERENCE.finditer(page.read_text(encoding="utf-8")):
        module = found[1] or module
        if module is None or not names_a_test(module, found[2], bool(found[3])):
            missing.append(found[0])
    assert not missing, f"{page.relative_to(ROOT)} names tests that do not exist: {missing}"


def test_the_test_name_check_can_tell_a_missing_test():
    assert names_a_test("test_docs", "test_every_test_a_page_names_exists", False)
    assert names_a_test("test_docs", "test_every_test_a_page_", True)
    assert not names_a_test("test_docs", "test_every_test_a_page_", False)  # a beginning only counts before "…"
    assert not names_a_test("test_docs", "test_no_such_test", True) and not names_a_test("test_nope", "test_x", True)


def test_the_site_nav_lists_every_page_once_and_only_pages_that_exist():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = [page for entry in config["nav"] for page in entry.values()]
    pages = sorted(p.name for p in (ROOT / config["docs_dir"]).glob("*.md"))
    assert sorted(listed) == pages, "mkdocs.yml's nav and the pages under docs/ differ"
    assert len(set(listed)) == len(listed)


def test_readme_perplexity_table_is_the_committed_json():
    """README's headline table (issue 22, item 5): every number in it is its JSON's, which records its own command
    and machine; a re-run that changes the JSON without the table fails here."""
    import json

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Measured: perplexity far past the position limit"):]
    cited = re.search(r"\(assets/eval/([\w.]+\.json)\)", section).group(1)
    data = json.loads((ROOT / "assets" / "eval" / cited).read_text())
    assert data["provenance"]["command"] and data["provenance"]["machine"]["cpu"]
    table = section[section.index("| tokens |"):]
    lines = [line for line in table[:table.index("\n\n")].splitlines() if not line.startswith("|---")]
    labels = [cell.strip() for cell in lines[0].strip("|").split("|")][1:]
    assert labels == list(data["runs"]), labels
    checked = 0
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        span, values = cells[0], cells[1:]
        for label, value in zip(labels, values):
            number = re.match(r"\**([\d,]+\.\d+)", value)
            if number is None:  # "stops (...)" or "-": the run had ended
                continue
            run = data["runs"][label]
            if span == "whole stream":
                expected = run["ppl"]
            else:
                first, last = (int(x.replace(",", "")) for x in span.split("–"))
                expected = next(s["ppl"] for s in run["segments"] if (s["start"], s["end"]) == (first, last))
            assert float(number.group(1).replace(",", "")) == pytest.approx(expected, abs=0.005), (span, label)
            checked += 1
    assert checked >= 15
