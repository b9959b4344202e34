"""Server-side chat storage: one interface (`ConversationStore`) over an engine, each conversation keyed by an
unguessable random token. `ChatStore` (here) keeps everything in one SQLite file (the embedded default,
`--data-dir`). The rules (limits, validation, the ordered `MIGRATIONS`, the read-modify-write logic of every
operation) live in `ConversationStore` once; an engine supplies only connections, transactions and the few dialect
differences (`{real}` column type, row-lock suffix), so the second engine, `store_pg.PostgresStore` (PostgreSQL,
shared by replicas), is one small subclass. `stores.open_store` picks the engine an app's settings name.

A conversation is found only by its token (`secrets.token_urlsafe`, 192 bits), which only the owning browser
holds: there is no listing of "all conversations", `list` answers for the tokens the caller presents. Stored per
conversation: title, system prompt, times, its recall switch (`recall`, on unless the user turned it off), and its
visible messages (`{"role", "content"}`, plus `"interrupted": True` on a reply that was still being written when it
was last saved, `"stopped": True` on one the user stopped, `"truncated": True` on one that ended at its
`max_new_tokens`: `validate.MARK_KEYS`, a column each). A user message whose turn recalled evicted messages
also keeps what recall did (schema 3): `fed`, the text the model was given (the typed one with the quoted passages
before it), and `recalled`, the indices of the earlier messages it quoted, in the same list. They are stored as distances back, so they stay right when the
oldest messages are dropped at `MAX_STORED_MESSAGES`. A conversation re-opened from the store then gives the model
the same context as before, and shows the same "recalled" markers.

Durability: the standard library's `sqlite3` in WAL mode with `synchronous=NORMAL`, every change one transaction.
A process killed at any instant (`kill -9`, out of memory) leaves the file consistent and holding every
committed change; only a power loss may lose the last transactions. `secure_delete` overwrites deleted rows and
a checkpoint after each delete moves them out of the WAL, so a deleted conversation is gone from the files.

Threads: one connection, used under a lock (SQLite serializes writers anyway; the volume is a few small writes
per second). Schema: `MIGRATIONS`, applied in order at open by either engine inside one transaction and recorded
in the `schema_version` table (SQLite also keeps `PRAGMA user_version` equal, which is all schema 1 had); a
database from a newer version is refused rather than guessed at.

Concurrency: every write is one transaction that first locks its conversation (SQLite: `BEGIN IMMEDIATE`, the
whole file; PostgreSQL: `SELECT ... FOR UPDATE` on the conversation's row), so two writers of one conversation,
two replicas included, never interleave. Each write bumps the conversation's `revision`; a caller that passes
`expected_revision` to `replace` gets `StoreConflict` instead of overwriting a change it has not seen. A store opened without a path (`ChatStore(None)`, persistence off) writes
nothing anywhere: it still mints tokens, everything else is a no-op that finds nothing.

This module knows nothing about models or sessions; `conversations.py` connects it to the engine.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

# The message limits are the engine's (one home): the store keeps whatever the engine accepted.
from .validate import MAX_MESSAGE_CHARS as MAX_STORED_MESSAGE_CHARS
from .validate import MAX_MESSAGES as MAX_STORED_MESSAGES
from .validate import (
    MARK_KEYS,
    MAX_FED_CHARS,
    RECALL_RECORD_KEYS,
    check_bool,
    check_int,
    check_message,
    check_number,
    check_recall_records,
    check_text,
)

#: File name of the database inside the data directory.
DB_FILE_NAME = "chats.sqlite"
#: Random bytes in a conversation token (192 bits: unguessable), written as 32 URL-safe characters.
TOKEN_BYTES = 24
#: What a token may look like; anything else is refused before it reaches SQL and never echoed.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,64}")
#: Longest stored title (longer ones are cut).
MAX_TITLE_CHARS = 80
#: Most tokens one `list` call looks up.
MAX_LIST_TOKENS = 500
#: Most conversations in one database; `create` beyond it raises `StoreFull` (after dropping expired ones).
MAX_CONVERSATIONS = 100_000
#: Conversations untouched for this many days are deleted by `purge_expired` (run at open and on create).
RETENTION_DAYS = 90
#: The message of the ValueError `create` raises for a token in use (`replace` tells it from other refusals).
DUPLICATE_TOKEN = "a conversation with this token exists already"
#: How long a write waits for another process's write to finish before failing.
BUSY_TIMEOUT_S = 5.0

@dataclass(frozen=True)
class Migration:
    """One schema step. `{real}` in a statement is the engine's double-precision type (SQLite `REAL`,
    PostgreSQL `DOUBLE PRECISION`: PostgreSQL's `REAL` is 4 bytes and would round Unix times to minutes)."""

    version: int
    purpose: str
    statements: tuple[str, ...]


