"""The attention-sink KV cache: keep `start_size` sink tokens plus the last `recent_size` tokens.

`StartRecentKVCache` is a `transformers.Cache` (a list of ordinary `DynamicLayer`s), so it is passed straight to
the model's forward (`past_key_values=` / `cache=`, see `families.cache_keyword`); no attention code is patched.
It only decides *which* tokens stay. Where the kept tokens sit afterwards is `positions.py`'s job: after an
eviction the keys behind the gap are re-rotated once (per layer with that layer's own RoPE frequencies; layers
without RoPE are left alone), so every kept key is exactly as if it had been encoded at its new in-cache position.
Every layer holds the same tokens; local (sliding-window) layers see only the model's window of them, applied by
the model's own masks over in-cache positions (see `families.py`).

Eviction is explicit, as in the paper's reference code: call `evict_for_space(n)` before feeding `n` tokens (the
cache then never holds more than `cache_size` tokens, even inside the forward pass), or `trim()` after a step.
With `auto_evict` on (set by `model.generate()`, see `hf_integration.py`) every forward pass does that itself.
Layout of the sequence axis at any time::

    [ protected head: max(start_size, pinned) | ......evicted...... | recent window: the rest of cache_size ]
      never evicted by evict_for_space / trim                         oldest evicted first

The protected head is the attention sinks, or a longer *pinned* prefix (`pin(n)`, e.g. a chat's system prompt)
that stays for the whole stream; `cache_size` does not grow with it, the recent window gives up the room. Under
the "turns" policy (`eviction="turns"`) an eviction is rounded up to the next message boundary recorded with
`mark_boundary` (see `eviction.py`), so whole past messages leave together. With `evict_block=k` an eviction takes
at least `k` tokens (`eviction.tokens_needed`), so a long reply evicts (and re-rotates) once per `k` tokens.
"""

from __future__ import annotations

import warnings

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .defaults import DEFAULT_RECENT_SIZE, DEFAULT_START_SIZE  # noqa: F401  (their home is defaults.py)
from .eviction import ProtectedHead, check_evict_block, check_policy
from .families import SHARED_ROPE
from .positions import rotation_for_offset, shift_keys
from .validate import check_int


