"""`--help` of the app and of the command-line chat answers without importing torch, transformers or gradio
(issue 27 item 9: it took 7-9 s because the whole app was imported first). Each command runs in a fresh Python
that reports which of those modules it had imported once argparse exited."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "gradio")

RUNNER = """
import json, runpy, sys
target, args = sys.argv[1], sys.argv[2:]
sys.argv = [target, *args]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
else:
    code = None
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def run(target: str, *args: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", RUNNER, target, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    return json.loads(done.stderr.strip().splitlines()[-1]), done.stdout


@pytest.mark.parametrize("target", ["app.py", "streaming_engine.chat"])
def test_help_imports_no_torch_transformers_or_gradio(target):
    outcome, shown = run(target, "--help")
    assert outcome == {"code": 0, "heavy": []}
    assert "--recent-size" in shown and "--backend" in shown  # the whole help, defaults included


def test_a_mistyped_app_flag_is_refused_before_the_heavy_imports():
    outcome, _ = run("app.py", "--no-such-flag")
    assert outcome == {"code": 2, "heavy": []}
