"""Continuous batching's cache: conversations' sink caches as rows of one padded tensor, decoded together.

A conversation's tokens live in its own `StartRecentKVCache` between turns and while its prompt is prefilled
(fresh conversations' first chunks may share one padded pass, `generation.forward_padded`, but their keys land in
each one's own cache: a prompt's length needs no ring and no shared columns). When its reply starts
decoding, its `ConversationCache` *joins* a row of the shared `BatchedSinkCache`; every decode step then feeds one
token for every row in a single forward pass. When the reply ends the row *leaves*: its tokens go back to its own
cache, in order. One copy in and one copy out per turn, nothing per token. This module only stores and moves
tokens; which position a token gets is `positions.py`'s decision, who decodes when is the scheduler's.

Layout, per layer, preallocated and written in place (no concatenation per token)::

    keys, values: [rows, kv_heads, columns, head_dim]       valid: [rows, columns], True where a row holds a token

    row b: | protected head: columns 0..h-1 | recent window as a ring: columns h..cache_size-1 | padding |
           logical token i <  h  ->  column i
           logical token i >= h  ->  column h + (ring_head + i - h) % (cache_size - h)

    h = max(start_size, pinned) is the row's own protected head (sinks, or a pinned system prompt if longer), so
    rows with heads of different lengths share the buffers; a row's head cannot change while it is in a batch.

* **Per-row eviction without moving tokens.** Evicting a row's `k` oldest recent tokens (how many: the
  conversation's own cache's policy, `eviction.py`, the same rule as alone, blocks and message boundaries included) advances its ring head by `k` and re-rotates the keys that stay, in place, by `-k` positions (`positions.shift_keys`, exactly the
  arithmetic of the single-conversation cache): one re-rotation per eviction block, per row. Values never move.
* **Column order does not matter.** Keys carry their RoPE position from when they were written (and from the
  re-rotation), new tokens get explicit per-row position ids, and a decode query attends to every key its row
  holds. So a row's new token goes into its own next ring column, and the `valid` mask hides every column the row
  does not hold.
* **Padding.** A forward pass spans columns `0..width-1`, `width` being the widest row's highest used column + 1;
  shorter rows are masked. The mask is handed to transformers as an ordinary 2D padding mask (and `None` when no
  row is padded), so it builds the right 4D mask for whichever attention kernel the model runs (eager, SDPA,
  flash) on CPU or GPU.
* **Memory.** Buffers grow (rows by doubling up to `max_batch`, columns up to the largest row capacity) and are
  freed when the last row leaves; they never grow per step. Every method that touches them runs in inference
  mode, as the forward pass does, so buffers grown inside a forward pass stay writable outside it.

A `ConversationCache` answers the single-conversation cache's questions (`get_seq_length`, `seen_tokens`,
`evict_for_space`, `stream_positions`, `kv_bytes`, ...) wherever its tokens are, so the turn logic in
`generation.py` does not care whether it is batched.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .cache import StartRecentKVCache
from .positions import rotation_for_offset, shift_keys
from .validate import check_int

#: Rows allocated when the first conversation joins; the buffers double up to `max_batch` as more join.
INITIAL_ROWS = 4
#: Columns allocated at least (the buffers then grow to the largest capacity among the rows that joined).
MIN_COLUMNS = 64


class ConversationCache:
    """One conversation's KV cache, alone (its `solo` `StartRecentKVCache`) or as a row of a `BatchedSinkCache`.

    Between turns and during prefill the tokens are in `solo`, and every call is forwarded to it. While attached
    to a batch the row's counters live here and its tensors in the batch. Touched by the worker thread only,
    except for the read-only counters (`get_seq_length`, `seen_tokens`, ...), which other threads may read.
    """

    def __init__(self, solo: StartRecentKVCache):
        if not isinstance(solo, StartRecentKVCache):
            raise TypeError(f"ConversationCache wraps a StartRecentKVCache, got {type(solo).__name__}")
        self.solo = solo
        self.batch: BatchedSinkCache | None = None
        self.row = -1  # index in `batch.rows` while attached
        self._held = self._seen = self._evicted = 0
        self._head = 0  # ring offset of the oldest recent token
        self._max_col = -1  # highest column this row has used since it joined (bounds the forward's width)

    # --- sizes (fixed for the conversation) -------------------------------------------------------------------

    start_size = property(lambda self: self.solo.start_size)
    recent_size = property(lambda self: self.solo.recent_size)
    cache_size = property(lambda self: self.solo.cache_size)
    pos_shift = property(lambda self: self.solo.pos_shift)
    rotary_emb = property(lambda self: self.solo.rotary_emb)
    pinned = property(lambda self: self.solo.pinned)
    protected = property(lambda self: self.solo.protected)
    window = property(lambda self: self.solo.window)
    eviction = property(lambda self: self.solo.eviction)
    evict_block = property(lambda self: self.solo.evict_block)
    boundaries = property(lambda self: self.solo.boundaries)

    def pin(self, tokens: int) -> int:
        """As `StartRecentKVCache.pin`; not while in a batch (the row's ring is laid out around its head)."""
        if self.attached:
            raise RuntimeError("a conversation's pinned head cannot change while it is a row of a batch")
        return self.solo.pin(tokens)

    def mark_boundary(self, position: int | None = None) -> None:
        """As `StartRecentKVCache.mark_boundary` (the boundaries stay with the conversation's own cache)."""
        self.solo.mark_boundary(self.seen_tokens if position is None else position)

    @property
    def attached(self) -> bool:
        return self.batch is not None

    # --- the single-conversation cache's questions ------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self._held if self.attached else self.solo.get_seq_length()

    @property
    def seen_tokens(self) -> int:
        return self._seen if self.attached else self.solo.seen_tokens

    @property
    def evicted_tokens(self) -> int:
        return self._evicted if self.attached else self.solo.evicted_tokens

    def evict_for_space(self, num_coming: int) -> int:
        """As `StartRecentKVCache.evict_for_space`: evict the oldest tokens after the protected head so
        `num_coming` more fit (room for at least `evict_block`; rounded to a message boundary under eviction="turns").
        How many is the conversation's own cache's policy (`eviction_count`), asked with the row's counters."""
        if not self.attached:
            return self.solo.evict_for_space(num_coming)
        head = self.protected
        count = self.solo.eviction_count(num_coming, self._held, lambda: self.batch.stream_index(self)[head:],
                                         self._seen)
        if count <= 0:
            return 0
        return self.batch.evict_oldest(self, count)

    def evict_range(self, start: int, end: int) -> int:
        """As `StartRecentKVCache.evict_range`; in a batch only the oldest tokens after the protected head can go
        (`start` must be the head's length), which is all that `evict_for_space` ever asks for."""
        if not self.attached:
            return self.solo.evict_range(start, end)
        head = min(self.protected, self._held)
        if not (start == head and start <= end <= self._held):
            raise ValueError(
                f"a batched row evicts only its oldest non-sink tokens after its protected head: "
                f"evict_range({head}, n) with n <= {self._held}, got evict_range({start}, {end})"
            )
        return self.batch.evict_oldest(self, end - start) if end > start else 0

    def trim(self) -> int:
        return self.evict_for_space(0)

    @property
    def stream_positions(self) -> list[int]:
        """Index in the whole stream of every token held, in cache order."""
        if not self.attached:
            return self.solo.stream_positions
        return self.batch.stream_index(self).tolist()

    def kv_bytes(self) -> int:
        """Bytes held by this conversation's keys and values (its share of a batch: padding not counted)."""
        if not self.attached:
            return self.solo.kv_bytes()
        return self._held * self.batch.bytes_per_token

    def reset(self) -> None:
        """Drop every token and zero the counters; a row leaves its batch without copying anything back."""
        if self.attached:
            self.batch.leave(self, keep=False)
        self.solo.reset()

    # --- where the next token goes (used by the batch) --------------------------------------------------------

    def _column(self, logical: int) -> int:
        head = self.protected
        if logical < head:
            return logical
        return head + (self._head + logical - head) % self.window

    def __repr__(self) -> str:
        where = f"row {self.row} of a batch" if self.attached else "alone"
        return (f"ConversationCache({where}, held={self.get_seq_length()}, seen={self.seen_tokens}, "
                f"evicted={self.evicted_tokens}, cache_size={self.cache_size})")


class BatchedSinkCache(Cache):
    """The rows of a batched decode step (see the module docstring for the layout). A `transformers.Cache`:
    pass it as the model's cache together with `attention_mask=step_mask` from `begin_step`."""

    def __init__(self, max_batch: int):
        check_int("max_batch", max_batch, 1)
        super().__init__(layers=[])
        self.max_batch = max_batch
        self.rows: list[ConversationCache] = []
        self._keys: list[torch.Tensor] = []  # per layer [row_cap, kv_heads, col_cap, head_dim]
        self._values: list[torch.Tensor] = []
        self._valid: torch.Tensor | None = None  # [row_cap, col_cap] bool, on the first layer's device
        self._stream: torch.Tensor | None = None  # [row_cap, col_cap] long, CPU: stream index of each token
        self._step: dict | None = None  # the forward pass in flight (rows, columns, width, index tensors)
        self.bytes_per_token = 0

    # --- sizes ------------------------------------------------------------------------------------------------

    @property
    def row_capacity(self) -> int:
        return self._valid.shape[0] if self._valid is not None else 0

    @property
    def column_capacity(self) -> int:
        return self._valid.shape[1] if self._valid is not None else 0

    def allocated_bytes(self) -> int:
        """Bytes of the preallocated key/value buffers (rows x columns, padding included)."""
        return sum(t.numel() * t.element_size() for t in self._keys + self._values)

    def __len__(self) -> int:  # transformers reads len(cache) as the number of layers
        return len(self._keys)

    # --- rows joining and leaving -----------------------------------------------------------------------------

    @torch.inference_mode()
    def join(self, conv: ConversationCache) -> None:
        """Move `conv`'s tokens from its own cache into a new last row."""
        if conv.attached:
            raise ValueError("this conversation is already in a batch")
        if len(self.rows) >= self.max_batch:
            raise RuntimeError(f"the batch is full ({self.max_batch} rows)")
        solo = conv.solo
        held = solo.get_seq_length()
        if held == 0:
            raise ValueError("a conversation joins the batch after its prompt is prefilled, not empty")
        layers = [layer for layer in solo.layers if layer.is_initialized]
        if not self._keys:
            self._allocate(layers)
        elif len(layers) != len(self._keys) or any(
            k.shape[1] != buf.shape[1] or k.shape[3] != buf.shape[3] or k.dtype != buf.dtype or k.device != buf.device
            for (k, _), buf in zip(((layer.keys, layer.values) for layer in layers), self._keys)
        ):
            raise ValueError("every conversation in a batch must come from the same model, dtype and device")
        b = len(self.rows)
        self._ensure(rows=b + 1, columns=max(held + 1, min(conv.cache_size, held + MIN_COLUMNS)),
                     largest=max([conv.cache_size] + [c.cache_size for c in self.rows]))
        # Logical token i sits in column i: the protected head first, then the ring starting at ring head 0.
        for buf_k, buf_v, layer in zip(self._keys, self._values, layers):
            buf_k[b, :, :held].copy_(layer.keys[0])
            buf_v[b, :, :held].copy_(layer.values[0])
        self._valid[b].zero_()
        self._valid[b, :held] = True
        self._stream[b, :held] = solo._stream_index
        conv._held, conv._seen, conv._evicted = held, solo.seen_tokens, solo.evicted_tokens
        conv._head, conv._max_col = 0, held - 1
        conv.batch, conv.row = self, b  # attached: readers on other threads now see the row's counters
        self.rows.append(conv)
        solo._take_tokens()  # only now let the conversation's own copy go

    @torch.inference_mode()
    def leave(self, conv: ConversationCache, keep: bool = True) -> None:
        """Remove `conv`'s row; with `keep`, its tokens go back to its own cache in order (counters included).
        The last row moves into the gap, so rows stay `0..len(rows)-1`."""
        if conv.batch is not self:
            raise ValueError("this conversation is not in this batch")
        if self._step is not None:
            raise RuntimeError("a row cannot leave during a forward pass")
        b = conv.row
        if keep:
            order = self._logical_columns(conv)
            layers = []
            for buf_k, buf_v in zip(self._keys, self._values):
                idx = order.to(buf_k.device)
                layers.append((buf_k[b].index_select(1, idx).unsqueeze(0), buf_v[b].index_select(1, idx).unsqueeze(0)))
            conv.solo._put_tokens(layers, self._stream[b].index_select(0, order.cpu()).clone(), conv._seen,
                                  conv._evicted)
        else:
            conv.solo.reset()
        last = len(self.rows) - 1
        if b != last:
            moved = self.rows[last]
            width = moved._max_col + 1
            for buf in self._keys + self._values:
                buf[b, :, :width].copy_(buf[last, :, :width])
            self._valid[b].copy_(self._valid[last])
            self._stream[b].copy_(self._stream[last])
            self.rows[b], moved.row = moved, b
        self._valid[last].zero_()
        self.rows.pop()
        conv.batch, conv.row = None, -1
        conv._held = conv._seen = conv._evicted = 0
        if not self.rows:  # nobody is decoding: give the memory back
            self._keys, self._values, self._valid, self._stream = [], [], None, None

    @torch.inference_mode()
    def evict_oldest(self, conv: ConversationCache, count: int) -> int:
        """Evict `conv`'s `count` oldest tokens after its protected head: the ring head moves, the keys that stay
        are re-rotated in place once (one rotation shared by all layers on a device). Returns `count`."""
        sinks = min(conv.protected, conv._held)
        recent = conv._held - sinks
        if not 0 <= count <= recent:
            raise ValueError(f"cannot evict {count} of a row's {recent} recent tokens")
        if count == 0:
            return 0
        if self._step is not None:
            raise RuntimeError("a row cannot evict during a forward pass")
        b, start, ring = conv.row, conv.protected, conv.window
        gone = start + (conv._head + torch.arange(count)) % ring
        self._valid[b, gone.to(self._valid.device)] = False
        stay = recent - count
        if conv.pos_shift and stay > 0:
            kept = start + (conv._head + count + torch.arange(stay)) % ring
            rotations: dict = {}
            for buf_k in self._keys:
                device = buf_k.device
                if device not in rotations:
                    rotations[device] = (kept.to(device), rotation_for_offset(conv.rotary_emb, -count, device))
                idx, rotation = rotations[device]
                row = buf_k[b]  # [kv_heads, columns, head_dim], a view: the writes below land in the buffer
                row[:, idx] = shift_keys(row[:, idx], count, conv.rotary_emb, rotation)
        conv._head = (conv._head + count) % ring
        conv._held -= count
        conv._evicted += count
        return count

    # --- one batched decode step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def begin_step(self, rows: range | None = None) -> torch.Tensor | None:
        """Prepare one new token for each row in `rows` (default: all); returns the 2D padding mask
        `[len(rows), width]` for the forward pass, or `None` when no row is padded."""
        if self._step is not None:
            raise RuntimeError("a forward pass is already in flight")
        rows = range(len(self.rows)) if rows is None else rows
        if not rows or rows.start < 0 or rows.stop > len(self.rows) or rows.step != 1:
            raise ValueError(f"rows must be a non-empty contiguous range within 0..{len(self.rows) - 1}")
        convs = self.rows[rows.start:rows.stop]
        columns = []
        for conv in convs:
            if conv._held >= conv.cache_size:
                raise RuntimeError(f"row {conv.row} is full ({conv._held} tokens): evict before decoding")
            columns.append(conv._column(conv._held))
        self._ensure(rows=len(self.rows), columns=max(columns) + 1,
                     largest=max(c.cache_size for c in self.rows))
        width = max(max(c._max_col for c in convs), max(columns)) + 1
        # Where each row's new key goes, as row indices into the buffer viewed as [rows * kv_heads * columns,
        # head_dim]: one index_copy_ per layer writes every row's token (per-row slicing costs B small copies).
        row_idx = torch.arange(rows.start, rows.stop)
        col_idx = torch.tensor(columns)
        index = {}
        for buf in self._keys:
            key = (buf.device, buf.shape[1])
            if key not in index:
                heads = torch.arange(buf.shape[1])
                flat = ((row_idx[:, None] * buf.shape[1] + heads) * buf.shape[2] + col_idx[:, None]).reshape(-1)
                index[key] = flat.to(buf.device)  # [rows * kv_heads], row-major like key_states[:, :, 0]
        self._valid[row_idx.to(self._valid.device), col_idx.to(self._valid.device)] = True
        self._step = {"rows": rows, "columns": columns, "width": width, "index": index, "cells": (row_idx, col_idx)}
        padded = any(conv._held + 1 != width for conv in convs)
        return self._valid[rows.start:rows.stop, :width] if padded else None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states: [rows, kv_heads, 1, head_dim], already rotated at each row's own position.
        step = self._step
        if step is None:
            raise RuntimeError("BatchedSinkCache.update outside a decode step: call begin_step first")
        if key_states.shape[-2] != 1:
            raise ValueError("a batched step feeds exactly one token per row (prompts are prefilled per conversation)")
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        flat = step["index"][(keys.device, keys.shape[1])]
        keys.view(-1, keys.shape[3]).index_copy_(0, flat, key_states.reshape(-1, keys.shape[3]))
        values.view(-1, values.shape[3]).index_copy_(0, flat, value_states.reshape(-1, values.shape[3]))
        rows, width = step["rows"], step["width"]
        return keys[rows.start:rows.stop, :, :width], values[rows.start:rows.stop, :, :width]

    @torch.inference_mode()
    def end_step(self) -> None:
        """The forward pass succeeded: every row in it now holds its new token."""
        step, self._step = self._step, None
        rows = step["rows"]
        for conv, column in zip(self.rows[rows.start:rows.stop], step["columns"]):
            self._stream[conv.row, column] = conv._seen
            conv._held += 1
            conv._seen += 1
            conv._max_col = max(conv._max_col, column)

    @torch.inference_mode()
    def abort_step(self) -> None:
        """The forward pass failed: forget its new tokens (their columns are free again; nothing else changed)."""
        step, self._step = self._step, None
        if step is not None:
            row_idx, col_idx = step["cells"]
            self._valid[row_idx.to(self._valid.device), col_idx.to(self._valid.device)] = False

    # --- transformers Cache interface (the attention mask's geometry) -----------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._step is not None:
            return self._step["width"] - 1
        return max((c._max_col + 1 for c in self.rows), default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._step["width"], 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # The query is the last column as far as causality goes, so it sees every column; the padding mask says
        # which of them its row really holds.
        return self._step["width"] - 1

    # --- introspection ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def stream_index(self, conv: ConversationCache) -> torch.Tensor:
        """Stream index of every token `conv` holds, in cache order."""
        return self._stream[conv.row].index_select(0, self._logical_columns(conv).cpu())

    def _logical_columns(self, conv: ConversationCache) -> torch.Tensor:
        """Columns of `conv`'s tokens in cache order (the protected head, then the ring from its ring head)."""
        sinks = min(conv.protected, conv._held)
        ring = conv.protected + (conv._head + torch.arange(conv._held - sinks)) % conv.window
        return torch.cat((torch.arange(sinks), ring))

    # --- storage ----------------------------------------------------------------------------------------------

    def _allocate(self, layers) -> None:
        self._keys = [torch.zeros(0, l.keys.shape[1], 0, l.keys.shape[3], dtype=l.keys.dtype, device=l.keys.device)
                      for l in layers]
        self._values = [torch.zeros(0, l.values.shape[1], 0, l.values.shape[3], dtype=l.values.dtype,
                                    device=l.values.device) for l in layers]
        self._valid = torch.zeros(0, 0, dtype=torch.bool, device=layers[0].keys.device)
        self._stream = torch.zeros(0, 0, dtype=torch.long)
        self.bytes_per_token = sum(
            t.shape[1] * t.shape[3] * t.element_size() for t in self._keys + self._values
        )

    def _ensure(self, rows: int, columns: int, largest: int) -> None:
        """Grow the buffers to hold `rows` rows and `columns` columns (amortized: rows double up to `max_batch`,
        columns double up to `largest`, the biggest capacity among the rows). Existing contents are kept."""
        row_cap, col_cap = self.row_capacity, self.column_capacity
        if rows <= row_cap and columns <= col_cap:
            return
        new_rows = row_cap if rows <= row_cap else min(self.max_batch, max(rows, INITIAL_ROWS, 2 * row_cap))
        new_cols = col_cap if columns <= col_cap else max(columns, min(largest, max(MIN_COLUMNS, 2 * col_cap)))

        def grown(old: torch.Tensor, shape) -> torch.Tensor:
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            if old.numel():
                if old.dim() == 4:
                    new[: old.shape[0], :, : old.shape[2]].copy_(old)
                else:
                    new[: old.shape[0], : old.shape[1]].copy_(old)
            return new

        self._keys = [grown(t, (new_rows, t.shape[1], new_cols, t.shape[3])) for t in self._keys]
        self._values = [grown(t, (new_rows, t.shape[1], new_cols, t.shape[3])) for t in self._values]
        self._valid = grown(self._valid, (new_rows, new_cols))
        self._stream = grown(self._stream, (new_rows, new_cols))

    def __repr__(self) -> str:
        return (f"BatchedSinkCache(rows={len(self.rows)}/{self.max_batch}, allocated {self.row_capacity} x "
                f"{self.column_capacity} columns, {self.allocated_bytes() / 2**20:.1f} MiB)")
