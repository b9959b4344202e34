"""One conversation's KV cache on llama.cpp: `StartRecentKVCache`'s contract over a llama.cpp sequence.

Same sizes (`start_size` sinks + `recent_size` recent tokens), same protected head (`pin`: `max(start_size,
pinned)` tokens never evicted), same eviction rule (`evict_for_space` drops the oldest tokens after the head, room for at least `evict_block`, rounded
to a message boundary under eviction="turns", decided by the same functions of `eviction.py`; `evict_range` any
range but the pinned head), same counters (`seen_tokens == held + evicted_tokens`), same `stream_positions` and
`kv_bytes`, so the turn logic in `generation.py`, the session statistics and the engine's counters read it exactly
like the transformers cache, and both backends make the same evictions. What differs is where the keys live: in a sequence of a
`LlamaCppContext` (or, while the conversation is swapped out, in host memory).

Positions follow `positions.py`'s rule: with position shift the tokens held sit at in-cache positions `0..held-1`
and the next token gets `held` (`positions.first_position`); without it they keep their stream positions. An
eviction only records itself here; the context applies it to llama.cpp right before the next forward pass (see
`context.py`): remove the range, then move the tokens behind it left by its length, which llama.cpp does by
re-rotating their keys, the same `R(-shift)` that `positions.shift_keys` applies on the transformers side.
"""

from __future__ import annotations

from ..eviction import ProtectedHead, check_evict_block, check_policy
from ..positions import first_position
from ..validate import check_int


class LlamaCppCache(ProtectedHead):
    """Sinks + recent window on a llama.cpp sequence. Touched by the engine's worker thread; the counters may be
    read from any thread, and `reset` may come from any thread once the conversation's turn has ended."""

    def __init__(self, context, start_size: int, recent_size: int, *, pos_shift: bool = True, pin: int = 0,
                 eviction: str = "tokens", evict_block: int = 1):
        check_int("start_size", start_size, 0)
        check_int("recent_size", recent_size, 1)
        check_policy(eviction)
        check_evict_block(evict_block, recent_size)
        if start_size + recent_size > context.seq_capacity:
            raise ValueError(
                f"start_size + recent_size = {start_size + recent_size} exceeds the {context.seq_capacity} tokens "
                "a llama.cpp sequence of this engine holds"
            )
        self.context = context
        self.start_size = start_size
        self.recent_size = recent_size
        self.cache_size = start_size + recent_size
        self.pos_shift = pos_shift
        self.eviction = eviction
        self.evict_block = evict_block
        self.pinned = 0
        #: Sorted stream positions where a message begins (only read under the "turns" policy).
        self.boundaries: list[int] = []
        self.seq: int | None = None  # the llama.cpp sequence holding the tokens (None: none yet, or swapped out)
        self.saved: bytes | None = None  # the tokens while swapped out to host memory
        self.seen_tokens = 0
        self.evicted_tokens = 0
        self._stream_index: list[int] = []  # index in the whole stream of every token held, in cache order
        self._pending: list[tuple[int, int, int]] = []  # evictions not yet applied: (p0, p1, shift) in llama.cpp
        self.pin(pin)

    # --- the cache contract ---------------------------------------------------------------------------------

    def get_seq_length(self) -> int:
        return len(self._stream_index)

    def evict_range(self, start: int, end: int) -> int:
        """Evict tokens `[start, end)` of the current cache (sinks included if named, pinned tokens never);
        returns how many."""
        count = self._range_to_evict(start, end)
        if count == 0:
            return 0
        if self.pos_shift:  # llama.cpp positions are cache indexes: drop [start, end), pull the rest left
            last = self._pending[-1] if self._pending else None
            if last is not None and last[2] and last[0] == start:
                # The same cut again before any forward pass (the head's end, as evict_for_space makes it): in
                # llama.cpp's positions, which have not moved yet, it continues the pending range, so the two
                # become one seq_rm + one seq_add.
                self._pending[-1] = (start, last[1] + count, last[2] + count)
            else:
                self._pending.append((start, end, count))
        else:  # positions are stream indexes (gaps from earlier evictions hold no cells): drop, keep the rest
            self._pending.append((self._stream_index[start], self._stream_index[end - 1] + 1, 0))
        del self._stream_index[start:end]
        self.evicted_tokens += count
        return count

    def reset(self) -> None:
        """Drop every token and zero the counters (the cache stays usable)."""
        self.context.release(self)
        self._pending = []
        self._stream_index = []
        self.boundaries = []
        self.seen_tokens = self.evicted_tokens = 0

    @property
    def stream_positions(self) -> list[int]:
        return list(self._stream_index)

    def kv_bytes(self) -> int:
        """Bytes of keys and values held for this conversation (llama.cpp's F16 cells)."""
        return self.get_seq_length() * self.context.bytes_per_token

    # --- used by the context, under its lock ------------------------------------------------------------------

    def next_position(self) -> int:
        """llama.cpp position of the next token fed (in-cache with position shift, stream without)."""
        return first_position(self)

    def _apply_evictions(self) -> None:
        # One seq_rm + one seq_add per eviction: the add makes llama.cpp re-rotate every cell behind the gap in the
        # next pass, which is why evictions come in blocks (`evict_block`), not one per decoded token.
        lc, memory = self.context.lc, self.context.memory
        for p0, p1, shift in self._pending:
            lc.llama_memory_seq_rm(memory, self.seq, p0, p1)
            if shift:
                lc.llama_memory_seq_add(memory, self.seq, p1, -1, -shift)
        self._pending = []

    def _appended(self, count: int) -> None:
        self._stream_index.extend(range(self.seen_tokens, self.seen_tokens + count))
        self.seen_tokens += count

    def __repr__(self) -> str:
        where = f"sequence {self.seq}" if self.seq is not None else ("host memory" if self.saved else "empty")
        return (f"LlamaCppCache(start_size={self.start_size}, recent_size={self.recent_size}, "
                f"held={self.get_seq_length()}, seen={self.seen_tokens}, evicted={self.evicted_tokens}, "
                f"pinned={self.pinned}, eviction={self.eviction!r}, evict_block={self.evict_block}, in {where})")
