"""Conversations that outlive a tab, a reload and a restart: live engine sessions bound to stored conversations.

A browser holds one random token per conversation (see `store.py`); the UI passes that token here and never
handles session ids. This module keeps the map token -> live session and writes every change to the store:

* `start` — a new conversation: a fresh token and a live session. Nothing is stored before the first message.
* `open` — a page load with a token: re-attach to the token's live session if it still exists (a reload creates
  no session), else re-create it from the store, its cache re-primed from the stored history on the next turn
  exactly as `history.restore_history` does, with what recall did in its turns (the quoted passages the model was
  given, the recall switch), so the model's context is the one it had. After `kill -9` and a restart this brings
  the conversation back.
  Replicas sharing one store (PostgreSQL) serve any conversation this way; a live session that another replica
  has since moved on (the store's revision differs from the one this process last loaded or wrote) is dropped and
  re-created from the store, so a browser that moved away and back never continues a stale history. The one
  exception is a revision this process may have moved itself: after a failed write (a `COMMIT` whose answer was
  lost), a live session whose messages begin with the stored ones is kept, with the turns the store lacks.
* `chat` — `StreamingEngine.chat` plus persistence: the user's message as soon as the turn is accepted, the
  whole conversation with the partial reply at its first piece, then the partial reply every
  `partial_save_interval_s` (marked interrupted), and the whole history once the turn ends.
  If the live session was closed meanwhile (idle, restart) it is re-created from the store first.
* `park` — a page switched to another conversation: this one keeps its live session (its cache, so switching
  back re-primes nothing) while it is among its owner's `KEEP_RECENT` most recently parked; older ones are
  released. Parked sessions count against the engine's caps like any other, so when a new or re-opened session
  finds a cap full, parked sessions are released (the owner's oldest first) to make room.
* `retry`, `stop`, `release` (tab closed: free the session now; the stored conversation stays), `delete` (the
  session and the stored rows; with `undoable=True` a copy stays in memory for `UNDO_DELETE_S`, and `undelete`
  brings the conversation back under its token, messages, system prompt and title), `rename`, `list`, `import_history` (an uploaded file becomes a new conversation;
  the server decides its mode and sizes) and `export`.

A storage failure (disk full, store full) never breaks a chat: it is logged, the chat goes on unsaved, and
`save_error(token)` tells the UI. Which owner a session counts against (client address, login user) is the
caller's to say: see the per-owner cap in `engine.py`.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from .defaults import PARTIAL_SAVE_INTERVAL_S
from .engine import EngineBusy, Refused, StreamingEngine, refusal
from .history import export_history, parse_history, restore_history
from .session import Event, refused
from .store import UNREACHABLE, ConversationStore, ConversationSummary, StoreError, StoreFull, new_token, valid_token
from .validate import MARK_KEYS, RECALL_RECORD_KEYS, check_bool, check_number, clean_text

logger = logging.getLogger(__name__)

#: A new conversation's title: the first line of its first message, cut to this many characters.
AUTO_TITLE_CHARS = 60
#: Storage failures remembered for `save_error` at most (the oldest are forgotten first).
MAX_PENDING_ERRORS = 1000
#: Conversations a page switched away from that keep their live session (and cache), per owner: switching back to
#: one of them re-primes nothing. They count against the engine's session caps, and give way when one is full.
KEEP_RECENT = 3
#: How long an undoable delete can be undone (seconds). The copy lives only in this process's memory: the stored
#: rows are gone at once, so a restart inside the window makes the delete final.
UNDO_DELETE_S = 120.0
#: Most deleted conversations kept for undo at once (the oldest become final first).
MAX_UNDOABLE_DELETES = 1000


class ConversationNotFound(KeyError):
    """The token is unknown, malformed, deleted, or its session ended while persistence is off."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "conversation not found"


class ConversationUnavailable(ConversationNotFound):
    """The conversation may well be stored, but the store cannot be asked now (its server is unreachable): a caller
    that would forget a token it cannot open must keep this one (a browser's list survives a database restart)."""


@dataclass
class Deleted:
    """What an undoable delete keeps, in memory, until `UNDO_DELETE_S` after the delete."""

    messages: list[dict]  # visible history, "interrupted" marks kept
    system_prompt: str | None
    title: str
    until: float  # time.monotonic() after which the delete is final


