"""Backend selection, the top of the seam: `model_loader(name)`, how `loading.load` loads a model for the backend it
resolved, and `backend_for(model, config)`, the one place that looks at a loaded model to decide which `Backend`
runs it."""

from __future__ import annotations

from typing import Callable

from .base import Backend
from .choice import is_llamacpp_model
from .hf import TransformersBackend
from .llama import LlamaCppBackend


def backend_for(model, config) -> Backend:
    """The backend for `model` (what `load` returned) under `config` (an `EngineConfig`): llama.cpp for a
    `LlamaCppModel` (its context is sized from `config`), transformers for anything else."""
    if is_llamacpp_model(model):
        return LlamaCppBackend(model, config)
    return TransformersBackend(model)


def model_loader(backend: str) -> Callable | None:
    """The loader of a resolved backend name (`choice.resolve_backend`) that loads its own kind of model
    (`LlamaCppBackend.load_model`: a GGUF through llama.cpp), or None where `loading.load` loads a transformers
    model itself."""
    return LlamaCppBackend.load_model if backend == LlamaCppBackend.name else None