#: Every schema change, oldest first; both engines apply the ones a database lacks, in order, at open.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "conversations, their messages, app secrets", (
        """CREATE TABLE conversations (
            token TEXT PRIMARY KEY,
            title TEXT NOT NULL DEFAULT '',
            system_prompt TEXT,
            created_at {real} NOT NULL,
            updated_at {real} NOT NULL
        )""",
        "CREATE INDEX conversations_by_update ON conversations(updated_at)",
        """CREATE TABLE messages (
            token TEXT NOT NULL REFERENCES conversations(token) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL,
            interrupted INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (token, seq)
        )""",
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    )),
    Migration(2, "a revision per conversation, bumped by every write (optimistic concurrency between replicas)", (
        "ALTER TABLE conversations ADD COLUMN revision INTEGER NOT NULL DEFAULT 0",
    )),
    Migration(3, "what recall did (the conversation's switch; per user message what its turn fed and quoted) and "
                 "the user's stop of a reply", (
        "ALTER TABLE conversations ADD COLUMN recall INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE messages ADD COLUMN fed TEXT",  # NULL: the content itself was fed
        "ALTER TABLE messages ADD COLUMN recalled TEXT NOT NULL DEFAULT ''",  # distances back, comma-separated
        "ALTER TABLE messages ADD COLUMN stopped INTEGER NOT NULL DEFAULT 0",  # a reply the user stopped
    )),
    Migration(4, "a reply that ended at its max_new_tokens, so its note survives a reload and a restart", (
        "ALTER TABLE messages ADD COLUMN truncated INTEGER NOT NULL DEFAULT 0",
    )),
)
#: The newest schema this code reads and writes; a database with a higher number is refused.
SCHEMA_VERSION = MIGRATIONS[-1].version
#: The table recording which migrations a database has had (created by the migration runner itself).
SCHEMA_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at {real} NOT NULL)"


class StoreError(RuntimeError):
    """The database cannot be used (not a chat database, written by a newer version, unwritable). `code` is
    stable for programs; the message is for people."""

    code = "store_unusable"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


#: `StoreError.code` of a database server that cannot be reached (PostgreSQL down): reported while it lasts, then gone.
UNREACHABLE = "store_unreachable"


class StoreFull(StoreError):
    """`MAX_CONVERSATIONS` conversations are stored; the message is safe to show to users."""

    code = "store_full"


class StoreConflict(StoreError):
    """`replace(..., expected_revision=...)` found the conversation changed (or deleted) by another writer since
    that revision: nothing was written; re-read it (`load`) and decide again."""

    code = "store_conflict"


def default_data_dir() -> Path:
    """`~/.cache/streaming-llm`, next to the converted default model."""
    return Path(os.path.expanduser("~")) / ".cache" / "streaming-llm"


