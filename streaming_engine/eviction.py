"""Which tokens an eviction takes: the oldest ones after the protected head, rounded to a message boundary.

Both caches (`cache.StartRecentKVCache` alone, `batch_cache.ConversationCache` as a batch row) ask this module how
many tokens `evict_for_space(n)` must remove, so a conversation makes the same evictions alone or batched. Which
*position* the kept tokens get afterwards is not decided here (that is `positions.py`), nor how they move.

* The **protected head** is `max(start_size, pinned)` tokens: the attention sinks, or a pinned prefix such as the
  system prompt if that is longer (`StartRecentKVCache.pin`). `evict_for_space` never takes a head token.
* Policy **"tokens"** is the paper's: the oldest tokens after the head, as many as needed (at least a block, below).
* **Block eviction** (`evict_block`, every policy, every backend, batch rows too): when an eviction is needed it
  makes room for at least `evict_block` tokens (as far as the tokens after the head allow), so a reply decoded
  past a full cache evicts once every `evict_block` tokens instead of every token and the cache holds between
  `cache_size - evict_block` and `cache_size` tokens. Each eviction re-rotates every kept key once (transformers) or makes llama.cpp shift every
  cell (`seq_rm` + `seq_add`), which done per token costs a large share of decode speed (measured in
  docs/block-eviction.md). `evict_block=1` is the paper's per-token eviction. What is kept is still exact: the
  tokens held predict as a dense forward over exactly them at in-cache positions would.
* Policy **"turns"** rounds that count *up* to the next message boundary (a stream position where a message began,
  recorded by whoever feeds messages: `mark_boundary`), so the model never sees the tail of a message without its
  beginning. When the cut falls inside the message still being fed (one message longer than the window: a long
  paste, a runaway reply), no boundary lies ahead of it and the count stays as it is: token eviction.
"""

from __future__ import annotations

import bisect
from typing import Callable, Sequence

from .validate import check_choice, check_int

#: Eviction policies: "tokens" (oldest tokens first, the paper) or "turns" (whole past messages, oldest first).
EVICTION_POLICIES = ("tokens", "turns")


def check_policy(eviction) -> str:
    check_choice("eviction", eviction, EVICTION_POLICIES)
    return eviction


#: Tokens evicted at once when a cache must make room, unless configured (`EngineConfig.evict_block`, `--evict-block`,
#: `enable_streaming_llm(..., evict_block=)`): the smallest block whose per-token eviction throughput stays within
#: 10% of no eviction on both backends (assets/eval/evict_block.json, docs/block-eviction.md). A cache whose recent
#: window is shorter uses the whole window (`block_for`).
DEFAULT_EVICT_BLOCK = 32


def check_evict_block(evict_block, recent_size: int) -> int:
    """`evict_block` if it is an int in `[1, recent_size]` (a block larger than the window could not be evicted)."""
    return check_int("evict_block", evict_block, 1, recent_size,
                     note=f" (the recent window holds {recent_size}; 1 = evict token by token)")


def block_for(recent_size: int, evict_block: int = DEFAULT_EVICT_BLOCK) -> int:
    """The block a cache of `recent_size` recent tokens uses when asked for `evict_block`: at most its window."""
    return max(1, min(evict_block, recent_size))


