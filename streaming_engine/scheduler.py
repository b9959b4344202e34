"""Threading for the engine: one worker thread that owns the model, and per-turn event queues. Nothing else here.

A running turn is a coroutine (`Session.turn`) that yields `Event`s for its reader and *requests* for forward
passes (`generation.Prefill`: a prompt chunk; `generation.Decode`: one sampled token), and is sent back each
request's logits. The worker alone touches the model and the caches, so forward passes never overlap.

The seam (`backends/base.py`): a scheduler decides WHAT runs (policy: which turns get a prompt slice or a decode
row, budgets, stops, retrying each row alone); its *runner*, the engine's backend, decides HOW (`forward` over
`(cache, ids)` rows, `turn_over` when a reply ends). `make_scheduler` picks the policy from the runner's
capabilities, never from which backend it is. Three policies, two sharing one loop (`QueuedScheduler`):

* `BatchedScheduler` (the default, continuous batching). Each iteration of its loop
  1. starts newly submitted turns and honours stops (a stopped turn is answered `STOP` at its next request, so it
     leaves before the next forward pass and never delays the others);
  2. feeds prompt chunks, turns in arrival order, until `prefill_budget` prompt tokens have gone through (a long
     paste therefore advances one bounded chunk per iteration, however long it is), all in one call of the runner,
     which runs the chunks that can share a pass together (on transformers: conversations' first chunks,
     `generation.padded_prefill_rows`), so prompts that arrive at once are prefilled at once. While other
     turns are decoding, prompts get at most one *slice* per iteration instead, sized to take about as long as
     one decode step (`prefill_slice`), and only while their share of the worker allows (`prompt_share.py`:
     at most `PREFILL_SHARE` of its time), so a decoding reply's time per token stays within a bound however
     long the paste, and the paste still advances. New turns go first: a turn whose prompt has not started gets
     its first slice (a short prompt whole) before any other prompt's, without waiting for that share
     (docs/benchmarks.md "One client against another" measures both);
  3. runs **one** forward pass for every turn that is decoding: each is a row of a `BatchedSinkCache`, up to
     `max_batch` rows (more wait for a free row, first come first served). Rows join when their prompt is done
     and leave when their reply ends, between steps; each row is sampled with its own settings and seed by its own
     coroutine and streams to its own queue.
  If the batched pass fails, every row is retried alone, so an error fails only the conversation that causes it.
  With `decode_step="static"` (or "auto", the default, on CUDA) the runner may hand back a fixed-shape step with
  the batch (`new_batch`; on transformers a `StaticDecodeStep` replayed from CUDA graphs per `cuda_graphs`, with
  every row sampled on the device, docs/gpu-decode.md): the rows' turns are then answered with their sampled token
  (`generation.Sampled`, one device->host copy of the ids per step) instead of logits. The policy is the same
  either way, only the pass and where the sampling happens differ (`decode_path` says which runs).
* `RoundRobinScheduler` (the baseline it replaced, kept for comparison): one forward pass per turn per iteration,
  turns taking turns; decoding stays on each conversation's own cache.
* `PackedScheduler`, for a runner that packs several conversations' rows into one pass (llama.cpp): each iteration
  one pass of waiting prompt slices (up to the budget, several conversations together) and one pass of up to
  `max_batch` decode rows; its round-robin baseline decodes one row per pass.

Callers read a turn's events from its own queue with a timeout, which is also how they notice a dead worker;
`read_many` lets one caller follow several turns at once without a thread per turn.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Callable, Hashable, Iterator

from .defaults import DECODE_STEPS, DEFAULT_CUDA_GRAPHS, DEFAULT_DECODE_STEP, DEFAULT_OVERLAP
from .generation import STOP, Decode, Prefill, Sampled
from .prompt_share import PromptShare, new_turns_first

logger = logging.getLogger(__name__)

#: How long a reader waits on its queue before checking that the worker is still alive.
POLL_INTERVAL_S = 0.1
#: How long `read_many` sleeps when none of its turns has a new event (bounds the delay it adds to a delta).
FAN_IN_POLL_S = 0.01
#: Pause after an iteration that failed outside any one turn (a bug), before the worker tries again.
ITERATION_RETRY_S = 0.05
#: The schedulers `make_scheduler` knows.
SCHEDULERS = ("batched", "round-robin")
#: Which decode path a scheduler runs (`Scheduler.decode_path`; the app's footer and `/metrics` show it): the eager
#: pass, the static step, or the static step replayed from CUDA graphs; either static one "+overlap" when it launches
#: the next step before the turns are answered (`overlap.OverlappedDecodeStep`).
DECODE_PATHS = ("eager", "static", "static+graphs", "static+overlap", "static+graphs+overlap")
#: Most prompt tokens fed in one iteration while other turns decode (each decoding reply waits one such slice per
#: token). The time rule below can only make a slice smaller; `PackedScheduler` slices by this cap alone.
PREFILL_SLICE_TOKENS = 64
#: Fewest prompt tokens a slice takes, however fast decoding is: tinier slices would spend the worker on
#: per-pass overhead and let a paste crawl.
PREFILL_MIN_SLICE = 8
#: Weight of the newest measurement in the running averages of step times (a few steps of memory: adapts to a
#: neighbour's load within a second, ignores one slow step).
TIMING_WEIGHT = 0.25


def prefill_slice(decode_s: float | None, prefill_s_per_token: float | None, remaining: int) -> int:
    """Prompt tokens to feed in one iteration while other turns decode: as many as take about one decode step
    (`decode_s`, seconds) at the measured prefill cost (`prefill_s_per_token`), within
    `PREFILL_MIN_SLICE..PREFILL_SLICE_TOKENS`, and never more than the `remaining` tokens of the chunk. Before
    both costs are measured, the cap. Pure, so the rule is tested without a clock."""
    size = PREFILL_SLICE_TOKENS
    if decode_s is not None and prefill_s_per_token:
        size = max(PREFILL_MIN_SLICE, min(size, int(decode_s / prefill_s_per_token)))
    return max(1, min(size, remaining))


def running_average(old: float | None, new: float) -> float:
    return new if old is None else old + TIMING_WEIGHT * (new - old)

_FINAL = ("done", "error")


class TurnHandle:
    """A submitted turn: its coroutine, the queue its events go to, and its stop flag."""

    def __init__(self, on_crash: Callable[[BaseException], object]):
        self.steps = None  # the turn's coroutine, set by the owner (usually `Session.turn`, which reads `stop_event`)
        self.on_crash = on_crash  # turns an exception that escaped `steps` into a final event
        self.events: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self.finished = threading.Event()
        self.request = None  # the forward pass it waits for (`Prefill` / `Decode`), None before it starts
        self.prompt_started = False  # whether any of its prompt went in yet (`prompt_share.new_turns_first`)

    def stop(self) -> None:
        self.stop_event.set()


class Scheduler:
    """What every scheduler shares: the worker thread, submission, advancing a turn's coroutine, reading its
    events. Subclasses decide which forward passes each iteration runs (`_iterate`); the `runner` (the engine's
    backend, `backends.base.Backend`) runs them."""

    def __init__(self, runner, name: str = "streaming-engine"):
        self.runner = runner
        self.model = runner.model
        self._name = name
        self._cv = threading.Condition()
        self._incoming: deque[TurnHandle] = deque()
        self._thread: threading.Thread | None = None
        self._running = 0  # turns submitted and not finished (read by other threads under `_cv`)
        #: Forward passes so far, by kind ("prefill", "decode"): lets tests and benchmarks count steps, not seconds.
        self.passes = {"prefill": 0, "decode": 0}
        #: Called (on the worker thread) after every forward pass with its kind and the handles it served.
        self.on_pass: Callable[[str, list[TurnHandle]], None] | None = None
        #: Which of `DECODE_PATHS` decodes (only the batched scheduler may take the static step).
        self.decode_path = DECODE_PATHS[0]

    @property
    def active_turns(self) -> int:
        with self._cv:
            return self._running

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, handle: TurnHandle) -> None:
        with self._cv:
            if not self.alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._incoming.append(handle)
            self._running += 1
            self._cv.notify()

    def _take_incoming(self, block: bool) -> list[TurnHandle]:
        with self._cv:
            while block and not self._incoming:
                self._cv.wait()
            taken = list(self._incoming)
            self._incoming.clear()
            return taken

    def _run(self) -> None:
        while True:
            try:
                self._iterate()
            except BaseException:  # noqa: BLE001 - never let the worker die; each turn's errors are handled below
                logger.exception("scheduler iteration failed")
                time.sleep(ITERATION_RETRY_S)  # a fault that repeats must not spin the CPU

    def _iterate(self) -> None:
        raise NotImplementedError

    def _served(self, kind: str, handles: list[TurnHandle]) -> None:
        self.passes[kind] += 1
        if self.on_pass is not None:
            self.on_pass(kind, handles)

    def _advance(self, handle: TurnHandle, answer=None) -> bool:
        """Send `answer` to the turn and deliver its events until it asks for a forward pass (returns True, with
        `handle.request` set) or ends (returns False; its final event is delivered, `finished` is set)."""
        final = None
        while True:
            try:
                item = handle.steps.send(answer)
            except StopIteration:
                break
            except BaseException as exc:  # noqa: BLE001 - one turn's failure must not stop the others
                logger.exception("turn crashed")
                final = handle.on_crash(exc)
                break
            answer = None
            if isinstance(item, (Prefill, Decode)):
                handle.request = item
                return True
            if item is None:
                continue
            if getattr(item, "kind", None) in _FINAL:
                final = item
                handle.steps.close()  # runs the turn's `finally`; nothing more comes from it
                break
            handle.events.put(item)
        self._finish(handle, final)
        return False

    def _finish(self, handle: TurnHandle, final) -> None:
        request, handle.request = handle.request, None
        cache = getattr(request, "cache", None)
        if cache is not None:
            self.runner.turn_over(cache)  # e.g. the reply's batch row goes back to the conversation's own cache
        if final is None:
            final = handle.on_crash(RuntimeError("the turn ended without a final event"))
        with self._cv:
            self._running -= 1
        # `finished` first: a reader that gets the final event may start the next turn of this chat at once.
        handle.finished.set()
        handle.events.put(final)

    def read(self, handle: TurnHandle) -> Iterator:
        """Yield `handle`'s events until its final one; stop the turn if the reader goes away early."""
        try:
            while True:
                try:
                    event = handle.events.get(timeout=POLL_INTERVAL_S)
                except queue.Empty:
                    if not self.alive():
                        raise RuntimeError("the generation worker stopped unexpectedly") from None
                    continue
                yield event
                if getattr(event, "kind", None) in _FINAL:
                    return
        finally:
            if not handle.finished.is_set():
                handle.stop()

    def read_many(self, handles: dict[Hashable, TurnHandle]) -> Iterator[tuple[Hashable, object]]:
        """Yield `(key, event)` from several turns' queues as events arrive, until each turn's final event.

        Polls the queues in turn (no thread per turn); stops every unfinished turn if the reader goes away early.
        """
        pending = dict(handles)
        try:
            while pending:
                quiet = True
                for key, handle in list(pending.items()):
                    try:
                        event = handle.events.get_nowait()
                    except queue.Empty:
                        # The worker queues a turn's last event before marking it finished, so this is the end.
                        if handle.finished.is_set() and handle.events.empty():
                            del pending[key]
                        continue
                    quiet = False
                    if getattr(event, "kind", None) in ("done", "error"):
                        del pending[key]
                    yield key, event
                if quiet and pending:
                    if not self.alive():
                        raise RuntimeError("the generation worker stopped unexpectedly")
                    time.sleep(FAN_IN_POLL_S)
        finally:
            for handle in handles.values():
                if not handle.finished.is_set():
                    handle.stop()

    def _forward_alone(self, cache, ids: list[int]):
        """The logits after feeding `ids` on `cache` in a pass of its own (a prompt chunk or slice, or one
        round-robin decode token), or the exception that feeding raised (the turn reports it)."""
        try:
            return self.runner.forward([(cache, ids)])[0]
        except Exception as exc:  # noqa: BLE001 - the turn reports it
            return exc

    def _forward_rows(self, rows: list, kind: str) -> list:
        """Each row's logits from one pass; if that fails, from one pass per row (an exception for a row that
        fails alone), so only the conversation that causes an error sees it."""
        try:
            return self.runner.forward(rows)
        except Exception:  # noqa: BLE001 - find the conversation that fails: run each alone
            if len(rows) > 1:
                logger.exception("%s %s pass failed; retrying its %d rows one by one", self.runner.name, kind,
                                 len(rows))
            return [self._forward_alone(cache, ids) for cache, ids in rows]

    def _forward_prompt(self, request: Prefill, ids: list[int]):
        """`_forward_alone` for `ids`, all or part of `request`'s chunk."""
        return self._forward_alone(request.cache, ids)

    def _prefill(self, handle: TurnHandle) -> None:
        """Run `handle`'s `Prefill` request on its conversation's own cache and advance it with the logits."""
        answer = self._forward_prompt(handle.request, handle.request.ids)
        self._served("prefill", [handle])
        self._advance(handle, answer)