def new_token() -> str:
    """A fresh conversation token (random; only its holder can find the conversation)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def valid_token(token) -> bool:
    return isinstance(token, str) and TOKEN_PATTERN.fullmatch(token) is not None


def _check_token(token) -> str:
    if not valid_token(token):
        raise ValueError("conversation token is malformed")
    return token


def _clean_title(title) -> str:
    if title is None:
        return ""
    if not isinstance(title, str):
        raise ValueError("title must be text")
    return " ".join(title.replace("\x00", "").split())[:MAX_TITLE_CHARS]


def _check_text(value, what: str, max_chars: int = MAX_STORED_MESSAGE_CHARS) -> str:
    value = check_text(value, what, max_chars, allow_empty=True)
    if "\x00" in value:  # PostgreSQL text cannot hold NUL: refused by both engines, so they store the same things
        raise ValueError(f"{what} contains a NUL character, which cannot be stored")
    return value


#: The columns of a message row after its position, in the order `_rows` gives them and `_messages` reads them:
#: role, content, fed, recalled, then one 0/1 column per mark, named as the mark (`MARK_KEYS`).
_MESSAGE_FIELDS = ("role", "content", "fed", "recalled", *MARK_KEYS)
MESSAGE_COLUMNS = ", ".join(_MESSAGE_FIELDS)
_INSERT_MESSAGE = (f"INSERT INTO messages(token, seq, {MESSAGE_COLUMNS}) "
                   f"VALUES ({', '.join(['?'] * (2 + len(_MESSAGE_FIELDS)))})")
MessageRow = tuple  # (role, content, fed or None, recalled, *one int per mark)


def _rows(messages: Iterable[dict]) -> list[MessageRow]:
    """(role, content, fed, recalled, *marks) for each message (`MESSAGE_COLUMNS`), validated (a recall record by
    `validate.check_recall_records`); only the newest `MAX_STORED_MESSAGES`. `fed` is None where it is the content
    itself; `recalled` holds distances back, comma-separated, so that dropping the oldest rows changes none."""
    messages = list(messages)
    plain = [check_message(m, i) for i, m in enumerate(messages)]
    records = check_recall_records([{k: m[k] for k in RECALL_RECORD_KEYS if k in m} for m in messages], plain)
    rows = []
    for i, (m, p, record) in enumerate(zip(messages, plain, records)):
        content = _check_text(p["content"], f"message {i}")
        fed = record.get("fed")
        fed = None if fed is None or fed == content else _check_text(fed, f"message {i}'s fed text", MAX_FED_CHARS)
        rows.append((p["role"], content, fed, ",".join(str(i - k) for k in record.get("recalled", ())),
                     *(int(bool(m.get(key))) for key in MARK_KEYS)))
    return rows[-MAX_STORED_MESSAGES:]


def _messages(rows: Iterable[tuple]) -> list[dict]:
    """The message dicts of stored rows (`MESSAGE_COLUMNS`, oldest first): `recalled` back to indices in this list
    (a message quoted before the oldest one kept is left out)."""
    out = []
    for i, (role, content, fed, recalled, *marks) in enumerate(rows):
        message = {"role": role, "content": content, **{key: True for key, on in zip(MARK_KEYS, marks) if on}}
        if fed is not None:
            message["fed"] = fed
        indices = [i - int(d) for d in recalled.split(",") if d] if recalled else []
        if any(0 <= k < i for k in indices):
            message["recalled"] = [k for k in indices if 0 <= k < i]
        out.append(message)
    return out


@dataclass
class ConversationSummary:
    """One line of a conversation list."""

    token: str
    title: str
    updated_at: float  # Unix time
    message_count: int
    interrupted: bool  # the last reply was cut off (the server stopped while writing it)


@dataclass
class StoredConversation:
    token: str
    title: str
    system_prompt: str | None
    created_at: float
    updated_at: float
    messages: list[dict] = field(default_factory=list)
    revision: int = 0  # bumped by every write; pass it to `replace(expected_revision=...)`
    recall: bool = True  # the conversation's recall switch (`set_recall`)

    @property
    def interrupted(self) -> bool:
        return bool(self.messages) and bool(self.messages[-1].get("interrupted"))


def check_limits(max_conversations, retention_days) -> None:
    check_int("max_conversations", max_conversations, 1)
    check_number("retention_days", retention_days, 0, low_open=True)


def newer_schema(where: str, version: int, hint: str) -> StoreError:
    return StoreError(f"{where} was written by a newer version of this app (schema {version}, this one reads "
                      f"{SCHEMA_VERSION}); upgrade, or {hint}", code="store_schema_newer")


def apply_migrations(db, current: int, real_type: str, where: str, hint: str) -> None:
    """Bring a database at schema `current` to `SCHEMA_VERSION`, inside the caller's transaction. `db` runs
    `?`-parameter SQL (both engines' connections, see `ConversationStore._write`)."""
    if current > SCHEMA_VERSION:
        raise newer_schema(where, current, hint)
    db.execute(SCHEMA_VERSION_TABLE.format(real=real_type))
    for migration in MIGRATIONS:
        if migration.version > current:
            for statement in migration.statements:
                db.execute(statement.format(real=real_type))
            db.execute("INSERT INTO schema_version(version, applied_at) VALUES (?, ?)", (migration.version, time.time()))


class ConversationStore(ABC):
    """What the app uses of a store, and the logic of every operation over either engine.

    An engine provides `_write()` (a transaction, writers serialized per conversation by `_FOR_UPDATE`),
    `_read()`, `enabled`, `file_problem()` and `close()`. Inside them, `db.execute(sql, params)` takes
    `?` parameters and returns a cursor (`fetchone`, `fetchall`, `rowcount`)."""

    #: Appended to the statement that reads a conversation's row first in a write: locks it until commit.
    _FOR_UPDATE = ""

    def __init__(self, *, max_conversations: int = MAX_CONVERSATIONS, retention_days: float = RETENTION_DAYS):
        check_limits(max_conversations, retention_days)
        self.max_conversations = max_conversations
        self.retention_days = retention_days
        self._lock = threading.RLock()
        self._secrets: dict[str, str] = {}

    @property
    @abstractmethod
    def enabled(self) -> bool:
        """Whether anything is stored at all (False: the no-persistence store)."""

    @abstractmethod
    def file_problem(self) -> str | None:
        """Why writes are not reaching the database right now (deleted file, unreachable server), or None."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def _write(self) -> contextlib.AbstractContextManager: ...

    @abstractmethod
    def _read(self) -> contextlib.AbstractContextManager: ...

    def _after_delete(self) -> None:  # noqa: B027 - an optional hook; most engines need nothing here
        """Called after rows were deleted (SQLite: move them out of the WAL)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- conversations -------------------------------------------------------------------------------------------

    def secret(self, name: str) -> str:
        """A random secret kept in the database under `name` (e.g. for encrypting browser storage), created on
        first use; stable across restarts and the same for every replica. Without persistence it lives as long as
        this object."""
        if not self.enabled:
            return self._secrets.setdefault(name, secrets.token_urlsafe(32))
        with self._write() as db:  # the first replica to insert wins; the others read its value
            db.execute("INSERT INTO meta(name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                       (name, secrets.token_urlsafe(32)))
            return db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0]

    def create(self, *, title: str | None = None, system_prompt: str | None = None, messages: Iterable[dict] = (),
               token: str | None = None, recall: bool = True) -> str:
        """Store a new conversation and return its token (a fresh one unless `token` is given); `recall`: its
        recall switch."""
        token = _check_token(token) if token is not None else new_token()
        if not self.enabled:
            return token
        check_bool("recall", recall)
        rows = _rows(messages)
        title = _clean_title(title)
        system_prompt = None if system_prompt is None else _check_text(system_prompt, "system prompt")
        if self._count() >= self.max_conversations:
            self.purge_expired()
        now = time.time()
        with self._write() as db:
            if db.execute("SELECT count(*) FROM conversations").fetchone()[0] >= self.max_conversations:
                raise StoreFull("The conversation store is full; new chats are not saved until older ones expire "
                                f"(after {self.retention_days:g} days unused).")
            if db.execute("SELECT 1 FROM conversations WHERE token = ?", (token,)).fetchone():
                raise ValueError(DUPLICATE_TOKEN)
            db.execute("INSERT INTO conversations(token, title, system_prompt, created_at, updated_at, revision, "
                       "recall) VALUES (?, ?, ?, ?, ?, 1, ?)", (token, title, system_prompt, now, now, int(recall)))
            db.executemany(_INSERT_MESSAGE, [(token, seq, *row) for seq, row in enumerate(rows)])
        return token

    def _count(self) -> int:
        with self._read() as db:
            return db.execute("SELECT count(*) FROM conversations").fetchone()[0]

    def exists(self, token: str) -> bool:
        if not self.enabled or not valid_token(token):
            return False
        with self._read() as db:
            return db.execute("SELECT 1 FROM conversations WHERE token = ?", (token,)).fetchone() is not None

    def revision(self, token: str) -> int | None:
        """The conversation's revision (bumped by every write), or None when there is none: one cheap read, for a
        replica to tell whether another one changed the conversation since it last loaded or wrote it."""
        if not self.enabled or not valid_token(token):
            return None
        with self._read() as db:
            head = db.execute("SELECT revision FROM conversations WHERE token = ?", (token,)).fetchone()
        return None if head is None else head[0]

    def load(self, token: str) -> StoredConversation | None:
        """The whole conversation, or None when the token is unknown, malformed or persistence is off."""
        if not self.enabled or not valid_token(token):
            return None
        with self._read() as db:
            head = db.execute("SELECT title, system_prompt, created_at, updated_at, revision, recall "
                              "FROM conversations WHERE token = ?", (token,)).fetchone()
            if head is None:
                return None
            rows = db.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE token = ? ORDER BY seq",
                              (token,)).fetchall()
        return StoredConversation(token, head[0], head[1], head[2], head[3], _messages(rows), revision=head[4],
                                  recall=bool(head[5]))

    def list(self, tokens: Iterable[str]) -> list[ConversationSummary]:
        """The stored conversations among `tokens` (the ones a browser holds), most recently updated first.
        Unknown and malformed tokens are skipped; at most `MAX_LIST_TOKENS` are looked up."""
        if not self.enabled:
            return []
        wanted = list(dict.fromkeys(t for t in tokens if valid_token(t)))[:MAX_LIST_TOKENS]
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        with self._read() as db:
            rows = db.execute(
                "SELECT c.token, c.title, c.updated_at, count(m.seq), "
                "coalesce((SELECT interrupted FROM messages WHERE token = c.token ORDER BY seq DESC LIMIT 1), 0) "
                f"FROM conversations c LEFT JOIN messages m ON m.token = c.token WHERE c.token IN ({marks}) "
                "GROUP BY c.token ORDER BY c.updated_at DESC",
                wanted,
            ).fetchall()
        return [ConversationSummary(t, title, updated, count, bool(cut)) for t, title, updated, count, cut in rows]

    def rename(self, token: str, title: str) -> bool:
        """Set the title; False when there is no such conversation."""
        title = _clean_title(title)
        if not self.enabled or not valid_token(token):
            return False
        with self._write() as db:
            return db.execute("UPDATE conversations SET title = ?, updated_at = ?, revision = revision + 1 "
                              "WHERE token = ?", (title, time.time(), token)).rowcount > 0

    def set_recall(self, token: str, enabled: bool) -> int | None:
        """Set the conversation's recall switch; returns the new revision (it moves, so other replicas re-load the
        conversation), None when there is no such conversation or persistence is off."""
        check_bool("recall", enabled)
        if not self.enabled or not valid_token(token):
            return None
        with self._write() as db:
            revision = self._locked_revision(db, token)
            if revision is None:
                return None
            db.execute("UPDATE conversations SET recall = ?, updated_at = ?, revision = revision + 1 WHERE token = ?",
                       (int(enabled), time.time(), token))
            return revision + 1

    def delete(self, token: str) -> bool:
        """Delete the conversation and all its messages (overwritten on disk); False when there was none."""
        if not self.enabled or not valid_token(token):
            return False
        with self._write() as db:
            found = db.execute("DELETE FROM conversations WHERE token = ?", (token,)).rowcount > 0
        if found:
            self._after_delete()
        return found

    def replace(self, token: str, messages: Iterable[dict], *, system_prompt: str | None = None,
                title: str | None = None, expected_revision: int | None = None,
                recall: bool | None = None) -> int | None:
        """Make the stored messages equal `messages` (creating the conversation if needed), in one transaction;
        returns the new revision (None without persistence).

        Only what changed is written: rows up to the first difference stay, the rest is replaced (a finished
        reply replaces its interrupted partial; a retry drops the last exchange). `title` is set only while the
        conversation has none. With `expected_revision` (from `load`), raises `StoreConflict` and writes nothing
        when another writer changed or deleted the conversation since. `recall`: set the recall switch too (None:
        leave it; a conversation created here has it on unless False)."""
        token = _check_token(token)
        if not self.enabled:
            return None
        if recall is not None:
            check_bool("recall", recall)
        messages = list(messages)
        rows = _rows(messages)
        system_prompt = None if system_prompt is None else _check_text(system_prompt, "system prompt")
        if expected_revision is None and not self.exists(token):
            try:
                self.create(token=token, title=title, system_prompt=system_prompt, messages=messages,
                            recall=recall is not False)
                return 1
            except ValueError as exc:  # created meanwhile by another writer: fall through to the update
                if str(exc) != DUPLICATE_TOKEN:
                    raise
        now = time.time()
        with self._write() as db:
            revision = self._locked_revision(db, token)
            if expected_revision is not None and revision != expected_revision:
                raise StoreConflict("This conversation was changed elsewhere (another tab or server) since it was "
                                    "read; reload it to see the newest version.")
            if revision is None:  # deleted between the check above and this transaction
                raise KeyError("no stored conversation has this token")
            stored = db.execute(f"SELECT seq, {MESSAGE_COLUMNS} FROM messages WHERE token = ? ORDER BY seq",
                                (token,)).fetchall()
            keep = 0
            while keep < min(len(stored), len(rows)) and tuple(stored[keep][1:]) == rows[keep]:
                keep += 1
            if keep < len(stored):
                db.execute("DELETE FROM messages WHERE token = ? AND seq >= ?", (token, stored[keep][0]))
            first = stored[keep - 1][0] + 1 if keep else 0
            db.executemany(_INSERT_MESSAGE, [(token, first + i, *row) for i, row in enumerate(rows[keep:])])
            db.execute("UPDATE conversations SET system_prompt = ?, updated_at = ?, revision = revision + 1, "
                       "title = CASE WHEN title = '' THEN ? ELSE title END, recall = coalesce(?, recall) "
                       "WHERE token = ?", (system_prompt, now, _clean_title(title),
                                           None if recall is None else int(recall), token))
            return revision + 1

    def append(self, token: str, messages: Iterable[dict]) -> int | None:
        """Add messages at the end (the conversation must exist); the oldest go beyond `MAX_STORED_MESSAGES`.
        Returns the new revision. Two writers appending at once both land, one after the other. A `recalled` index
        counts within `messages`."""
        token = _check_token(token)
        if not self.enabled:
            return None
        rows = _rows(messages)
        with self._write() as db:
            revision, last = self._lock_conversation(db, token)
            db.executemany(_INSERT_MESSAGE, [(token, last + 1 + i, *row) for i, row in enumerate(rows)])
            db.execute("DELETE FROM messages WHERE token = ? AND seq <= ?", (token, last + len(rows) -
                                                                              MAX_STORED_MESSAGES))
            db.execute("UPDATE conversations SET updated_at = ?, revision = revision + 1 WHERE token = ?",
                       (time.time(), token))
            return revision + 1

    def save_partial(self, token: str, content: str) -> int | None:
        """Save the reply being written: the trailing assistant message marked interrupted (added if the last
        message is not one). Cheap (one row), for saving every few seconds while a reply streams; the
        conversation must exist. `replace` with the finished reply clears the mark. Returns the new revision."""
        token = _check_token(token)
        if not self.enabled:
            return None
        content = _check_text(content, "reply")
        with self._write() as db:
            revision, last = self._lock_conversation(db, token)
            row = db.execute("SELECT role, interrupted FROM messages WHERE token = ? AND seq = ?",
                             (token, last)).fetchone()
            if row is not None and tuple(row) == ("assistant", 1):
                db.execute("UPDATE messages SET content = ? WHERE token = ? AND seq = ?", (content, token, last))
            else:
                db.execute("INSERT INTO messages(token, seq, role, content, interrupted) VALUES (?, ?, 'assistant', "
                           "?, 1)", (token, last + 1, content))
            db.execute("UPDATE conversations SET updated_at = ?, revision = revision + 1 WHERE token = ?",
                       (time.time(), token))
            return revision + 1

    def _locked_revision(self, db, token: str) -> int | None:
        """The conversation's revision (None: no such conversation), its row locked until the transaction ends."""
        head = db.execute(f"SELECT revision FROM conversations WHERE token = ?{self._FOR_UPDATE}", (token,)).fetchone()
        return None if head is None else head[0]

    def _lock_conversation(self, db, token: str) -> tuple[int, int]:
        """(revision, last seq or -1) of the conversation, its row locked until the transaction ends."""
        revision = self._locked_revision(db, token)
        if revision is None:
            raise KeyError("no stored conversation has this token")
        last = db.execute("SELECT coalesce(max(seq), -1) FROM messages WHERE token = ?", (token,)).fetchone()[0]
        return revision, last

    def purge_expired(self, now: float | None = None) -> int:
        """Delete conversations not updated for `retention_days`; returns how many."""
        if not self.enabled:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        with self._write() as db:
            gone = db.execute("DELETE FROM conversations WHERE updated_at < ?", (cutoff,)).rowcount
        if gone:
            self._after_delete()
        return gone


