"""`backend_for(model, config)`: the one place that looks at a loaded model to decide which `Backend` runs it."""

from __future__ import annotations

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
