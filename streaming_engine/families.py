"""Model families: which architectures the attention-sink cache supports, and how each layer carries positions.

Position shift re-rotates cached keys (see `positions.py`), so it needs keys cached *after* a half-split RoPE (or
with no positional rotation at all). Per decoder layer this module answers two questions from the config alone:

* **how keys carry their position** (`layer_rope_kinds`): through the model's shared rotary module (most
  families), through a per-layer-type frequency set of that module (Gemma 3: local and global layers use different
  RoPE bases), or not at all (SmolLM3's NoPE layers, whose keys never need re-rotating);
* **what the layer attends to** (`layer_windows`): every held token (full attention) or only the model's own
  sliding window over the held tokens (Gemma 2/3 local layers, Mistral/Phi-3 checkpoints with `sliding_window`).
  The cache holds the same tokens on every layer and the model's own masks apply the window over in-cache
  positions, which is exactly what re-encoding the kept tokens would do.

Anything else (learned or ALiBi positions, chunked or linear attention layers) is refused with a clear error
rather than silently degrading.
"""

from __future__ import annotations

import functools
import inspect

import torch

#: `config.model_type` values known to work (each tested with tiny random models, see tests/test_cache.py).
SUPPORTED_FAMILIES: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "gpt_neox", "falcon",            # RoPE, full attention
    "qwen3", "phi3", "olmo2", "granite", "smollm3", "gemma",        # RoPE with q/k norms, partial rotary, NoPE layers
    "gemma2", "gemma3_text",                                        # hybrid: local sliding-window + global layers
)
#: Attention layer types the cache can serve (`config.layer_types` entries).
FULL, SLIDING = "full_attention", "sliding_attention"
SUPPORTED_LAYER_TYPES = (FULL, SLIDING)
#: `layer_rope_kinds` entry for a layer whose keys use the rotary module's one frequency set.
SHARED_ROPE = ""


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def layer_types(config) -> list[str]:
    """Attention type of every decoder layer: `config.layer_types` when the config has it; otherwise every layer
    is local when the config names a `sliding_window` (Mistral, Phi-3) and global when it does not."""
    config = _text_config(config)
    count = int(getattr(config, "num_hidden_layers", 0) or 0)
    declared = getattr(config, "layer_types", None)
    if declared:
        return list(declared)
    return [SLIDING if getattr(config, "sliding_window", None) else FULL] * count


def layer_windows(config) -> list[int | None]:
    """Per decoder layer: the model's sliding window (tokens a query may see, itself included) or None."""
    window = getattr(_text_config(config), "sliding_window", None)
    return [window if t == SLIDING else None for t in layer_types(config)]


def unsupported_reason(config) -> str | None:
    """Why `config` cannot stream with attention sinks, or None when it can."""
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(SUPPORTED_FAMILIES)
    if model_type not in SUPPORTED_FAMILIES:
        return (
            f"model family {model_type!r} is not supported by StreamingLLM position shift; "
            f"supported families (RoPE; full or sliding-window attention): {supported}"
        )
    if model_type == "falcon" and getattr(config, "alibi", False):
        return f"this Falcon checkpoint uses ALiBi, not RoPE; supported families (RoPE, full attention): {supported}"
    other = sorted({t for t in layer_types(config) if t not in SUPPORTED_LAYER_TYPES})
    if other:
        return (
            f"this {model_type} checkpoint has {', '.join(other)} layers; StreamingLLM supports layers of type "
            f"{' and '.join(SUPPORTED_LAYER_TYPES)} only"
        )
    if SLIDING in layer_types(config) and not getattr(_text_config(config), "sliding_window", None):
        return f"this {model_type} checkpoint declares sliding_attention layers but no sliding_window"
    return None


def check_supported(config) -> None:
    """Raise `ValueError` naming the supported families when `config` cannot stream."""
    reason = unsupported_reason(config)
    if reason is not None:
        raise ValueError(reason)


def check_cache_size(config, cache_size: int) -> None:
    """Refuse a cache size the model cannot stream with. When *every* layer is local (Mistral, Phi-3 with a
    `sliding_window`), a cache longer than the window pushes the attention sinks out of every layer's view, so it
    would silently be plain window attention (hybrid models keep the sinks visible on their global layers); and
    RoPE that changes frequencies with length (LongRoPE, dynamic NTK) must stay below its switch."""
    _check_rope_scaling(_text_config(config), cache_size)
    windows = layer_windows(config)
    if windows and all(w is not None for w in windows):
        window = min(windows)
        if cache_size > window:
            raise ValueError(
                f"every layer of this {getattr(config, 'model_type', '?')} checkpoint attends only to its last "
                f"{window} tokens (sliding_window), so a cache of {cache_size} tokens would hide the attention "
                f"sinks from every layer: use start_size + recent_size <= {window}"
            )


def _check_rope_scaling(config, cache_size: int) -> None:
    """LongRoPE and dynamic NTK switch frequencies once positions pass the original context; a key re-rotated
    with the other set would land in the wrong place, so in-cache positions must stay below that switch."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) not in ("longrope", "dynamic"):
        return
    original = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    if original and cache_size > original:
        raise ValueError(
            f"this checkpoint's {rope.get('rope_type', rope.get('type'))} RoPE changes frequencies past "
            f"{original} positions, so position shift needs start_size + recent_size <= {original} "
            f"(got {cache_size})"
        )


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


def rotary_takes_layer_type(rotary_emb: torch.nn.Module) -> bool:
    """True when the rotary module keeps one frequency set per layer type and must be told which (Gemma 3)."""
    return "layer_type" in inspect.signature(rotary_emb.forward).parameters


def layer_rope_kinds(model: torch.nn.Module, rotary_emb: torch.nn.Module | None = None) -> tuple[str | None, ...]:
    """How each decoder layer's cached keys carry their position.

    Entries: `SHARED_ROPE` (the rotary module's frequencies), a layer-type name (the rotary module's frequencies
    for that type, Gemma 3), or None (no rotary at all: SmolLM3's NoPE layers, never re-rotated).
    """
    config = _text_config(model.config)
    types = layer_types(config)
    rotary_emb = rotary_emb if rotary_emb is not None else find_rotary_embedding(model)
    per_type = rotary_takes_layer_type(rotary_emb)
    uses_rope = getattr(config, "no_rope_layers", None) or [1] * len(types)
    return tuple(
        (layer_type if per_type else SHARED_ROPE) if uses_rope[i] else None for i, layer_type in enumerate(types)
    )


def batchable(model: torch.nn.Module) -> bool:
    """Whether conversations on `model` can share one batched forward pass (`batch_cache.BatchedSinkCache`).

    The batched cache keeps each row's recent window as a ring, so columns are not in stream order; that is
    invisible to full attention (positions live in the rotated keys) but not to a local layer's sliding window,
    which masks by column. It also re-rotates every layer with the shared rotary frequencies. Hybrid models
    (local layers, or per-layer-type RoPE as in Gemma 3) therefore decode one conversation per forward pass.
    """
    if any(window is not None for window in layer_windows(model.config)):
        return False
    return all(kind in (SHARED_ROPE, None) for kind in layer_rope_kinds(model))


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
