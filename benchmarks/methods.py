"""Attention variants fed one token at a time, as the paper evaluates them.

Each runner answers `step(token_id) -> logits [vocab]` (the prediction for the next token), `kv_bytes()` (KV
memory held after the step) and `held()` (tokens the next prediction attends to):

* `dense`: a growing cache, nothing evicted (the quality reference; memory and latency grow);
* `window`: the last `start_size + recent_size` tokens, no sinks (the baseline that collapses);
* `streaming`: `start_size` sinks + `recent_size` recent tokens with position shift (the paper), making room for
  each token as it comes (one eviction, one key re-rotation per token once the cache is full);
* `streaming-noshift`: the same tokens, original positions kept (ablation);
* `recompute`: the last `start_size + recent_size` tokens re-encoded from scratch every step (sliding window with
  re-computation: the quality gold standard for a window, and quadratic cost);
* `streaming-block` (benchmark only): `streaming`, but when the cache is full it evicts `evict_block` tokens at
  once, as the chat engine does when it reserves room for a whole reply: one re-rotation per block;
* `perstep-rope` (benchmark only): the paper's reference implementation, which stores keys without RoPE and
  rotates the whole cache at in-cache positions on every step; the same outputs as `streaming`, more work.

The perplexity CLI runs the same methods on a *batch* of rows fed a *block* of tokens per forward pass
(`BlockRunner`, named by a `MethodSpec` such as `streaming:4+1020`). All rows advance in lockstep, so one cache
holding a batch axis evicts the same positions of every row at the same time: each row gets exactly what a
batch-1 run would give it. A block of `n` tokens is fed after evicting room for all `n` of them, so token `i` of
the block attends to the sinks, the rest of the window and the `i` block tokens before it; with `n = 1` this is the
paper's per-token protocol, with larger `n` each prediction sees up to `n - 1` fewer window tokens (measured in
docs/benchmarks.md, "Perplexity over a long text"). Dense attention is exact with any block.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from streaming_engine.cache import StartRecentKVCache, enable_streaming_llm
from streaming_engine.families import cache_keyword, find_rotary_embedding
from streaming_engine.generation import forward
from streaming_engine.placement import input_device
from streaming_engine.positions import next_position_ids, rotate_half

PPL_METHODS = ("dense", "window", "streaming", "streaming-noshift", "recompute")
BENCH_METHODS = ("dense", "streaming", "streaming-block", "perstep-rope", "recompute")
ALL_METHODS = PPL_METHODS + ("streaming-block", "perstep-rope")
#: Tokens evicted at once by the decode benchmark's `streaming-block` unless told otherwise (a typical reply
#: length; the committed bench figures use it). The engine's own default block is `eviction.DEFAULT_EVICT_BLOCK`.
BENCH_EVICT_BLOCK = 64


class CacheRunner:
    """Any cache fed token by token; an evicting cache makes room for `evict_block` tokens when it is full."""

    def __init__(self, model, cache, evict: bool, evict_block: int = 1):
        self.model, self.cache, self.evict = model, cache, evict
        self.evict_block = evict_block

    def step(self, token_id: int) -> torch.Tensor:
        if self.evict and self.cache.get_seq_length() + 1 > self.cache.cache_size:
            self.cache.evict_for_space(self.evict_block)
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
        ids = torch.tensor([list(self.tokens)], device=input_device(self.model))  # [1, window]
        kwargs = {cache_keyword(self.model): fresh}
        logits = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs).logits
        self._kv_bytes = sum(
            layer.keys.numel() * layer.keys.element_size() * 2 for layer in fresh.layers if layer.is_initialized
        )
        return logits[0, -1]

    def prime(self, token_ids: list[int]) -> None:
        """Fill the window without running the model: every step re-encodes the whole window anyway, so a step's
        cost depends only on how many tokens the window holds, never on how they got there."""
        self.tokens.extend(token_ids)

    def kv_bytes(self) -> int:
        return self._kv_bytes

    def held(self) -> int:
        return len(self.tokens)


class PerStepRopeCache(StartRecentKVCache):
    """The reference implementation's bookkeeping: keys are stored *without* RoPE and the whole cache is rotated at
    positions 0..n-1 on every forward pass, for every layer. Eviction just drops tokens.

    transformers rotates keys before they reach the cache, so incoming keys are first un-rotated (an exact inverse:
    a rotation by the negative angle, with any attention scaling folded into cos/sin divided out twice).
    """

    def __init__(self, start_size: int, recent_size: int, rotary_emb):
        # pos_shift=True: new tokens get in-cache positions, like the reference code.
        super().__init__(start_size, recent_size, rotary_emb=rotary_emb, pos_shift=True)
        self.scale = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
        self._rope_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own (cos, sin) for positions 0..length-1, shaped `[1, 1, length, rotary_dim]`."""
        key = (length, torch.device(device))  # layers split over devices each need their own copy
        if key not in self._rope_cache:
            probe = torch.empty(0, device=device, dtype=torch.float32)  # only its device and dtype are read
            cos, sin = self.rotary_emb(probe, torch.arange(length, device=device).unsqueeze(0))  # [1, n, rot]
            # Keep one length only: once the cache is full every step asks for the same one.
            self._rope_cache = {k: v for k, v in self._rope_cache.items() if k[0] == length}
            self._rope_cache[key] = (cos[:, None].to(device), sin[:, None].to(device))
        return self._rope_cache[key]

    def _rotate(self, x: torch.Tensor, offset: int, inverse: bool) -> torch.Tensor:
        # x: [batch, kv_heads, seq, head_dim]; rotate token i to position offset+i (or undo that rotation)
        cos, sin = self._cos_sin(offset + x.shape[-2], x.device)
        cos, sin = cos[..., offset:, :], sin[..., offset:, :]
        if inverse:  # R(p)^-1 = R(-p); cos/sin carry the scale s, so divide by s^2 to undo s * R(p)
            cos, sin = cos / self.scale**2, -sin / self.scale**2
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        rot = cos.shape[-1]
        head, tail = x[..., :rot], x[..., rot:]
        return torch.cat((head * cos + rotate_half(head) * sin, tail), dim=-1)

    def _moved_keys(self, keys: torch.Tensor, shift: int, rotations: dict, kind=None) -> torch.Tensor:
        return keys  # stored without RoPE: nothing to move on eviction

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        held = self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0
        raw = self._rotate(key_states, held, inverse=True)  # the model rotated them at in-cache positions
        keys, values = super().update(raw, value_states, layer_idx, *args, **kwargs)
        return self._rotate(keys, 0, inverse=False), values  # the per-step work the paper's code does


