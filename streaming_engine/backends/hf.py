"""The transformers backend: any supported Hugging Face checkpoint, on the CPU or on GPUs, as `load` returns it.

A conversation's cache is a `batch_cache.ConversationCache` around its own `cache.StartRecentKVCache` (rotary
module and per-layer RoPE kinds found once, from the model); while its reply decodes it is a row of the backend's
`SinkRows` batch (a `BatchedSinkCache`), and it leaves that row when the reply ends (`turn_over`) or before a
prompt is fed on it (`forward`). A prompt chunk is one conversation's pass (`generation.forward`), except that
fresh conversations' first chunks handed over together share one padded pass (`generation.padded_prefill_rows`);
decode rows share one pass in `SinkRows`; both only where `families.batchable` allows (elsewhere, and for the
round-robin baseline, each row decodes alone on its own cache, `base.RowPasses`). On CUDA (`decode_step="auto"`),
or wherever "static" is asked for, the decode pass is the fixed-shape static step, its rows sampled on the device
(docs/gpu-decode.md), unless `static_step.unsupported_reason` refuses the model.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import weakref

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ..batch_cache import BatchedSinkCache, ConversationCache
from ..cache import StartRecentKVCache
from ..cuda_graphs import GraphedDecodeStep, StaticStepConfig
from ..defaults import DEFAULT_CUDA_GRAPHS, DEFAULT_DECODE_STEP, DEFAULT_OVERLAP
from ..device_sampling import SampledDecodeStep
from ..families import batchable, find_rotary_embedding, layer_rope_kinds
from ..generation import Sampled, forward, forward_batch, forward_padded, padded_prefill_rows
from ..overlap import OverlappedDecodeStep, resolve_overlap
from ..placement import format_bytes, format_placement, input_device, weight_bytes_by_placement
from ..scheduler import DECODE_PATHS
from ..static_step import StaticDecodeStep, StaticSinkCache, resolve_decode_step, unsupported_reason
from .base import Backend, DecodeBatch, Description

logger = logging.getLogger(__name__)
#: Columns a static batch allocates before any conversation joins (a larger conversation grows them once).
STATIC_MIN_CAPACITY = 64
#: Cache attributes that never cross a process boundary (`cache_state`): the model's rotary module (the receiver
#: binds its own).
LOCAL_CACHE_FIELDS = frozenset({"rotary_emb"})


def _layer_to(layer, device: torch.device | str):
    """A copy of a cache layer with its tensors on `device`; `layer.device` (where the layer runs) is kept."""
    moved = copy.copy(layer)
    for name in ("keys", "values"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor):
            # A copy even when already there: the sender keeps using its own tensors.
            setattr(moved, name, tensor.to(device, copy=True))
    return moved


#: The callback of the `forward_with_breaks` pass under way on this thread (`callback`, None outside one) and
#: whether it is running (`inside`). Per thread, because engines in one process may share a model and run passes
#: on their own workers at once.
_pass_breaks = threading.local()
#: Models whose decoder layers carry the pause hook (once each, however many backends wrap them).
_paused_models: weakref.WeakSet = weakref.WeakSet()


def _before_layer(module, args) -> None:
    callback = getattr(_pass_breaks, "callback", None)
    if callback is not None:
        # A pass the callback runs goes through these layers too: no nesting.
        _pass_breaks.callback, _pass_breaks.inside = None, True
        try:
            callback()
        finally:
            _pass_breaks.callback, _pass_breaks.inside = callback, False


def _pause_points(model) -> None:
    """Hook `_before_layer` before every decoder layer of `model` but the first (transformers' decoder layers all
    derive from `GradientCheckpointingLayer`), once."""
    if model in _paused_models:
        return
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    for layer in layers[1:]:
        layer.register_forward_pre_hook(_before_layer)
    _paused_models.add(model)


def _own_cache(cache):
    """The cache holding a conversation's tokens between turns: the `StartRecentKVCache` inside its
    `ConversationCache` (or the cache itself, for a plain one)."""
    if getattr(cache, "attached", False):
        raise RuntimeError("a session's state is taken between turns, not while its reply decodes in a batch row")
    return getattr(cache, "solo", cache)


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

    def forward_with_breaks(self, rows, between_layers):
        """`forward(rows)` with `between_layers()` called before each decoder layer after the first (`_pause_points`:
        pre-hooks on the model's decoder layers, registered once per model and idle outside such a pass). The
        callback is unset while it runs, so passes it starts go straight through."""
        if getattr(_pass_breaks, "inside", False):
            return self.forward(rows)  # started by a callback: goes straight through
        _pause_points(self.model)
        _pass_breaks.callback = between_layers
        try:
            return self.forward(rows)
        finally:
            _pass_breaks.callback = None

    def new_decode_batch(self, max_rows: int, *, round_robin: bool = False, decode_step: str = DEFAULT_DECODE_STEP,
                         cuda_graphs: str = DEFAULT_CUDA_GRAPHS, overlap: str = DEFAULT_OVERLAP) -> DecodeBatch:
        graphs = StaticStepConfig(cuda_graphs=cuda_graphs)  # validated even when the step stays eager
        if round_robin:
            return super().new_decode_batch(max_rows, round_robin=True)
        if not self.batchable:
            logger.info("%s has local or per-layer-type attention layers: decoding one conversation per pass",
                        type(self.model).__name__)
            return super().new_decode_batch(max_rows)
        step = resolve_decode_step(decode_step, self.input_device)  # "auto": static on CUDA only
        reason = unsupported_reason(self.model) if step == "static" else None
        if reason is not None:
            logger.info("static decode step unavailable (%s): %s; decoding eagerly", reason.code, reason.message)
        if step != "static" or reason is not None:
            return SinkRows(self, BatchedSinkCache(max_rows))
        batch = StaticSinkCache(max_rows, STATIC_MIN_CAPACITY)
        # Replayed from CUDA graphs per `cuda_graphs` ("auto": on CUDA); elsewhere the same step, eagerly. Every
        # row is sampled on the device behind it (one copy of the ids per step).
        static = StaticDecodeStep(self.model, batch)
        # Per `overlap` ("auto": on CUDA) the next step is launched before the turns are answered (overlap.py).
        sampled = OverlappedDecodeStep if resolve_overlap(overlap, static.device) else SampledDecodeStep
        return SinkRows(self, batch, sampled(GraphedDecodeStep(static, graphs), batch.rows_allocated, static.device))

    def forward_batch(self, batch: BatchedSinkCache, tokens: list[int], rows=None) -> torch.Tensor:
        return forward_batch(self.model, batch, tokens, rows)

    def turn_over(self, cache) -> None:
        if cache.attached:
            cache.batch.leave(cache)  # the reply is over: its tokens go back to the conversation's own cache

    def cache_state(self, cache: ConversationCache) -> tuple[dict, int]:
        """The conversation's own `StartRecentKVCache` (between turns its tokens are there: a batch row is only
        borrowed while a reply decodes), every attribute but the model's rotary module, each layer's keys and
        values copied to the CPU (`DynamicLayer.device` keeps where the layer runs)."""
        own = _own_cache(cache)
        contents, kv_bytes = {}, 0
        for name, value in vars(own).items():
            if name in LOCAL_CACHE_FIELDS:
                continue
            if name == "layers":
                value = [_layer_to(layer, "cpu") for layer in value]
                kv_bytes = sum(t.numel() * t.element_size() for layer in value
                               for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                               if isinstance(t, torch.Tensor))
            elif isinstance(value, torch.Tensor):
                value = value.to("cpu", copy=True)
            contents[name] = value
        return contents, kv_bytes

    def load_cache_state(self, cache: ConversationCache, contents: dict, *, onto_devices: bool) -> None:
        """Each layer back on the device it executes on (`onto_devices`), else copies left on the CPU; the
        receiving cache keeps its own rotary module."""
        own = _own_cache(cache)
        for name, value in contents.items():
            if name == "layers":
                value = [_layer_to(layer, getattr(layer, "device", "cpu")) if onto_devices else copy.copy(layer)
                         for layer in value]
            setattr(own, name, value)

    def describe(self) -> Description:
        device = self.input_device
        placement = weight_bytes_by_placement(self.model)
        # Weights all where the inputs go (the common case) need no list: "cpu, 269.0 MB of weights". A device map
        # lists where each part is stored, which is not where it runs: "cuda:0 (weights: cuda:0 1.20 GB, cpu 310.5 MB)".
        where = (f"{device}, {format_bytes(placement[str(device)])} of weights" if list(placement) == [str(device)]
                 else f"{device} (weights: {format_placement(placement)})")
        return Description(device, torch.get_num_threads(), (where, str(self.model.dtype).replace("torch.", "")))


class SinkRows(DecodeBatch):
    """Decoding conversations as rows of one `BatchedSinkCache` (`cache`), stepped together: eagerly
    (`TransformersBackend.forward_batch`) or, with `static_step` (the fixed-shape step over a `StaticSinkCache`,
    perhaps replayed from CUDA graphs, which also samples its rows: `decode(tokens, samplings) -> (logits, ids)`),
    the rows' turns answered with their sampled token. A row stays until its reply ends (`turn_over`)."""

    def __init__(self, backend: TransformersBackend, cache: BatchedSinkCache, static_step=None):
        self.backend, self.cache, self.static_step = backend, cache, static_step
        self.rows_per_pass = cache.max_batch
        #: The step that runs: "static" or "eager" ("auto" resolved, after any fallback).
        self.decode_step = "static" if static_step is not None else "eager"

    @property
    def path(self) -> str:
        """Which of `DECODE_PATHS` runs, read when asked: a step whose graphs failed to record goes on uncaptured."""
        static_step = self.static_step
        if static_step is None:
            return DECODE_PATHS[0]
        path = DECODE_PATHS[2] if static_step.graphs else DECODE_PATHS[1]
        return path + "+overlap" if getattr(static_step, "overlaps", False) else path

    def holds(self, conv) -> bool:
        return conv.attached

    def join(self, conv) -> None:
        self.cache.join(conv)

    def step(self, requests: list) -> list:
        """One pass over every row the batch holds (`requests` are theirs, in any order), answers in `requests`'
        order."""
        by_row = {id(r.cache): r for r in requests}
        rows = list(self.cache.rows)
        if len(rows) != len(requests) or any(id(conv) not in by_row for conv in rows):
            raise RuntimeError("a decode step must serve every row of the batch")
        ordered = [by_row[id(conv)] for conv in rows]
        tokens = [r.token_id for r in ordered]
        if self.static_step is not None:
            samplings = [r.sampling for r in ordered]
            logits, ids = self.static_step.decode(tokens, samplings)
            answers = [logits[b] if ids is None or samplings[b] is None else Sampled(ids[b]) for b in range(len(rows))]
        else:
            logits = self.backend.forward_batch(self.cache, tokens)
            answers = [logits[b] for b in range(len(rows))]
        answer_of = {id(r.cache): a for r, a in zip(ordered, answers)}
        return [answer_of[id(r.cache)] for r in requests]

    def step_alone(self, request):
        conv = request.cache
        return self.backend.forward_batch(self.cache, [request.token_id], range(conv.row, conv.row + 1))[0]

    def drop(self, conv) -> None:
        if conv.attached:
            conv.batch.leave(conv, keep=False)  # its row holds a half-written step
