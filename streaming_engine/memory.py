"""What the model still holds of each message: message spans in stream positions, and the memory map.

A session records, for every message it feeds, the span of stream positions its tokens took (`MessageSpan`).
`measure` counts how many of those positions the cache still holds (the cache's `stream_positions`), so the UI can
fade what the model no longer sees and the stats can say how many turns are still fully in memory. This module
decides nothing: which tokens go is `eviction.py`, where kept tokens sit is `positions.py`.

A message's span is the stretch of the stream its turn fed: a user message's span opens with the end-of-turn
token of the reply before it (fed first thing in the next turn, see `session.py`) and ends where the reply begins;
a reply's span is every reply token fed. A history re-encoded into a smaller cache (`Session._prime`) skips the
middle of the conversation: a message skipped whole has no span, one skipped in part counts its skipped tokens
as `missing`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

#: A message's state in the memory map: every token held, some, none; or "pending" (a restored history the next
#: turn re-encodes, see `Session.memory_map`).
STATES = ("full", "partial", "gone", "pending")


@dataclass
class MessageSpan:
    """Stream positions `[start, end)` of a message's fed tokens (`end` None: still being fed, up to the stream's
    end), and `missing` tokens of it that were never fed."""

    start: int
    end: int | None = None
    missing: int = 0


def measure(span: MessageSpan | None, held: list[int], seen: int) -> dict:
    """`{"tokens", "held", "state"}` of one message: its tokens (None when it was never fed into this cache), how
    many of them `held` (sorted stream positions of the cache's tokens) contains, and its state (`STATES`).

    An empty span (a reply of one token, whose only token opens the next user span) takes the state of the
    position it starts at."""
    if span is None:
        return {"tokens": None, "held": 0, "state": "gone"}
    end = seen if span.end is None else span.end
    lo = bisect.bisect_left(held, span.start)
    count = bisect.bisect_left(held, end) - lo
    tokens = end - span.start + span.missing
    if tokens == 0:
        there = span.start >= seen or (lo < len(held) and held[lo] == span.start)
        return {"tokens": 0, "held": 0, "state": "full" if there else "gone"}
    state = "full" if count == tokens else "gone" if count == 0 else "partial"
    return {"tokens": tokens, "held": count, "state": state}


def turns_in_memory(entries: list[dict]) -> int:
    """User turns (a user message and the replies after it) whose every message is fully held."""
    turns, whole = 0, None
    for entry in entries:
        if entry["role"] == "user":
            turns += bool(whole)
            whole = entry["state"] == "full"
        elif entry["role"] == "assistant" and whole is not None:
            whole = whole and entry["state"] == "full"
    return turns + bool(whole)