def make_runner(method: str, model, start_size: int, recent_size: int, evict_block: int = BENCH_EVICT_BLOCK):
    """A fresh runner for `method` with a cache of `start_size + recent_size` tokens (dense: unbounded)."""
    size = start_size + recent_size
    if method == "dense":
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        return CacheRunner(model, StartRecentKVCache(0, limit, pos_shift=False), evict=False)
    if method == "window":
        return CacheRunner(model, enable_streaming_llm(model, 0, size), evict=True)
    if method == "streaming":
        return CacheRunner(model, enable_streaming_llm(model, start_size, recent_size), evict=True)
    if method == "streaming-block":
        if not 1 <= evict_block <= recent_size:
            raise ValueError(f"evict_block must be in [1, recent_size={recent_size}], got {evict_block}")
        cache = enable_streaming_llm(model, start_size, recent_size)
        return CacheRunner(model, cache, evict=True, evict_block=evict_block)
    if method == "streaming-noshift":
        return CacheRunner(model, enable_streaming_llm(model, start_size, recent_size, pos_shift=False), evict=True)
    if method == "recompute":
        return RecomputeRunner(model, size)
    if method == "perstep-rope":
        cache = PerStepRopeCache(start_size, recent_size, find_rotary_embedding(model))
        return CacheRunner(model, cache, evict=True)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")