class StartRecentKVCache(ProtectedHead, Cache):
    """Sinks + recent-window KV cache with StreamingLLM position shift.

    Attributes: `start_size`, `recent_size`, `cache_size` (their sum), `pos_shift`, and the counters
    `seen_tokens` (every token ever appended) and `evicted_tokens` (every token evicted), so that
    `seen_tokens == get_seq_length() + evicted_tokens` always holds. `pinned`: the first `pinned` tokens held are
    never evicted (`pin`); `protected` is `max(start_size, pinned)`. `eviction`: "tokens" (the paper) or "turns"
    (whole messages between the stream positions in `boundaries`, see `mark_boundary`). `evict_block`: fewest tokens
    one eviction takes (1: token by token, the paper's reference code). `layer_rope` says per layer how its keys
    carry their position (`families.layer_rope_kinds`; None: every layer uses the rotary module's one
    frequency set). `auto_evict`: every forward pass this cache takes part in makes room for its tokens and
    places them at in-cache positions itself (needs the model hook that `enable_streaming_llm` installs).
    """

    def __init__(
        self,
        start_size: int = DEFAULT_START_SIZE,
        recent_size: int = DEFAULT_RECENT_SIZE,
        *,
        rotary_emb: torch.nn.Module | None = None,
        pos_shift: bool = True,
        layer_rope: tuple[str | None, ...] | None = None,
        auto_evict: bool = False,
        pin: int = 0,
        eviction: str = "tokens",
        evict_block: int = 1,
    ):
        check_int("start_size", start_size, 0)
        check_int("recent_size", recent_size, 1)
        check_policy(eviction)
        check_evict_block(evict_block, recent_size)
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
        self.layer_rope = tuple(layer_rope) if layer_rope is not None else None
        self.auto_evict = bool(auto_evict)
        self.eviction = eviction
        self.evict_block = evict_block
        self.pinned = 0
        #: Sorted stream positions where a message begins (only read under the "turns" policy).
        self.boundaries: list[int] = []
        # Set by the model hook right before a forward pass it prepared; checked by `update` (see `hf_integration`).
        self._prepared_forward = False
        # Set when `model.generate()` takes this cache; the hook then lines up generate's full-sequence input.
        self._generate_starting = False
        self._handed_to_generate = False
        self.seen_tokens = 0
        self.evicted_tokens = 0
        # Index in the whole stream of every held token; tests and the UI use it to see what survived.
        self._stream_index = torch.empty(0, dtype=torch.long)
        self.pin(pin)

    def new(self) -> "StartRecentKVCache":
        """A fresh, empty cache with the same sizes, pinned head, policy and model binding (one per conversation)."""
        return StartRecentKVCache(
            self.start_size, self.recent_size, rotary_emb=self.rotary_emb, pos_shift=self.pos_shift,
            layer_rope=self.layer_rope, auto_evict=self.auto_evict, pin=self.pinned, eviction=self.eviction,
            evict_block=self.evict_block,
        )

    # --- transformers Cache interface -------------------------------------------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states: [batch, kv_heads, new_tokens, head_dim], already rotated at their in-cache positions.
        if layer_idx == 0:
            if self.auto_evict and not self._prepared_forward:
                # Without the hook nothing evicted or placed these tokens: refuse rather than grow silently.
                raise RuntimeError(
                    "this StartRecentKVCache has auto_evict on but the model has no StreamingLLM hook, so nothing "
                    "would evict: create the cache with enable_streaming_llm(model, start_size, recent_size)"
                )
            self._prepared_forward = False
            new = key_states.shape[-2]
            self._stream_index = torch.cat(
                (self._stream_index, torch.arange(self.seen_tokens, self.seen_tokens + new))
            )
            self.seen_tokens += new
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def _is_user_defined(self) -> bool:
        return self._handed_to_generate

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        # transformers' generate() sets this flag on a cache it was handed, once per call, before the first forward
        # pass: the one moment a cache learns that generate (which neither evicts nor knows in-cache positions) is
        # about to drive it. From then on every forward pass makes room and places its tokens (`auto_evict`).
        self._handed_to_generate = bool(value)
        if value:
            self.auto_evict = True
            self._generate_starting = True

    @property
    def is_croppable(self) -> bool:
        """False: an eviction cannot be undone, so generate() must not plan on rolling this cache back."""
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "StartRecentKVCache cannot roll back tokens (evicted ones are gone), so assisted / speculative decoding "
            "is not supported with it; use plain greedy or sampled generate(), or the StreamingEngine"
        )

    def reset(self) -> None:
        """Drop every token and zero the counters (the cache object stays usable)."""
        self.layers = []
        self.seen_tokens = 0
        self.evicted_tokens = 0
        self._stream_index = torch.empty(0, dtype=torch.long)
        self.boundaries = []

    # --- eviction ---------------------------------------------------------------------------------------------

    def evict_range(self, start: int, end: int) -> int:
        """Evict tokens `[start, end)` of the current cache (sinks included if named, pinned tokens never);
        returns how many."""
        count = self._range_to_evict(start, end)
        if count == 0:
            return 0
        # (device, rope kind) -> (cos, sin): one rotation per eviction, shared by every layer of that kind
        rotations: dict = {}
        for index, layer in enumerate(self.layers):
            if not layer.is_initialized or layer.get_seq_length() == 0:
                continue
            keys, values = layer.keys, layer.values  # [batch, kv_heads, held, head_dim]
            tail = self._moved_keys(keys[:, :, end:], count, rotations, self._rope_kind(index))
            layer.keys = torch.cat((keys[:, :, :start], tail), dim=-2)
            layer.values = torch.cat((values[:, :, :start], values[:, :, end:]), dim=-2)
        self._stream_index = torch.cat((self._stream_index[:start], self._stream_index[end:]))
        self.evicted_tokens += count
        return count

    def _rope_kind(self, layer_idx: int) -> str | None:
        if self.layer_rope is None or layer_idx >= len(self.layer_rope):
            return SHARED_ROPE
        return self.layer_rope[layer_idx]

    def _moved_keys(self, keys: torch.Tensor, shift: int, rotations: dict, kind: str | None) -> torch.Tensor:
        """Keys that sat behind an evicted gap of `shift` tokens, placed at their new positions."""
        if not self.pos_shift or shift == 0 or keys.shape[-2] == 0 or kind is None:  # None: a layer without RoPE
            return keys
        key = (keys.device, kind)
        if key not in rotations:
            rotations[key] = rotation_for_offset(self.rotary_emb, -shift, keys.device, kind or None)
        return shift_keys(keys, shift, self.rotary_emb, rotations[key])

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
            f"pinned={self.pinned}, eviction={self.eviction!r}, evict_block={self.evict_block}, "
            f"pos_shift={self.pos_shift})"
        )


def __getattr__(name: str):
    # `enable_streaming_llm` lived here until it moved beside the hook it installs (`hf_integration`), which broke
    # the import circle between the two modules; the old path works for one more release.
    if name == "enable_streaming_llm":
        from .hf_integration import enable_streaming_llm

        warnings.warn("streaming_engine.cache.enable_streaming_llm moved: import it from streaming_engine (or "
                      "streaming_engine.hf_integration)", DeprecationWarning, stacklevel=2)
        return enable_streaming_llm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
