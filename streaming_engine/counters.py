"""Process-wide counters over every turn the engine runs, for monitoring (the app's `/metrics`).

Sessions keep their own statistics, but those vanish when a session closes and restart when its cache is rebuilt;
a monitoring system needs totals that only ever grow. `EngineCounters.watch` wraps a turn's step generator on the
worker thread and adds, after every step, what the step changed on the session's cache: tokens that went through
the model, tokens sampled, tokens evicted. It also keeps the recent decode rate over all sessions together.
Reading happens from any thread under a lock; nothing here touches the model.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Generator

#: The decode rate is averaged over this many most recent seconds.
RATE_WINDOW_S = 10.0


def _grown(before: int, after: int) -> int:
    """How much a counter grew over one step; a counter that went down was reset in between (a rebuilt cache,
    a new reply) and then grew from zero."""
    return after - before if after >= before else after


class EngineCounters:
    """Monotonic totals (`tokens_processed`, `tokens_generated`, `tokens_evicted`, `turns_started`,
    `turns_finished`, `turn_errors`) and `decode_tokens_per_s()` over the last `RATE_WINDOW_S` seconds."""

    def __init__(self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        # `clock`: seconds, monotonic; a test passes (or sets) its own so the rate window never depends on how fast
        # the machine is.
        self.window_s, self.clock = window_s, clock
        self._lock = threading.Lock()
        self.tokens_processed = 0
        self.tokens_generated = 0
        self.tokens_evicted = 0
        self.turns_started = 0
        self.turns_finished = 0
        self.turn_errors = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens sampled in that step)

    def watch(self, session, steps: Generator) -> Generator:
        """`steps` (a session's turn coroutine), counting what every step did to `session`.

        Transparent to the scheduler: whatever it sends (a forward pass's logits, `STOP`) goes on to the turn,
        and closing this closes the turn. Items without a `kind` (the turn's forward-pass requests) pass through.
        """
        with self._lock:
            self.turns_started += 1
        cache = session.cache
        seen, evicted, reply = cache.seen_tokens, cache.evicted_tokens, session.reply_tokens
        finished = crashed = False
        try:
            item = steps.send(None)
            while True:
                now_seen, now_evicted, now_reply = cache.seen_tokens, cache.evicted_tokens, session.reply_tokens
                sampled = _grown(reply, now_reply)
                kind = getattr(item, "kind", None)
                with self._lock:
                    self.tokens_processed += _grown(seen, now_seen)
                    self.tokens_evicted += _grown(evicted, now_evicted)
                    self.tokens_generated += sampled
                    if sampled:
                        self._recent.append((self.clock(), sampled))
                    # Counted on the final event itself: the scheduler stops stepping a turn there, so this
                    # generator may never be resumed to reach its end.
                    if kind in ("done", "error") and not finished:
                        finished = True
                        self.turns_finished += 1
                        self.turn_errors += kind == "error"
                seen, evicted, reply = now_seen, now_evicted, now_reply
                try:
                    answer = yield item
                except GeneratorExit:
                    steps.close()
                    raise
                item = steps.send(answer)
        except StopIteration:
            return
        except Exception:
            crashed = True  # the scheduler turns the exception into an error event
            raise
        finally:
            if not finished:
                with self._lock:
                    self.turns_finished += 1
                    self.turn_errors += crashed

    def count_turn(self, *, processed: int, generated: int, evicted: int, error: bool) -> None:
        """A whole turn that ran elsewhere (a ZeroGPU worker, see `remote.py`), counted when it lands here."""
        with self._lock:
            self.turns_started += 1
            self.turns_finished += 1
            self.turn_errors += bool(error)
            self.tokens_processed += processed
            self.tokens_generated += generated
            self.tokens_evicted += evicted
            if generated:
                self._recent.append((self.clock(), generated))

    def decode_tokens_per_s(self, now: float | None = None) -> float:
        """Tokens sampled per second over the last `window_s` seconds, all sessions together."""
        now = self.clock() if now is None else now
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window_s

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "tokens_processed": self.tokens_processed,
                "tokens_generated": self.tokens_generated,
                "tokens_evicted": self.tokens_evicted,
                "turns_started": self.turns_started,
                "turns_finished": self.turns_finished,
                "turn_errors": self.turn_errors,
            }
