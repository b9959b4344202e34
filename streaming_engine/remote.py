"""Turns that run in another process while every conversation stays here: the engine for ZeroGPU Spaces.

On a Hugging Face ZeroGPU Space the GPU is attached only inside functions decorated with `spaces.GPU`, and every
call of such a function runs in a forked worker process, which may be a fresh fork each time. Nothing a call leaves
in its worker can be relied on later, and nothing it changes reaches the main process except what it returns. So
if whole handlers ran in the worker, the sessions they create would live and die there, out of reach of every
handler that runs in the main process (Stop, New chat, Download, a page reload, the HTTP API).

`RemoteTurnsEngine` is a `StreamingEngine` whose sessions (history, counters, KV cache) always stay in the main
process, so every caller sees the same conversations. Only `chat` and `chat_many` differ: a call claims its
sessions here, ships their state (`handoff.py`) into **one** call of the `run_elsewhere`-wrapped function, and
relays what that call streams back: each event as it happens and, with each final event, the session's updated
state, which is adopted here before the event is passed on (so a caller reading `history` or `export` right after
"done" sees the finished turn). Inside the call, a worker-local engine runs the turns exactly as a local engine
would, its cache on the GPU; only forward passes and the cache's round trip happen there.

Stop crosses the process boundary through a `StopBoard`: a few bytes of shared memory mapped when the engine is
built, before any worker is forked, so every fork shares them. A watcher in the worker checks its slots between
forward passes. If the worker dies or the platform refuses the call, a turn that had started keeps the user's
message and the partial reply (the cache is re-primed from the history next turn, as after any failure); a turn
that never started is refused, so the message goes back to the user unchanged.

`decode_step="auto"` means the eager step here and in the workers (`REMOTE_AUTO_DECODE_STEP`, docs/gpu-decode.md).

Boundary: no gradio and no `spaces` here; the caller passes the decorator (`run_elsewhere=spaces.GPU(...)`), or
nothing, which runs the same path in-process.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

from .counters import _grown
from .engine import EngineBusy, EngineConfig, Refused, SessionNotFound, StreamingEngine
from .handoff import SessionState, capture, export_state, import_state, open_state
from .session import CONTINUE_ELSEWHERE, Event, refused

#: How often the worker's stop watcher looks at its stop slots (seconds): well under one decode step on a CPU.
STOP_POLL_S = 0.02
#: What decode_step="auto" means for turns that run elsewhere (ZeroGPU workers): the eager step, until a
#: measurement shows the static step's allocation and graph capture paying back within one short GPU call.
REMOTE_AUTO_DECODE_STEP = "eager"
_FINAL = ("done", "error")


class StopBoard:
    """One byte per running turn in memory shared with every process forked after it was made.

    `acquire` hands out a free slot (None when all are taken), `set` raises its flag, the worker reads it with
    `is_set`, and `release` clears it for the next turn. Slots are handed out and released in the main process only.
    """

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"a stop board needs at least one slot, got {slots}")
        self._flags = mmap.mmap(-1, slots)  # anonymous and MAP_SHARED: a fork sees the same bytes
        self._free = list(range(slots))
        self._lock = threading.Lock()

    def acquire(self) -> int | None:
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
        self._flags[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self._flags[slot] = 0
        with self._lock:
            self._free.append(slot)

    def set(self, slot: int) -> None:
        self._flags[slot] = 1

    def is_set(self, slot: int) -> bool:
        return self._flags[slot] == 1


class RemoteTurn:
    """The main process's handle on a turn running elsewhere; `stop`, `settle`, `rewind` and `close` use it
    exactly as they use a local turn's handle."""

    def __init__(self, board: StopBoard, slot: int):
        self.board = board
        self.slot = slot
        self.stop_event = threading.Event()
        self.finished = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()
        self.board.set(self.slot)


