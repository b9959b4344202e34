"""Incremental chat templating: encode only what a new user turn adds, never the history.

History lives in the KV cache, so each turn feeds just the text the chat template puts between what the model has
already seen and the assistant's answer: the end of the previous assistant turn (e.g. `<|im_end|>\\n` when the
reply stopped early), the new user message and the assistant header.

`ChatTemplater.turn_text(stream_text, messages)` finds that text by rendering the whole conversation with the
tokenizer's own template and cutting off `stream_text`, the exact text fed so far. When a template rewrites past
turns (some strip reasoning, some date-stamp the system prompt) that prefix test fails, and the text the template
adds for one more user turn is taken instead. Tokenizers without a template get a plain `User:`/`Assistant:` format.

Template injection. The rendered text is encoded with special tokens parsed (the template's own markers such as
`<|im_start|>` must become control tokens), so a message that *spells* a marker would otherwise become one too: a
user, or an uploaded history, could forge system or assistant turns. Every message's content is therefore
neutralized before rendering (`neutralize`): each spelling of a special or added token inside it is broken by an
invisible WORD JOINER (U+2060) after its first character, so the tokenizer reads it as ordinary text. Only the
template's own framing is left to become control tokens. Chosen over encoding content segments separately with
special-token parsing off, because that needs the content's exact place in the rendered text (templates trim,
rewrite or date-stamp content) and tokenizes segment edges differently on SentencePiece tokenizers that prepend
"▁" to the first segment only; neutralizing the input works for any template and leaves the text-to-ids step
untouched. The joiner is checked once per tokenizer (`_pick_breaker`): if a tokenizer's normalizer dropped it,
a visible separator is used instead. The history the user sees keeps exactly what was typed; only the model's
view is neutralized, and benign text is rendered unchanged.
"""

from __future__ import annotations

import re

PLAIN_USER = "User: "
PLAIN_ASSISTANT = "Assistant:"
#: Inserted after the first character of a marker spelled inside a message: invisible, and not a token part.
WORD_JOINER = "\u2060"
#: Tried in order when a tokenizer's normalizer removes the joiner (then the marker would form again).
BREAKER_FALLBACKS = ("\u200b", " ")
#: Leading messages kept in the stand-in context `pieces` renders a late message after (system prompt + first turn).
HEAD_CONTEXT = 2
#: Messages just before k kept in that context (a user/assistant pair and one more, for templates that look back).
WINDOW = 3


def control_spellings(tokenizer) -> list[str]:
    """Texts the tokenizer turns into one control token: its special tokens and every added token that is not
    plain whitespace (e.g. Qwen's `<tool_call>`), longest first so that overlapping spellings break fully."""
    spellings = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        content = getattr(added, "content", str(added))
        if getattr(added, "special", False) or not any(ch.isspace() for ch in content):
            spellings.add(content)
    return sorted((s for s in spellings if isinstance(s, str) and len(s) >= 2), key=len, reverse=True)