@dataclass
class Opened:
    """What a page needs to show a conversation."""

    token: str  # keep it in the browser: it is the only key to this conversation
    session_id: str  # the live engine session (for stats and export)
    messages: list[dict]  # visible history; an assistant message cut off by a stop has "interrupted": True
    system_prompt: str | None
    title: str
    reattached: bool  # True: the live session was still open (a reload); no session was created


def auto_title(messages: list[dict]) -> str:
    first = next((m["content"] for m in messages if m["role"] == "user" and m["content"].strip()), "")
    line = first.strip().splitlines()[0] if first.strip() else ""
    return line if len(line) <= AUTO_TITLE_CHARS else line[: AUTO_TITLE_CHARS - 1] + "…"


def _marks_of(messages: list[dict]) -> dict[str, set[int]]:
    """Per mark (`MARK_KEYS`), the indices of the stored or uploaded replies that carry it."""
    return {key: {i for i, m in enumerate(messages) if m.get(key) and m["role"] == "assistant"} for key in MARK_KEYS}


def _not_taken(exc: Exception) -> Refused:
    """The events of a turn refused before the engine saw it (the conversation cannot be opened, a cap, a stored
    history the engine refuses), as `engine.refusal` tells them."""
    return Refused(refused(str(exc), "busy" if isinstance(exc, EngineBusy) else "invalid"))


