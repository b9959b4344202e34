"""One llama.cpp context shared by an engine's conversations: a sequence per conversation, batched forward passes.

Why one context with many sequences rather than one context per conversation: llama.cpp decodes tokens of
several sequences in one `llama_decode` call (one pass over the weights for all of them), and a context's compute
buffers are paid once. Measured on the 2-core test CPU (1 thread, SmolLM2-135M Q4_1, 512 tokens held): one row
decodes at ~60 tok/s either way, four rows in one call at ~72 tok/s together, while separate contexts can only
take turns (~60 tok/s together). The KV cache is *not* unified (`kv_unified=False`): every sequence has its own
stream of `seq_capacity` cells, so a decode step attends over its own tokens only, not over every conversation's.

Sequences are a fixed pool (`sequences`, the engine's `max_active_turns`, so every running turn fits). A
conversation that needs a sequence when none is free takes one from the least recently used conversation, whose
tokens are first copied out to host memory (`llama_state_seq_get_data`) and copied back, into whichever sequence is
free, the next time it runs. Every conversation therefore keeps its tokens however many are open; only their
place changes.

Positions: a conversation's cache (`cache.py`) records evictions and applies them here, right before the next
forward pass that includes it (`llama_memory_seq_rm` for the evicted range, `llama_memory_seq_add` of minus the
gap for the tokens behind it, which makes llama.cpp re-rotate their keys at the start of that very pass). So no
sequence ever sits with positions moved but keys not yet re-rotated, which a copy to host memory would freeze.

All llama.cpp calls go through this object under one lock: the worker thread decodes while other threads may
free a closed conversation's sequence.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch

from ..validate import check_int
from .cache import LlamaCppCache

#: llama.cpp allocates KV cells per sequence in multiples of this (its context-size padding).
CELL_PADDING = 256
#: Fewest tokens a sequence holds, whatever the engine's window: a session may ask for a larger cache than the
#: engine's (the app's comparison tab opens a 512-token dense side); for the default model that is 11 MiB per
#: sequence.
MIN_SEQ_TOKENS = 512


def _padded(count: int) -> int:
    return -(-count // CELL_PADDING) * CELL_PADDING


class LlamaCppContext:
    """`sequences` sequences of `seq_capacity` KV cells each (rounded up to `CELL_PADDING`); at most
    `batch_tokens` tokens per forward pass. Raises `ValueError` when the model's KV cache cannot shift positions
    (StreamingLLM needs that)."""

    def __init__(self, model, *, sequences: int, seq_capacity: int, batch_tokens: int):
        lc = model.lc
        self.model, self.lc = model, lc
        limit = int(lc.llama_max_parallel_sequences())
        for name, value, low in (("sequences", sequences, 1), ("seq_capacity", seq_capacity, 2),
                                 ("batch_tokens", batch_tokens, 1)):
            check_int(name, value, low)
        if sequences > limit:
            raise ValueError(f"llama.cpp holds at most {limit} sequences per context, asked for {sequences}")
        self.sequences = sequences
        self.batch_tokens = batch_tokens
        params = lc.llama_context_default_params()
        params.n_ctx = sequences * _padded(seq_capacity)
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_seq_max = sequences
        params.kv_unified = False  # each sequence attends over its own cells only (module docstring)
        params.n_threads = params.n_threads_batch = model.n_threads
        # As llama-cpp-python's `Llama` (its default), so a reply equals llama.cpp's own generation token for token.
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ptr = lc.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise RuntimeError(f"llama.cpp could not create a context of {sequences} x {seq_capacity} tokens")
        self._finalizers = [weakref.finalize(self, lc.llama_free, self.ptr)]
        self.memory = lc.llama_get_memory(self.ptr)
        if not lc.llama_memory_can_shift(self.memory):
            raise ValueError(
                f"llama.cpp cannot shift positions in {model.name}'s KV cache, which StreamingLLM needs; "
                "use --backend transformers for this model"
            )
        self.seq_capacity = int(lc.llama_n_ctx_seq(self.ptr))
        self.bytes_per_token = model.kv_bytes_per_token
        batch = lc.llama_batch_init(batch_tokens, 0, 1)
        self._finalizers.append(weakref.finalize(self, lc.llama_batch_free, batch))
        self._batch = batch
        self.lock = threading.RLock()
        self._free = list(range(sequences - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._resident: OrderedDict[int, object] = OrderedDict()  # sequence -> its cache, least recently used first
        self.swaps = {"out": 0, "in": 0}  # copies to and from host memory, for tests and benchmarks

    def close(self) -> None:
        """Free llama.cpp's memory for this context now (an engine's worker keeps the context referenced for the
        process's lifetime); every conversation on it is forgotten and a later forward pass raises."""
        with self.lock:
            for finalizer in reversed(self._finalizers):
                finalizer()
            self.ptr = None
            for cache in list(self._resident.values()):
                cache.seq = None
            self._resident.clear()

    def allocated_bytes(self) -> int:
        """Bytes of the KV cells llama.cpp allocated for all sequences (F16 keys and values)."""
        return self.sequences * _padded(self.seq_capacity) * self.bytes_per_token

    def new_cache(self, start_size: int, recent_size: int, *, pos_shift: bool = True, pin: int = 0,
                  eviction: str = "tokens", evict_block: int = 1):
        """An empty conversation cache on this context (`cache.LlamaCppCache`)."""
        return LlamaCppCache(self, start_size, recent_size, pos_shift=pos_shift, pin=pin, eviction=eviction,
                             evict_block=evict_block)

    # --- where a conversation's tokens are --------------------------------------------------------------------

    def _place(self, cache, keep: set[int]) -> None:
        """Give `cache` a sequence (copying its tokens back from host memory); under the lock."""
        if cache.seq is not None:
            self._resident.move_to_end(cache.seq)
            return
        if cache.cache_size > self.seq_capacity:
            raise ValueError(f"a conversation of {cache.cache_size} tokens does not fit this context's "
                             f"{self.seq_capacity}-token sequences")
        if not self._free:
            victim = next((c for c in self._resident.values() if id(c) not in keep), None)
            if victim is None:
                raise RuntimeError(f"all {self.sequences} llama.cpp sequences are in this forward pass")
            self._swap_out(victim)
        seq = self._free.pop()
        if cache.saved is not None:
            data = cache.saved
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            read = self.lc.llama_state_seq_set_data(self.ptr, buf, len(data), seq)
            if read != len(data):
                self._free.append(seq)
                raise RuntimeError("llama.cpp could not restore a conversation's tokens into a free sequence")
            cache.saved = None
            self.swaps["in"] += 1
        cache.seq = seq
        self._resident[seq] = cache

    def _swap_out(self, cache) -> None:
        seq = cache.seq
        size = int(self.lc.llama_state_seq_get_size(self.ptr, seq))
        buf = (ctypes.c_uint8 * size)()
        written = int(self.lc.llama_state_seq_get_data(self.ptr, buf, size, seq))
        cache.saved = bytes(buf[:written])
        self.lc.llama_memory_seq_rm(self.memory, seq, -1, -1)
        del self._resident[seq]
        self._free.append(seq)
        cache.seq = None
        self.swaps["out"] += 1

    def release(self, cache) -> None:
        """Forget `cache`'s tokens (in a sequence or in host memory); its sequence becomes free."""
        with self.lock:
            cache.saved = None
            if cache.seq is not None and self.ptr is not None:
                self.lc.llama_memory_seq_rm(self.memory, cache.seq, -1, -1)
                self._resident.pop(cache.seq, None)
                self._free.append(cache.seq)
                cache.seq = None

    # --- forward passes ---------------------------------------------------------------------------------------

    def forward(self, rows: list[tuple[object, list[int]]], all_logits: bool = False) -> list[torch.Tensor]:
        """Feed every `(cache, ids)` row on its own sequence in one `llama_decode`; return each row's logits:
        the last token's `[vocab]`, or every token's `[len(ids), vocab]` with `all_logits`. Room must have been
        made first (`evict_for_space`). On failure nothing is fed and every cache is as before."""
        total = sum(len(ids) for _, ids in rows)
        if not rows or any(not ids for _, ids in rows):
            raise ValueError("every row needs at least one token")
        if total > self.batch_tokens:
            raise ValueError(f"{total} tokens exceed this context's {self.batch_tokens} tokens per pass")
        if len({id(cache) for cache, _ in rows}) != len(rows):
            raise ValueError("a conversation appears twice in one forward pass")
        lc, batch = self.lc, self._batch
        with self.lock:
            if self.ptr is None:
                raise RuntimeError("this llama.cpp context is closed")
            keep = {id(cache) for cache, _ in rows}
            for cache, ids in rows:
                if cache.context is not self:
                    raise ValueError("this cache belongs to another llama.cpp context")
                if cache.get_seq_length() + len(ids) > cache.cache_size:
                    raise ValueError(f"{len(ids)} more tokens do not fit a cache holding {cache.get_seq_length()} "
                                     f"of {cache.cache_size}: evict first")
                self._place(cache, keep)
                cache._apply_evictions()
            i = 0
            outputs = []  # (row, first batch index with logits, count)
            for r, (cache, ids) in enumerate(rows):
                first = cache.next_position()
                for j, token in enumerate(ids):
                    batch.token[i] = token
                    batch.pos[i] = first + j
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = cache.seq
                    batch.logits[i] = all_logits or j == len(ids) - 1
                    i += 1
                outputs.append((i - (len(ids) if all_logits else 1), len(ids) if all_logits else 1))
            batch.n_tokens = total
            status = lc.llama_decode(self.ptr, batch)
            if status != 0:
                for cache, _ in rows:  # drop whatever part of the batch went in
                    lc.llama_memory_seq_rm(self.memory, cache.seq, cache.next_position(), -1)
                raise RuntimeError(f"llama.cpp decode failed (status {status})")
            answers = []
            vocab = self.model.n_vocab
            for (cache, ids), (first, count) in zip(rows, outputs):
                pointer = lc.llama_get_logits_ith(self.ptr, first)
                logits = np.ctypeslib.as_array(pointer, shape=(count * vocab,)).copy()  # rows are contiguous
                answers.append(torch.from_numpy(logits.reshape(count, vocab) if all_logits else logits))
                cache._appended(len(ids))
        return answers

    def __repr__(self) -> str:
        return (f"LlamaCppContext({self.sequences} sequences x {self.seq_capacity} tokens, "
                f"{len(self._resident)} in use, {self.allocated_bytes() / 2**20:.0f} MiB KV)")


def engine_context(model, config) -> LlamaCppContext:
    """The context an engine with `config` (an `EngineConfig`) needs: a sequence for every turn that may run at
    once (and every batch row), each as long as the largest cache a session gets by default (the dense limit
    included, and at least `MIN_SEQ_TOKENS`), at most the model's trained context; passes as long as a prompt chunk."""
    capacity = min(model.n_ctx_train, max(config.cache_size, config.dense_max_tokens or 0, MIN_SEQ_TOKENS))
    sequences = max(config.max_active_turns, config.max_batch)
    return model.new_context(sequences=min(sequences, int(model.lc.llama_max_parallel_sequences())),
                             seq_capacity=capacity, batch_tokens=max(config.prefill_chunk_size, config.max_batch))
