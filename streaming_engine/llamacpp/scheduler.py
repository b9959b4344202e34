"""The engine's worker on llama.cpp: serves the turns' `Prefill` / `Decode` requests with `LlamaCppContext` passes.

The same loop as the transformers `BatchedScheduler` (see `streaming_engine/scheduler.py`), from which only the
forward passes differ. Each iteration
  1. starts newly submitted turns and answers stopped ones `STOP`;
  2. feeds at most `prefill_budget` waiting prompt tokens in one `llama_decode`, several conversations together
     when they fit, in arrival order. A prompt chunk longer than what is left of the budget is fed in *slices*:
     the rest of it waits for the next iteration (behind the other waiting prompts), after the decode step
     below, so a long paste delays each other reply by one bounded slice per token, however long its chunks
     (issue 28 measured llama.cpp prefill at ~81 tok/s on the test CPU: a whole 512-token chunk in one pass
     held every other user for seconds). The turn is answered once its last
     slice went in (the logits of that slice's last token), so slicing changes no token: a causal model's cache
     after feeding a chunk in pieces is the cache after feeding it whole. A stop waits for the chunk it arrived
     in, as when chunks went whole;
  3. decodes one token for up to `max_batch` decoding turns in **one** `llama_decode` (each its own sequence);
     with `batched=False` (the round-robin baseline) one turn per pass, turns taking turns.
Turns beyond `max_batch` wait their turn: a row served goes to the back of the queue. If a batched pass fails,
its rows are retried one by one, so only the conversation that causes an error sees it.
"""

from __future__ import annotations

import logging
from collections import deque

from ..generation import STOP, Decode, Prefill
# PREFILL_SLICE_TOKENS: most prompt tokens one iteration feeds here (its home is the shared scheduler module)
from ..scheduler import PREFILL_SLICE_TOKENS, Scheduler, TurnHandle

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
        self._fed: dict[int, int] = {}  # id(handle) -> tokens of its current `Prefill` already fed (sliced)

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
            # A chunk already part-fed finishes first: stopping inside it would leave half a chunk in the cache.
            for handle in [h for h in waiting if h.stop_event.is_set() and id(h) not in self._fed]:
                waiting.remove(handle)
                self._place(handle, self._advance(handle, STOP))

    def _prefill_round(self) -> None:
        """One pass of at most `prefill_budget` prompt tokens (and the context's pass size): waiting chunks in
        arrival order, the last one taken perhaps only in part (a slice; the rest goes next iteration)."""
        room = min(self.prefill_budget, self.context.batch_tokens)
        slices = []  # (handle, first token of the slice, slice length)
        for handle in self._prefilling:
            if room <= 0:
                break
            fed = self._fed.get(id(handle), 0)
            size = min(len(handle.request.ids) - fed, room)
            slices.append((handle, fed, size))
            room -= size
        if not slices:
            return
        rows = [(h.request.cache, h.request.ids[fed:fed + size]) for h, fed, size in slices]
        answers = self._forward(rows, "prefill")
        self._served("prefill", [h for h, _, _ in slices])
        for (handle, fed, size), answer in zip(slices, answers):
            done = fed + size
            if done < len(handle.request.ids) and not isinstance(answer, BaseException):
                self._fed[id(handle)] = done  # the rest of this chunk goes in next iteration,
                self._prefilling.remove(handle)  # after the other waiting prompts' (each one's slices stay in order)
                self._prefilling.append(handle)
                continue
            self._fed.pop(id(handle), None)
            self._prefilling.remove(handle)
            self._place(handle, self._advance(handle, answer))

    def _decode_round(self) -> None:
        rows = list(self._decoding)[: self.max_batch]
        if rows:
            self._serve("decode", rows, self._decoding, lambda h: [h.request.token_id])

    def _serve(self, kind: str, handles: list[TurnHandle], queue: deque, ids_of) -> None:
        """One forward pass for `handles` (or one each, if the shared pass fails), then advance every turn."""
        answers = self._forward([(h.request.cache, ids_of(h)) for h in handles], kind)
        self._served(kind, handles)
        for handle, answer in zip(handles, answers):
            queue.remove(handle)
            self._place(handle, self._advance(handle, answer))

    def _forward(self, rows: list, kind: str) -> list:
        """Each row's logits from one `llama_decode`; if that fails, from one pass per row (an exception for a row
        that fails alone), so only the conversation that causes an error sees it."""
        try:
            return self.context.forward(rows)
        except Exception:  # noqa: BLE001 - find the conversation that fails: run each alone
            if len(rows) > 1:
                logger.exception("llama.cpp %s pass failed; retrying its %d rows one by one", kind, len(rows))
            answers = []
            for row in rows:
                try:
                    answers.append(self.context.forward([row])[0])
                except Exception as exc:  # noqa: BLE001 - this conversation's error, reported to it alone
                    answers.append(exc)
            return answers


def make_llamacpp_scheduler(context, kind: str, *, max_batch: int, prefill_budget: int) -> LlamaCppScheduler:
    """`"batched"` (every decoding turn in one pass) or `"round-robin"` (one per pass), as `make_scheduler`; the
    prompt budget per iteration is at most `PREFILL_SLICE_TOKENS`."""
    from ..scheduler import SCHEDULERS

    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {kind!r}")
    return LlamaCppScheduler(context, max_batch=max_batch, prefill_budget=min(prefill_budget, PREFILL_SLICE_TOKENS),
                             batched=kind == "batched")