def parse_methods(text: str, allowed: tuple[str, ...], option: str = "--methods") -> list[str]:
    """`"a,b"` -> `["a", "b"]`, every name checked against `allowed` (duplicates dropped, order kept); the error
    names `option`, the command-line flag the text came from."""
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in methods if m not in allowed]
    if not methods or unknown:
        raise ValueError(f"{option} takes a comma list of: {', '.join(allowed)} (got {text!r})")
    return methods


# --- batched rows, a block of tokens per forward pass (the perplexity CLI) ------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A perplexity method and its cache, written `dense`, `window:1024`, `recompute:256` or `streaming:4+1020`
    (`streaming-noshift` likewise). Window and recompute keep `recent_size` recent tokens and no sinks."""

    name: str
    start_size: int = 0
    recent_size: int = 0

    def __post_init__(self):
        if self.name not in PPL_METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose from {', '.join(PPL_METHODS)}")
        if self.name == "dense":
            if self.start_size or self.recent_size:
                raise ValueError("dense keeps every token: it takes no cache size")
            return
        if self.name in ("window", "recompute") and self.start_size:
            raise ValueError(f"{self.name} keeps no attention sinks: write {self.name}:SIZE")
        if self.start_size < 0 or self.recent_size < 1:
            raise ValueError(f"{self.label}: start_size must be >= 0 and recent_size >= 1")

    @property
    def cache_size(self) -> int | None:
        return None if self.name == "dense" else self.start_size + self.recent_size

    @property
    def label(self) -> str:
        if self.name == "dense":
            return "dense"
        if self.name in ("window", "recompute"):
            return f"{self.name} {self.recent_size}"
        return f"{self.name} {self.start_size}+{self.recent_size}"

    @classmethod
    def parse(cls, text: str, start_size: int = 4, recent_size: int = 1020) -> "MethodSpec":
        """`streaming:4+1020`, `window:1024`, `dense`; a bare name takes `start_size + recent_size` tokens."""
        name, _, size = text.strip().partition(":")
        try:
            if not size:
                if name == "dense":
                    return cls(name)
                if name in ("window", "recompute"):
                    return cls(name, 0, start_size + recent_size)
                return cls(name, start_size, recent_size)
            if "+" in size:
                start, recent = size.split("+", 1)
                return cls(name, int(start), int(recent))
            return cls(name, 0, int(size)) if name in ("window", "recompute") else cls(name, start_size, int(size))
        except ValueError as exc:
            if "invalid literal" in str(exc):
                raise ValueError(f"bad method {text!r}: write NAME, NAME:SIZE or NAME:SINKS+RECENT") from None
            raise


def parse_specs(text: str, start_size: int = 4, recent_size: int = 1020) -> list[MethodSpec]:
    """A comma list of method specs (duplicates dropped, order kept)."""
    specs = list(dict.fromkeys(MethodSpec.parse(part, start_size, recent_size)
                               for part in text.split(",") if part.strip()))
    if not specs:
        raise ValueError(f"--methods takes a comma list such as streaming:4+1020,window:1024,dense (got {text!r})")
    return specs


@torch.inference_mode()
def forward_block(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """Feed `ids` `[rows, n]` on top of `cache` (a batch of rows); return every position's logits `[rows, n, vocab]`."""
    rows, n = ids.shape
    # One position range for every row: the rows advance in lockstep, so they hold the same number of tokens.
    positions = next_position_ids(cache, n, ids.device).expand(rows, n)
    out = model(input_ids=ids, position_ids=positions, use_cache=True, **{cache_keyword(model): cache})
    return out.logits


