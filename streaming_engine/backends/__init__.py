"""Backends: which one runs the model (`choice`: `--backend`, what `auto` means) and the seam the engine talks
through (`base.Backend`; `hf` for transformers, `llama` for llama.cpp; `factory.backend_for` picks one for a loaded
model). See `base.py` for the seam and docs/backends.md for how to add a backend.

Only the torch-free choice is imported here (`--help` and `webui.settings` read `BACKENDS` without torch); import
`streaming_engine.backends.factory` (or `.base`, `.hf`, `.llama`) for the rest.
"""

from .choice import (
    AUTO_REASON,
    BACKENDS,
    backend_line,
    check_backend,
    choose_backend,
    is_gguf,
    is_llamacpp_model,
    resolve_backend,
)

__all__ = ["AUTO_REASON", "BACKENDS", "backend_line", "check_backend", "choose_backend", "is_gguf",
           "is_llamacpp_model", "resolve_backend"]
