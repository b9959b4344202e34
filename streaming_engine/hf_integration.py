"""Driving a stock transformers model with a `StartRecentKVCache` and no engine: `model.generate()` and single steps.

transformers' `generate()` knows nothing about eviction: it computes position ids as a count of every token so
far (stream positions, not in-cache ones) and would let the cache grow without bound. `enable_streaming_llm`
therefore installs one forward *pre-hook* on the model (a documented PyTorch mechanism; attention code stays
stock). It is a no-op unless the forward pass gets a `StartRecentKVCache` with `auto_evict` on, which
`generate()` switches on when it takes the cache (it marks a cache it was handed, from transformers 5.17 on; see
`StartRecentKVCache._is_user_defined`). Then, before every forward pass, the hook:

1. makes room for the incoming tokens (`evict_for_space`), exactly as the engine does before each step;
2. replaces the position ids by in-cache positions (`positions.next_position_ids`, the one place positions are
   decided), so the text equals the engine's greedy output token for token;
3. drops generate's 2-D attention mask when it is all ones (the mask then comes from the cache's own length);
   a padded batch is refused, because its mask indexes the whole stream, not the held tokens;
4. on the first pass of a `generate()` call on a cache that has already evicted tokens, lines generate's input up
   with the cache: transformers' convention is that the caller passes the *full* sequence (everything fed before
   plus the new tokens) and it slices off as many tokens as the cache reports held, so `evicted_tokens` already
   seen tokens arrive again and are skipped here.

A prompt longer than the recent window cannot go in one pass without losing itself; the hook refuses it and names
`generate(..., prefill_chunk_size=N)`, which makes generate feed the prompt in chunks with eviction in between.
`stream_forward` is the same step for hand-written loops, passing the cache under the keyword this transformers
version expects (`cache=` from 5.24, `past_key_values=` before), so a loop raises no deprecation warning.
"""

from __future__ import annotations

import torch

from .cache import StartRecentKVCache
from .defaults import DEFAULT_RECENT_SIZE, DEFAULT_START_SIZE
from .families import cache_keyword, check_cache_size, check_supported, find_rotary_embedding, layer_rope_kinds
from .positions import next_position_ids

_HOOK_ATTR = "_streaming_llm_hook"
_CACHE_KEYWORDS = ("cache", "past_key_values")


def enable_streaming_llm(
    model: torch.nn.Module,
    start_size: int = DEFAULT_START_SIZE,
    recent_size: int = DEFAULT_RECENT_SIZE,
    pos_shift: bool = True,
    *,
    auto_evict: bool = False,
    pin: int = 0,
    eviction: str = "tokens",
    evict_block: int = 1,
) -> StartRecentKVCache:
    """Bind a fresh `StartRecentKVCache` to `model` (the paper's reference-code entry point).

    `pin=n` protects the first `n` tokens fed (e.g. a system prompt) from eviction, besides the sinks;
    `eviction="turns"` evicts whole messages between the boundaries marked with `cache.mark_boundary()`;
    `evict_block=k` makes every eviction take at least `k` tokens (1, the default, is the reference code's
    token-by-token eviction; the engine uses `eviction.DEFAULT_EVICT_BLOCK`, see docs/block-eviction.md).

    Raises `ValueError` naming the supported families when the model cannot stream. Also installs the model hook
    that lets `model.generate(ids, past_key_values=cache)` (or any forward pass with `auto_evict=True`) evict as it
    goes and place tokens at in-cache positions (see `hf_integration.py`). Call it again, or call `.new()` on the
    result, for another conversation.
    """
    check_supported(model.config)
    check_cache_size(model.config, start_size + recent_size)
    rotary = find_rotary_embedding(model)
    install_hook(model)
    return StartRecentKVCache(
        start_size, recent_size, rotary_emb=rotary, pos_shift=pos_shift,
        layer_rope=layer_rope_kinds(model, rotary), auto_evict=auto_evict, pin=pin, eviction=eviction,
        evict_block=evict_block,
    )


def install_hook(model: torch.nn.Module) -> None:
    """Register the StreamingLLM pre-hook on `model` once (idempotent)."""
    if getattr(model, _HOOK_ATTR, None) is None:
        handle = model.register_forward_pre_hook(_before_forward, with_kwargs=True)
        setattr(model, _HOOK_ATTR, handle)


def _streaming_cache(kwargs: dict):
    for keyword in _CACHE_KEYWORDS:
        cache = kwargs.get(keyword)
        if isinstance(cache, StartRecentKVCache):
            return cache
    return None


def _before_forward(module, args: tuple, kwargs: dict):
    cache = _streaming_cache(kwargs)
    if cache is None or not cache.auto_evict:
        return None
    args, kwargs = list(args), dict(kwargs)
    name = "input_ids" if (args or kwargs.get("input_ids") is not None) else "inputs_embeds"
    tokens = args[0] if args else kwargs[name]  # [batch, n] ids or [batch, n, hidden] embeddings

    if cache._generate_starting:
        cache._generate_starting = False
        tokens = _skip_already_fed(cache, tokens)

    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool(mask.all())):
            raise ValueError(
                "StartRecentKVCache cannot follow an attention mask with padding (it indexes the whole stream, "
                "while the cache holds only sinks and recent tokens): generate one unpadded prompt at a time"
            )
        kwargs["attention_mask"] = None  # all ones: the causal mask follows from the cache's length

    count = tokens.shape[1]
    cache.evict_for_space(count)
    if cache.get_seq_length() + count > cache.cache_size:
        raise ValueError(
            f"{count} tokens cannot go through a {cache.start_size} + {cache.recent_size} token cache in one "
            f"forward pass (they would evict one another): pass prefill_chunk_size=N with N <= "
            f"{cache.recent_size} to generate(), or feed the tokens in chunks"
        )
    kwargs["position_ids"] = next_position_ids(cache, count, tokens.device).expand(tokens.shape[0], -1)
    if args:
        args[0] = tokens
    else:
        kwargs[name] = tokens
    cache._prepared_forward = True
    return tuple(args), kwargs


def _skip_already_fed(cache, tokens: torch.Tensor) -> torch.Tensor:
    """generate() re-sends `evicted_tokens` tokens the cache has already seen (it slices by tokens *held*)."""
    already = cache.evicted_tokens
    if already == 0:
        return tokens
    if tokens.shape[1] <= already:
        raise ValueError(
            f"generate() continues a StartRecentKVCache from the full sequence: pass every token fed so far "
            f"({cache.seen_tokens}) followed by the new ones (got {cache.get_seq_length() + tokens.shape[1]}); "
            f"with prefill_chunk_size, make the first chunk longer than the {already} evicted tokens"
        )
    return tokens[:, already:]


@torch.inference_mode()
def stream_forward(model: torch.nn.Module, cache, input_ids: torch.Tensor, **kwargs):
    """One forward pass of `input_ids` (`[batch, n]`) on top of `cache`: room is made first, the tokens get
    in-cache positions and the cache goes in under the keyword this transformers version expects. Returns the
    model's output (`.logits`: `[batch, n, vocab]`, or the last position only with `logits_to_keep=1`)."""
    cache.evict_for_space(input_ids.shape[1])
    return model(
        input_ids=input_ids,
        position_ids=next_position_ids(cache, input_ids.shape[1], input_ids.device),
        use_cache=True,
        **{cache_keyword(model): cache},
        **kwargs,
    )
