"""The chat-history file: its JSON schema, writing it, reading it back, its size limits, and moving a conversation
between such a file and an engine (`export_history`, `restore_history`, over the engine's public surface).

What users download and upload to continue a conversation elsewhere (format `streaming-llm-chat`, version 1)::

    {"format": "streaming-llm-chat", "version": 1,
     "mode": "streaming" | "dense" | "window", "system_prompt": text | null,
     "start_size": int, "recent_size": int,               # informative: the restoring engine's sizes apply
     "messages": [{"role": "user" | "assistant", "content": text}, ...],
     "title": text,                                       # optional: the conversation's (renamed) title
     "recall": true | false,                              # optional: the conversation's recall switch
     "exported_at": "2025-01-31T12:00:00+00:00"}

A message may carry more, as the store keeps it (`store.py`), so that a download uploaded elsewhere is the same
conversation, not only the same words:

- a user message whose turn recalled evicted messages: `"fed"`, the text the model was given (the quoted passages,
  then the typed text), and `"recalled"`, the indices in "messages" of the messages it quoted. The restored session
  gives the model that same text again when it re-primes, and the page shows the same "recalled" markers.
- a reply: `"interrupted": true` when it was cut off while being written, `"stopped": true` when the user stopped it,
  `"truncated": true` when it ended at its `max_new_tokens` (`validate.MARK_KEYS`).

All of these, like "title" and "recall", are optional and outside the version: a file without them (written before
they were added, or by hand) reads as before, and a reader that does not know them keeps the role and text only.

`parse_history` checks the size, the encoding and the schema and returns what a restore needs; it never touches a
session. A `fed` text must be what this app feeds (a recall block quoting only the messages its record names,
then the message), so that a shared file cannot give the model text no page shows. Whether a message's *text* is
acceptable (length, control characters), whether the mode exists and whether a recall record's indices are
consistent (`validate.check_recall_records`) are the engine's rules, applied when `restore_history` hands the
messages to `StreamingEngine.open_history`.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Collection, Mapping

from .recall import flatten, quotes_only
from .validate import (  # noqa: F401  (ROLES re-exported)
    MARK_KEYS,
    MAX_MESSAGES,
    RECALL_RECORD_KEYS,
    ROLES,
    check_bool,
    check_messages,
    parse_json,
)

EXPORT_FORMAT = "streaming-llm-chat"
EXPORT_VERSION = 1
#: Largest accepted history file, in bytes (the app's upload limit too).
MAX_HISTORY_BYTES = 8 * 1024 * 1024
#: Most messages accepted in one history (the store keeps as many; `validate.MAX_MESSAGES`).
MAX_HISTORY_MESSAGES = MAX_MESSAGES

_LIMIT_TEXT = f"{MAX_HISTORY_BYTES // (1024 * 1024)} MiB"
#: Most characters one upload's `fed` check may scan (`_check_fed_texts`): each quoted line costs a substring search
#: of the messages it quotes, each quoted message is flattened once at `FLATTEN_COST` per character. Substring search
#: ran at about 2 G characters/s on this project's CI machine and flattening about 40 times slower, so this bounds
#: the check to well under a second even for a file built to be slow; a real chat's records cost a small fraction.
MAX_FED_CHECK_CHARS = 1_000_000_000
FLATTEN_COST = 40


@dataclass
class ChatHistory:
    """A parsed history: `messages` are `{"role", "content"}` dicts with the roles in `ROLES`. `records`: what
    recall did, parallel to `messages` (`{}` or the file's `{"fed", "recalled"}`, unchecked: `open_history` checks
    them), or None when no message has one. `recall`: the recall switch. `marks`: per key of `MARK_KEYS`, the
    indices of the replies the file marks so."""

    messages: list[dict]
    mode: str | None = None
    system_prompt: str | None = None
    title: str | None = None  # as the file has it; the store cleans and cuts it (`store.MAX_TITLE_CHARS`)
    records: list[dict] | None = None
    recall: bool | None = None  # the conversation's recall switch, None where the file does not say
    marks: dict[str, frozenset[int]] = field(default_factory=lambda: {key: frozenset() for key in MARK_KEYS})

    @property
    def last_reply_open(self) -> bool:
        """The last message is a reply the file marks (cut, stopped, cut off): one a Continue may extend."""
        return bool(self.messages) and any(len(self.messages) - 1 in marked for marked in self.marks.values())


def _file_message(message: dict) -> dict:
    """One message as the file writes it: role and text, then what of `RECALL_RECORD_KEYS` and `MARK_KEYS` it has
    (a record only when it recalled something; a mark only when set)."""
    out = {"role": message["role"], "content": message["content"]}
    if message.get("recalled"):
        out.update({key: message[key] for key in RECALL_RECORD_KEYS if key in message})
    out.update({key: True for key in MARK_KEYS if message.get(key)})
    return out


def dump_history(*, mode: str, system_prompt: str | None, start_size: int, recent_size: int,
                 messages: list[dict], title: str | None = None, recall: bool | None = None) -> str:
    """The history as JSON text (indented, non-ASCII kept as is), stamped with the current UTC time. `messages`
    as the store keeps them: role and text, and where they have them a recall record and marks (module
    docstring); `title` is written only when there is one, `recall` (the recall switch) when it is given."""
    return json.dumps({
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "mode": mode,
        "system_prompt": system_prompt,
        "start_size": start_size,
        "recent_size": recent_size,
        "messages": [_file_message(m) for m in messages],
        **({"title": title} if title else {}),
        **({"recall": recall} if recall is not None else {}),
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }, ensure_ascii=False, indent=2)


def parse_history(exported: str | bytes) -> ChatHistory:
    """Read a history written by `dump_history`. Raises `ValueError` with a message fit for users on a file that
    is too large, not UTF-8, not JSON, or not in this format."""
    if isinstance(exported, (bytes, bytearray)):
        if len(exported) > MAX_HISTORY_BYTES:
            raise ValueError(f"history file is too large (limit {_LIMIT_TEXT})")
        try:
            exported = bytes(exported).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError("history file is not UTF-8 text") from exc
    if not isinstance(exported, str) or len(exported.encode("utf-8", "surrogatepass")) > MAX_HISTORY_BYTES:
        raise ValueError(f"history must be JSON text of at most {_LIMIT_TEXT}")
    data = parse_json(exported, "history file")  # a nesting bomb is "not valid JSON (nested too deep)"
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ValueError(f"not a chat history exported by this app (expected format {EXPORT_FORMAT!r})")
    raw = data.get("messages")
    messages = check_messages(raw, "history 'messages'")
    records = [{key: m[key] for key in RECALL_RECORD_KEYS if key in m} for m in raw]
    records = _check_fed_texts(records, messages)
    marks = {key: frozenset(_marked(raw, messages, key)) for key in MARK_KEYS}
    system_prompt = data.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError("history 'system_prompt' must be text or null")
    mode = data.get("mode")
    if mode is not None and not isinstance(mode, str):
        raise ValueError("history 'mode' must be text or null")
    title = data.get("title")
    if title is not None and not isinstance(title, str):
        raise ValueError("history 'title' must be text or null")
    recall = data.get("recall")
    recall = None if recall is None else check_bool("history 'recall'", recall)
    return ChatHistory(messages, mode, system_prompt, title, records if any(records) else None, recall, marks)


def _check_fed_texts(records: list[dict], messages: list[dict]) -> list[dict]:
    """`records` with each file `fed` text checked: it must be what this app feeds, a recall block that quotes only
    the messages its record names (`recall.quotes_only`), then the message as shown; otherwise a shared file could
    give the model text that no page shows, and the file is refused. The rest of a record (its indices, its
    length) is `validate.check_recall_records`'s.

    The check scans each quoted line against the messages it names, so its cost is bounded: records are checked
    newest first (a re-primed cache holds the newest turns) within `MAX_FED_CHECK_CHARS`, and older ones past it
    are dropped unchecked, as `export_history` drops the oldest to fit the upload limit. Their messages stay whole."""
    out, spent, flat = list(records), 0, {}  # flat: message index -> its text flattened, made once
    for i in range(len(records) - 1, -1, -1):
        fed, quoted = records[i].get("fed"), records[i].get("recalled")
        if (not quoted or not isinstance(fed, str) or not isinstance(quoted, list)
                or any(type(k) is not int or not 0 <= k < i for k in quoted)):
            continue  # recalled nothing (the record is dropped), or malformed (refused by the record check)
        quoted = set(quoted)
        new = [k for k in quoted if k not in flat]
        spent += (fed.count("\n") * sum(len(messages[k]["content"]) for k in quoted)
                  + FLATTEN_COST * sum(len(messages[k]["content"]) for k in new))
        if spent > MAX_FED_CHECK_CHARS:
            out[: i + 1] = [{}] * (i + 1)
            break
        flat.update({k: flatten(messages[k]["content"]) for k in new})
        content = messages[i]["content"]
        if not (fed.endswith(content) and quotes_only(fed[:len(fed) - len(content)], [flat[k] for k in quoted])):
            raise ValueError(f"history message {i}'s 'fed' text must be a recall block quoting the messages its "
                             "'recalled' names, then the message itself")
    return out


def _marked(raw: list, messages: list[dict], key: str) -> list[int]:
    """The indices of the replies whose `key` mark (`MARK_KEYS`) is set; a mark that is not true or false is
    refused, one on a user message is ignored (only replies are cut off or stopped)."""
    for i, m in enumerate(raw):
        check_bool(f"history message {i}'s {key!r}", m.get(key, False))
    return [i for i, (m, clean) in enumerate(zip(raw, messages)) if m.get(key) and clean["role"] == "assistant"]


def export_history(engine, session_id: str, *, title: str | None = None,
                   marks: Mapping[str, Collection[int]] | None = None, recall: bool | None = None) -> str:
    """Session `session_id` of `engine` as a history file: the conversation as typed and replied, with what recall
    did in its turns (`engine.recall_records`), the session's mode and sizes. The engine keeps no title, no marks
    and no switch: `title` is the caller's name for it, `marks` (as `ChatHistory.marks`) the replies it marks,
    `recall` its recall switch (a session's budget of 0 does not say it: a server without recall gives every
    session 0). A file that would pass the upload limit (`MAX_HISTORY_BYTES`) drops the recall records of its oldest
    turns until it fits, or until none is left (`upload_limit_note` then says so)."""
    view = engine.session(session_id)
    visible = [m for m in engine.history(session_id) if m["role"] != "system"]
    marks = marks or {}
    stored = [{**m, **r, **{key: True for key in MARK_KEYS if i in marks.get(key, ()) and m["role"] == "assistant"}}
              for i, (m, r) in enumerate(zip(visible, engine.recall_records(session_id)))]

    def dumped() -> str:
        return dump_history(mode=view.mode, system_prompt=view.system_prompt, start_size=view.start_size,
                            recent_size=view.recent_size, messages=stored, title=title, recall=recall)

    text = dumped()
    # A file past the upload limit could not come back. What recall fed the oldest turns goes first: the text of
    # every message stays whole, and a re-primed cache holds the newest turns, whose records are kept longest.
    recorded = [m for m in stored if m.get("recalled")]
    while recorded and (excess := len(text.encode("utf-8")) - MAX_HISTORY_BYTES) > 0:
        while recorded and excess > 0:
            record = {key: recorded[0].pop(key) for key in RECALL_RECORD_KEYS if key in recorded[0]}
            recorded.pop(0)
            excess -= len(json.dumps(record, ensure_ascii=False, indent=2).encode("utf-8"))
        text = dumped()
    return text


def upload_limit_note(exported: str) -> str | None:
    """None when the history file `exported` can be uploaded back; else why not, in words for users (a
    conversation whose text alone passes `MAX_HISTORY_BYTES`: the download keeps it whole all the same)."""
    size = len(exported.encode("utf-8"))
    if size <= MAX_HISTORY_BYTES:
        return None
    return (f"This history is {size / (1024 * 1024):.1f} MiB, more than the {_LIMIT_TEXT} an upload may be: the "
            "download holds all of it, but it cannot be uploaded back whole.")


def restore_history(engine, exported: str | bytes | ChatHistory, mode: str | None = None, *,
                    allow_file_mode: bool = False, owner: str | None = None, origin: str = "browser") -> str:
    """A new session of `engine` holding the history file `exported` (or a `ChatHistory` already parsed from
    one), with what recall did in its turns and, where the file switches recall off, recall off; its cache is
    rebuilt (sinks + the tail that fits) on the first turn. Raises `ValueError` with a clear message on a corrupt
    or oversized file, and then changes nothing. Marks are the caller's to keep (`ChatHistory.marks`): the engine
    keeps none.

    The server, not the file, decides the session's mode and sizes: `mode` (default "streaming") with the engine's
    sizes. A file's `"mode"` is only read when the caller passes `allow_file_mode=True`; otherwise an uploaded
    `"mode": "dense"` could turn a bounded chat into a cache that grows to the model's limit."""
    history = exported if isinstance(exported, ChatHistory) else parse_history(exported)
    mode = mode or (history.mode if allow_file_mode else None) or "streaming"
    session_id = engine.open_history(history.messages, history.system_prompt, mode=mode, owner=owner,
                                     origin=origin, records=history.records, last_reply_open=history.last_reply_open)
    if history.recall is False:
        engine.set_recall_budget(session_id, 0)
    return session_id