def tokens_needed(held: int, protected: int, cache_size: int, num_coming: int, block: int = 1) -> int:
    """How many of the oldest tokens after the protected head must go so `num_coming` more fit in `cache_size`:
    0 when they fit; otherwise enough to make room for `max(num_coming, block)` tokens (a trim, `num_coming=0`,
    leaves room for `block - 1`), so after one decoded token the next `block - 1` fit without evicting, while a
    feed of at least `block` tokens (a turn's reserve, a prompt chunk) evicts only what it needs; never more than
    the tokens after the head. `block=1` is the paper's rule: exactly what is needed."""
    # Plain comparisons, not `check_int`: this runs for every fed token, and `evict_for_space(n)` (the paper's API)
    # takes any integer-like count (a numpy or torch scalar from `input_ids.shape` arithmetic) as it always has.
    if num_coming < 0:
        raise ValueError(f"num_coming must be >= 0, got {num_coming}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    needed = held + num_coming - cache_size
    if needed <= 0:
        return 0
    return min(needed + max(0, block - max(num_coming, 1)), held - protected)


def round_to_message(after_head, count: int, boundaries: list[int], seen: int) -> int:
    """`count` raised so that the eviction ends at a message boundary, or `count` itself when none lies ahead.

    `after_head`: stream positions of the tokens held after the protected head, in cache (= stream) order, as a
    list or a 1-D tensor; the `count` oldest of them must go. `boundaries`: sorted stream positions where messages
    begin; a boundary counts only once reached (`<= seen`, the next stream position), so the reply or prompt still
    being fed is never rounded away. Evicting everything up to boundary `b` removes every held token before `b`.
    """
    held = len(after_head)
    if count <= 0 or count >= held:
        return max(count, 0)
    first_kept = int(after_head[count])  # the oldest token the plain eviction would keep
    i = bisect.bisect_left(boundaries, first_kept)
    if i == len(boundaries) or boundaries[i] > seen:
        return count  # the cut is inside the message being fed: token eviction
    b = boundaries[i]
    # Tokens before b (after_head is sorted): all of them go, and nothing of the message starting at b.
    if isinstance(after_head, list):
        return bisect.bisect_left(after_head, b)
    return int((after_head < b).sum())


class ProtectedHead:
    """The protected head, message boundaries and the eviction rule, shared by every sink cache
    (`StartRecentKVCache`, a batch row's solo copy, `LlamaCppCache`), so they refuse, record and evict the same way.
    The cache supplies `start_size`, `cache_size`, `pinned`, `boundaries`, `eviction`, `evict_block`, `seen_tokens`,
    `_stream_index` (stream index of every held token, a list or a 1-D tensor), `get_seq_length()` and
    `evict_range(start, end)` (how its storage drops a range)."""

    @property
    def protected(self) -> int:
        """Tokens at the head that `evict_for_space` never takes: the sinks or the pinned prefix, the longer."""
        return max(self.start_size, self.pinned)

    @property
    def window(self) -> int:
        """Room for tokens after the protected head (`cache_size - protected`)."""
        return self.cache_size - self.protected

    def pin(self, tokens: int) -> int:
        """Protect the first `tokens` positions of the cache (held now or still to come) from every eviction,
        e.g. a system prompt fed first; `pin(0)` unpins. At least one position must stay evictable. Returns it."""
        check_int("pin", tokens, 0, self.cache_size - 1, note=f" (the cache holds {self.cache_size} tokens)")
        self.pinned = tokens
        return tokens

    def mark_boundary(self, position: int | None = None) -> None:
        """Record that a message begins at stream `position` (default: the next token fed, `seen_tokens`).

        Under eviction="turns" an eviction then ends only at such a boundary (see above); a position may lie ahead
        of the stream (a reply's first token, known before its prompt is fed)."""
        position = self.seen_tokens if position is None else check_int("position", position, 0)
        if not self.boundaries or position > self.boundaries[-1]:
            self.boundaries.append(position)
        elif position not in self.boundaries:
            bisect.insort(self.boundaries, position)

    def _range_to_evict(self, start: int, end: int) -> int:
        """How many tokens `evict_range(start, end)` removes, after refusing a range outside the cache or reaching
        into the pinned head (sinks may be named; pinned tokens never)."""
        held = self.get_seq_length()
        if not (0 <= start <= end <= held):
            raise ValueError(f"evict_range({start}, {end}) is outside the {held} tokens held")
        if end > start and start < self.pinned:
            raise ValueError(
                f"evict_range({start}, {end}) reaches into the {self.pinned} pinned tokens at the head; "
                f"unpin them first (pin(0))"
            )
        return end - start

    def eviction_count(self, num_coming: int, held: int, after_head: Callable[[], Sequence[int]], seen: int) -> int:
        """The policy: how many of the oldest tokens after the protected head go so `num_coming` more fit, for a
        cache holding `held` tokens after `seen` fed; `after_head()` gives their stream positions (asked only under
        eviction="turns"). A batch row asks its own cache's policy with the row's counters, so a subclass that
        overrides this is honoured alone and batched alike."""
        count = tokens_needed(held, self.protected, self.cache_size, num_coming, self.evict_block)
        if count > 0 and self.eviction == "turns":
            count = round_to_message(after_head(), count, self.boundaries, seen)
        return count

    def evict_for_space(self, num_coming: int) -> int:
        """Evict the oldest tokens after the protected head so `num_coming` more fit in `cache_size`; returns how
        many (room for at least `evict_block` when any; under eviction="turns", up to the next message boundary).

        No-op when they already fit. The head (sinks or pinned prefix) is never evicted here, so when
        `num_coming > window` the whole recent window goes and the caller must feed its tokens in chunks.
        """
        head = self.protected
        count = self.eviction_count(num_coming, self.get_seq_length(), lambda: self._stream_index[head:],
                                    self.seen_tokens)
        if count <= 0:
            return 0
        return self.evict_range(head, head + count)

    def trim(self) -> int:
        """Evict down to `cache_size` tokens (the reference code's per-step behaviour); returns how many."""
        return self.evict_for_space(0)
