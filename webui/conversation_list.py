"""The Chat tab's conversation list, as chat apps have it: the browser's conversations, newest first, to switch
between, rename and delete; and the browser-side record of which conversations those are.

The browser keeps only tokens (`gr.BrowserState`, encrypted with a key kept in the store): `{"tokens": [...],
"current": token}`. Values coming back from a browser are untrusted and go through `browser_record` first. Titles
and counts come from the server (`Conversations.list`); a conversation not stored (a new one before its first
message, or any with `--no-persist`) is listed while its live session exists.

This module lays out the list's block and formats it; the handlers that act on it live with the other chat
handlers in `chat_tab.py`.
"""

from __future__ import annotations

import time

import gradio as gr

from streaming_engine.conversations import ConversationNotFound, auto_title
from streaming_engine.store import MAX_LIST_TOKENS, MAX_TITLE_CHARS, ConversationSummary, valid_token

#: Browser storage key of the record of the browser's conversations.
BROWSER_STORAGE_KEY = "streaming-llm-conversations"
#: Most conversations the list shows (the newest); the browser remembers up to `MAX_LIST_TOKENS`.
LIST_SHOWN = 50
#: The title of a conversation before its first message names it.
UNTITLED = "New chat"


def empty_record() -> dict:
    return {"tokens": [], "current": None}


def browser_record(value) -> dict:
    """A browser's record cleaned up: well-formed tokens only, no duplicates, at most `MAX_LIST_TOKENS` (the most
    recently added kept), and `current` among them or None."""
    record = value if isinstance(value, dict) else {}
    tokens = record.get("tokens") if isinstance(record.get("tokens"), list) else []
    tokens = list(dict.fromkeys(t for t in tokens if valid_token(t)))[-MAX_LIST_TOKENS:]
    current = record.get("current")
    return {"tokens": tokens, "current": current if current in tokens else None}


def remember(record: dict, token: str | None) -> dict:
    """`record` with `token` as the current conversation (added to the list if new); None: no current one."""
    tokens = [t for t in record["tokens"] if t != token] + ([token] if token else [])
    return browser_record({"tokens": tokens, "current": token})


def forget(record: dict, token: str | None) -> dict:
    """`record` without `token` (no current conversation if it was the current one)."""
    current = None if record["current"] == token else record["current"]
    return browser_record({"tokens": [t for t in record["tokens"] if t != token], "current": current})


def summaries(conversations, record: dict, stored: list[ConversationSummary] | None = None
              ) -> list[ConversationSummary]:
    """The record's conversations that still exist, newest first: stored ones (`stored`, when the caller has
    already asked the store), then live unstored ones (the current conversation first among those)."""
    stored = conversations.list(record["tokens"]) if stored is None else stored
    known = {s.token for s in stored}
    live = []
    for token in dict.fromkeys([record["current"], *reversed(record["tokens"])]):
        if token is None or token in known:
            continue
        try:
            messages = conversations.messages(token)
        except ConversationNotFound:
            continue
        live.append(ConversationSummary(token, auto_title(messages), time.time(), len(messages),
                                        bool(messages) and bool(messages[-1].get("interrupted"))))
    return live + stored


def label(summary: ConversationSummary) -> str:
    """One line of the list: title, message count, and a mark on a conversation whose last reply was cut off."""
    count = summary.message_count
    text = f"{summary.title or UNTITLED} · {count} message{'s' if count != 1 else ''}"
    return text + (" · interrupted" if summary.interrupted else "")


def list_update(conversations, record: dict, items: list[ConversationSummary] | None = None):
    """The list component's new choices and selection for `record` (`items`: its `summaries`, if known)."""
    items = summaries(conversations, record) if items is None else items
    shown = items[:LIST_SHOWN]
    current = record["current"]
    if current is not None and current not in {s.token for s in shown}:
        shown = [s for s in items if s.token == current] + shown[: LIST_SHOWN - 1]
    tokens = {s.token for s in shown}
    return gr.update(choices=[(label(s), s.token) for s in shown], value=current if current in tokens else None)


def build_conversation_list():
    """The list's block inside the current layout; returns (list, title box, rename button, delete button, undo
    button). The undo button shows only while the page's last delete can be undone (see `chat_tab`)."""
    with gr.Accordion("Conversations", open=True, elem_id="conversation-list"):
        listing = gr.Radio(choices=[], value=None, show_label=False, container=False, elem_id="conversations")
        with gr.Row():
            title = gr.Textbox(placeholder="Title of this chat", show_label=False, container=False, scale=3,
                               max_length=MAX_TITLE_CHARS, elem_id="conversation-title")
            rename = gr.Button("Rename", size="sm", scale=1, min_width=70, elem_id="rename-conversation")
        with gr.Row():
            delete = gr.Button("Delete this chat", size="sm", variant="stop", elem_id="delete-conversation")
            undo = gr.Button("Undo delete", size="sm", visible=False, elem_id="undo-delete")
    return listing, title, rename, delete, undo
