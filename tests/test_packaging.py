"""The package: `pip install .` gives a working library and web app outside the repository, and the requirement
files CI and Spaces install from say the same as pyproject.toml."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
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


@pytest.mark.packaging
def test_pip_install_gives_a_library_and_app_that_work_from_any_directory(tmp_path):
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
    _run(str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = textwrap.dedent("""
        import torch, transformers, streaming_engine, app, webui
        from streaming_engine import enable_streaming_llm
        from streaming_engine.families import cache_keyword
        for module in (streaming_engine, app, webui):
            assert "site-packages" in module.__file__, module.__file__
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
    for command in ("streaming-llm-chat", "streaming-llm-app"):
        assert "usage:" in _run(str(venv / "bin" / command), "--help", cwd=elsewhere)
