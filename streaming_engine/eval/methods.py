"""Attention variants fed one token at a time, as the paper evaluates them.

Each runner answers `step(token_id) -> logits [vocab]` (the prediction for the next token) and `kv_bytes()` (KV
memory the step needed):

* `dense`: a growing cache, nothing evicted (the quality reference; memory and latency grow);
* `window`: the last `start_size + recent_size` tokens, no sinks (the baseline that collapses);
* `streaming`: `start_size` sinks + `recent_size` recent tokens with position shift (the paper);
* `streaming-noshift`: the same tokens, original positions kept (ablation);
* `recompute`: the last `start_size + recent_size` tokens re-encoded from scratch every step (sliding window with
  re-computation: the quality gold standard for a window, and quadratic cost);
* `perstep-rope` (benchmark only): the paper's reference implementation, which stores keys without RoPE and
  rotates the whole cache at in-cache positions on every step; the same outputs as `streaming`, more work.
"""

from __future__ import annotations

from collections import deque

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..cache import StartRecentKVCache, enable_streaming_llm
from ..families import find_rotary_embedding
from ..generation import forward
from ..positions import rotate_half

PPL_METHODS = ("dense", "window", "streaming", "streaming-noshift", "recompute")
BENCH_METHODS = ("dense", "streaming", "perstep-rope", "recompute")


class CacheRunner:
    """Any cache fed token by token, making room before each token when it evicts."""

    def __init__(self, model, cache, evict: bool):
        self.model, self.cache, self.evict = model, cache, evict

    def step(self, token_id: int) -> torch.Tensor:
        if self.evict:
            self.cache.evict_for_space(1)
        return forward(self.model, self.cache, [token_id])

    def kv_bytes(self) -> int:
        return self.cache.kv_bytes()

    def held(self) -> int:
        return self.cache.get_seq_length()


class RecomputeRunner:
    """Re-encode the last `window` tokens from scratch at positions 0..n-1 for every prediction."""

    def __init__(self, model, window: int):
        self.model = model
        self.tokens: deque[int] = deque(maxlen=window)
        self._kv_bytes = 0

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        self.tokens.append(token_id)
        fresh = DynamicCache()
        ids = torch.tensor([list(self.tokens)], device=self.model.device)  # [1, window]
        logits = self.model(input_ids=ids, past_key_values=fresh, use_cache=True, logits_to_keep=1).logits
        self._kv_bytes = sum(
            layer.keys.numel() * layer.keys.element_size() * 2 for layer in fresh.layers if layer.is_initialized
        )
        return logits[0, -1]

    def kv_bytes(self) -> int:
        return self._kv_bytes

    def held(self) -> int:
        return len(self.tokens)


class PerStepRopeCache(StartRecentKVCache):
    """The reference implementation's bookkeeping: keys are stored *without* RoPE and the whole cache is rotated at
    positions 0..n-1 on every forward pass, for every layer. Eviction just drops tokens."""

    def __init__(self, start_size: int, recent_size: int, rotary_emb):
        # pos_shift=True: new tokens get in-cache positions, like the reference code.
        super().__init__(start_size, recent_size, rotary_emb=rotary_emb, pos_shift=True)
        self.rotary = rotary_emb
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if length not in self._rope_cache:
            probe = torch.empty(0, device=device, dtype=torch.float32)
            cos, sin = self.rotary(probe, torch.arange(length, device=device).unsqueeze(0))  # [1, n, rot]
            self._rope_cache = {length: (cos[:, None], sin[:, None])}  # keep one length: the cache is full soon
        return self._rope_cache[length]

    def _rotate(self, x: torch.Tensor, offset: int, inverse: bool) -> torch.Tensor:
        # x: [batch, kv_heads, seq, head_dim]; rotate tokens to positions offset..offset+seq-1 (or undo that)
        cos, sin = self._cos_sin(offset + x.shape[-2], x.device)
        cos, sin = cos[..., offset:, :].to(x.dtype), sin[..., offset:, :].to(x.dtype)
        if inverse:
            sin = -sin
        rot = cos.shape[-1]
        head, tail = x[..., :rot], x[..., rot:]
        return torch.cat((head * cos + rotate_half(head) * sin, tail), dim=-1)

    def _moved_keys(self, keys: torch.Tensor, shift: int) -> torch.Tensor:
        return keys  # stored without RoPE: nothing to move

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        held = self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0
        raw = self._rotate(key_states, held, inverse=True)  # the model rotated them at in-cache positions
        keys, values = super().update(raw, value_states, layer_idx, *args, **kwargs)
        return self._rotate(keys, 0, inverse=False), values


def make_runner(method: str, model, start_size: int, recent_size: int):
    """A fresh runner for `method` with a cache of `start_size + recent_size` tokens (dense: unbounded)."""
    size = start_size + recent_size
    if method == "dense":
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        return CacheRunner(model, StartRecentKVCache(0, limit, pos_shift=False), evict=False)
    if method == "window":
        return CacheRunner(model, enable_streaming_llm(model, 0, size), evict=True)
    if method == "streaming":
        return CacheRunner(model, enable_streaming_llm(model, start_size, recent_size), evict=True)
    if method == "streaming-noshift":
        return CacheRunner(model, enable_streaming_llm(model, start_size, recent_size, pos_shift=False), evict=True)
    if method == "recompute":
        return RecomputeRunner(model, size)
    if method == "perstep-rope":
        cache = PerStepRopeCache(start_size, recent_size, find_rotary_embedding(model))
        return CacheRunner(model, cache, evict=True)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(PPL_METHODS + BENCH_METHODS[2:3])}")


def parse_methods(text: str, allowed: tuple[str, ...]) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in allowed]
    if not methods or unknown:
        raise ValueError(f"--methods takes a comma list of: {', '.join(allowed)} (got {text!r})")
    return methods
