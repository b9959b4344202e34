"""Model families: which architectures the attention-sink cache supports, and where their rotary module lives.

Position shift re-rotates cached keys (see `positions.py`), so it needs a model whose keys are cached *after* a
half-split RoPE and whose every layer is full causal attention. Anything else (learned or ALiBi positions, hybrid
sliding-window layers, linear attention) is refused with a clear error rather than silently degrading.
"""

from __future__ import annotations

import functools
import inspect

import torch

#: `config.model_type` values known to work (tested with tiny random models of each).
SUPPORTED_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gpt_neox", "falcon")


def unsupported_reason(config) -> str | None:
    """Why `config` cannot stream with attention sinks, or None when it can."""
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(SUPPORTED_FAMILIES)
    if model_type not in SUPPORTED_FAMILIES:
        return (
            f"model family {model_type!r} is not supported by StreamingLLM position shift; "
            f"supported families (RoPE, full attention): {supported}"
        )
    if model_type == "falcon" and getattr(config, "alibi", False):
        return f"this Falcon checkpoint uses ALiBi, not RoPE; supported families (RoPE, full attention): {supported}"
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        return (
            f"this {model_type} checkpoint mixes in {', '.join(other)} layers (hybrid sliding-window model); "
            f"StreamingLLM needs every layer to be full attention"
        )
    return None


def check_supported(config) -> None:
    """Raise `ValueError` naming the supported families when `config` cannot stream."""
    reason = unsupported_reason(config)
    if reason is not None:
        raise ValueError(reason)


def find_rotary_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """The model's shared rotary embedding module (`model.model.rotary_emb`, `model.gpt_neox.rotary_emb`, ...)."""
    base = getattr(model, "base_model", model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None:
        return rotary
    for _, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            return module
    raise ValueError(f"could not find a rotary embedding module in {type(model).__name__}")


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward keyword that takes a cache: `cache` in recent transformers 5.x, `past_key_values` before.

    transformers 5.24 renamed the argument and announced the old name's removal; asking the signature keeps
    us working on both sides of that change without a deprecation warning on every decode step.
    """
    return _cache_keyword_of(type(model))


@functools.lru_cache(maxsize=None)
def _cache_keyword_of(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