class ChatTemplater:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        spellings = control_spellings(tokenizer)
        self._markers = re.compile("|".join(map(re.escape, spellings))) if spellings else None
        self._breaker = self._pick_breaker(spellings)

    def _pick_breaker(self, spellings: list[str]) -> str:
        """The joiner, unless this tokenizer still finds a control token in joiner-broken spellings."""
        if not spellings:
            return WORD_JOINER
        ids = {i for s in spellings for i in self.tokenizer.convert_tokens_to_ids([s]) if i is not None}
        for breaker in (WORD_JOINER, *BREAKER_FALLBACKS):
            probe = " ".join(s[0] + breaker + s[1:] for s in spellings)
            if not ids & set(self.tokenizer(probe, add_special_tokens=False)["input_ids"]):
                return breaker
        raise ValueError("this tokenizer turns every tried spelling of its markers into control tokens")

    def neutralize(self, text: str) -> str:
        """`text` with every control-token spelling broken apart (by the joiner after its first character).

        Repeated until none is left: breaking one spelling may leave an overlapping one intact (specials
        `<a>` and `>b`: breaking `<a>` in `<a>b` leaves `>b`). Each pass breaks at least one, so this ends."""
        if self._markers is None:
            return text
        while self._markers.search(text):
            text = self._markers.sub(lambda m: m.group(0)[0] + self._breaker + m.group(0)[1:], text)
        return text

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The whole conversation as text, as the tokenizer's template writes it, with every message's content
        neutralized (see the module docstring): the only control tokens are the template's own."""
        messages = [{**m, "content": self.neutralize(m["content"])} for m in messages]
        if self.has_template:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        parts = []
        for message in messages:
            if message["role"] == "system":
                parts.append(message["content"] + "\n\n")
            elif message["role"] == "user":
                parts.append(f"{PLAIN_USER}{message['content']}\n")
            else:
                parts.append(f"{PLAIN_ASSISTANT} {message['content']}\n")
        if add_generation_prompt:
            parts.append(PLAIN_ASSISTANT)
        return "".join(parts)

    def turn_text(self, stream_text: str, messages: list[dict]) -> str:
        """Text to feed for the last message of `messages` (a user turn), given everything fed so far.

        `messages` holds the whole conversation with assistant turns as generated (raw text, stop strings
        included), ending with the new user message.
        """
        full = self.render(messages, add_generation_prompt=True)
        if full.startswith(stream_text):
            return full[len(stream_text):]
        before = self.render(messages[:-1], add_generation_prompt=False) if len(messages) > 1 else ""
        if full.startswith(before):
            return full[len(before):]
        # Last resort: render the new user message on its own (a template that cannot be diffed at all).
        return self.render(messages[-1:], add_generation_prompt=True)

    def system_text(self, system_prompt: str, text: str | None = None) -> str:
        """The leading part of `text` (a rendering that starts with this system prompt; default: the prompt of a
        first user turn) that renders the system prompt: what a session pins. "" when it cannot be found.

        Templates with a system role write it as a block of its own, which is `render([system])`; templates that
        fold it into the first user turn (Gemma) get the text up to the end of the prompt's content."""
        system = {"role": "system", "content": system_prompt}
        if text is None:
            text = self.render([system, {"role": "user", "content": "."}], add_generation_prompt=True)
        try:
            alone = self.render([system], add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - some templates refuse a conversation without a user turn
            alone = ""
        if alone and text.startswith(alone):
            return alone
        content = self.neutralize(system_prompt)
        at = text.find(content) if content else -1
        return text[: at + len(content)] if at >= 0 else ""

    def piece(self, messages: list[dict], k: int) -> str | None:
        """The text the template writes for message `k` of `messages` (the rendering of `messages[:k+1]` minus that
        of `messages[:k]`), or None when the template rewrites earlier messages so that no such cut exists."""
        before = self.render(messages[:k], add_generation_prompt=False) if k else ""
        upto = self.render(messages[: k + 1], add_generation_prompt=False)
        return upto[len(before):] if upto.startswith(before) else None

    def pieces(self, messages: list[dict], ks) -> dict[int, str] | None:
        """`piece(messages, k)` for every k in `ks`, in time linear in `len(ks)` rather than in the history.

        `piece` renders the history up to k twice, so asking it for every kept message of a long history is
        quadratic (20,000 one-character messages cost ~10 s of the worker thread, stalling every chat). Chat
        templates write a message from its role, its content, whether it is first, and the parity of its index
        (role-alternation checks), so message k is rendered after a short stand-in context instead: the first
        `HEAD_CONTEXT` messages (system prompt, BOS, Gemma's folded first turn) and the `WINDOW` messages just before
        k, chosen so that k keeps its index parity. Small k (inside that context) use `piece` itself.

        Trusted only when checked against the real rendering: the pieces of a contiguous run starting at 0 must
        spell a prefix of it, those of a run ending at the last message a suffix, and every other run must occur
        in it. Otherwise None, as for a template that cannot be cut (the caller then encodes the whole text)."""
        out = {}
        for k in sorted(set(ks)):
            text = self.local_piece(messages, k)
            if text is None:
                return None
            out[k] = text
        return out if self.pieces_agree(messages, out) else None

    def local_piece(self, messages: list[dict], k: int) -> str | None:
        """Message k's piece rendered after the stand-in context (see `pieces`); unchecked on its own."""
        if k < HEAD_CONTEXT + WINDOW + 1:
            return self.piece(messages, k)
        w = WINDOW + ((k - HEAD_CONTEXT - WINDOW) % 2)  # keep k's index parity in the stand-in
        context = messages[:HEAD_CONTEXT] + messages[k - w:k]
        before = self.render(context, add_generation_prompt=False)
        upto = self.render(context + [messages[k]], add_generation_prompt=False)
        return upto[len(before):] if upto.startswith(before) else None

    def pieces_agree(self, messages: list[dict], pieces: dict[int, str]) -> bool:
        """Whether `pieces` (message index -> text) agree with the real rendering of `messages` (see `pieces`)."""
        if not pieces:
            return True
        full = self.render(messages, add_generation_prompt=False)
        ks = sorted(pieces)
        runs, start = [], ks[0]
        for prev, k in zip(ks, ks[1:] + [None]):
            if k != prev + 1:
                runs.append((start, prev))
                start = k
        at = 0
        for lo, hi in runs:
            spelled = "".join(pieces[k] for k in range(lo, hi + 1))
            if lo == 0 and not full.startswith(spelled):
                return False
            if hi == len(messages) - 1 and not full.endswith(spelled):
                return False
            found = full.find(spelled, at)
            if found < 0:
                return False
            at = found + len(spelled)
        return True

    def encode(self, text: str) -> list[int]:
        """Token ids of template text (special tokens are spelled out in the text, so none are added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
