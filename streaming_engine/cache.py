"""The attention-sink KV cache: keep `start_size` sink tokens plus the last `recent_size` tokens.

`StartRecentKVCache` is a `transformers.Cache` (a list of ordinary `DynamicLayer`s), so it is passed straight to
`model(input_ids, past_key_values=cache)`; no attention code is patched. It only decides *which* tokens stay.
Where the kept tokens sit afterwards is `positions.py`'s job: after an eviction the keys behind the gap are
re-rotated once, so every kept key is exactly as if it had been encoded at its new in-cache position.

Eviction is explicit, as in the paper's reference code: call `evict_for_space(n)` before feeding `n` tokens (the
cache then never holds more than `cache_size` tokens, even inside the forward pass), or `trim()` after a step.
Layout of the sequence axis at any time::

    [ sinks: start_size | ......evicted...... | recent window: up to recent_size ]
      never evicted by                          oldest evicted first
      evict_for_space / trim
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .families import check_supported, find_rotary_embedding
from .positions import rotation_for_offset, shift_keys


class StartRecentKVCache(Cache):
    """Sinks + recent-window KV cache with StreamingLLM position shift.

    Attributes: `start_size`, `recent_size`, `cache_size` (their sum), `pos_shift`, and the counters
    `seen_tokens` (every token ever appended) and `evicted_tokens` (every token evicted), so that
    `seen_tokens == get_seq_length() + evicted_tokens` always holds.
    """

    def __init__(
        self,
        start_size: int = 4,
        recent_size: int = 2000,
        *,
        rotary_emb: torch.nn.Module | None = None,
        pos_shift: bool = True,
    ):
        for name, value in (("start_size", start_size), ("recent_size", recent_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if start_size < 0:
            raise ValueError(f"start_size must be >= 0, got {start_size}")
        if recent_size < 1:
            raise ValueError(f"recent_size must be >= 1, got {recent_size}")
        if pos_shift and rotary_emb is None:
            raise ValueError(
                "pos_shift=True needs the model's rotary embedding: use enable_streaming_llm(model, ...) "
                "or pass rotary_emb=..."
            )
        super().__init__(layer_class_to_replicate=DynamicLayer)
        self.start_size = start_size
        self.recent_size = recent_size
        self.cache_size = start_size + recent_size
        self.pos_shift = pos_shift
        self.rotary_emb = rotary_emb
        self.seen_tokens = 0
        self.evicted_tokens = 0
        # Index in the whole stream of every held token; tests and the UI use it to see what survived.
        self._stream_index = torch.empty(0, dtype=torch.long)

    def new(self) -> "StartRecentKVCache":
        """A fresh, empty cache with the same sizes and model binding (one per conversation)."""
        return StartRecentKVCache(
            self.start_size, self.recent_size, rotary_emb=self.rotary_emb, pos_shift=self.pos_shift
        )

    # --- transformers Cache interface -------------------------------------------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states: [batch, kv_heads, new_tokens, head_dim], already rotated at their in-cache positions.
        if layer_idx == 0:
            new = key_states.shape[-2]
            self._stream_index = torch.cat(
                (self._stream_index, torch.arange(self.seen_tokens, self.seen_tokens + new))
            )
            self.seen_tokens += new
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reset(self) -> None:
        """Drop every token and zero the counters (the cache object stays usable)."""
        self.layers = []
        self.seen_tokens = 0
        self.evicted_tokens = 0
        self._stream_index = torch.empty(0, dtype=torch.long)

    # --- eviction ---------------------------------------------------------------------------------------------

    def evict_range(self, start: int, end: int) -> int:
        """Evict tokens `[start, end)` of the current cache (sinks included if named); returns how many."""
        held = self.get_seq_length()
        if not (0 <= start <= end <= held):
            raise ValueError(f"evict_range({start}, {end}) is outside the {held} tokens held")
        count = end - start
        if count == 0:
            return 0
        rotations: dict = {}  # device -> (cos, sin): one rotation per eviction, shared by every layer on a device
        for layer in self.layers:
            if not layer.is_initialized or layer.get_seq_length() == 0:
                continue
            keys, values = layer.keys, layer.values  # [batch, kv_heads, held, head_dim]
            tail = self._moved_keys(keys[:, :, end:], count, rotations)
            layer.keys = torch.cat((keys[:, :, :start], tail), dim=-2)
            layer.values = torch.cat((values[:, :, :start], values[:, :, end:]), dim=-2)
        self._stream_index = torch.cat((self._stream_index[:start], self._stream_index[end:]))
        self.evicted_tokens += count
        return count

    def _moved_keys(self, keys: torch.Tensor, shift: int, rotations: dict) -> torch.Tensor:
        """Keys that sat behind an evicted gap of `shift` tokens, placed at their new positions."""
        if not self.pos_shift or shift == 0 or keys.shape[-2] == 0:
            return keys
        if keys.device not in rotations:
            rotations[keys.device] = rotation_for_offset(self.rotary_emb, -shift, keys.device)
        return shift_keys(keys, shift, self.rotary_emb, rotations[keys.device])

    def evict_for_space(self, num_coming: int) -> int:
        """Evict the oldest non-sink tokens so `num_coming` more fit in `cache_size`; returns how many.

        No-op when they already fit. Sinks are never evicted here, so when `num_coming > recent_size` the whole
        recent window goes and the caller must feed its tokens in chunks.
        """
        if num_coming < 0:
            raise ValueError(f"num_coming must be >= 0, got {num_coming}")
        held = self.get_seq_length()
        overflow = held + num_coming - self.cache_size
        count = min(overflow, held - self.start_size)
        if count <= 0:
            return 0
        return self.evict_range(self.start_size, self.start_size + count)

    def trim(self) -> int:
        """Evict down to `cache_size` tokens (the reference code's per-step behaviour); returns how many."""
        return self.evict_for_space(0)

    def __call__(self, past_key_values=None) -> "StartRecentKVCache":
        """Reference-code style `past = kv_cache(past)`: trims and returns this cache."""
        self.trim()
        return self

    # --- hand-over to and from a batch row (see batch_cache.py) ----------------------------------------------

    def _take_tokens(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Every layer's `(keys, values)` `[1, kv_heads, held, head_dim]` and the stream index of each held token,
        leaving this cache empty; the counters stay (the batch row that takes the tokens carries them on)."""
        layers = [(layer.keys, layer.values) for layer in self.layers if layer.is_initialized]
        stream_index = self._stream_index
        self.layers = []
        self._stream_index = torch.empty(0, dtype=torch.long)
        return layers, stream_index

    def _put_tokens(self, layers: list[tuple[torch.Tensor, torch.Tensor]], stream_index: torch.Tensor,
                    seen_tokens: int, evicted_tokens: int) -> None:
        """Hold exactly `layers` (as `_take_tokens` returns them) with these counters, replacing what was held."""
        self.layers = []
        for keys, values in layers:
            layer = DynamicLayer()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            self.layers.append(layer)
        self._stream_index = stream_index
        self.seen_tokens = seen_tokens
        self.evicted_tokens = evicted_tokens

    # --- introspection ----------------------------------------------------------------------------------------

    @property
    def stream_positions(self) -> list[int]:
        """Index in the whole stream of every token held, in cache order."""
        return self._stream_index.tolist()

    def kv_bytes(self) -> int:
        """Bytes held by keys and values across all layers."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total

    def __repr__(self) -> str:
        return (
            f"StartRecentKVCache(start_size={self.start_size}, recent_size={self.recent_size}, "
            f"held={self.get_seq_length()}, seen={self.seen_tokens}, evicted={self.evicted_tokens}, "
            f"pos_shift={self.pos_shift})"
        )


def enable_streaming_llm(
    model: torch.nn.Module, start_size: int = 4, recent_size: int = 2000, pos_shift: bool = True
) -> StartRecentKVCache:
    """Bind a fresh `StartRecentKVCache` to `model` (the paper's reference-code entry point).

    Raises `ValueError` naming the supported families when the model cannot stream. Call it again, or call
    `.new()` on the result, for another conversation.
    """
    check_supported(model.config)
    return StartRecentKVCache(
        start_size, recent_size, rotary_emb=find_rotary_embedding(model), pos_shift=pos_shift
    )
