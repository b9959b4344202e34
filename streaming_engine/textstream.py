"""Incremental detokenization: turn a growing list of token ids into safe text deltas.

Byte-level BPE tokenizers split one emoji or CJK character over several tokens; decoding them one at a time
yields U+FFFD replacement characters. `TextStream` re-decodes the whole reply and only releases text that can no
longer change: it holds back a trailing replacement character (an incomplete UTF-8 sequence) and any suffix that
could still grow into a user stop string, so a stop string is never shown even partially.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self.emitted = ""  # text already handed out
        self.stopped_at: int | None = None  # index in the decoded text where a stop string starts

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is safe to show (possibly empty)."""
        self.ids.append(token_id)
        text = self.text()
        for stop in self.stop:
            index = text.find(stop)
            if index != -1 and (self.stopped_at is None or index < self.stopped_at):
                self.stopped_at = index
        if self.stopped_at is not None:
            return self._release(text[: self.stopped_at])
        safe = len(text)
        while safe > 0 and text[safe - 1] == REPLACEMENT:
            safe -= 1
        safe -= self._stop_prefix_len(text[:safe])
        return self._release(text[:safe])

    def finish(self) -> str:
        """Release whatever is left (the reply is over); returns the final delta."""
        text = self.text()
        if self.stopped_at is not None:
            text = text[: self.stopped_at]
        return self._release(text)

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best

    def _release(self, visible: str) -> str:
        # Only ever append: text the user has already seen is never taken back, even if a tokenizer's clean-up
        # rewrites an earlier character once more tokens arrive (the final reply text is re-read at the end).
        delta = visible[len(self.emitted):]
        self.emitted += delta
        return delta