class RoundRobinScheduler(Scheduler):
    """The baseline: one forward pass per turn per iteration, turns taking turns, nothing batched."""

    def __init__(self, runner, name: str = "streaming-engine"):
        super().__init__(runner, name)
        self._queue: deque[TurnHandle] = deque()

    def _iterate(self) -> None:
        for handle in self._take_incoming(block=not self._queue):
            if self._advance(handle):
                self._queue.append(handle)
        if not self._queue:
            return
        handle = self._queue.popleft()
        if handle.stop_event.is_set():
            alive = self._advance(handle, STOP)
        elif isinstance(handle.request, Prefill):
            self._prefill(handle)
            alive = handle.request is not None
        else:
            answer = self._forward_alone(handle.request.cache, [handle.request.token_id])
            self._served("decode", [handle])
            alive = self._advance(handle, answer)
        if alive:
            self._queue.append(handle)


class QueuedScheduler(Scheduler):
    """The loop both continuous-batching policies share. Each iteration
      1. starts newly submitted turns and answers stopped ones `STOP` (a chunk already part-fed finishes first);
      2. feeds prompt tokens (`_prefill_round`, the policy's own);
      3. runs one decode step for the decoding turns (`_decode_round`, the policy's own).
    Turns wait in `_prefilling` or `_decoding` by the request they wait for, in arrival order."""

    def __init__(self, runner, name: str = "streaming-engine"):
        super().__init__(runner, name)
        self._prefilling: deque[TurnHandle] = deque()
        self._decoding: deque[TurnHandle] = deque()  # in arrival order
        self._fed: dict[int, int] = {}  # id(handle) -> tokens of its current `Prefill` already fed (in slices)
        #: The worker time prompts may take while replies decode (`prompt_share.py`), measured with `clock`
        #: (tests may replace it).
        self.prompt_share = PromptShare()
        self.clock = time.perf_counter

    def _iterate(self) -> None:
        idle = not self._prefilling and not self._decoding
        for handle in self._take_incoming(block=idle):
            self._place(handle, self._advance(handle))
        self._honour_stops()
        self._prefill_round()
        self._decode_round()

    def _place(self, handle: TurnHandle, alive: bool) -> None:
        """Queue a turn by the request it now waits for."""
        if not alive:
            return
        if isinstance(handle.request, Prefill):
            self._prefilling.append(handle)
        else:
            self._decoding.append(handle)

    def _honour_stops(self) -> None:
        for waiting in (self._prefilling, self._decoding):
            # A chunk already part-fed finishes first: stopping inside it would leave half a chunk in the cache.
            for handle in [h for h in waiting if h.stop_event.is_set() and id(h) not in self._fed]:
                waiting.remove(handle)
                self._dropped(handle)
                self._place(handle, self._advance(handle, STOP))

    def _dropped(self, handle: TurnHandle) -> None:
        """`handle` leaves its queue before its request was served (a stop)."""

    def _prefill_round(self) -> None:
        raise NotImplementedError

    def _decode_round(self) -> None:
        raise NotImplementedError


