"""The PostgreSQL engine of the chat store (`--database-url postgresql://...`): the same schema, migrations and
operations as the SQLite engine (`store.ConversationStore` holds all of them), in one database shared by every
replica. This module supplies only what differs: connections (a small pool, reconnecting after an outage),
transactions, the `?` -> `%s` parameter translation and the error translation. psycopg 3 is imported only here, and
only when a PostgreSQL store is opened (`pip install "psycopg[binary]"`).

Concurrency: a write is one `READ COMMITTED` transaction whose first statement locks its conversation's row
(`SELECT ... FOR UPDATE`, `ConversationStore._FOR_UPDATE`), so two replicas writing one conversation run one after
the other and the second sees what the first committed; a read is one `REPEATABLE READ READ ONLY` transaction, so a
conversation's head and its messages come from one snapshot. Migrations run at open inside one transaction holding a
transaction-scoped advisory lock (`MIGRATION_LOCK_KEY`): replicas starting together migrate once, the others wait
and then find the schema current.

Start-up: `open_when_reachable` is how a replica opens its store. A server that does not answer yet (the database
container still starting beside the app) is retried every `START_RETRY_S` for at most `START_WAIT_S`, each attempt
reported in one line; past that it raises `StoreError` with code `UNREACHABLE_AT_START`, and the app refuses to
start rather than serve chats unsaved: behind a front, a replica that is not serving is skipped, and its
orchestrator restarts it, while one serving unsaved chats would hide every stored conversation from its users.

Outages: a statement that finds the server gone raises `StoreError` with code `store_unreachable` (a message safe to
show, without the password), and `file_problem()` says so until an operation (or /health's probe) reaches the server
again. Idle pooled connections left broken by a server restart are replaced transparently at the next `BEGIN`
(nothing of that transaction had been sent), so the first operation after the server is back succeeds. A write
whose `COMMIT` was cut off raises the same error: it was not acknowledged, and the caller treats it as unsaved.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from urllib.parse import urlsplit

from .store import (
    BUSY_TIMEOUT_S,
    DUPLICATE_TOKEN,
    MAX_CONVERSATIONS,
    RETENTION_DAYS,
    UNREACHABLE,
    ConversationStore,
    StoreError,
    apply_migrations,
)
from .validate import check_number

#: URL schemes libpq accepts for a PostgreSQL server.
POSTGRES_SCHEMES = ("postgresql", "postgres")
#: Connections one store keeps (each replica): writes are short, so a few serve the app's threads; a thread finding
#: all of them busy waits for one.
POOL_SIZE = 4
#: Seconds to wait for the server when connecting (libpq `connect_timeout`; whole seconds).
CONNECT_TIMEOUT_S = 5
#: How long a write waits for another writer's row lock (PostgreSQL `lock_timeout`), like SQLite's busy timeout.
LOCK_TIMEOUT_MS = int(BUSY_TIMEOUT_S * 1000)
#: After this many seconds without reaching the server, `file_problem()` (i.e. /health) checks it with `SELECT 1`:
#: an outage while the app is idle is reported without waiting for a user's write to fail.
HEALTH_PROBE_S = 5.0
#: `pg_advisory_xact_lock` key held while migrating (any constant; "SLLM" in ASCII).
MIGRATION_LOCK_KEY = 0x534C4C4D
#: How long a replica starting while its database server is unreachable waits for it (seconds), then refuses to start.
START_WAIT_S = 60.0
#: Seconds between connection attempts while waiting at start.
START_RETRY_S = 2.0
#: `StoreError.code` of a replica that gave up waiting for its database server at start.
UNREACHABLE_AT_START = "store_unreachable_at_start"
#: The SQL type of Unix times (`{real}` in `store.MIGRATIONS`): 8 bytes, as SQLite's REAL.
REAL_TYPE = "DOUBLE PRECISION"


def check_database_url(url) -> str:
    """`url` if it names a PostgreSQL database (`postgresql://user:password@host:port/dbname`), else ValueError.
    The message never repeats the URL (it may hold a password)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("the database URL must be a non-empty postgresql:// URL")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ValueError("the database URL is malformed; expected postgresql://user:password@host:port/dbname") from None
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ValueError(f"the database URL must start with postgresql:// (got scheme {parts.scheme or 'none'!r}); "
                         "only PostgreSQL is supported as a shared store")
    return url.strip()


