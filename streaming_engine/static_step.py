"""The static decode step: one token for every row of a batch through tensors whose shapes never change.

`BatchedSinkCache` already writes tokens in place, but its forward pass follows the batch: the row count is the
number of conversations and the attention width the widest row's used columns, so every step has new shapes (no
CUDA graph can replay it) and the mask is rebuilt on the host. This module fixes both shapes:

* **`StaticSinkCache`** (a `BatchedSinkCache`: join, leave, per-row eviction, ring layout and re-rotation are
  inherited unchanged) allocates its buffers once at full size, `[row_capacity, kv_heads, capacity, head_dim]`
  per layer with `capacity = start_size + recent_size` (the largest cache a row may hold) and `row_capacity`
  the largest row bucket, and keeps them (same addresses) when the last row leaves, so a captured graph stays
  valid. Eviction is the parent's in-place ring advance: sinks and pinned heads stay, the kept keys are
  re-rotated by `positions.shift_keys`.
* **`StaticDecodeStep`** feeds one token per row padded to a *bucket* of rows (1, 2, 4, 8, ...). Everything that
  changes per step (token id, position id, the column each row writes) goes to the device in one copy
  (`prepare`, host side); `run` is then pure device work of fixed shape: mark the new columns valid, build the
  additive mask `[bucket, 1, 1, capacity]` from the valid-column map, run the model over every column, write each
  row's key/value with one `index_copy_` per layer. That is what `cuda_graphs.py` captures.

Why positions stay exact: a row's position id is `positions.batch_position_ids` (the one home of positions: the
position the conversation would get alone), the keys already carry theirs, and columns a row does not hold are
masked, so attending over the full width changes only which zeros the softmax adds. Padded rows (bucket larger
than the batch) write into rows no conversation holds, see only their own new column, and their logits are
dropped.

`unsupported_reason(model)` says, as a typed code, when a model cannot take this step (hybrid sliding-window
families, per-layer-type RoPE, models split over devices, attention kernels that take no additive mask); callers
then keep the eager batched path. `resolve_decode_step` says which step `decode_step="auto"` means on a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .batch_cache import BatchedSinkCache, ConversationCache
from .families import batchable, cache_keyword
from .families import unsupported_reason as family_unsupported_reason
from .placement import input_device
from .positions import batch_position_ids
from .validate import check_int

#: `Unsupported.code`s: why a model keeps the eager path.
STATIC_FAMILY = "static_family"  # not a StreamingLLM family at all
STATIC_HYBRID = "static_hybrid"  # local sliding-window layers or per-layer-type RoPE: rows cannot share columns
STATIC_DEVICE_MAP = "static_device_map"  # layers on several devices: one graph cannot span them
STATIC_ATTENTION = "static_attention"  # an attention kernel that takes no additive 4D mask
#: Attention implementations that take the additive 4D mask the static step builds.
MASKED_ATTENTION = ("eager", "sdpa")
#: Devices where decode_step="auto" takes the static step: CUDA, where it is replayed from graphs and decoding is
#: bound by launches. On the CPU it only keeps up with the eager step (docs/gpu-decode.md "Measured on CPU"), MPS
#: has no graphs; ZeroGPU's short-lived workers stay eager too (`remote.RemoteTurnsEngine`).
AUTO_STATIC_DEVICES = ("cuda",)


@dataclass(frozen=True)
class Unsupported:
    """Why a model cannot take the static step: a stable `code` (one of the `STATIC_*` names) and a message."""

    code: str
    message: str


class StaticStepUnsupported(ValueError):
    """Raised when a static step is built for a model `unsupported_reason` refuses; `.code` says why."""

    def __init__(self, reason: Unsupported):
        super().__init__(f"{reason.code}: {reason.message}")
        self.code = reason.code


def unsupported_reason(model: torch.nn.Module) -> Unsupported | None:
    """Why `model` cannot decode through `StaticDecodeStep`, or None when it can."""
    family = family_unsupported_reason(model.config)
    if family is not None:
        return Unsupported(STATIC_FAMILY, family)
    if not batchable(model):
        return Unsupported(STATIC_HYBRID, f"{model.config.model_type} has local sliding-window layers or "
                                          "per-layer-type RoPE: its rows cannot share one static batch")
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(devices) > 1:
        return Unsupported(STATIC_DEVICE_MAP, f"the model is split over {len(devices)} devices "
                                              f"({', '.join(sorted(devices))}); the static step runs on one")
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    if attention not in MASKED_ATTENTION:
        return Unsupported(STATIC_ATTENTION, f"attention implementation {attention!r} takes no additive mask; "
                                             f"the static step needs one of {', '.join(MASKED_ATTENTION)}")
    return None


def resolve_decode_step(decode_step: str, device: torch.device | str) -> str:
    """The step `decode_step` (one of `defaults.DECODE_STEPS`) means for a model whose inputs go to `device`:
    "auto" is "static" on `AUTO_STATIC_DEVICES` and "eager" elsewhere; "eager" and "static" mean themselves."""
    if decode_step != "auto":
        return decode_step
    return "static" if torch.device(device).type in AUTO_STATIC_DEVICES else "eager"


def row_buckets(max_batch: int) -> tuple[int, ...]:
    """The row counts a static step is shaped for: powers of two up to the first one >= `max_batch`."""
    buckets = [1]
    while buckets[-1] < max_batch:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def bucket_for(rows: int, max_batch: int) -> int:
    """The smallest bucket holding `rows` rows."""
    for bucket in row_buckets(max_batch):
        if bucket >= rows:
            return bucket
    raise ValueError(f"{rows} rows exceed max_batch={max_batch}")


class StaticSinkCache(BatchedSinkCache):
    """A `BatchedSinkCache` whose buffers keep one shape while rows come and go (see the module docstring).

    `capacity`: the columns of every row; a conversation whose `cache_size` is larger grows it once, when it
    joins. Rows are allocated up to the largest bucket of `max_batch`. `release()` frees the buffers. The rows can
    also be decoded eagerly (`generation.forward_batch`), as a `BatchedSinkCache`.
    """

    def __init__(self, max_batch: int, capacity: int):
        super().__init__(max_batch)
        self.capacity = check_int("capacity", capacity, 1)
        self.rows_allocated = row_buckets(max_batch)[-1]
        self._static: dict | None = None  # the device tensors of the step in flight (bucket, rows, columns)
        #: Called before any row joins, leaves, evicts or takes an eager step: an overlapped step
        #: (`overlap.OverlappedDecodeStep`) takes back the step it launched ahead, which assumed the rows unchanged.
        self.before_change: Callable[[], None] | None = None

    def _changing(self) -> None:
        if self.before_change is not None:
            self.before_change()

    def join(self, conv: ConversationCache) -> None:
        self._changing()
        super().join(conv)

    def evict_oldest(self, conv: ConversationCache, count: int) -> int:
        if count > 0:
            self._changing()
        return super().evict_oldest(conv, count)

    def begin_step(self, rows: range | None = None) -> torch.Tensor | None:
        self._changing()
        return super().begin_step(rows)

    def _ensure(self, rows: int, columns: int, largest: int) -> None:
        # Allocated once at full size; only a conversation larger than `capacity` grows the columns (the buffers
        # then move: a graph recorded against them is recaptured, see cuda_graphs.py).
        if self.row_capacity and largest <= self.capacity:
            return
        old = (self._keys, self._values, self._valid, self._stream)
        held = self.column_capacity
        self.capacity = max(self.capacity, largest)
        shape = (self.rows_allocated, self.capacity)

        def full(t: torch.Tensor) -> torch.Tensor:
            new = torch.zeros(shape[0], t.shape[1], shape[1], t.shape[3], dtype=t.dtype, device=t.device)
            new[: t.shape[0], :, :held].copy_(t)
            return new

        self._keys = [full(t) for t in old[0]]
        self._values = [full(t) for t in old[1]]
        self._valid = torch.zeros(shape, dtype=torch.bool, device=old[2].device)
        self._valid[: old[2].shape[0], :held] = old[2]
        self._stream = torch.zeros(shape, dtype=torch.long)
        self._stream[: old[3].shape[0], :held] = old[3]

    @torch.inference_mode()
    def leave(self, conv: ConversationCache, keep: bool = True) -> None:
        """As `BatchedSinkCache.leave`, but the buffers stay allocated (same addresses) when the last row goes."""
        self._changing()
        kept = (self._keys, self._values, self._valid, self._stream)
        super().leave(conv, keep)
        if not self.rows and kept[0]:
            self._keys, self._values, self._valid, self._stream = kept

    def release(self) -> None:
        """Free the buffers (only when no row is in the batch)."""
        if self.rows:
            raise RuntimeError("the static cache still has rows")
        self._keys, self._values, self._valid, self._stream = [], [], None, None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states: [bucket, kv_heads, 1, head_dim], rotated at each row's position; written at its column.
        static = self._static
        if static is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        heads = keys.shape[1]
        flat = static["flat"].get(heads)
        if flat is None:  # [bucket * kv_heads] indices into the buffer viewed as [rows * heads * columns, head_dim]
            head_ids = torch.arange(heads, device=keys.device)
            flat = ((static["rows"][:, None] * heads + head_ids) * keys.shape[2] + static["columns"][:, None])
            flat = static["flat"][heads] = flat.reshape(-1)
        keys.view(-1, keys.shape[3]).index_copy_(0, flat, key_states.reshape(-1, keys.shape[3]))
        values.view(-1, values.shape[3]).index_copy_(0, flat, value_states.reshape(-1, values.shape[3]))
        bucket = static["bucket"]
        return keys[:bucket], values[:bucket]  # [bucket, kv_heads, capacity, head_dim]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if self._static is not None:
            return self.capacity, 0
        return super().get_mask_sizes(query_length, layer_idx)  # an eager step (forward_batch) over these rows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._static is not None:
            return self.capacity - 1
        return super().get_seq_length(layer_idx)


class StaticDecodeStep:
    """One decode step of fixed shape over a `StaticSinkCache`: `prepare(tokens)` on the host, `run(bucket)` on
    the device, `finish()` to account the new tokens (or `abort()`). `__call__` does all three.

    Raises `StaticStepUnsupported` (with `.code`) for a model `unsupported_reason` refuses.
    """

    def __init__(self, model: torch.nn.Module, cache: StaticSinkCache):
        reason = unsupported_reason(model)
        if reason is not None:
            raise StaticStepUnsupported(reason)
        if not isinstance(cache, StaticSinkCache):
            raise TypeError(f"StaticDecodeStep needs a StaticSinkCache, got {type(cache).__name__}")
        self.model, self.cache = model, cache
        self.device = input_device(model)
        self.keyword = cache_keyword(model)
        output = model.get_output_embeddings()
        #: The logits' width (the output projection's rows; a checkpoint may pad it past the tokenizer's).
        self.vocab = output.weight.shape[0] if output is not None else model.config.vocab_size
        rows = cache.rows_allocated
        # token id, position id, column: the per-step inputs, one host->device copy (pinned host memory on CUDA).
        self._host = torch.zeros(rows, 3, dtype=torch.long, pin_memory=self.device.type == "cuda")
        # Marks when the last non-blocking copy out of `_host` is done: the next `prepare` waits for it before
        # writing `_host` again (an overlapped step, overlap.py, may prepare while that copy is still queued).
        self._staged = torch.cuda.Event() if self.device.type == "cuda" else None
        self._inputs = torch.zeros(rows, 3, dtype=torch.long, device=self.device)  # [rows, 3]
        self._row_ids = torch.arange(rows, device=self.device)
        self._true = torch.ones((), dtype=torch.bool, device=self.device)
        self.bucket = 0

    @torch.inference_mode()
    def prepare(self, token_ids: list[int], device_tokens: torch.Tensor | None = None) -> int:
        """Stage one token per row (`token_ids[b]` for row b, all rows): returns the bucket to `run`. With
        `device_tokens` (`[rows]` int64 on the step's device: the ids the previous step drew) the tokens come from
        there instead, copied on the device, and `token_ids` only counts the rows."""
        cache = self.cache
        convs = cache.rows
        if len(token_ids) != len(convs) or not convs:
            raise ValueError(f"{len(token_ids)} tokens for {len(convs)} rows")
        if cache._step is not None:
            raise RuntimeError("a forward pass is already in flight")
        columns = []
        for conv in convs:
            if conv._held >= conv.cache_size:
                raise RuntimeError(f"row {conv.row} is full ({conv._held} tokens): evict before decoding")
            columns.append(conv._column(conv._held))
        bucket = bucket_for(len(convs), cache.max_batch)
        n = len(convs)
        host = self._host
        if self._staged is not None:
            self._staged.synchronize()  # the previous step's copy has read `_host` (at once if it never recorded)
        host[:bucket].zero_()  # padded rows: token 0 at position 0 in column 0 of a row no conversation holds
        host[:n, 0] = torch.tensor(token_ids, dtype=torch.long)
        host[:n, 1] = batch_position_ids(convs)[:, 0]
        host[:n, 2] = torch.tensor(columns, dtype=torch.long)
        self._inputs[:bucket].copy_(host[:bucket], non_blocking=True)
        if self._staged is not None:
            self._staged.record()
        if device_tokens is not None:  # queued after the step that drew them: no host round trip
            self._inputs[:n, 0].copy_(device_tokens)
        # The parent's bookkeeping for end_step / abort_step (host side, never read inside the step).
        cache._step = {"rows": range(n), "columns": columns, "width": cache.capacity,
                       "cells": (torch.arange(n), torch.tensor(columns))}
        self.bucket = bucket
        return bucket

    def run(self, bucket: int) -> torch.Tensor:
        """The fixed-shape device work for `bucket` rows (inputs staged by `prepare`): logits `[bucket, vocab]`.
        Nothing here reads a tensor back to the host, so it can be captured as a CUDA graph."""
        cache = self.cache
        inputs = self._inputs[:bucket]  # [bucket, 3]
        rows, columns = self._row_ids[:bucket], inputs[:, 2]
        valid = cache._valid
        valid.index_put_((rows, columns), self._true)  # each row now holds its new column
        dtype = cache._keys[0].dtype
        mask = torch.zeros(bucket, 1, 1, cache.capacity, dtype=dtype, device=valid.device)
        mask.masked_fill_(~valid[:bucket, None, None, :], torch.finfo(dtype).min)  # [bucket, 1, 1, capacity]
        cache._static = {"bucket": bucket, "rows": rows, "columns": columns, "flat": {}}
        try:
            out = self.model(
                input_ids=inputs[:, 0:1],  # [bucket, 1]
                position_ids=inputs[:, 1:2],  # [bucket, 1]
                attention_mask=mask,
                use_cache=True,
                logits_to_keep=1,
                **{self.keyword: cache},
            )
        finally:
            cache._static = None
        return out.logits[:, -1]  # [bucket, vocab]

    @torch.inference_mode()
    def finish(self) -> None:
        """The step succeeded: every live row holds its new token; padded rows' marks are cleared."""
        cache, n = self.cache, len(self.cache.rows)
        if self.bucket > n:
            cache._valid[n:self.bucket, 0] = False
        cache.end_step()

    @torch.inference_mode()
    def abort(self) -> None:
        """The step failed: its new tokens are forgotten, the rows are as before."""
        cache, n = self.cache, len(self.cache.rows)
        if self.bucket > n:
            cache._valid[n:self.bucket, 0] = False
        cache.abort_step()

    @torch.inference_mode()
    def __call__(self, token_ids: list[int]) -> torch.Tensor:
        """Feed `token_ids` (one per row); logits `[rows, vocab]` of the live rows."""
        bucket = self.prepare(token_ids)
        try:
            logits = self.run(bucket)
        except BaseException:
            self.abort()
            raise
        self.finish()
        return logits[: len(token_ids)]