class BatchedScheduler(QueuedScheduler):
    """Continuous batching: every decoding turn is a row of one forward pass per iteration (see the module doc).
    The runner makes the batch its rows live in (`new_batch`: a `BatchedSinkCache` on transformers) and runs the
    batched step (`forward_batch`); prompts go through its `forward`."""

    def __init__(self, runner, *, max_batch: int = 16, prefill_budget: int = 512, name: str = "streaming-engine",
                 decode_step: str = DEFAULT_DECODE_STEP, cuda_graphs: str = DEFAULT_CUDA_GRAPHS,
                 overlap: str = DEFAULT_OVERLAP):
        super().__init__(runner, name)
        if isinstance(prefill_budget, bool) or not isinstance(prefill_budget, int) or prefill_budget < 1:
            raise ValueError(f"prefill_budget must be an integer >= 1, got {prefill_budget!r}")
        if decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step must be one of {', '.join(DECODE_STEPS)}; got {decode_step!r}")
        # `static_step`: the runner's fixed-shape step over the whole batch, which also samples its rows
        # (`decode(tokens, samplings) -> (logits, ids)`), or None: eager.
        self.batch, self.static_step = runner.new_batch(max_batch, decode_step=decode_step, cuda_graphs=cuda_graphs,
                                                        overlap=overlap)
        #: The step that runs: "static" or "eager" ("auto" resolved, after any fallback).
        self.decode_step = "static" if self.static_step is not None else "eager"
        if self.static_step is not None:
            path = DECODE_PATHS[2] if self.static_step.graphs else DECODE_PATHS[1]
            self.decode_path = path + "+overlap" if getattr(self.static_step, "overlaps", False) else path
        self.prefill_budget = prefill_budget
        self._owner: dict[int, TurnHandle] = {}  # id(ConversationCache) -> the turn decoding on that row
        #: False: whole chunks even while others decode (the behaviour before issue 28), the fairness benchmark's
        #: baseline (`benchmarks/fairness.py`).
        self.slice_prefill = True
        self.decode_s: float | None = None  # running average of one decode step, seconds
        self.prefill_s_per_token: float | None = None  # running average of prefill seconds per prompt token

    def _dropped(self, handle: TurnHandle) -> None:
        self._owner.pop(id(handle.request.cache), None)

    def _prefill_round(self) -> None:
        """New turns first (`prompt_share.new_turns_first`): while others decode or other prompts wait, the turns
        whose prompt has not started get their first slice (up to `PREFILL_SLICE_TOKENS`; a short prompt whole),
        together, and nothing else this iteration. Otherwise, nobody decoding: prompt chunks for up to
        `prefill_budget` tokens, each waiting turn at most once, in arrival order, handed to the runner in one
        call (prompts that arrived together may share one pass: `backends.hf.TransformersBackend.forward`).
        Somebody decoding: one slice (`prefill_slice`) of the first waiting chunk, only while the prompts' share
        of the worker allows (`PromptShare.may_continue`); the rest of that chunk goes to the back, behind the
        other waiting prompts."""
        if not self._prefilling:
            return
        if self.slice_prefill:
            fresh, going = new_turns_first(self._prefilling, lambda handle: handle.prompt_started)
            if fresh and (going or self._decoding):
                for handle in fresh:
                    self._prefilling.remove(handle)
                self._feed([(h, 0, min(len(h.request.ids), PREFILL_SLICE_TOKENS)) for h in fresh])
                return
        if not self._decoding or not self.slice_prefill:
            slices, spent = [], 0
            while self._prefilling and spent < self.prefill_budget:
                handle = self._prefilling.popleft()
                fed = self._fed.pop(id(handle), 0)
                spent += len(handle.request.ids) - fed
                slices.append((handle, fed, len(handle.request.ids) - fed))
            self._feed(slices)
            return
        if not self.prompt_share.may_continue():
            return  # prompts had their share of the worker: the decoding replies go first
        handle = self._prefilling.popleft()
        fed = self._fed.pop(id(handle), 0)
        remaining = len(handle.request.ids) - fed
        self._feed([(handle, fed, prefill_slice(self.decode_s, self.prefill_s_per_token, remaining))])

    def _feed(self, slices: list[tuple[TurnHandle, int, int]]) -> None:
        """Feed each `(handle, fed, size)`: tokens `fed..fed+size` of the turn's prompt chunk on its own cache, all
        in one runner call (`_forward_rows`: one pass, or one per row where the runner cannot share). A turn is
        answered once its chunk's last token went in (that token's logits): a causal model's cache after a chunk
        fed in slices is the cache after feeding it whole, so slicing changes no reply. A part-fed chunk waits at
        the back. Beside decoding replies, the call's time is spent from `prompt_share`."""
        rows = [(h.request.cache, h.request.ids[fed:fed + size]) for h, fed, size in slices]
        beside_replies = bool(self._decoding)
        started = self.clock()
        answers = self._forward_rows(rows, "prefill") if len(rows) > 1 else [self._forward_prompt(
            slices[0][0].request, rows[0][1])]
        elapsed = self.clock() - started
        tokens = sum(size for _, _, size in slices)
        self.prefill_s_per_token = running_average(self.prefill_s_per_token, elapsed / tokens)
        if beside_replies:
            self.prompt_share.fed(elapsed)
        for handle, _, _ in slices:
            handle.prompt_started = True
        self._served("prefill", [h for h, _, _ in slices])
        for (handle, fed, size), answer in zip(slices, answers):
            if fed + size < len(handle.request.ids) and not isinstance(answer, BaseException):
                self._fed[id(handle)] = fed + size
                self._prefilling.append(handle)
                continue
            self._place(handle, self._advance(handle, answer))

    def _decode_round(self) -> None:
        batch = self.batch
        for handle in list(self._decoding):  # free rows go to the longest-waiting turns
            if len(batch.rows) >= batch.max_batch:
                break
            cache = handle.request.cache
            if cache.attached:
                continue
            try:
                batch.join(cache)
            except Exception as exc:  # noqa: BLE001 - e.g. a cache from another model: this turn fails alone
                self._decoding.remove(handle)
                self._place(handle, self._advance(handle, exc))
                continue
            self._owner[id(cache)] = handle
        if not batch.rows:
            return
        rows = list(batch.rows)
        handles = [self._owner[id(cache)] for cache in rows]
        tokens = [handle.request.token_id for handle in handles]
        started = self.clock()
        try:
            if self.static_step is not None:
                samplings = [handle.request.sampling for handle in handles]
                logits, ids = self.static_step.decode(tokens, samplings)
                answers = [logits[b] if ids is None or samplings[b] is None else Sampled(ids[b])
                           for b in range(len(rows))]
            else:
                logits = self.runner.forward_batch(batch, tokens)
                answers = [logits[b] for b in range(len(rows))]
            step_s = self.clock() - started
            self.decode_s = running_average(self.decode_s, step_s)
            self.prompt_share.decoded(step_s, bool(self._prefilling))
        except Exception:  # noqa: BLE001 - find the row that fails: run each alone
            logger.exception("batched decode failed; retrying its %d rows one by one", len(rows))
            answers = []
            for cache, token in zip(rows, tokens):
                try:
                    answers.append(self.runner.forward_batch(batch, [token], range(cache.row, cache.row + 1))[0])
                except Exception as exc:  # noqa: BLE001 - this conversation's error, reported to it alone
                    answers.append(exc)
        self._served("decode", handles)
        for cache, handle, answer in zip(rows, handles, answers):
            if isinstance(answer, BaseException) and cache.attached:
                cache.batch.leave(cache, keep=False)  # its row holds a half-written step: drop it
            self._decoding.remove(handle)
            self._owner.pop(id(cache), None)
            alive = self._advance(handle, answer)
            if alive and isinstance(handle.request, Decode):
                self._owner[id(handle.request.cache)] = handle
                self._decoding.append(handle)
            else:
                self._place(handle, alive)


