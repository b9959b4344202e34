"""Threading for the engine: one worker thread, per-turn event queues and stop events. Nothing else here.

Every running turn is a generator that does at most one forward pass per `next()`. The worker owns the model:
it takes the turn at the head of a round-robin queue, advances it one step, and puts it back at the tail. Forward
passes are therefore serialized (no two threads touch the model or a cache at once) and interleaved fairly: with
N conversations generating, each gets every N-th step, so a long prompt in one tab cannot starve another.

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

logger = logging.getLogger(__name__)

#: How long a reader waits on its queue before checking that the worker is still alive.
POLL_INTERVAL_S = 0.1
#: How long `read_many` sleeps when none of its turns has a new event (bounds the delay it adds to a delta).
FAN_IN_POLL_S = 0.01


class TurnHandle:
    """A submitted turn: its step generator, the queue its events go to, and its stop flag."""

    def __init__(self, on_crash: Callable[[BaseException], object]):
        self.steps: Iterator | None = None  # set by the owner, usually from a generator that reads `stop_event`
        self.on_crash = on_crash  # turns an exception that escaped `steps` into a final event
        self.events: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self.finished = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()


class Scheduler:
    """Round-robin single worker over active turns."""

    def __init__(self, name: str = "streaming-engine"):
        self._name = name
        self._active: deque[TurnHandle] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False  # a turn is being stepped right now (it is out of `_active` meanwhile)

    @property
    def active_turns(self) -> int:
        with self._cv:
            return len(self._active) + (1 if self._busy else 0)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, handle: TurnHandle) -> None:
        with self._cv:
            if not self.alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._active.append(handle)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._active:
                    self._cv.wait()
                handle = self._active.popleft()
                self._busy = True
            finished = False
            try:
                event = next(handle.steps)
                if event is not None:
                    handle.events.put(event)
                    finished = getattr(event, "kind", None) in ("done", "error")
            except StopIteration:
                finished = True
            except BaseException as exc:  # noqa: BLE001 - the worker must survive any one turn's failure
                logger.exception("turn crashed")
                handle.events.put(handle.on_crash(exc))
                finished = True
            with self._cv:
                self._busy = False
                if finished:
                    handle.finished.set()
                else:
                    self._active.append(handle)

    def read(self, handle: TurnHandle) -> Iterator:
        """Yield `handle`'s events until its final one; stop the turn if the reader goes away early."""
        try:
            while True:
                try:
                    event = handle.events.get(timeout=POLL_INTERVAL_S)
                except queue.Empty:
                    if handle.finished.is_set() and handle.events.empty():
                        return
                    if not self.alive():
                        raise RuntimeError("the generation worker stopped unexpectedly")
                    continue
                yield event
                if getattr(event, "kind", None) in ("done", "error"):
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
