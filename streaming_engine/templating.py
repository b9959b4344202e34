"""Incremental chat templating: encode only what a new user turn adds, never the history.

History lives in the KV cache, so each turn feeds just the text the chat template puts between what the model has
already seen and the assistant's answer: the end of the previous assistant turn (e.g. `<|im_end|>\\n` when the
reply stopped early), the new user message and the assistant header.

`ChatTemplater.turn_text(stream_text, messages)` finds that text by rendering the whole conversation with the
tokenizer's own template and cutting off `stream_text`, the exact text fed so far. When a template rewrites past
turns (some strip reasoning, some date-stamp the system prompt) that prefix test fails, and the text the template
adds for one more user turn is taken instead. Tokenizers without a template get a plain `User:`/`Assistant:` format.
"""

from __future__ import annotations

PLAIN_USER = "User: "
PLAIN_ASSISTANT = "Assistant:"


class ChatTemplater:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The whole conversation as text, exactly as the tokenizer's template writes it."""
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

    def encode(self, text: str) -> list[int]:
        """Token ids of template text (special tokens are spelled out in the text, so none are added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
