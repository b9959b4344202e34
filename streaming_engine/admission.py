"""A fair admission queue: at most `capacity` turns at once, at most `per_client` of them one client's, and the
rest waiting, admitted round-robin across clients as slots free up.

Without it, one client that sends 16 requests at once holds every reply slot and everyone else is answered
"busy" (429) until those finish, repeatably. With it, a client over its share waits behind its own requests
only; another client's request is admitted at the next free slot. Waiting is bounded twice, so overload still
answers: a client may have at most `max_waiting` requests queued (more are refused at once with `GateFull`),
and a request that waited `wait_s` is refused too.

Used from asyncio code (the HTTP API); the state is guarded by a thread lock and waiters are futures resolved on
their own event loop, so one gate serves several loops (tests run servers on their own threads).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

#: Replies one client may have running at once through a gate (the OpenAI API's); more of its requests wait. Each
#: running reply is a row of every decode step, so this bounds how much one client slows the others: on the test
#: CPU (1 thread, default model) 4 rows beside a victim measured 1.70x its time per token alone
#: (`benchmarks/fairness.py`, scenario `flood`, before the prompt-share policy), close to issue 28's 2x bar; 3 leaves
#: room under it (1.09x now: assets/eval/fairness.json, docs/benchmarks.md "One client against another").
MAX_TURNS_PER_CLIENT = 3


class GateFull(RuntimeError):
    """A request was not admitted; `code` says why ("client_queue_full" or "queue_timeout"), the message is safe
    to show."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class _Waiter:
    client: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    admitted: bool = field(default=False)


class FairGate:
    def __init__(self, capacity: int, per_client: int, max_waiting: int, wait_s: float):
        for name, value in (("capacity", capacity), ("per_client", per_client), ("max_waiting", max_waiting)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not wait_s > 0:
            raise ValueError(f"wait_s must be positive; got {wait_s!r}")
        self.capacity, self.per_client, self.max_waiting, self.wait_s = capacity, per_client, max_waiting, wait_s
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()
        self._waiting: OrderedDict[str, deque[_Waiter]] = OrderedDict()  # order: whose turn is next
        self.admitted_total = 0  # for the probe's report and tests

    def running(self, client: str | None = None) -> int:
        with self._lock:
            return sum(self._running.values()) if client is None else self._running[client]

    def waiting(self, client: str | None = None) -> int:
        with self._lock:
            if client is None:
                return sum(len(q) for q in self._waiting.values())
            return len(self._waiting.get(client, ()))

    def _can_run_locked(self, client: str) -> bool:
        return sum(self._running.values()) < self.capacity and self._running[client] < self.per_client

    async def enter(self, client: str) -> None:
        """Return once `client` may start a turn (then call `leave(client)` exactly once); raises `GateFull`."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiting.get(client) and self._can_run_locked(client):
                self._running[client] += 1
                self.admitted_total += 1
                return
            queue = self._waiting.setdefault(client, deque())
            if len(queue) >= self.max_waiting:
                raise GateFull("client_queue_full",
                               f"Too many of your requests are waiting ({len(queue)}, limit {self.max_waiting}); "
                               "wait for some to finish.")
            waiter = _Waiter(client, loop, loop.create_future())
            queue.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.wait_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            with self._lock:
                if not waiter.admitted:
                    self._drop_locked(waiter)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    raise GateFull("queue_timeout",
                                   f"Server busy: waited {self.wait_s:.0f} s for a free reply slot. "
                                   "Try again shortly.") from None
            # Admitted just as the wait ended: the slot is ours; give it back if we are being cancelled.
            if isinstance(exc, asyncio.CancelledError):
                self.leave(client)
                raise

    def _drop_locked(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.client)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[waiter.client]

    def leave(self, client: str) -> None:
        """A turn admitted for `client` ended: free its slot and admit whoever is next, round-robin by client."""
        with self._lock:
            if self._running[client] <= 0:
                raise RuntimeError(f"leave() without a matching enter() for {client!r}")
            self._running[client] -= 1
            if not self._running[client]:
                del self._running[client]
            self._dispatch_locked()

    def _dispatch_locked(self) -> None:
        progress = True
        while progress and sum(self._running.values()) < self.capacity:
            progress = False
            for client in list(self._waiting):
                if self._running[client] >= self.per_client:
                    continue
                waiter = self._waiting[client].popleft()
                if not self._waiting[client]:
                    del self._waiting[client]
                else:
                    self._waiting.move_to_end(client)  # next admission goes to another client first
                waiter.admitted = True
                self._running[client] += 1
                self.admitted_total += 1
                waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
                progress = True
                break


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