@dataclass
class _Claim:
    """A session taken for one remote call: its handle, the state shipped out, the reply seen so far."""

    handle: RemoteTurn
    state: SessionState
    reply: str = ""
    started: bool = False  # an event of this turn came back: the worker accepted the message




class RemoteTurnsEngine(StreamingEngine):
    """A `StreamingEngine` whose forward passes run inside `run_elsewhere(fn)` calls (e.g. `spaces.GPU(...)`),
    one call per `chat`/`chat_many`, while its sessions stay in this process."""

    continues_replies = False  # see `continue_reply`

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, *,
                 run_elsewhere: Callable[[Callable], Callable] | None = None):
        config = config or EngineConfig()
        if config.decode_step == "auto":
            # Eager here and in every worker: a worker may be a fresh fork per call, which would allocate the static
            # cache and capture its graphs again inside each call's GPU time, and the engine built here must not
            # touch CUDA before the fork (the model may report a CUDA device that `spaces` defers).
            config = replace(config, decode_step=REMOTE_AUTO_DECODE_STEP)
        super().__init__(model, tokenizer, config)
        # Made now, before any worker is forked, so every worker shares it.
        self.stop_board = StopBoard(self.config.max_active_turns)
        self._inflight: dict[str, str] = {}  # session id -> the user message of its turn running elsewhere
        self._remote_turns = 0
        self._worker: tuple[int, StreamingEngine] | None = None  # (pid, engine) of the worker-local engine
        self.run_turns = run_elsewhere(self.turns_in_worker) if run_elsewhere else self.turns_in_worker

    @property
    def remote_turns(self) -> int:
        """Turns running elsewhere right now."""
        with self._lock:
            return self._remote_turns

    # --- main process ------------------------------------------------------------------------------------------

    def history(self, session_id: str) -> list[dict]:
        """As `StreamingEngine.history`; while a turn runs elsewhere its user message is already included, as a
        local turn's is once it starts."""
        messages = super().history(session_id)
        pending = self._inflight.get(session_id)
        return messages + [{"role": "user", "content": pending}] if pending is not None else messages

    def chat(self, session_id: str, message: str, **sampling) -> Iterator[Event]:
        for _, event in self.chat_many([session_id], message, **sampling):
            yield event

    def start_chat(self, session_id: str, message: str, **sampling) -> Iterator[Event]:
        """As `StreamingEngine.start_chat`: the session is claimed (or the turn refused) now, and the remote call
        starts at the first `next()`. The base class's version would submit the turn to this process's own
        scheduler, i.e. run a forward pass in the main process."""
        claims, refused = self._claim([session_id], message, sampling)
        if refused:
            return Refused(refused[0][1])
        return _ClaimedTurn(self, claims, message, sampling)

    def continue_reply(self, session_id: str, **sampling) -> Iterator[Event]:
        """Refused: a reply continues from the cache exactly as it ended (its last token not fed yet), which the
        session state shipped to a worker does not carry."""
        return Refused(refused(CONTINUE_ELSEWHERE, "invalid"))

    def chat_many(self, session_ids: Iterable[str], message: str, **sampling) -> Iterator[tuple[str, Event]]:
        """As `StreamingEngine.chat_many`, with every turn of this call running in one `run_elsewhere` call."""
        claims, refused = self._claim(list(dict.fromkeys(session_ids)), message, sampling)
        try:
            yield from refused
        except GeneratorExit:
            self._release(claims)
            raise
        if claims:
            yield from self._relay(claims, message, sampling)

    def _claim(self, session_ids: list[str], message, sampling: dict) -> tuple[dict[str, _Claim], list]:
        """Admit each turn as a local one would (`admit_turn`), then mark its session as running a remote turn."""
        claims, refused_ = {}, []
        for sid in session_ids:
            def claim(session, text, params, slot, sid=sid):
                handle = RemoteTurn(self.stop_board, slot)
                claims[sid] = _Claim(handle, capture(session, self.backend))
                session.current = handle
                self._inflight[sid] = text

            outcome = self.admit_turn(sid, message, sampling, claim)
            if isinstance(outcome, Event):
                refused_.append((sid, outcome))
        return claims, refused_

    def _take_slot(self):
        """A stop-board slot for one more remote turn, or None at `max_active_turns`."""
        with self._lock:
            slot = self.stop_board.acquire() if self._remote_turns < self.config.max_active_turns else None
            if slot is not None:
                self._remote_turns += 1
        return slot

    def _relay(self, claims: dict[str, _Claim], message: str, sampling: dict) -> Iterator[tuple[str, Event]]:
        states = {sid: c.state for sid, c in claims.items()}
        slots = {sid: c.handle.slot for sid, c in claims.items()}
        open_ = set(claims)  # sessions whose final event has not come back yet
        stream = self.run_turns(states, message, sampling, slots)
        try:
            for sid, event, state in stream:
                claim = claims.get(sid)
                if claim is None or sid not in open_:
                    continue
                claim.started = claim.started or event.accepted
                if event.kind == "delta":
                    claim.reply += event.text
                else:
                    open_.discard(sid)
                    self._settle(sid, claim, state, error=event.kind == "error")
                yield sid, event
        except Exception as exc:  # noqa: BLE001 - the worker died or the platform refused the call
            for sid in sorted(open_):
                claim = claims[sid]
                yield sid, self._settle(sid, claim, None, failure=exc)
            open_.clear()
        finally:
            if open_:  # the reader left early: stop the turns and still collect their states
                for sid in open_:
                    claims[sid].handle.stop()
                self._drain(stream, claims, open_)
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            self._release(claims)

    def _drain(self, stream, claims: dict[str, _Claim], open_: set[str]) -> None:
        try:
            for sid, event, state in stream:
                if sid in open_:
                    if event.kind == "delta":
                        claims[sid].reply += event.text
                    else:
                        open_.discard(sid)
                        self._settle(sid, claims[sid], state, error=event.kind == "error")
                if not open_:
                    break
        except Exception:  # noqa: BLE001 - nothing more will come; record what we have below
            pass
        for sid in list(open_):
            self._settle(sid, claims[sid], None, failure=RuntimeError("the reader went away"))
            open_.discard(sid)

    def _settle(self, sid: str, claim: _Claim, state: SessionState | None,
                failure: BaseException | None = None, error: bool = False) -> Event | None:
        """Land a finished remote turn in its session and free its claim: adopt the worker's state; without one,
        keep what the user saw (a turn that started) or nothing (a refused one). The engine's counters (`/metrics`)
        take what the turn did, as if it had run here. With `failure`, returns the final event to report in place
        of the one that never came."""
        message = self._inflight.pop(sid, None)
        try:
            if state is not None:
                session = self._get(sid)
                seen, evicted = session.cache.seen_tokens, session.cache.evicted_tokens
                import_state(self, sid, state)
                self.counters.count_turn(processed=_grown(seen, session.cache.seen_tokens),
                                         generated=session.reply_tokens,
                                         evicted=_grown(evicted, session.cache.evicted_tokens), error=error)
            elif claim.started and message is not None:
                self.counters.count_turn(processed=0, generated=0, evicted=0, error=True)
                # As after a local failure: the message and the partial reply stay, the cache is re-primed.
                session = self._get(sid)
                with session.lock:
                    kept = [dict(m) for m in session.history] + [{"role": "user", "content": message}]
                    if claim.reply:
                        kept.append({"role": "assistant", "content": claim.reply})
                    session.clear()
                    session.load_history(kept)
        except SessionNotFound:  # closed meanwhile: nothing to land
            pass
        self._finish(claim)
        if failure is None:
            return None
        if claim.started:
            return Event("error", f"Generation failed ({type(failure).__name__}: {failure}). Your conversation is "
                         "kept; send a message to continue or start a new chat.", self._stats_or_none(sid), "error",
                         code="failed")
        return refused(f"The GPU could not run this reply: {failure}", "failed", self._stats_or_none(sid))

    def _stats_or_none(self, sid: str) -> dict:
        try:
            return self.stats(sid)
        except SessionNotFound:
            return {}

    def _finish(self, claim: _Claim) -> None:
        """The turn is over here: its handle reads finished and its stop slot and turn count are given back."""
        with self._lock:
            if claim.handle.finished.is_set():
                return
            claim.handle.finished.set()
            self._remote_turns -= 1
        self.stop_board.release(claim.handle.slot)

    def _release(self, claims: dict[str, _Claim]) -> None:
        for sid, claim in claims.items():
            if not claim.handle.finished.is_set():
                self._inflight.pop(sid, None)
                self._finish(claim)

    # --- inside the worker -------------------------------------------------------------------------------------

    def worker_engine(self) -> StreamingEngine:
        """This process's own engine for running turns (built once per process: a fresh fork builds its own, and
        shares no lock or thread with the main process)."""
        pid = os.getpid()
        if self._worker is None or self._worker[0] != pid:
            self._worker = (pid, StreamingEngine(self.model, self.tokenizer, self.config))
        return self._worker[1]

    def turns_in_worker(self, states: dict[str, SessionState], message: str, sampling: dict,
                        slots: dict[str, int]) -> Iterator[tuple[str, Event, SessionState | None]]:
        """The function `run_elsewhere` wraps: run one turn per state on a worker-local engine; yields
        `(session_id, event, state)`, `state` being the session's new state on its final event (else None)."""
        engine = self.worker_engine()
        local: dict[str, str] = {}  # worker session id -> main-process session id
        try:
            for sid, state in states.items():
                local[open_state(engine, state)] = sid
        except (EngineBusy, ValueError) as exc:
            for lsid in local:
                engine.close(lsid)
            for sid in states:
                yield sid, refused(str(exc), "busy" if isinstance(exc, EngineBusy) else "invalid"), None
            return
        watcher = _StopWatcher(engine, self.stop_board, {lsid: slots[sid] for lsid, sid in local.items()})
        try:
            for lsid, event in engine.chat_many(list(local), message, **sampling):
                final = event.kind in _FINAL
                state = export_state(engine, lsid) if final and event.accepted else None
                yield local[lsid], event, state
        finally:
            watcher.close()
            for lsid in local:
                engine.close(lsid)


