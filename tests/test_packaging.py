"""The package: `pip install .` gives a working library and web app outside the repository, and the requirement
files CI and Spaces install from say the same as pyproject.toml."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest

try:  # Python 3.11+
    import tomllib
except ImportError:  # 3.10: the same parser as the `tomli` package (pip and setuptools bring it)
    tomllib = pytest.importorskip("tomli", reason="Python 3.10 without tomli: pip install tomli")

ROOT = Path(__file__).resolve().parent.parent


def requirement_lines(path: Path) -> set[str]:
    return {line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()}


def test_requirement_files_say_what_pyproject_says():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime = set(project["dependencies"]) | set(extras["app"]) | set(extras["eval"])
    assert requirement_lines(ROOT / "requirements.txt") == runtime
    assert requirement_lines(ROOT / "requirements-dev.txt") == set(extras["test"])
    assert requirement_lines(ROOT / "requirements-cpu.txt") == set(extras["cpu"])
    assert not any(re.fullmatch(r"torch", r) for r in runtime)  # never an unbounded torch


def test_every_python_package_in_the_tree_is_in_the_wheel():
    """A new sub-package (`streaming_engine/backends/`) left out of `packages` imports fine from the checkout and
    fails only once installed; this says so in milliseconds, before the slow install test."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for top in ("streaming_engine", "webui", "benchmarks") for init in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_console_scripts_point_at_real_entry_points():
    import importlib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"streaming-llm-chat", "streaming-llm-app"} <= set(scripts)
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def _run(*cmd, cwd=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


#: The files the app reads from webui.assets besides the button icons (see webui/assets.py and its callers).
APP_FILES = {"style.css", "examples.json", "autopilot.json", "attention_sinks.png"}


def icons_the_app_uses() -> set[str]:
    """`icons/<name>.svg` for every `icon("<name>")` in the web app's code: what the buttons reference."""
    names = set()
    for path in (ROOT / "webui").glob("*.py"):
        names |= set(re.findall(r'\bicon\("(\w+)"\)', path.read_text()))
    return {f"icons/{name}.svg" for name in names}


def page_asset_urls(page: str, base: str) -> set[str]:
    """Every same-server file or asset URL the page references: Gradio's `/file=` and `/gradio_api/file=` links
    (button icons, images), and the `src`/`href` of its scripts, stylesheets and icons."""
    found = set()
    for match in re.findall(r'(?:https?://[^"\'\s]+?)?/(?:gradio_api/)?file=[^"\'\s\\)]+', page):
        found.add(urllib.parse.urljoin(base, match))
    for match in re.findall(r'(?:src|href)="([^"#]+)"', page):
        url = urllib.parse.urljoin(base, match)
        if url.startswith(base) and url.rstrip("/") != base.rstrip("/"):
            found.add(url)
    return found


@pytest.mark.packaging
def test_pip_install_gives_a_library_and_app_that_work_from_any_directory(tmp_path, tiny_chat_model,
                                                                          default_tokenizer):
    wheels = tmp_path / "wheels"
    try:  # no network needed when setuptools here is new enough; otherwise pip fetches it for an isolated build
        import setuptools

        isolation = ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 77 else []
    except ImportError:
        isolation = []
    # Build from a clean copy: an in-tree build would leave build/ behind, and stale files there leak into wheels.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "build", "*.egg-info", ".pytest_cache", "runs", "test-artifacts", ".venv*"))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, str(source), "-w", str(wheels))
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", str(venv))
    python = venv / "bin" / "python"
    wheel = next(wheels.glob("*.whl"))
    # Exactly what the app needs in webui/assets: no missing icon, and no development script or screenshot.
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n.removeprefix("webui/assets/") for n in archive.namelist() if n.startswith("webui/assets/")}
        top_level = {n for n in archive.namelist() if "/" not in n}
        benchmarks = {n for n in archive.namelist() if n.startswith("benchmarks/")}
    assert shipped == APP_FILES | icons_the_app_uses(), shipped ^ (APP_FILES | icons_the_app_uses())
    assert top_level == {"app.py"}  # no tools/ program
    assert {"benchmarks/__init__.py", "benchmarks/ppl.py", "benchmarks/loadtest.py"} <= benchmarks, benchmarks
    _run(str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = textwrap.dedent("""
        import importlib, pkgutil, sys, torch, transformers, streaming_engine, app, webui
        from streaming_engine import enable_streaming_llm
        from streaming_engine.families import cache_keyword
        for module in (streaming_engine, app, webui):
            assert "site-packages" in module.__file__, module.__file__
        for found in pkgutil.iter_modules(webui.__path__):  # every module of the web app, and the library's own
            importlib.import_module("webui." + found.name)
        assert not [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]  # not the product
        from webui.assets import ASSETS
        assert (ASSETS / "style.css").is_file() and (ASSETS / "examples.json").is_file()
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=128)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        cache = enable_streaming_llm(model, 4, 12)
        out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=40, do_sample=False, pad_token_id=0,
                             eos_token_id=None, **{cache_keyword(model): cache})
        assert out.shape == (1, 43) and cache.get_seq_length() == 16, cache
        print("ok")
    """)
    assert _run(str(python), "-c", script, cwd=elsewhere).strip().endswith("ok")
    for command in ("streaming-llm-chat", "streaming-llm-app", "streaming-llm-ppl", "streaming-llm-loadtest"):
        assert "usage:" in _run(str(venv / "bin" / command), "--help", cwd=elsewhere)
    serve_installed_app_and_load_every_asset(venv, elsewhere, tmp_path, tiny_chat_model, default_tokenizer)


def serve_installed_app_and_load_every_asset(venv: Path, cwd: Path, tmp_path: Path, model, tokenizer) -> None:
    """Issue 27 item 2: the installed app, started outside the repository, serves a page whose every referenced
    asset loads (a button icon missing from the wheel is a broken image: 404/403 here)."""
    from browser_util import free_port

    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               GRADIO_TEMP_DIR=str(tmp_path / "gradio"))  # its own file cache: no copy left by another run
    command = [str(venv / "bin" / "streaming-llm-app"), "--model", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--data-dir", str(tmp_path / "data"), "--recent-size", "60"]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    base = f"http://127.0.0.1:{port}/"
    output = []
    try:
        # Wait on the server's own word that it listens (the line Gradio prints), not on a clock.
        for line in process.stdout:
            output.append(line)
            if "Running on local URL" in line:
                break
        assert process.poll() is None, "".join(output)[-3000:]
        assert any(line.startswith("Backend: transformers") for line in output), "".join(output)[-3000:]
        with urllib.request.urlopen(base, timeout=60) as response:
            page = response.read().decode()
        urls = page_asset_urls(page, base)
        # Gradio serves each icon from its own cache copy, named as the file: every button's icon is on the page.
        for name in icons_the_app_uses():
            assert any(url.endswith("/" + name.split("/")[-1]) for url in urls), (name, sorted(urls))
        failed = {}
        for url in sorted(urls):
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    status = response.status
            except urllib.error.HTTPError as err:
                status = err.code
            if status != 200:
                failed[url] = status
        assert not failed, failed
    finally:
        process.terminate()
        process.wait(timeout=60)