def redact_url(url: str) -> str:
    """The URL without its password (for messages and logs): `postgresql://user@host:port/dbname`."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"{parts.username}@" if parts.username else "") + host + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def _driver():
    try:
        import psycopg
    except ImportError as exc:
        raise StoreError('the PostgreSQL store needs psycopg 3: pip install "psycopg[binary]"',
                         code="store_driver_missing") from exc
    return psycopg


@functools.lru_cache(maxsize=256)
def pg_sql(sql: str) -> str:
    """The store's engine-neutral SQL in psycopg's dialect: `?` parameters become `%s` (a literal `%` is doubled
    first). The store's statements hold no `?` inside string literals; this is the one place the dialects meet."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgDb:
    """What `ConversationStore` calls `db`: `execute`/`executemany` with `?` parameters on one connection."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, params=()):
        return self.conn.execute(pg_sql(sql), tuple(params))

    def executemany(self, sql: str, rows):
        rows = list(rows)
        cursor = self.conn.cursor()
        if rows:
            cursor.executemany(pg_sql(sql), rows)
        return cursor


class PostgresStore(ConversationStore):
    """Conversations in a PostgreSQL database (see the module docstring); `url` as `check_database_url` accepts."""

    _FOR_UPDATE = " FOR UPDATE"

    def __init__(self, url: str, *, max_conversations: int = MAX_CONVERSATIONS,
                 retention_days: float = RETENTION_DAYS, pool_size: int = POOL_SIZE):
        super().__init__(max_conversations=max_conversations, retention_days=retention_days)
        self._psycopg = _driver()
        self.url = check_database_url(url)
        self.label = redact_url(self.url)  # what messages name: never the password
        self._password = urlsplit(self.url).password
        self._idle: list = []  # connections ready for use, newest last
        self._slots = threading.BoundedSemaphore(pool_size)
        self._pool_lock = threading.Lock()
        self._problem: str | None = None
        self._last_contact = 0.0  # time.monotonic() of the last statement that reached the server
        self._closed = False
        with self._transaction("BEGIN") as db:
            self._migrate(db)
        self.purge_expired()

    # --- connections ----------------------------------------------------------------------------------------------

    def _connect(self):
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                   options=f"-c lock_timeout={LOCK_TIMEOUT_MS}")
        except psycopg.OperationalError as exc:
            raise self._unreachable(exc) from None
        return conn

    def _unreachable(self, exc) -> StoreError:
        detail = " ".join(str(exc).split())
        if self._password:
            detail = detail.replace(self._password, "***")
        self._problem = (f"the chat database server {self.label} is unreachable ({detail}); new messages are not "
                         "saved until it is back")
        return StoreError(self._problem, code=UNREACHABLE)

    def _checkout(self, begin: str):
        """A pooled connection inside a transaction opened by `begin`. A reused connection whose server went away
        meanwhile fails at `begin`, before anything of this transaction was sent: it is replaced by a new one."""
        psycopg = self._psycopg
        while True:
            with self._pool_lock:
                if self._closed:
                    raise StoreError("the chat store is closed", code="store_closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._connect()
                try:
                    conn.execute(begin)
                except psycopg.OperationalError:  # a fresh connection that fails here is an outage
                    conn.close()
                    raise
                return conn
            try:
                conn.execute(begin)
                return conn
            except psycopg.OperationalError:
                conn.close()  # stale (the server restarted): try the next idle one, then a new one

    def _give_back(self, conn) -> None:
        idle = self._psycopg.pq.TransactionStatus.IDLE
        with self._pool_lock:
            # Only a connection outside any transaction is reused (a failed ROLLBACK leaves one aborted).
            if self._closed or conn.closed or conn.broken or conn.info.transaction_status != idle:
                conn.close()
            else:
                self._idle.append(conn)

    @contextlib.contextmanager
    def _transaction(self, begin: str):
        psycopg = self._psycopg
        self._slots.acquire()
        conn = None
        try:
            try:
                conn = self._checkout(begin)
            except psycopg.OperationalError as exc:
                raise self._unreachable(exc) from None
            try:
                yield _PgDb(conn)
                conn.execute("COMMIT")
            except BaseException as exc:
                if not (conn.closed or conn.broken):
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, psycopg.Error):
                    raise self._translate(exc, conn) from exc
                raise
            self._problem = None
            self._last_contact = time.monotonic()
        finally:
            if conn is not None:
                self._give_back(conn)
            self._slots.release()

    def _translate(self, exc, conn) -> Exception:
        """The store's error for a driver error: one place for every engine-specific failure."""
        errors = self._psycopg.errors
        if conn.closed or conn.broken:
            return self._unreachable(exc)
        if isinstance(exc, errors.UniqueViolation) and exc.diag.constraint_name == "conversations_pkey":
            return ValueError(DUPLICATE_TOKEN)  # another replica created the same token first
        if isinstance(exc, errors.LockNotAvailable):
            return StoreError(f"the chat database is busy (a row lock was held for over {LOCK_TIMEOUT_MS} ms); "
                              "try again", code="store_busy")
        # A server going down answers the statement in flight with "terminating connection" (SQLSTATE class 57P:
        # operator intervention) or a connection exception (class 08) before the connection reads as broken: an
        # outage, not a refused statement.
        if isinstance(exc, self._psycopg.OperationalError) and (exc.sqlstate is None or exc.sqlstate[:2] == "08"
                                                               or exc.sqlstate[:3] == "57P"):
            return self._unreachable(exc)
        return StoreError(f"the chat database {self.label} refused a statement ({' '.join(str(exc).split())})",
                          code="store_failed")

    def _write(self):
        return self._transaction("BEGIN")

    def _read(self):
        return self._transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    # --- schema ---------------------------------------------------------------------------------------------------

    def _migrate(self, db) -> None:
        db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))
        current = 0
        if db.execute("SELECT to_regclass('schema_version')").fetchone()[0] is not None:
            current = db.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        if current == 0 and db.execute("SELECT count(*) FROM information_schema.tables "
                                       "WHERE table_schema = current_schema()").fetchone()[0]:
            raise StoreError(f"{self.label} holds other tables: not a chat database of this app (give the app an "
                             "empty database of its own)", code="store_not_ours")
        apply_migrations(db, current, REAL_TYPE, self.label, "point --database-url at another database")

    # --- the interface --------------------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return True

    def file_problem(self) -> str | None:
        """Why writes are not reaching the server (unreachable), or None. While a problem is known, or when nothing
        reached the server for `HEALTH_PROBE_S`, asks the server first, so /health follows an outage and its end."""
        if self._problem is not None or time.monotonic() - self._last_contact > HEALTH_PROBE_S:
            with contextlib.suppress(StoreError):
                with self._read() as db:
                    db.execute("SELECT 1").fetchone()
        return self._problem

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def open_when_reachable(url: str, *, wait_s: float = START_WAIT_S, say=None, **kwargs) -> PostgresStore:
    """`PostgresStore(url, **kwargs)`, retrying every `START_RETRY_S` while the server is unreachable, for at most
    `wait_s` seconds (0: one attempt); each failed attempt is reported through `say(line)`. Raises `StoreError`
    with code `UNREACHABLE_AT_START` once the time is up (any other `StoreError`, e.g. a newer schema, at once)."""
    check_number("wait_s", wait_s, 0, note=" seconds")
    say = say or (lambda line: None)
    deadline = time.monotonic() + wait_s
    attempt = 0
    while True:
        attempt += 1
        try:
            store = PostgresStore(url, **kwargs)
        except StoreError as exc:
            if exc.code != UNREACHABLE:
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreError(f"gave up after {attempt} attempt{'s' if attempt != 1 else ''} in {wait_s:g} s: "
                                 f"{exc}", code=UNREACHABLE_AT_START) from None
            say(f"waiting for the chat database (attempt {attempt}, {left:.0f} s left): {exc}")
            time.sleep(min(START_RETRY_S, left))
            continue
        if attempt > 1:
            say(f"reached the chat database {store.label} after {attempt} attempts")
        return store