class PackedScheduler(QueuedScheduler):
    """Continuous batching for a runner that packs several conversations' rows into one pass (`packs_rows`:
    llama.cpp, one `llama_decode` over several sequences). Each iteration, after the shared start and stops,
      2. feeds at most `prefill_budget` waiting prompt tokens (and the runner's `pass_tokens`) in one pass,
         several conversations together when they fit, new turns first, then in queue order; while replies
         decode, prompts already under way are fed only within their share of the worker (`prompt_share.py`,
         the same rule as `BatchedScheduler`). A chunk longer than what is left of the
         budget is fed in *slices*: the rest of it waits for the next iteration (behind the other waiting
         prompts), after the decode step below, so a long paste delays each other reply by one bounded slice per
         token, however long its chunks (issue 28 measured llama.cpp prefill at ~81 tok/s on the test CPU: a whole
         512-token chunk in one pass held every other user for seconds). The turn is answered once its last slice
         went in (the logits of that slice's last token), so slicing changes no token;
      3. decodes one token for up to `max_batch` decoding turns in **one** pass (each its own row); with
         `batched=False` (the round-robin baseline) one turn per pass, turns taking turns.
    Turns beyond `max_batch` wait their turn: a row served goes to the back of the queue. If a shared pass fails,
    its rows are retried one by one, so only the conversation that causes an error sees it."""

    def __init__(self, runner, *, max_batch: int = 16, prefill_budget: int = 512, batched: bool = True,
                 name: str = "streaming-engine"):
        super().__init__(runner, name)
        for label, value in (("max_batch", max_batch), ("prefill_budget", prefill_budget)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
        rows = runner.max_rows or max_batch
        self.max_batch = min(max_batch, rows) if batched else 1
        self.prefill_budget = prefill_budget

    def _prefill_round(self) -> None:
        """One pass of at most `prefill_budget` prompt tokens (and the runner's pass size): waiting chunks, new
        turns first (`prompt_share.new_turns_first`) and then in queue order, the last one taken perhaps only in
        part (a slice; the rest goes next iteration). While replies decode, the continuing prompts are taken only
        while their share of the worker allows (`PromptShare.may_continue`), and the pass's time is spent from
        it."""
        room = min(self.prefill_budget, self.runner.pass_tokens or self.prefill_budget)
        beside_replies = bool(self._decoding)
        fresh, going = new_turns_first(self._prefilling, lambda handle: handle.prompt_started)
        if beside_replies and not self.prompt_share.may_continue():
            going = []
        slices = []  # (handle, first token of the slice, slice length)
        for handle in fresh + going:
            if room <= 0:
                break
            fed = self._fed.get(id(handle), 0)
            size = min(len(handle.request.ids) - fed, room)
            slices.append((handle, fed, size))
            room -= size
        if not slices:
            return
        rows = [(h.request.cache, h.request.ids[fed:fed + size]) for h, fed, size in slices]
        started = self.clock()
        answers = self._forward_rows(rows, "prefill")
        if beside_replies:
            self.prompt_share.fed(self.clock() - started)
        self._served("prefill", [h for h, _, _ in slices])
        for (handle, fed, size), answer in zip(slices, answers):
            handle.prompt_started = True
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
        handles = list(self._decoding)[: self.max_batch]
        if not handles:
            return
        started = self.clock()
        answers = self._forward_rows([(h.request.cache, [h.request.token_id]) for h in handles], "decode")
        self.prompt_share.decoded(self.clock() - started, bool(self._prefilling))
        self._served("decode", handles)
        for handle, answer in zip(handles, answers):
            self._decoding.remove(handle)
            self._place(handle, self._advance(handle, answer))


def make_scheduler(kind: str, runner, *, max_batch: int = 16, prefill_budget: int = 512,
                   decode_step: str = DEFAULT_DECODE_STEP, cuda_graphs: str = DEFAULT_CUDA_GRAPHS,
                   overlap: str = DEFAULT_OVERLAP) -> Scheduler:
    """`"batched"` (continuous batching) or `"round-robin"` (the one-conversation-per-pass baseline) for `runner`
    (a `backends.base.Backend`), the policy chosen by what the runner can do, never by which backend it is:

    * a runner that packs rows (`packs_rows`) gets `PackedScheduler` (round-robin: one row per pass), its prompt
      budget per iteration at most `PREFILL_SLICE_TOKENS`;
    * otherwise `BatchedScheduler` where conversations can share a batched decode (`batchable`), else the
      round-robin worker even when "batched" is asked for (`families.batchable`: local sliding-window layers,
      per-layer-type RoPE): same replies, no batching.
    """
    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {kind!r}")
    name = runner.worker_name
    if runner.packs_rows:
        return PackedScheduler(runner, max_batch=max_batch, prefill_budget=min(prefill_budget, PREFILL_SLICE_TOKENS),
                               batched=kind == "batched", name=name)
    if kind == "batched" and runner.batchable:
        return BatchedScheduler(runner, max_batch=max_batch, prefill_budget=prefill_budget, name=name,
                                decode_step=decode_step, cuda_graphs=cuda_graphs, overlap=overlap)
    if kind == "batched":
        logger.info("%s has local or per-layer-type attention layers: decoding one conversation per pass",
                    type(runner.model).__name__)
    return RoundRobinScheduler(runner, name=name)
