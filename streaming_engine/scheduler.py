"""Threading and policy for the engine: one worker thread that owns the model, per-turn event queues, and the one
loop that decides which forward passes run. Nothing else here.

A running turn is a coroutine (`Session.turn`) that yields `Event`s for its reader and *requests* for forward
passes (`generation.Prefill`: a prompt chunk; `generation.Decode`: one sampled token), and is sent back each
request's answer. The worker alone touches the model and the caches, so forward passes never overlap.

The seam (`backends/base.py`): the scheduler decides WHAT runs (policy: which turns get a prompt slice or a decode
row, budgets, stops, retrying each row alone); its *runner*, the engine's backend, decides HOW: `forward` over
`(cache, ids)` rows for prompts, and the batch decode rows live in (`new_decode_batch`, a `DecodeBatch`: which rows
it holds, `join`, one `step` over them, `step_alone` for the retry, `drop` after a row failed), `turn_over` when a
reply ends. The runner owns that batch: on transformers a `BatchedSinkCache`, or the fixed-shape static step whose
rows are sampled on the device (replayed from CUDA graphs per `cuda_graphs`, docs/gpu-decode.md; its turns are then
answered with their sampled token, `generation.Sampled`); on llama.cpp one packed `llama_decode`; one conversation
per pass where the model cannot share one (`families.batchable`) or round-robin is asked for. A captured decode step
is therefore one more `DecodeBatch`, never another scheduler; `decode_path` says which one runs.

`Scheduler` is the one loop. Each iteration
  1. starts newly submitted turns and honours stops (a stopped turn is answered `STOP` at its next request, so it
     leaves before the next forward pass and never delays the others; a chunk already part-fed finishes first);
  2. feeds prompt tokens, waiting turns in arrival order, each at most once, until the iteration's *room* is
     spent, all in one call of the runner (which runs the chunks that can share a pass together: on transformers
     fresh conversations' first chunks, `generation.padded_prefill_rows`; on llama.cpp any rows). The room is
     `prefill_budget` (and never more than the runner's `pass_tokens`); while other turns are decoding, it is one
     *slice* sized to take about as long as one decode step (`prefill_slice`), and a prompt already under way
     gets it only while the prompts' share of the worker allows (`prompt_share.py`: at most `PREFILL_SHARE` of
     its time), so a decoding reply's time per token stays within a bound however long the paste, and the paste
     still advances. While nothing decodes, a pass is sized to take about `PROMPT_PASS_S`, and a turn that
     arrives during it *cuts in*: where the runner can pause a pass between decoder layers
     (`Backend.forward_with_breaks`), the new turn's first slice runs there, on its own cache (`_cut_in`), and
     the paused pass goes on after it unchanged; elsewhere the newcomer waits a fraction of a second for the
     pass, not a whole 512-token chunk on a CPU. New turns go first: a turn whose prompt has not started gets
     its first slice (a short prompt whole) before any other prompt's, without waiting for that share
     (docs/benchmarks.md "One client against another" measures both). The last chunk taken may be cut: the
     rest of it waits at the back, behind the other waiting prompts. A causal model's cache after a chunk fed in
     slices is the cache after feeding it whole, so slicing changes no reply;
  3. runs **one** decode step for up to the batch's `rows_per_pass` decoding turns: the rows the batch already
     holds, then the longest-waiting turns (first come first served; a row served goes to the back of the queue).
     Rows join when their prompt is done and leave when their reply ends, between steps; each row is sampled with
     its own settings and seed by its own coroutine and streams to its own queue.
  If a shared pass fails, each of its rows is retried alone, so an error fails only the conversation that causes it.

With `round_robin=True` (the baseline continuous batching replaced, kept for the serving benchmark) the same loop
feeds one turn's prompt chunk per iteration, whole and alone, and decodes one row per pass on its conversation's
own cache, turns taking turns.

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
from .generation import STOP, Decode, Prefill
from .prompt_share import PromptShare, new_turns_first
from .validate import check_choice, check_int

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
#: token). The time rule below can only make a slice smaller.
PREFILL_SLICE_TOKENS = 64
#: Fewest prompt tokens a slice takes, however fast decoding is: tinier slices would spend the worker on
#: per-pass overhead and let a paste crawl.
PREFILL_MIN_SLICE = 8
#: Longest a prompt pass should take while no reply decodes, seconds. A turn that arrives meanwhile cuts into
#: the pass between layers where the runner can pause (transformers, `Scheduler._cut_in`); where it cannot
#: (llama.cpp: one `llama_decode`), or with `cut_in` off, it waits at most about this long for its own first slice
#: (new turns go first). At the measured prompt cost a pass takes `prompt_pass_tokens`, at least
#: `PREFILL_SLICE_TOKENS`, at most the budget. On the 2-core test CPU (SmolLM2-135M, 1 thread) 512 prompt tokens
#: took 2.16 s in one pass, 2.24 s in 128-token passes and 2.43 s in 64-token ones, so a quarter second costs a lone
#: paste about a tenth of its speed; on a GPU a whole 512-token chunk takes milliseconds and the budget decides.
PROMPT_PASS_S = 0.25
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


def prompt_pass_tokens(pass_s: float | None, prefill_s_per_token: float | None, budget: int) -> int:
    """Prompt tokens for one pass while no reply decodes: as many as take about `pass_s` seconds at the measured
    cost per token, within `PREFILL_SLICE_TOKENS..budget`; the whole `budget` before the cost is measured or when
    `pass_s` is None (no time bound). Pure, like `prefill_slice`."""
    if pass_s is None or not prefill_s_per_token:
        return budget
    return min(budget, max(PREFILL_SLICE_TOKENS, int(pass_s / prefill_s_per_token)))


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
    """The worker thread, submission, advancing a turn's coroutine, reading its events, and the one loop that
    decides which forward passes each iteration runs (module docstring); the `runner` (the engine's backend,
    `backends.base.Backend`) runs them."""

    def __init__(self, runner, *, max_batch: int = 16, prefill_budget: int = 512, round_robin: bool = False,
                 name: str = "streaming-engine", decode_step: str = DEFAULT_DECODE_STEP,
                 cuda_graphs: str = DEFAULT_CUDA_GRAPHS, overlap: str = DEFAULT_OVERLAP):
        check_int("max_batch", max_batch, 1)
        check_int("prefill_budget", prefill_budget, 1)
        check_choice("decode_step", decode_step, DECODE_STEPS)
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
        #: The baseline: one turn's prompt chunk per iteration, one decode row per pass (module docstring).
        self.round_robin = round_robin
        self.prefill_budget = prefill_budget
        #: The runner's batch decoding rows live in (`backends.base.DecodeBatch`).
        self.batch = runner.new_decode_batch(1 if round_robin else max_batch, round_robin=round_robin,
                                             decode_step=decode_step, cuda_graphs=cuda_graphs, overlap=overlap)
        #: False: whole budgets even while others decode (the behaviour before issue 28), the fairness benchmark's
        #: baseline (`benchmarks/fairness.py`).
        self.slice_prefill = True
        #: While no reply decodes, a prompt pass takes about this long at most (`PROMPT_PASS_S`); None: whole
        #: budgets, as before (tests that count passes of whole chunks, the fairness benchmark's baseline).
        self.prompt_pass_s: float | None = PROMPT_PASS_S
        #: Whether turns that arrive during a prompt pass begun with nothing decoding are fed between its layers
        #: (`_cut_in`); False: they wait for the pass to end (the fairness benchmark's baseline).
        self.cut_in = True
        self.clock = time.perf_counter  # what `prefill_slice`'s costs are measured with (tests may replace it)
        #: The worker time prompts may take while replies decode (`prompt_share.py`), measured with `clock`.
        self.prompt_share = PromptShare()
        self.decode_s: float | None = None  # running average of one decode step, seconds
        self.prefill_s_per_token: float | None = None  # running average of prefill seconds per prompt token
        self._prefilling: deque[TurnHandle] = deque()
        self._decoding: deque[TurnHandle] = deque()  # in arrival order, a row served going to the back
        self._fed: dict[int, int] = {}  # id(handle) -> tokens of its current `Prefill` already fed (in slices)
        self._cutting_in = False  # inside `_cut_in`: the passes it runs are not cut into again
        self._cut_in_s = 0.0  # time `_cut_in` took during the idle pass under way (not that pass's own cost)
        self._cut_in_end: float | None = None  # when the last cut into that pass ended (None: none did)

    @property
    def decode_path(self) -> str:
        """Which of `DECODE_PATHS` decodes (the batch's)."""
        return self.batch.path

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

    def _run_prompt_rows(self, rows: list, between_layers: Callable[[], None] | None) -> list:
        if between_layers is None:
            return self.runner.forward(rows)
        return self.runner.forward_with_breaks(rows, between_layers)

    def _forward_alone(self, cache, ids: list[int], between_layers: Callable[[], None] | None = None):
        """The logits after feeding `ids` on `cache` in a pass of its own, or the exception that feeding raised (the
        turn reports it)."""
        try:
            return self._run_prompt_rows([(cache, ids)], between_layers)[0]
        except Exception as exc:  # noqa: BLE001 - the turn reports it
            return exc

    def _forward_rows(self, rows: list, between_layers: Callable[[], None] | None = None) -> list:
        """Each prompt row's logits from one runner call; if that fails, from one pass per row (an exception for a
        row that fails alone), so only the conversation that causes an error sees it. `between_layers`: the
        callback the runner may call between decoder layers (`_cut_in`)."""
        if len(rows) == 1:
            return [self._forward_alone(*rows[0], between_layers)]
        try:
            return self._run_prompt_rows(rows, between_layers)
        except Exception:  # noqa: BLE001 - find the conversation that fails: run each alone
            logger.exception("%s prefill pass failed; retrying its %d rows one by one", self.runner.name, len(rows))
            return [self._forward_alone(cache, ids, between_layers) for cache, ids in rows]

    def _cut_in(self) -> None:
        """Called by the runner between two decoder layers of a prompt pass that began with nothing decoding (a
        paste's pass, `_feed`): turns submitted since, whose prompt has not started, get their first slice now, in
        a pass of their own on their own caches, so their first token comes within one layer of their arrival
        instead of after the rest of that pass (a forward pass cannot be cut short, but it can pause: the paste's
        activations wait on the stack, its cache has the earlier layers' keys of this slice and is touched by no
        other pass). Their next tokens decode at the next iteration's step, as every row's do; the paste's pass
        then goes on from the layer where it paused, so its cache and reply are those of an unbroken pass."""
        if not self._incoming:  # the common case, before every layer: no lock
            return
        self._cutting_in = True
        started = self.clock()
        try:
            for handle in self._take_incoming(block=False):
                self._place(handle, self._advance(handle))
            fresh, _ = new_turns_first(self._prefilling, lambda handle: handle.prompt_started)
            if fresh:
                self._feed_new_turns(fresh)
        except Exception:  # noqa: BLE001 - a fault here must not fail the paused pass: its cache is half-written
            logger.exception("cutting into a prompt pass failed; the turns wait for the next iteration")
        finally:
            self._cut_in_end = self.clock()
            self._cut_in_s += self._cut_in_end - started
            self._cutting_in = False

    # --- the loop ------------------------------------------------------------------------------------------------

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
                self._place(handle, self._advance(handle, STOP))

    def _room(self) -> int:
        """Prompt tokens this iteration may feed (see the module docstring, step 2)."""
        room = self.prefill_budget
        if self._decoding and self.slice_prefill:
            waiting = sum(len(h.request.ids) - self._fed.get(id(h), 0) for h in self._prefilling)
            room = min(room, prefill_slice(self.decode_s, self.prefill_s_per_token, waiting))
        elif self.slice_prefill:
            room = prompt_pass_tokens(self.prompt_pass_s, self.prefill_s_per_token, room)
        return min(room, self.runner.pass_tokens or room)

    def _prefill_round(self) -> None:
        """New turns first (`prompt_share.new_turns_first`): while others decode or other prompts wait, the turns
        whose prompt has not started get their first slice (up to `PREFILL_SLICE_TOKENS`; a short prompt whole),
        together, and nothing else this iteration. Otherwise waiting prompt chunks in queue order, each at most
        once, until the room is spent (the last one perhaps only in part); beside decoding replies only while the
        prompts' share of the worker allows (`PromptShare.may_continue`). Round-robin: the first waiting chunk,
        whole."""
        if not self._prefilling:
            return
        if self.round_robin:
            handle = self._prefilling.popleft()
            fed = self._fed.pop(id(handle), 0)
            self._feed([(handle, fed, len(handle.request.ids) - fed)])
            return
        if self.slice_prefill:
            fresh, going = new_turns_first(self._prefilling, lambda handle: handle.prompt_started)
            if fresh and (going or self._decoding):
                self._feed_new_turns(fresh)
                return
            if self._decoding and not self.prompt_share.may_continue():
                return  # prompts had their share of the worker: the decoding replies go first
        room = self._room()
        slices = []  # (handle, first token of the slice, slice length)
        for handle in list(self._prefilling):
            fed = self._fed.pop(id(handle), 0)
            size = min(len(handle.request.ids) - fed, room)
            self._prefilling.remove(handle)
            slices.append((handle, fed, size))
            room -= size
            if room <= 0:
                break
        self._feed(slices)

    def _feed_new_turns(self, fresh: list[TurnHandle]) -> None:
        """The first slice of each turn in `fresh` (not started, arrival order), up to `PREFILL_SLICE_TOKENS` each (a
        short prompt whole), in one runner call while the runner's `pass_tokens` allow."""
        room = self.runner.pass_tokens
        slices = []
        for handle in fresh:
            size = min(len(handle.request.ids), PREFILL_SLICE_TOKENS)
            if room is not None and slices and size > room:
                break
            self._prefilling.remove(handle)
            slices.append((handle, 0, size))
            room = None if room is None else room - size
        self._feed(slices)

    def _feed(self, slices: list[tuple[TurnHandle, int, int]]) -> None:
        """Feed each `(handle, fed, size)`: tokens `fed..fed+size` of the turn's prompt chunk on its own cache, all
        in one runner call. A turn is answered once its chunk's last token went in (that token's logits); a
        part-fed chunk waits at the back. Beside decoding replies, the call's time is spent from
        `prompt_share`. While nothing decodes, new turns may cut into the pass between layers (`_cut_in`); their
        time is not this pass's."""
        rows = [(h.request.cache, h.request.ids[fed:fed + size]) for h, fed, size in slices]
        beside_replies = bool(self._decoding)
        breakable = (self.cut_in and self.slice_prefill and not self.round_robin and not beside_replies
                     and not self._cutting_in)
        if breakable:  # only here: the passes `_cut_in` runs come through `_feed` too
            self._cut_in_s, self._cut_in_end = 0.0, None
        started = self.clock()
        answers = self._forward_rows(rows, self._cut_in if breakable else None)
        ended = self.clock()
        elapsed = ended - started - (self._cut_in_s if breakable else 0.0)
        tokens = sum(size for _, _, size in slices)
        self.prefill_s_per_token = running_average(self.prefill_s_per_token, elapsed / tokens)
        if beside_replies:
            self.prompt_share.fed(elapsed)
        elif breakable and self._cut_in_end is not None and self._decoding:
            # Turns that cut in decode now, and the rest of this pass ran beside them: spent like a slice.
            self.prompt_share.fed(ended - self._cut_in_end)
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
        """One step for the rows the batch holds and, while it has room, the longest-waiting decoding turns."""
        batch = self.batch
        chosen = [h for h in self._decoding if batch.holds(h.request.cache)]
        for handle in list(self._decoding):
            if len(chosen) >= batch.rows_per_pass:
                break
            cache = handle.request.cache
            if batch.holds(cache):
                continue
            try:
                batch.join(cache)
            except Exception as exc:  # noqa: BLE001 - e.g. a cache from another model: this turn fails alone
                self._decoding.remove(handle)
                self._place(handle, self._advance(handle, exc))
                continue
            chosen.append(handle)
        if not chosen:
            return
        requests = [handle.request for handle in chosen]
        started = self.clock()
        try:
            answers = batch.step(requests)
            step_s = self.clock() - started
            self.decode_s = running_average(self.decode_s, step_s)
            self.prompt_share.decoded(step_s, bool(self._prefilling))
        except Exception:  # noqa: BLE001 - find the row that fails: run each alone
            logger.exception("batched decode failed; retrying its %d rows one by one", len(requests))
            answers = []
            for request in requests:
                try:
                    answers.append(batch.step_alone(request))
                except Exception as exc:  # noqa: BLE001 - this conversation's error, reported to it alone
                    answers.append(exc)
        self._served("decode", chosen)
        for handle, answer in zip(chosen, answers):
            if isinstance(answer, BaseException):
                batch.drop(handle.request.cache)  # its row may hold a half-written step
            self._decoding.remove(handle)
            self._place(handle, self._advance(handle, answer))


def make_scheduler(kind: str, runner, *, max_batch: int = 16, prefill_budget: int = 512,
                   decode_step: str = DEFAULT_DECODE_STEP, cuda_graphs: str = DEFAULT_CUDA_GRAPHS,
                   overlap: str = DEFAULT_OVERLAP) -> Scheduler:
    """`"batched"` (continuous batching) or `"round-robin"` (the one-conversation-per-pass baseline) for `runner`
    (a `backends.base.Backend`). What a pass can hold is the runner's to say (its `DecodeBatch`, `pass_tokens`),
    never which backend it is; a runner that packs every row into its passes (`packs_rows`: llama.cpp, whose
    prompt passes are slow per token) gets a prompt budget of at most `PREFILL_SLICE_TOKENS` per iteration."""
    check_choice("scheduler", kind, SCHEDULERS)
    if runner.packs_rows:
        prefill_budget = min(prefill_budget, PREFILL_SLICE_TOKENS)
    return Scheduler(runner, max_batch=max_batch, prefill_budget=prefill_budget, round_robin=kind == "round-robin",
                     name=runner.worker_name, decode_step=decode_step, cuda_graphs=cuda_graphs, overlap=overlap)