class BlockRunner:
    """Rows fed a block at a time through one cache with a batch axis.

    `step(ids [rows, n]) -> logits [rows, n, vocab]`; `room()` is how many more tokens the method can take (dense
    stops at `limit`, the model's positions), `state()`/`load_state()` save and restore the cache for `--resume`.
    """

    def __init__(self, model, spec: MethodSpec, limit: int | None = None):
        self.model, self.spec = model, spec
        self.limit = limit
        if spec.name == "dense":
            self.cache = StartRecentKVCache(0, limit or 1 << 30, pos_shift=False)
        else:
            self.cache = enable_streaming_llm(model, spec.start_size, spec.recent_size,
                                              pos_shift=spec.name != "streaming-noshift")
        self.evict = spec.name != "dense"

    def room(self) -> int | None:
        if self.evict or self.limit is None:
            return None
        return self.limit - self.cache.get_seq_length()

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        if self.evict:
            self.cache.evict_for_space(ids.shape[1])
        return forward_block(self.model, self.cache, ids)

    def held(self) -> int:
        return self.cache.get_seq_length()

    def kv_bytes(self) -> int:
        return self.cache.kv_bytes()

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (every layer's keys and values `[rows, kv_heads, held, head_dim]`, stream index) and counters."""
        tensors = {"stream_index": self.cache._stream_index.clone()}
        for i, layer in enumerate(self.cache.layers):
            if layer.is_initialized and layer.get_seq_length():
                tensors[f"keys.{i}"], tensors[f"values.{i}"] = layer.keys, layer.values
        return tensors, {"seen": self.cache.seen_tokens, "evicted": self.cache.evicted_tokens}

    def load_state(self, tensors: dict[str, torch.Tensor], counters: dict) -> None:
        """Put back what `state()` saved: the cache continues exactly where it was."""
        self.cache.reset()
        device = input_device(self.model)
        layer = 0
        while f"keys.{layer}" in tensors:
            self.cache.update(tensors[f"keys.{layer}"].to(device), tensors[f"values.{layer}"].to(device), layer)
            layer += 1
        # update() counted the restored tokens as new ones; the saved counters are the truth.
        self.cache.seen_tokens, self.cache.evicted_tokens = int(counters["seen"]), int(counters["evicted"])
        self.cache._stream_index = tensors["stream_index"].clone()


class BlockRecompute:
    """`recompute` for a batch of rows: every step re-encodes each row's last `window` tokens from scratch.

    One token per step only (a block would let later tokens of the block see more than the window)."""

    def __init__(self, model, spec: MethodSpec):
        self.model, self.window = model, spec.recent_size
        self.tokens: torch.Tensor | None = None  # [rows, <= window]
        self._kv_bytes = 0

    def room(self) -> None:
        return None

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] != 1:
            raise ValueError("recompute feeds one token per step: use --block 1")
        self.tokens = ids if self.tokens is None else torch.cat((self.tokens, ids), dim=1)[:, -self.window:]
        fresh = DynamicCache()
        logits = self.model(input_ids=self.tokens, use_cache=True, logits_to_keep=1,
                            **{cache_keyword(self.model): fresh}).logits  # [rows, 1, vocab]
        self._kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2
                             for layer in fresh.layers if layer.is_initialized)
        return logits

    def held(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def kv_bytes(self) -> int:
        return self._kv_bytes

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {} if self.tokens is None else {"tokens": self.tokens}
        return tensors, {"kv_bytes": self._kv_bytes}

    def load_state(self, tensors: dict[str, torch.Tensor], counters: dict) -> None:
        self.tokens = tensors["tokens"].to(input_device(self.model)) if "tokens" in tensors else None
        self._kv_bytes = int(counters["kv_bytes"])


def make_block_runner(spec: MethodSpec, model):
    """A fresh batched runner for `spec`; dense stops at the model's positions."""
    if spec.name == "recompute":
        return BlockRecompute(model, spec)
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    return BlockRunner(model, spec, limit)