class _ClaimedTurn:
    """The events of a turn whose session `start_chat` has claimed: the remote call runs from the first `next()`.
    Closed (or dropped) before that, it releases the claim, since `_relay`'s own cleanup never ran."""

    def __init__(self, engine: RemoteTurnsEngine, claims: dict[str, _Claim], message: str, sampling: dict):
        self._engine, self._claims, self._args = engine, claims, (message, sampling)
        self._events: Iterator[tuple[str, Event]] | None = None
        self._closed = False

    def __iter__(self):
        return self

    def __next__(self) -> Event:
        if self._closed:
            raise StopIteration
        if self._events is None:
            self._events = self._engine._relay(self._claims, *self._args)
        return next(self._events)[1]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._events is None:
            self._engine._release(self._claims)
        else:
            self._events.close()

    def __del__(self):
        self.close()


class _StopWatcher:
    """In the worker: stops a turn once the main process raises its slot on the `StopBoard`."""

    def __init__(self, engine: StreamingEngine, board: StopBoard, slots: dict[str, int]):
        self._engine, self._board, self._slots = engine, board, dict(slots)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stop-watcher", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while self._slots and not self._done.wait(STOP_POLL_S):
            for lsid, slot in list(self._slots.items()):
                if self._board.is_set(slot):
                    try:
                        self._engine.stop(lsid)
                    except SessionNotFound:
                        pass
                    del self._slots[lsid]

    def close(self) -> None:
        self._done.set()
        self._thread.join()
