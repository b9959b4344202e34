"""Incremental detokenization: turn a growing list of token ids into safe text deltas, in constant work per token.

Byte-level BPE tokenizers split one emoji or CJK character over several tokens; decoding them one at a time
yields U+FFFD replacement characters. The `tokenizers` library's `DecodeStream` decodes incrementally and holds a
token back until its bytes form whole characters, so each token costs the same however long the reply is (a
whole-reply re-decode per token cost 14 s over a 4,096-token reply). Tokenizers without a Rust backend get the same
behaviour from a short sliding window of tokens (`_WindowDecoder`).

On top of that, `TextStream` keeps one rule of its own: text that could still grow into a user stop string is held
back, so a stop string is never shown, even partially. Only the held-back tail is ever searched, never the reply.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class _WindowDecoder:
    """Incremental decoding for tokenizers without `DecodeStream`: re-decode only the last few tokens.

    The text of `ids[prefix:]` minus the text of `ids[prefix:read]` is what the newest tokens add; decoding from a
    few tokens back lets the tokenizer see a character's earlier bytes and any leading-space rules.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def step(self, token_id: int) -> str | None:
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.ids[self.prefix:self.read])
        after = decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            del self.ids[: self.prefix]  # only the window is kept
            self.read -= self.prefix
            self.prefix = 0
            return after[len(before):]
        return None


def incremental_decoder(tokenizer):
    """An object with `step(token_id) -> str | None` (None: wait for more tokens), special tokens skipped."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)

        class _Stream:
            def step(self, token_id: int) -> str | None:
                return stream.step(backend, token_id)

        return _Stream()
    return _WindowDecoder(tokenizer)


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None, context: list[int] | None = None):
        """`context`: ids already shown before this stream (the end of a reply being continued), decoded first and
        not handed out, so that the first new token's text (a leading space, say) comes out as in one decode."""
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self._decoder = incremental_decoder(tokenizer)
        for token_id in context or ():
            self._decoder.step(token_id)
        self._shown: list[str] = []  # text handed out, in pieces (joined only on request)
        self._shown_chars = 0
        self._held = ""  # decoded text not handed out yet: a suffix that could still become a stop string
        self.stopped_at: int | None = None  # index in the decoded text where a stop string starts

    @property
    def emitted(self) -> str:
        """All text handed out so far."""
        if len(self._shown) > 1:
            self._shown = ["".join(self._shown)]
        return self._shown[0] if self._shown else ""

    def text(self) -> str:
        """The whole reply decoded at once (used once, when a reply fails; not per token)."""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is safe to show (possibly empty)."""
        self.ids.append(token_id)
        piece = self._decoder.step(token_id)
        if self.stopped_at is not None or not piece:
            return ""
        held = self._held + piece
        first = None
        for stop in self.stop:
            index = held.find(stop)
            if index != -1 and (first is None or index < first):
                first = index
        if first is not None:
            self.stopped_at = self._shown_chars + first
            self._held = ""
            return self._release(held[:first])
        keep = self._stop_prefix_len(held)
        self._held = held[len(held) - keep:] if keep else ""
        return self._release(held[: len(held) - keep])

    def finish(self) -> str:
        """Release whatever is left (the reply is over); returns the final delta."""
        held, self._held = self._held, ""
        return "" if self.stopped_at is not None else self._release(held)

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best

    def _release(self, text: str) -> str:
        if text:
            self._shown.append(text)
            self._shown_chars += len(text)
        return text
