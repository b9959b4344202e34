"""The engine's worker on llama.cpp: serves the turns' `Prefill` / `Decode` requests with `LlamaCppContext` passes.

The same loop as the transformers `BatchedScheduler` (see `streaming_engine/scheduler.py`), from which only the
forward passes differ. Each iteration
  1. starts newly submitted turns and answers stopped ones `STOP`;
  2. feeds waiting prompt chunks, several conversations in one `llama_decode` when they fit, until
     `prefill_budget` prompt tokens went through (so a long paste delays the others by one bounded pass);
  3. decodes one token for up to `max_batch` decoding turns in **one** `llama_decode` (each its own sequence);
     with `batched=False` (the round-robin baseline) one turn per pass, turns taking turns.
Turns beyond `max_batch` wait their turn: a row served goes to the back of the queue. If a batched pass fails,
its rows are retried one by one, so only the conversation that causes an error sees it.
"""

from __future__ import annotations

import logging
from collections import deque

from ..generation import STOP, Decode, Prefill
from ..scheduler import Scheduler, TurnHandle

logger = logging.getLogger(__name__)


class LlamaCppScheduler(Scheduler):
    def __init__(self, context, *, max_batch: int = 16, prefill_budget: int = 512, batched: bool = True):
        super().__init__(context.model, name="streaming-engine-llamacpp")
        for name, value in (("max_batch", max_batch), ("prefill_budget", prefill_budget)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.context = context
        self.max_batch = min(max_batch, context.sequences) if batched else 1
        self.prefill_budget = prefill_budget
        self._prefilling: deque[TurnHandle] = deque()
        self._decoding: deque[TurnHandle] = deque()

    def _iterate(self) -> None:
        idle = not self._prefilling and not self._decoding
        for handle in self._take_incoming(block=idle):
            self._place(handle, self._advance(handle))
        self._honour_stops()
        self._prefill_round()
        self._decode_round()

    def _place(self, handle: TurnHandle, alive: bool) -> None:
        if not alive:
            return
        (self._prefilling if isinstance(handle.request, Prefill) else self._decoding).append(handle)

    def _honour_stops(self) -> None:
        for waiting in (self._prefilling, self._decoding):
            for handle in [h for h in waiting if h.stop_event.is_set()]:
                waiting.remove(handle)
                self._place(handle, self._advance(handle, STOP))

    def _prefill_round(self) -> None:
        """Prompt chunks of waiting turns, in arrival order, together while they fit one pass and the budget."""
        taken, spent = [], 0
        for handle in self._prefilling:
            size = len(handle.request.ids)
            if taken and (spent + size > self.prefill_budget or spent + size > self.context.batch_tokens):
                break
            taken.append(handle)
            spent += size
        if taken:
            self._serve("prefill", taken, self._prefilling, lambda h: h.request.ids)

    def _decode_round(self) -> None:
        rows = list(self._decoding)[: self.max_batch]
        if rows:
            self._serve("decode", rows, self._decoding, lambda h: [h.request.token_id])

    def _serve(self, kind: str, handles: list[TurnHandle], queue: deque, ids_of) -> None:
        """One forward pass for `handles` (or one each, if the shared pass fails), then advance every turn."""
        rows = [(h.request.cache, ids_of(h)) for h in handles]
        try:
            answers = self.context.forward(rows)
        except Exception:  # noqa: BLE001 - find the conversation that fails: run each alone
            if len(rows) > 1:
                logger.exception("llama.cpp %s pass failed; retrying its %d rows one by one", kind, len(rows))
            answers = []
            for row in rows:
                try:
                    answers.append(self.context.forward([row])[0])
                except Exception as exc:  # noqa: BLE001 - this conversation's error, reported to it alone
                    answers.append(exc)
        self._served(kind, handles)
        for handle, answer in zip(handles, answers):
            queue.remove(handle)
            self._place(handle, self._advance(handle, answer))


def make_llamacpp_scheduler(context, kind: str, *, max_batch: int, prefill_budget: int) -> LlamaCppScheduler:
    """`"batched"` (every decoding turn in one pass) or `"round-robin"` (one per pass), as `make_scheduler`."""
    from ..scheduler import SCHEDULERS

    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {kind!r}")
    return LlamaCppScheduler(context, max_batch=max_batch, prefill_budget=prefill_budget, batched=kind == "batched")
