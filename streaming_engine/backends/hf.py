"""The transformers backend: any supported Hugging Face checkpoint, on the CPU or on GPUs, as `load` returns it.

A conversation's cache is a `batch_cache.ConversationCache` around its own `cache.StartRecentKVCache` (rotary
module and per-layer RoPE kinds found once, from the model); while its reply decodes it is a row of the batched
worker's `BatchedSinkCache`, and it leaves that row when the reply ends (`turn_over`) or before a prompt is fed
on it (`forward`). A prompt chunk is one conversation's pass (`generation.forward`), except that fresh
conversations' first chunks handed over together share one padded pass (`generation.padded_prefill_rows`); decode
rows share a pass only in `scheduler.BatchedScheduler`, and both only where `families.batchable` allows. On CUDA (`decode_step="auto"`), or
wherever "static" is asked for, that pass is the fixed-shape static step, its rows sampled on the device
(`new_batch`; docs/gpu-decode.md), unless `static_step.unsupported_reason` refuses the model.
"""

from __future__ import annotations

import functools
import logging

import torch

from ..batch_cache import BatchedSinkCache, ConversationCache
from ..cache import StartRecentKVCache
from ..cuda_graphs import GraphedDecodeStep, StaticStepConfig
from ..defaults import DEFAULT_CUDA_GRAPHS, DEFAULT_DECODE_STEP, DEFAULT_OVERLAP
from ..device_sampling import SampledDecodeStep
from ..families import batchable, find_rotary_embedding, layer_rope_kinds
from ..generation import forward, forward_batch, forward_padded, padded_prefill_rows
from ..overlap import OverlappedDecodeStep, resolve_overlap
from ..placement import describe_placement, input_device
from ..static_step import StaticDecodeStep, StaticSinkCache, resolve_decode_step, unsupported_reason
from .base import Backend, Description

logger = logging.getLogger(__name__)
#: Columns a static batch allocates before any conversation joins (a larger conversation grows them once).
STATIC_MIN_CAPACITY = 64


class TransformersBackend(Backend):
    name = "transformers"
    #: False: every prompt chunk gets a pass of its own even where several could share one (`forward`), the
    #: time-to-first-token benchmark's baseline (`benchmarks/ttft.py`).
    padded_prefill = True

    @property
    def max_positions(self) -> int | None:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None

    @property
    def input_device(self) -> torch.device:
        return input_device(self.model)  # not model.device: under offloading that reads "meta"

    @functools.cached_property
    def batchable(self) -> bool:
        return batchable(self.model)

    @functools.cached_property
    def rotary_emb(self) -> torch.nn.Module:
        # Found on first use, after the engine has refused an unsupported model with its own message.
        return find_rotary_embedding(self.model)

    @functools.cached_property
    def layer_rope(self) -> tuple[str | None, ...]:
        return layer_rope_kinds(self.model, self.rotary_emb)

    def new_cache(self, start_size: int, recent_size: int, *, pos_shift: bool = True, eviction: str = "tokens",
                  evict_block: int = 1) -> ConversationCache:
        if not pos_shift:  # dense: a plain growing cache with counters, positions = stream positions
            return ConversationCache(StartRecentKVCache(start_size, recent_size, pos_shift=False))
        return ConversationCache(StartRecentKVCache(start_size, recent_size, rotary_emb=self.rotary_emb,
                                                    layer_rope=self.layer_rope, eviction=eviction,
                                                    evict_block=evict_block))

    def forward(self, rows: list[tuple[ConversationCache, list[int]]]) -> list[torch.Tensor]:
        """The rows that may share a pass (`generation.padded_prefill_rows`: fresh conversations' first chunks,
        arrived together) go in one padded pass; every other row gets a pass of its own on its conversation's own
        cache (a row still in the batch leaves it first: a prompt after decoding, which turns do not do today).
        If the shared pass fails its rows go one by one too. With several rows, a row that fails in its own pass
        is answered with its exception: the rows before it went in already and must not be fed again."""
        for cache, _ in rows:
            if cache.attached:
                cache.batch.leave(cache)
        answers: list = [None] * len(rows)
        shared = padded_prefill_rows(rows, self.batchable) if self.padded_prefill else []
        if shared:
            try:
                for index, logits in zip(shared, forward_padded(self.model, [rows[i] for i in shared])):
                    answers[index] = logits
            except Exception:  # noqa: BLE001 - nothing was written to the caches: each row goes alone below
                logger.exception("padded prefill of %d rows failed; feeding them one by one", len(shared))
        for index, (cache, ids) in enumerate(rows):
            if answers[index] is not None:
                continue
            try:
                answers[index] = forward(self.model, cache.solo, ids)
            except Exception as exc:  # noqa: BLE001 - this conversation's error; the others stay fed once
                if len(rows) == 1:
                    raise
                answers[index] = exc
        return answers

    def new_batch(self, max_batch: int, *, decode_step: str = DEFAULT_DECODE_STEP,
                  cuda_graphs: str = DEFAULT_CUDA_GRAPHS, overlap: str = DEFAULT_OVERLAP):
        graphs = StaticStepConfig(cuda_graphs=cuda_graphs)  # validated even when the step stays eager
        step = resolve_decode_step(decode_step, self.input_device)  # "auto": static on CUDA only
        reason = unsupported_reason(self.model) if step == "static" else None
        if reason is not None:
            logger.info("static decode step unavailable (%s): %s; decoding eagerly", reason.code, reason.message)
        if step != "static" or reason is not None:
            return BatchedSinkCache(max_batch), None
        batch = StaticSinkCache(max_batch, STATIC_MIN_CAPACITY)
        # Replayed from CUDA graphs per `cuda_graphs` ("auto": on CUDA); elsewhere the same step, eagerly. Every
        # row is sampled on the device behind it (one copy of the ids per step).
        static = StaticDecodeStep(self.model, batch)
        # Per `overlap` ("auto": on CUDA) the next step is launched before the turns are answered (overlap.py).
        sampled = OverlappedDecodeStep if resolve_overlap(overlap, static.device) else SampledDecodeStep
        return batch, sampled(GraphedDecodeStep(static, graphs), batch.rows_allocated, static.device)

    def forward_batch(self, batch: BatchedSinkCache, tokens: list[int], rows=None) -> torch.Tensor:
        return forward_batch(self.model, batch, tokens, rows)

    def turn_over(self, cache) -> None:
        if cache.attached:
            cache.batch.leave(cache)  # the reply is over: its tokens go back to the conversation's own cache

    def describe(self) -> Description:
        device = self.input_device
        return Description(device, torch.get_num_threads(),
                           (f"{device} ({describe_placement(self.model)})", str(self.model.dtype).replace("torch.", "")))