class ChatStore(ConversationStore):
    """Conversations in SQLite (see the module docstring). `ChatStore(None)` is the no-persistence store."""

    def __init__(
        self,
        path: str | os.PathLike | None,
        *,
        max_conversations: int = MAX_CONVERSATIONS,
        retention_days: float = RETENTION_DAYS,
    ):
        super().__init__(max_conversations=max_conversations, retention_days=retention_days)
        self.path = Path(path).expanduser() if path is not None else None
        self._db: sqlite3.Connection | None = None
        self._inode: int | None = None
        if self.path is not None:
            self._db = self._connect(self.path)
            self._inode = os.stat(self.path).st_ino
            self.purge_expired()

    @classmethod
    def open(cls, data_dir: str | os.PathLike | None = None, *, persist: bool = True, **limits) -> "ChatStore":
        """The store for an app: `<data_dir>/chats.sqlite` (default `default_data_dir()`), or none at all."""
        if not persist:
            return cls(None, **limits)
        folder = Path(data_dir).expanduser() if data_dir else default_data_dir()
        return cls(folder / DB_FILE_NAME, **limits)

    @property
    def enabled(self) -> bool:
        return self._db is not None

    def file_problem(self) -> str | None:
        """Why writes no longer reach the database file, or None. SQLite keeps writing into a file deleted (or
        replaced) under it without an error, so a deleted database would otherwise lose every new message silently."""
        if self._db is None or self.path is None:
            return None
        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            return f"the chat database {self.path} was deleted while the app runs; new messages are not saved"
        if inode != self._inode:
            return f"the chat database {self.path} was replaced while the app runs; new messages are not saved"
        return None

    # --- connection and schema -----------------------------------------------------------------------------------

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fresh = not path.exists()
            if fresh:  # private chats: readable by this user only
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except OSError as exc:
            raise StoreError(f"cannot open the chat database {path}: {exc.strerror or exc}") from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA secure_delete=ON")
            # One transaction: a crash mid-migration leaves the previous schema whole, and two processes starting
            # at once cannot both migrate (the second waits for the write lock, then sees the new version).
            db.execute("BEGIN IMMEDIATE")
            try:
                current = db.execute("PRAGMA user_version").fetchone()[0]  # schema 1 kept only this
                if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone():
                    current = max(current, db.execute("SELECT coalesce(max(version), 0) FROM schema_version")
                                  .fetchone()[0])
                if current == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise StoreError(f"{path} holds other tables: not a chat database of this app",
                                     code="store_not_ours")
                apply_migrations(db, current, "REAL", str(path), "use another --data-dir")
                # Kept equal to the newest migration: an older version of the app (which reads only this) then
                # refuses the file instead of writing rows without a revision.
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreError(f"{path} is not a usable chat database ({exc}); move it away or use another "
                             "--data-dir") from exc
        except StoreError:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextlib.contextmanager
    def _write(self):
        """A write transaction (`BEGIN IMMEDIATE` takes the write lock at once, so what it reads is current)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self):
        with self._lock:
            yield self._db

    def _after_delete(self) -> None:
        """Copy the WAL into the main file and empty it, so deleted text does not linger in the WAL."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