class Conversations:
    """Token-addressed conversations over an engine and a store (thread-safe)."""

    def __init__(self, engine: StreamingEngine, store: ConversationStore, *,
                 partial_save_interval_s: float = PARTIAL_SAVE_INTERVAL_S):
        self.engine = engine
        self.store = store
        self.partial_save_interval_s = check_number("partial_save_interval_s", partial_save_interval_s, 0)
        self._live: dict[str, str] = {}  # token -> live session id
        # token -> mark (`MARK_KEYS`: interrupted, stopped, truncated) -> indices of the replies carrying it. Kept
        # with the live session (a reload, a switch back within `KEEP_RECENT`), and in the store, from which a
        # re-opened conversation reads them back (`_marks_of`).
        self._marks: dict[str, dict[str, set[int]]] = {}
        self._errors: dict[str, str] = {}  # token -> last storage failure, until `save_error` reads it
        self._storage_problem: str | None = None  # why nothing is being saved (see `storage_problem`)
        self._deleted: dict[str, Deleted] = {}  # token -> what `undelete` restores, oldest first
        self._parked: dict[str, str | None] = {}  # token -> owner, of live sessions no page shows; oldest first
        self._revisions: dict[str, int] = {}  # token -> store revision this process last loaded or wrote
        # Tokens whose last write here failed: the store may hold a write whose answer was lost (a server stopping
        # mid-commit), so a revision that moved may be this process's own (see `_moved_on`).
        self._unsure: set[str] = set()
        # Conversations whose recall the user switched off (`set_recall`): stored with the conversation too, read
        # back whenever its session is re-created from the store, and applied to every session made for it here.
        self._recall_off: set[str] = set()
        self._lock = threading.RLock()

    @property
    def persistent(self) -> bool:
        return self.store.enabled

    # --- opening ---------------------------------------------------------------------------------------------------

    def start(self, *, owner: str | None = None, origin: str = "browser", system_prompt: str | None = None,
              start_size: int | None = None, recent_size: int | None = None, recall: bool = True) -> Opened:
        """A new, empty conversation with its live session (cache sizes: the engine's unless given; `recall`
        False: recall switched off, see `set_recall`). Raises `EngineBusy` at a session cap, `ValueError` on bad
        sizes."""
        sid = self._making_room(owner, lambda: self.engine.new_session(
            "streaming", system_prompt, start_size=start_size, recent_size=recent_size, owner=owner, origin=origin,
            recall_budget=None if recall else 0))
        token = new_token()
        with self._lock:
            self._forget_closed()
            self._live[token] = sid
            if not recall:
                self._recall_off.add(token)
        return self._opened(token, sid, "", reattached=False)

    def open(self, token: str, *, owner: str | None = None, origin: str = "browser") -> Opened:
        """Re-attach to `token`'s live session, or re-create it from the store.

        Raises `ConversationNotFound` (unknown token, or gone with persistence off; `ConversationUnavailable` when
        the store cannot be asked now), `EngineBusy` (a cap) and
        `ValueError` (a stored history the engine's current limits refuse)."""
        with self._lock:
            sid = self._live_session(token)
        if sid is not None and self._moved_on(token, sid):
            sid = None
        if sid is not None:
            try:
                self.engine.settle(sid)  # a reply stopped by the old page's leaving: let it land in the history
                summary = self.list([token])
                return self._opened(token, sid, summary[0].title if summary else "", reattached=True)
            except KeyError:  # closed while we waited: re-create it below
                pass
        with self._lock:
            sid = self._live_session(token)
            if sid is not None:  # another page re-created it meanwhile
                return self._opened(token, sid, "", reattached=True)
            return self._reopen(token, owner, origin)

    def _live_session(self, token: str) -> str | None:
        sid = self._live.get(token) if isinstance(token, str) else None
        if isinstance(token, str):
            self._parked.pop(token, None)  # shown again
        if sid is not None and sid not in self.engine.session_ids():
            self._forget(token)  # closed meanwhile (idle timeout)
            sid = None
        return sid

    def _moved_on(self, token: str, sid: str) -> bool:
        """Whether another replica changed the stored conversation since this process last loaded or wrote it;
        if so its live session here is stale and is released (the caller re-creates it from the store). A session
        replying here is never stale (its own writes move the revision), nor one the store cannot be asked about."""
        if not self.store.enabled:
            return False
        try:
            stored = self.store.revision(token)
            if stored is None or stored == self._revisions.get(token) or self.engine.replying(sid):
                return False
            if token in self._unsure and self._holds_stored(token, sid):
                # This process's own write, committed though its answer was lost: the store holds what the live
                # session holds, or less (writes that failed since). Re-loading would drop those messages.
                with self._lock:
                    self._revisions[token] = stored
                return False
        except (sqlite3.DatabaseError, StoreError, KeyError):
            return False
        logger.info("conversation changed by another replica since it was live here: re-loading it from the store")
        self.release(token)
        return True

    def _holds_stored(self, token: str, sid: str) -> bool:
        """Whether the live session's messages begin with the stored ones (a stored reply marked interrupted
        counts as the live reply at its place, which it was a part of)."""
        stored = self.store.load(token)
        live = self.messages(token, sid)
        if stored is None or len(stored.messages) > len(live):
            return False
        for i, (kept, mine) in enumerate(zip(stored.messages, live)):
            partial = kept.get("interrupted") and i == len(stored.messages) - 1 and kept["role"] == "assistant"
            if kept["role"] != mine["role"] or not (partial or kept["content"] == mine["content"]):
                return False
        return True

    def _mark(self, token: str, key: str, index: int) -> None:
        """Reply `index` of the conversation carries mark `key` (`MARK_KEYS`)."""
        with self._lock:
            self._marks.setdefault(token, {}).setdefault(key, set()).add(index)

    def _keep_marks(self, token: str, below: int) -> None:
        """Drop the marks of messages from `below` on (a new turn or a retry replaces them); under the lock."""
        self._marks[token] = {key: {i for i in marked if i < below} for key, marked in self._marks.get(token, {}).items()}

    def _forget(self, token: str) -> None:
        """Drop what is kept in memory for a conversation whose session is gone (the store keeps the rest)."""
        self._live.pop(token, None)
        self._revisions.pop(token, None)
        self._unsure.discard(token)
        self._marks.pop(token, None)
        self._parked.pop(token, None)

    def _reopen(self, token: str, owner: str | None, origin: str) -> Opened:
        try:
            stored = self.store.load(token) if valid_token(token) else None
        except StoreError as exc:  # the database server is unreachable: the chat is there, just not now
            raise ConversationUnavailable(f"this conversation cannot be loaded now: {exc}") from None
        except sqlite3.DatabaseError as exc:  # a corrupted file: this chat is lost, the others keep working
            self._broken(exc)
            raise ConversationNotFound("this conversation cannot be read from the damaged chat database; "
                                       "start a new chat") from None
        if stored is None:
            raise ConversationNotFound("this conversation is no longer available; start a new chat")
        sid = self._making_room(owner, lambda: self._open_stored(stored.messages, stored.system_prompt, owner, origin))
        (self._recall_off.discard if stored.recall else self._recall_off.add)(token)  # another replica may have set it
        if token in self._recall_off:
            self.engine.set_recall_budget(sid, 0)
        self._live[token] = sid
        self._revisions[token] = stored.revision
        self._marks[token] = _marks_of(stored.messages)
        return self._opened(token, sid, stored.title, reattached=False)

    def _open_stored(self, messages: list[dict], system_prompt: str | None, owner: str | None, origin: str) -> str:
        """A session continuing stored `messages` (the store's dicts), with what recall did in their turns, so the
        model is given the same context again and the "recalled" markers stay."""
        history = [{"role": m["role"], "content": m["content"]} for m in messages]
        records = [{k: m[k] for k in RECALL_RECORD_KEYS if k in m} for m in messages]
        marked = bool(messages) and any(messages[-1].get(key) for key in MARK_KEYS)  # a reply that can go on
        return self.engine.open_history(history, system_prompt, owner=owner, origin=origin, records=records,
                                        last_reply_open=marked)

    def _stored_messages(self, token: str, sid: str) -> list[dict]:
        """`messages` as the store keeps them: each user message whose turn recalled also has `fed` and
        `recalled` (`StreamingEngine.recall_records`)."""
        return [{**m, **r} for m, r in zip(self.messages(token, sid), self.engine.recall_records(sid))]

    def _session(self, token: str, owner: str | None, origin: str = "browser") -> str:
        with self._lock:
            sid = self._live_session(token)
        if sid is not None and not self._moved_on(token, sid):
            return sid
        with self._lock:
            sid = self._live_session(token)  # another thread may have re-created it meanwhile
            return sid if sid is not None else self._reopen(token, owner, origin).session_id

    def _forget_closed(self) -> None:
        alive = set(self.engine.session_ids())
        for token in [t for t, sid in self._live.items() if sid not in alive]:
            self._forget(token)

    def _opened(self, token: str, sid: str, title: str, reattached: bool) -> Opened:
        history = self.engine.history(sid)
        system = history[0]["content"] if history and history[0]["role"] == "system" else None
        return Opened(token, sid, self.messages(token, sid), system, title, reattached)

    def messages(self, token: str, sid: str | None = None) -> list[dict]:
        """The visible history of a live conversation, its replies' marks (`MARK_KEYS`) set."""
        sid = sid or self._live.get(token)
        if sid is None:
            raise ConversationNotFound("this conversation is not open")
        marks = self._marks.get(token, {})
        visible = [m for m in self.engine.history(sid) if m["role"] != "system"]
        return [{**m, **{key: True for key, marked in marks.items() if i in marked}} if m["role"] == "assistant"
                else m for i, m in enumerate(visible)]

    def memory_map(self, token: str) -> list[dict]:
        """`StreamingEngine.memory_map` of a live conversation (system prompt first when there is one); empty when
        it is not open, so a page repainting after its session closed just shows no markers."""
        sid = self._live.get(token) if isinstance(token, str) else None
        try:
            return self.engine.memory_map(sid) if sid is not None else []
        except KeyError:
            return []

    def set_recall(self, token: str, enabled: bool) -> None:
        """The per-conversation recall switch: off, no evicted message is quoted back into this conversation's
        turns; on, its session's default budget (`StreamingEngine.set_recall_budget`). Applies from the next turn
        and to the session re-created for it later in this process."""
        check_bool("recall", enabled)
        with self._lock:
            (self._recall_off.discard if enabled else self._recall_off.add)(token)
            sid = self._live.get(token)
        if sid is not None:
            try:
                self.engine.set_recall_budget(sid, None if enabled else 0)
            except KeyError:  # closed meanwhile: the next session made for it reads `_recall_off`
                pass
        if valid_token(token):  # not stored yet (no message): its first save stores the switch
            self._guarded(token, self.store.set_recall, token, enabled)

    def recall_available(self) -> bool:
        """Whether this server recalls at all: an engine-wide `recall_budget=0` (the app's `--recall-budget 0`)
        turns it off for every conversation, and no switch turns it back on."""
        return self.engine.recall_budget_for("streaming", self.engine.config.recent_size) > 0

    def recall_enabled(self, token: str | None) -> bool:
        """Whether recall is on for `token`'s conversation (on unless switched off, where the server recalls)."""
        return self.recall_available() and token not in self._recall_off

    # --- chatting --------------------------------------------------------------------------------------------------

    def chat(self, token: str, message: str, *, owner: str | None = None, **sampling) -> Iterator[Event]:
        """`StreamingEngine.chat` on the token's conversation, saving as it goes (see the module docstring).

        Not lazy: the turn is submitted, and its user message stored, before this returns, so a page may show the
        message once it holds the iterator and a crash after that loses nothing it showed (issue 28, item 6). The
        turn's outcome is saved when the iterator ends or is closed, even before its first event. A message not
        taken (the conversation cannot be opened, bad settings, busy) comes back as `engine.refusal` can tell, its
        one event `accepted` False: nothing of it was stored, so a page must not show it as sent."""
        try:
            sid = self._session(token, owner)
            before = len(self.messages(token, sid))
        except (ConversationNotFound, EngineBusy, ValueError) as exc:  # busy: a cap, while re-creating it
            return _not_taken(exc)
        with self._lock:
            self._keep_marks(token, before)
        events = self.engine.start_chat(sid, message, **sampling)
        if refusal(events) is not None:
            return events
        try:
            existed = self.store.exists(token)
        except (sqlite3.DatabaseError, StoreError):  # unreadable or unreachable: never delete on its word
            existed = True
        # Saved as soon as the turn is accepted, not at its first token: a crash during a long prefill (or before
        # the worker took the turn) must not lose the user's message (issue 28, item 6).
        self._persist(token, sid, before + 1, message=message)
        saving = self._saving(token, sid, before, events, existed)
        next(saving)  # into its `try`: from here on, closing it saves the outcome
        return saving

    def continue_reply(self, token: str, *, owner: str | None = None, **sampling) -> Iterator[Event]:
        """`StreamingEngine.continue_reply` on the token's conversation, saving as `chat` does: the last reply grows
        in place (stored marked interrupted while it streams), and ends with the mark of its new end, the old one
        dropped. Refused (one event, `accepted` False) as the engine refuses it; nothing is stored then."""
        try:
            sid = self._session(token, owner)
            shown = self.messages(token, sid)
        except (ConversationNotFound, EngineBusy, ValueError) as exc:
            return _not_taken(exc)
        events = self.engine.continue_reply(sid, **sampling)
        if refusal(events) is not None:
            return events
        reply_at = len(shown) - 1  # the engine took it, so the last message is the reply
        with self._lock:
            self._keep_marks(token, reply_at)
        # `_saving` counts from the message before the reply, as for a turn whose user message is at `before`.
        saving = self._saving(token, sid, reply_at - 1, events, True, reply=shown[-1]["content"])
        next(saving)
        return saving

    def _saving(self, token: str, sid: str, before: int, events: Iterator[Event], existed: bool, reply: str = ""):
        """The turn's events, saving as they come; `chat` primes it (its first `yield` hands back nothing).
        `reply`: the text the reply already has (a continued one's)."""
        started, ended, last_save = False, None, time.monotonic()
        try:
            yield None
            for event in events:
                if event.kind == "delta":
                    reply += event.text
                    # Only what this reader has seen is saved, the reply marked interrupted: the worker may be steps
                    # ahead (its history can already hold the finished reply), which is saved when the turn ends.
                    if not started:  # the whole conversation once more: heals a write at acceptance that failed
                        started, last_save = True, time.monotonic()
                        self._persist(token, sid, before + 1, reply=reply)
                    elif time.monotonic() - last_save >= self.partial_save_interval_s:
                        last_save = time.monotonic()
                        self._guarded(token, self.store.save_partial, token, reply)
                else:
                    ended = event
                yield event
        finally:
            self._after_turn(token, sid, before, ended, started, reply, existed)

    def _persist(self, token: str, sid: str, upto: int | None = None, *, message: str | None = None,
                 reply: str | None = None) -> None:
        """Store the conversation (all of it, or its first `upto` messages) with its system prompt and title.
        `message`: the turn's accepted user message, added when the worker has not yet appended it to the session's
        history (it does so when it starts the turn). `reply`: the reply so far, stored marked interrupted."""
        messages = self._stored_messages(token, sid)[:upto]
        if message is not None and upto is not None and len(messages) == upto - 1:
            messages.append({"role": "user", "content": clean_text(message)})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply, "interrupted": True})
        self._guarded(token, self.store.replace, token, messages, system_prompt=self._system_prompt(sid),
                      title=auto_title(messages), recall=token not in self._recall_off)

    def _after_turn(self, token: str, sid: str, before: int, ended, started: bool, reply: str,
                    existed: bool = True) -> None:
        """Save the turn's outcome. A reply cut off by a failure, or by its reader going away, is marked
        interrupted; one the user stopped is marked stopped (it ends where they wanted), one that ended at its
        `max_new_tokens` truncated (`Event.mark`)."""
        try:
            now = len(self.messages(token, sid))
        except KeyError:  # the session was closed meanwhile (tab closed, deleted): nothing left to add
            if started:
                self._guarded(token, self.store.save_partial, token, reply)
            return
        if ended and now <= before and not started:
            # Taken here but refused where it was to run (a ZeroGPU call the platform turned down): the message
            # goes back to the user, so the copy stored at acceptance is undone.
            if existed:
                self._persist(token, sid)
            else:
                self._guarded(token, self.store.delete, token)
        elif ended:
            if now > before:  # a refused message changed nothing
                if ended.mark is not None and now > before + 1:  # the turn left a reply to mark
                    self._mark(token, ended.mark, before + 1)
                self._persist(token, sid)
        elif started:  # the reader went away mid-reply: keep what it saw, marked interrupted
            self._mark(token, "interrupted", before + 1)
            self._guarded(token, self.store.save_partial, token, reply)

    def retry(self, token: str, *, owner: str | None = None) -> str:
        """Drop the last exchange (saved at once) and return its user message, to send again with `chat`."""
        sid = self._session(token, owner)
        message = self.engine.rewind(sid)
        with self._lock:
            self._keep_marks(token, len(self.messages(token, sid)))
        self._persist(token, sid)
        return message

    def replying(self, token: str | None) -> bool:
        """Whether a reply is being written in this conversation now (False when it has no live session)."""
        sid = self._live.get(token) if isinstance(token, str) else None
        try:
            return sid is not None and self.engine.replying(sid)
        except KeyError:  # closed meanwhile
            return False

    def stop(self, token: str) -> None:
        """Stop the reply being written (no-op when none is)."""
        sid = self._live.get(token) if isinstance(token, str) else None
        if sid is not None:
            try:
                self.engine.stop(sid)
            except KeyError:
                pass

    def _guarded(self, token: str, write, *args, **kwargs) -> None:
        try:
            revision = write(*args, **kwargs)
            if isinstance(revision, int) and not isinstance(revision, bool):  # a write's new revision
                with self._lock:
                    if token in self._live:
                        self._revisions[token] = revision
                    self._unsure.discard(token)
            lost = self.store.file_problem()  # a write "succeeds" into a deleted file: say so, as for a full disk
            if lost is not None:
                raise StoreError(lost)
        except KeyError:  # deleted meanwhile (`save_partial` after a delete): nothing to save into
            pass
        except (sqlite3.Error, StoreError, OSError, ValueError) as exc:
            logger.warning("could not save conversation: %s", exc)
            with self._lock:
                if token in self._live:
                    self._unsure.add(token)
            # An unreachable server is not remembered here: the store's `file_problem` reports it while it lasts.
            if isinstance(exc, sqlite3.DatabaseError) or (isinstance(exc, StoreError) and not isinstance(exc, StoreFull)
                                                          and exc.code != UNREACHABLE):
                self._storage_problem = str(exc)
            with self._lock:
                self._errors.pop(token, None)
                self._errors[token] = f"This chat could not be saved ({exc}); it continues unsaved."
                while len(self._errors) > MAX_PENDING_ERRORS:
                    del self._errors[next(iter(self._errors))]

    def save_error(self, token: str) -> str | None:
        """The last storage failure for `token` since the previous call (then forgotten), or None."""
        with self._lock:
            return self._errors.pop(token, None)

    # --- closing, listing, files -----------------------------------------------------------------------------------

    def release(self, token: str) -> None:
        """The tab closed: free the live session now. The stored conversation stays (a later `open` revives it)."""
        if not isinstance(token, str):
            return
        with self._lock:
            sid = self._live.get(token)
            self._forget(token)
        if sid is not None:
            self.engine.close(sid)

    def park(self, token: str | None, owner: str | None = None) -> None:
        """No page shows `token` any more, but its owner may well come back to it: keep its live session while it
        is among the owner's `KEEP_RECENT` most recently parked (the older ones are released)."""
        if not isinstance(token, str):
            return
        with self._lock:
            if self._live_session(token) is None:
                return
            self._parked[token] = owner
            mine = [t for t, o in self._parked.items() if o == owner]
        for old in mine[:-KEEP_RECENT] if KEEP_RECENT else mine:
            self.release(old)

    def parked(self) -> list[str]:
        """Tokens whose live session is kept though no page shows them, oldest first."""
        with self._lock:
            return list(self._parked)

    def _making_room(self, owner: str | None, create):
        """`create()` (a new engine session); at a full cap, release parked sessions, the owner's oldest first,
        then anyone's, until it succeeds or none is left (then the engine's `EngineBusy` stands)."""
        while True:
            try:
                return create()
            except EngineBusy:
                with self._lock:
                    victims = [t for t, o in self._parked.items() if o == owner] or list(self._parked)
                if not victims:
                    raise
                self.release(victims[0])

    def delete(self, token: str, *, undoable: bool = False) -> bool:
        """Close the session and delete the stored conversation and its messages; False when nothing was stored.

        `undoable`: keep a copy in memory (not on disk) so that `undelete` can bring it back for `UNDO_DELETE_S`;
        a conversation with no messages leaves nothing to undo."""
        kept = self._copy(token) if undoable and isinstance(token, str) else None
        self.release(token)
        if isinstance(token, str):
            with self._lock:
                self._errors.pop(token, None)
                self._forget_expired_deletes()
                if kept is not None:
                    self._deleted.pop(token, None)
                    self._deleted[token] = kept
                    while len(self._deleted) > MAX_UNDOABLE_DELETES:
                        del self._deleted[next(iter(self._deleted))]
        return self.store.delete(token)

    def _copy(self, token: str) -> Deleted | None:
        """The conversation as `undelete` would restore it (live session first, else the store), or None."""
        until = time.monotonic() + UNDO_DELETE_S
        sid = self._live.get(token)
        title = ""
        try:
            summary = self.store.list([token]) if valid_token(token) else []
            title = summary[0].title if summary else ""
            if sid is not None:
                history = self.engine.history(sid)
                system = history[0]["content"] if history and history[0]["role"] == "system" else None
                messages = self._stored_messages(token, sid)
            else:
                stored = self.store.load(token) if valid_token(token) else None
                if stored is None:
                    return None
                messages, system, title = stored.messages, stored.system_prompt, stored.title
        except (KeyError, sqlite3.DatabaseError):  # closed meanwhile, or unreadable: nothing to keep
            return None
        return Deleted([dict(m) for m in messages], system, title or auto_title(messages), until) if messages else None

    def _forget_expired_deletes(self) -> None:
        now = time.monotonic()
        for token in [t for t, d in self._deleted.items() if d.until <= now]:
            del self._deleted[token]

    def undoable(self, token: str | None) -> bool:
        """Whether `undelete(token)` can still bring the conversation back."""
        with self._lock:
            self._forget_expired_deletes()
            return isinstance(token, str) and token in self._deleted

    def undelete(self, token: str, *, owner: str | None = None, origin: str = "browser") -> Opened:
        """Undo an undoable `delete` within `UNDO_DELETE_S`: the conversation comes back under the same token, with
        its messages, system prompt and title, stored again and with a live session (its cache re-primed on the
        next turn, as `open` does). Raises `ConversationNotFound` once the delete is final, `EngineBusy` at a cap
        (the copy is kept: undo can be tried again within the window)."""
        with self._lock:
            self._forget_expired_deletes()
            kept = self._deleted.pop(token, None) if isinstance(token, str) else None
        if kept is None:
            raise ConversationNotFound("too late to undo: that conversation was deleted for good")
        try:
            sid = self._making_room(owner, lambda: self._open_stored(kept.messages, kept.system_prompt, owner, origin))
        except (EngineBusy, ValueError):
            with self._lock:
                self._deleted[token] = kept
            raise
        if token in self._recall_off:
            self.engine.set_recall_budget(sid, 0)
        with self._lock:
            self._live[token] = sid
            self._marks[token] = _marks_of(kept.messages)
        self._guarded(token, self.store.replace, token, kept.messages, system_prompt=kept.system_prompt,
                      title=kept.title, recall=token not in self._recall_off)
        return self._opened(token, sid, kept.title, reattached=False)

    def rename(self, token: str, title: str) -> bool:
        renamed = self.store.rename(token, title)
        if renamed and token in self._live:  # this process's own write: its live session stays current
            with contextlib.suppress(sqlite3.DatabaseError, StoreError):
                revision = self.store.revision(token)
                if revision is not None:
                    self._revisions[token] = revision
        return renamed

    def list(self, tokens: Iterable[str]) -> list[ConversationSummary]:
        """The stored conversations among the tokens a browser holds, newest first; none when the database is
        unreadable (corrupted under the running app) or unreachable: the chat tab keeps working, /health says why."""
        return self.listing(tokens) or []

    def listing(self, tokens: Iterable[str]) -> list[ConversationSummary] | None:
        """`list`, but None when the store could not answer: then a token missing from the answer proves nothing,
        and nothing may be forgotten on its word."""
        try:
            return self.store.list(tokens)
        except sqlite3.DatabaseError as exc:
            self._broken(exc)
            return None
        except StoreError:  # unreachable (file_problem says so) until the server is back
            return None

    def _broken(self, exc: Exception) -> None:
        logger.warning("the chat database cannot be read: %s", exc)
        self._storage_problem = f"the chat database cannot be read ({exc}); chats continue unsaved"

    def storage_problem(self) -> str | None:
        """Why conversations are not being saved (unusable, corrupted or deleted database), or None: for /health."""
        return self.store.file_problem() or self._storage_problem

    def import_history(self, exported: str | bytes, *, owner: str | None = None, origin: str = "browser") -> Opened:
        """An uploaded history as a new conversation (stored at once), with its recall records and marks, so it
        is the conversation that was downloaded, its recall switch included. The server decides mode and sizes."""
        history = parse_history(exported)
        # At a full session cap, parked sessions make room, as for a new chat: an upload is one too.
        sid = self._making_room(owner, lambda: restore_history(self.engine, history, owner=owner, origin=origin))
        token = new_token()
        with self._lock:
            self._live[token] = sid
            self._marks[token] = {key: set(marked) for key, marked in history.marks.items()}
            if history.recall is False:
                self._recall_off.add(token)
        # The file's title (a renamed chat keeps its name).
        title = (history.title or "").strip() or auto_title(self.messages(token, sid))
        self._guarded(token, self.store.replace, token, self._stored_messages(token, sid),
                      system_prompt=self._system_prompt(sid), title=title, recall=token not in self._recall_off)
        stored = self.list([token])  # the title as the store cleaned it
        return self._opened(token, sid, stored[0].title if stored else title, reattached=False)

    def export(self, token: str) -> str:
        """The live conversation as a history file, with its stored title (a rename included), what recall did in
        its turns, its replies' marks (`MARK_KEYS`) and its recall switch."""
        sid = self._live.get(token) if isinstance(token, str) else None
        if sid is None:
            raise ConversationNotFound("this conversation is not open")
        try:
            summary = self.store.list([token])
        except sqlite3.DatabaseError:  # unreadable: the download still works, titled from its first message
            summary = []
        with self._lock:
            marks = {key: set(marked) for key, marked in self._marks.get(token, {}).items()}
        return export_history(self.engine, sid, marks=marks, recall=token not in self._recall_off,
                              title=summary[0].title if summary else auto_title(self.messages(token, sid)))

    def _system_prompt(self, sid: str) -> str | None:
        history = self.engine.history(sid)
        return history[0]["content"] if history and history[0]["role"] == "system" else None
