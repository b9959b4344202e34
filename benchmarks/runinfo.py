"""Where a benchmark number came from: the machine, the settings and the command, detected by the script itself.

Every evaluation script that writes a JSON result puts `run_metadata(...)` under its `PROVENANCE_KEY`, so a figure
in the docs can be traced to the exact command line, the parsed options, the code's git commit and the machine
(CPU model and flags, cores, memory, GPUs, library versions) without anyone adding a field by hand. Everything here
is read at run time; a fact that cannot be read is recorded as None, never guessed.

Boundary: this module only describes a run; it neither measures nor decides anything. torch is imported when a
machine is described, not at import, and the CPU facts come from the torch-free `modelfiles`, so the HTTP-only
load test stays an HTTP client.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from streaming_engine.modelfiles import NATIVE_BF16_CPU_FLAGS, cpu_flags, cpu_model_name

#: The key of a result JSON that holds its provenance (one name for every script, so checks can find it).
PROVENANCE_KEY = "provenance"
#: Distributions whose versions change numbers (kernels, tokenization, quantized arithmetic); missing ones are None.
VERSIONED_PACKAGES = ("torch", "transformers", "accelerate", "llama_cpp_python", "numpy", "gradio")
#: How long `git` may take to say the commit before the run is recorded without one.
GIT_TIMEOUT_S = 10.0


def _usable_cores() -> int | None:
    """Cores this process may run on (a container or `taskset` can allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # psutil missing or the platform unsupported: memory is then unknown, not zero
        return None


def _gpus(torch) -> list[dict]:
    """Name and memory of each visible CUDA device; empty without CUDA (never raises for lack of a GPU)."""
    try:
        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out.append({"index": i, "name": props.name, "memory_bytes": int(props.total_memory)})
        return out
    except Exception:  # a broken driver must not lose the run's result: record that no GPU could be read
        return []


def package_version(distribution: str) -> str | None:
    """The installed version of `distribution`, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """Facts about the machine running this process, as detected now."""
    import torch

    flags = cpu_flags()
    return {
        "cpu": cpu_model_name(),
        "cpu_flags": " ".join(sorted(flags)),  # one string, as /proc/cpuinfo has it: ~100 flags
        "cpu_native_bf16": sorted(flags & NATIVE_BF16_CPU_FLAGS),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _memory_bytes(),
        "gpus": _gpus(torch),
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: package_version(name) for name in VERSIONED_PACKAGES},
    }


def json_safe(value: Any) -> Any:
    """`value` as plain JSON types: paths and unknown objects as strings, tuples and sets as lists."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(json_safe(v) for v in value)
    return str(value)


def command_line(prog: str, argv: Sequence[str]) -> str:
    """The shell command that reruns this: `prog` (e.g. `python -m benchmarks.bench`) plus `argv`,
    shell-quoted so that `shlex.split` gives the same words back."""
    return shlex.join([*shlex.split(prog), *argv])


def git_commit(where: Path | None = None) -> dict:
    """`{"commit": sha or None, "dirty": bool or None}` of the checkout holding this code (None outside git)."""
    where = where or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=GIT_TIMEOUT_S)
        if sha.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return {"commit": sha.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def run_metadata(args: argparse.Namespace, argv: Sequence[str] | None, prog: str) -> dict:
    """What produced a result: `command` (rerunnable), `config` (every parsed option, after the script's own
    adjustments such as `--quick`), `machine`, `date` (UTC) and `git`.

    `argv` is the list given to `main` (None: the process's `sys.argv[1:]`, as argparse reads it); `prog` is how the
    script is started, `parser.prog` for the evaluation CLIs.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    return {
        "command": command_line(prog, words),
        "config": json_safe(vars(args)),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
    }


def with_provenance(payload: dict, run: dict) -> dict:
    """`payload` with `run` (from `run_metadata`) under `PROVENANCE_KEY`; every existing key stays as it was."""
    if PROVENANCE_KEY in payload:
        raise ValueError(f"the result already has a {PROVENANCE_KEY!r} field")
    return {**payload, PROVENANCE_KEY: run}


def write_result(path: str | Path, payload: dict, run: dict) -> Path:
    """Write `payload` plus its provenance `run` as JSON at `path` (folders made as needed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(with_provenance(payload, run), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
