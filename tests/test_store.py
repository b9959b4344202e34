"""The chat store: conversations survive restarts and kill -9, only token holders find them, deletes erase."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streaming_engine import store as store_module
from streaming_engine.store import ChatStore, StoreConflict, StoreError, StoreFull, new_token
from streaming_engine.validate import MARK_KEYS

ROOT = Path(__file__).resolve().parent.parent


def exchange(n: int, tag: str = "") -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{tag}message {i}"} for i in range(n)]


@pytest.fixture
def db(store_opener):
    """A store on a fresh database of each engine (SQLite file, PostgreSQL database): the same tests run on both."""
    return store_opener()


@pytest.fixture
def sqlite_db(tmp_path):
    with ChatStore.open(tmp_path / "data") as store:
        yield store


def test_a_conversation_round_trips_through_a_fresh_process_view(db, store_opener):
    token = db.create(title="  Trip   planning ", system_prompt="Be brief.", messages=exchange(4))
    assert len(token) == 32 and db.exists(token)
    loaded = store_opener().load(token)  # what a restarted server (or another replica) sees
    assert (loaded.title, loaded.system_prompt, loaded.messages) == ("Trip planning", "Be brief.", exchange(4))
    assert not loaded.interrupted and loaded.created_at <= loaded.updated_at


@pytest.mark.parametrize("n", [1, 5])
def test_only_the_tokens_a_browser_presents_are_listed_newest_first(db, n):
    mine = [db.create(title=f"mine {i}", messages=exchange(i + 1)) for i in range(n)]
    theirs = db.create(title="someone else's")
    listed = db.list([*mine, "not a token!", new_token(), "'; DROP TABLE conversations; --"])
    assert [c.token for c in listed] == mine[::-1] and theirs not in [c.token for c in listed]
    assert [c.message_count for c in listed] == list(range(n, 0, -1))
    db.rename(mine[0], "renamed")
    assert db.list(mine)[0].title == "renamed" and db.exists(theirs)


def test_replace_rewrites_only_what_changed_and_a_finished_reply_clears_the_interrupted_mark(db):
    token = db.create(messages=exchange(3))
    db.save_partial(token, "Half a rep")
    db.save_partial(token, "Half a reply")
    assert db.load(token).messages[-1] == {"role": "assistant", "content": "Half a reply", "interrupted": True}
    assert db.list([token])[0].interrupted
    db.replace(token, exchange(3) + [{"role": "assistant", "content": "The whole reply."}])
    assert db.load(token).messages == exchange(3) + [{"role": "assistant", "content": "The whole reply."}]
    db.replace(token, exchange(2))  # a retry drops the last exchange
    assert db.load(token).messages == exchange(2) and not db.list([token])[0].interrupted
    db.append(token, [{"role": "user", "content": "next"}])
    assert db.load(token).messages[-1]["content"] == "next"


def test_replace_creates_a_missing_conversation_and_keeps_a_given_title(db):
    token = new_token()
    db.replace(token, exchange(2), system_prompt="sys", title="First title")
    db.replace(token, exchange(4), system_prompt="sys", title="Another title")
    loaded = db.load(token)
    assert loaded.title == "First title" and loaded.messages == exchange(4)


def test_delete_removes_the_conversation_and_only_it(db):
    token = db.create(title="private", messages=exchange(3))
    keep = db.create(messages=exchange(2))
    assert db.delete(token) and not db.delete(token)
    assert db.load(token) is None and db.list([token]) == [] and not db.exists(token)
    assert db.load(keep).messages == exchange(2) and db.append(keep, exchange(1)) == 2
    with db._read() as conn:  # the messages went with it (ON DELETE CASCADE), on either engine
        assert conn.execute("SELECT count(*) FROM messages WHERE token = ?", (token,)).fetchone()[0] == 0


def test_delete_removes_the_text_from_the_sqlite_files(sqlite_db):
    db = sqlite_db
    secret = "my bank PIN is 9731-UNIQUE-MARKER"
    token = db.create(title="private", messages=[{"role": "user", "content": secret}] + exchange(2))
    keep = db.create(messages=exchange(2))
    assert db.delete(token) and not db.delete(token)
    assert db.load(token) is None and db.list([token]) == [] and db.load(keep).messages == exchange(2)
    rows = sqlite3.connect(db.path).execute("SELECT count(*) FROM messages WHERE token = ?", (token,)).fetchone()
    assert rows == (0,)
    for file in db.path.parent.iterdir():
        assert secret.encode() not in file.read_bytes(), file.name


def test_without_persistence_nothing_is_written_anywhere(tmp_path):
    folder = tmp_path / "data"
    store = ChatStore.open(folder, persist=False)
    token = store.create(messages=exchange(2))
    store.replace(token, exchange(3))
    store.save_partial(token, "x")
    assert not store.enabled and store.load(token) is None and store.list([token]) == [] and not store.exists(token)
    assert store.secret("browser") == store.secret("browser")
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def test_the_database_file_is_private_to_its_user(sqlite_db):
    assert sqlite_db.path.stat().st_mode & 0o077 == 0


def test_a_secret_is_stable_across_restarts_and_replicas(store_opener):
    with store_opener() as first:
        value = first.secret("browser-state")
    with store_opener() as second:
        assert second.secret("browser-state") == value and second.secret("other") != value


@pytest.mark.parametrize("bad", ["", "short", "x" * 65, "a b c d e f g h i j", "../../../../etc/passwd", None, 7])
def test_malformed_tokens_find_nothing_and_are_never_echoed(db, bad):
    assert db.load(bad) is None and not db.exists(bad) and not db.delete(bad) and not db.rename(bad, "t")
    with pytest.raises(ValueError, match="^conversation token is malformed$"):
        db.replace(bad, exchange(1))


def test_bad_messages_are_refused_and_change_nothing(db):
    token = db.create(messages=exchange(2))
    for bad in ([{"role": "system", "content": "x"}], [{"role": "user", "content": 5}], ["text"],
                [{"role": "user", "content": "a NUL \x00 byte"}],  # PostgreSQL text cannot hold it: neither stores it
                [{"role": "user", "content": "x" * (store_module.MAX_STORED_MESSAGE_CHARS + 1)}]):
        with pytest.raises(ValueError, match="message 0"):
            db.replace(token, bad)
    assert db.load(token).messages == exchange(2)


def test_the_store_has_a_cap_and_expired_conversations_make_room(store_opener):
    with store_opener(max_conversations=2, retention_days=1) as store:
        old, _ = store.create(), store.create()
        with pytest.raises(StoreFull, match="store is full"):
            store.create()
        with store._write() as conn:  # age one conversation past the retention time
            conn.execute("UPDATE conversations SET updated_at = ? WHERE token = ?", (time.time() - 2 * 86400, old))
        store.create()
        assert not store.exists(old)


def test_only_the_newest_messages_are_kept_beyond_the_limit(db, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_STORED_MESSAGES", 5)
    token = db.create(messages=exchange(8))
    assert db.load(token).messages == exchange(8)[-5:]
    db.append(token, exchange(2, "new "))
    assert db.load(token).messages == exchange(8)[-3:] + exchange(2, "new ")


def test_files_that_are_not_our_database_are_refused_clearly(tmp_path):
    junk = tmp_path / "junk" / store_module.DB_FILE_NAME
    junk.parent.mkdir()
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a usable chat database"):
        ChatStore(junk)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.commit()
    with pytest.raises(StoreError, match="not a chat database"):
        ChatStore(other)
    newer = tmp_path / "newer.sqlite"
    ChatStore(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {store_module.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer version"):
        ChatStore(newer)


def test_many_threads_writing_at_once_leave_every_conversation_whole(db):
    tokens = [db.create() for _ in range(6)]
    errors = []

    def writer(token):
        try:
            for k in range(40):
                db.replace(token, exchange(k % 7 + 1, f"{token}:{k}:"))
                db.save_partial(token, f"{token}:{k}:partial")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for token in tokens:
        assert db.load(token).messages == exchange(39 % 7 + 1, f"{token}:39:") + [
            {"role": "assistant", "content": f"{token}:39:partial", "interrupted": True}]


WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
import streaming_engine.store as store  # the package imports nothing heavy until asked: starts in a blink
assert "torch" not in sys.modules
db = store.ChatStore(sys.argv[2])
tokens = [db.create(title="kill test") for _ in range(3)]
print("ready", flush=True)
k = 0
while True:
    k += 1
    for t in tokens:
        n = k % 25 + 1
        db.replace(t, [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{k}|{i}|" + "x" * 300}
                       for i in range(n)])
        db.save_partial(t, f"{k}|partial|" + "y" * (k % 500))
    print(k, flush=True)  # snapshot k is committed for every conversation
"""


def check_consistent(path: Path) -> tuple[int, int]:
    """Every conversation holds one complete snapshot k (plus at most its partial reply).
    Returns (conversations, messages)."""
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()
    with ChatStore(path) as store:
        tokens = [t for (t,) in store._db.execute("SELECT token FROM conversations")]
        total = 0
        for token in tokens:
            messages = store.load(token).messages
            done = [m for m in messages if not m.get("interrupted")]
            ks = {m["content"].split("|")[0] for m in messages}
            assert len(ks) <= 1, ks
            if done:
                k = int(done[0]["content"].split("|")[0])
                assert [m["content"].split("|")[1] for m in done] == [str(i) for i in range(k % 25 + 1)]
            assert all(m.get("interrupted") for m in messages[len(done):]) and len(messages) - len(done) <= 1
            total += len(messages)
    return len(tokens), total


@pytest.mark.parametrize("snapshots", [1, 5, 20])
def test_a_writer_killed_with_sigkill_mid_write_leaves_a_consistent_database(tmp_path, snapshots):
    """Killed after `snapshots` (then twice as many) complete rounds of writes, i.e. somewhere inside the next one:
    the writer says when each round is committed, so where it dies depends on a count, not on a clock."""
    path = tmp_path / "chats.sqlite"
    for run in range(2):  # the second run starts on the file the first one was killed over
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT),
                                  str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            for k in range(1, snapshots * (run + 1) + 1):
                assert child.stdout.readline().strip() == str(k), "the writer stopped before it was killed"
            assert child.poll() is None, "the writer must still be writing when it is killed"
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        assert child.returncode == -signal.SIGKILL
        conversations, messages = check_consistent(path)
        assert conversations == 3 * (run + 1) and messages > 0


def _schema_1_file(path) -> dict[str, list[dict]]:
    """A database exactly as the previous release left it: schema 1's DDL, `PRAGMA user_version = 1`, no
    `schema_version` table, rows written with plain SQL (not through today's code)."""
    import sqlite3
    import time

    from streaming_engine.store import MIGRATIONS

    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0].statements:
        db.execute(statement.format(real="REAL"))
    db.execute("PRAGMA user_version = 1")
    stored = {"a" * 32: exchange(4, "a "), "b" * 32: exchange(1, "b ") + [
        {"role": "assistant", "content": "half", "interrupted": True}]}
    now = time.time()  # recent, so the retention sweep keeps them
    for n, (token, messages) in enumerate(stored.items()):
        db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?)", (token, f"chat {n}", "Be kind.", now - 60 + n, now - 30 + n))
        for seq, m in enumerate(messages):
            db.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?)",
                       (token, seq, m["role"], m["content"], int(m.get("interrupted", False))))
    db.execute("INSERT INTO meta VALUES ('browser-state', 'kept secret')")
    db.close()
    return stored


def test_a_schema_1_file_from_the_previous_release_upgrades_keeping_every_conversation(tmp_path):
    stored = _schema_1_file(tmp_path / "data" / "chats.sqlite")
    from streaming_engine.store import SCHEMA_VERSION, StoreConflict

    with ChatStore.open(tmp_path / "data") as store:
        assert store.secret("browser-state") == "kept secret"
        for n, (token, messages) in enumerate(stored.items()):
            loaded = store.load(token)
            assert (loaded.title, loaded.system_prompt, loaded.messages) == (f"chat {n}", "Be kind.", messages)
        token = "a" * 32
        before = store.load(token).revision
        after = store.append(token, exchange(2, "new "))
        assert after == before + 1
        with pytest.raises(StoreConflict):  # a writer still holding the old revision is refused, nothing written
            store.replace(token, exchange(1), expected_revision=before)
        assert store.load(token).messages == stored[token] + exchange(2, "new ")
    import sqlite3

    db = sqlite3.connect(tmp_path / "data" / "chats.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # the runner records what it applied: the upgrade from 1, not schema 1 itself (that release had no table)
    assert [v for (v,) in db.execute("SELECT version FROM schema_version ORDER BY version")] == list(
        range(2, SCHEMA_VERSION + 1))


# --- two replicas on one database, and the PostgreSQL engine's own cases ------------------------------------------

#: How long a test waits for a writer thread to reach a stage (generous: 2 shared cores, a server restart).
STAGE_WAIT_S = 120


def test_two_replicas_writing_one_conversation_at_once_lose_nothing_and_never_interleave(store_opener):
    """Replica A appends exchanges; replica B adds its own by read-modify-replace with `expected_revision`,
    re-reading and retrying when A got there first (the optimistic path). Every exchange lands once, whole."""
    a, b = store_opener(), store_opener()
    token = a.create(messages=exchange(2, "start "))
    rounds, errors, conflicts = 15, [], []

    def pair(who, k):
        return [{"role": "user", "content": f"{who}{k}?"}, {"role": "assistant", "content": f"{who}{k}!"}]

    def appender():
        try:
            for k in range(rounds):
                a.append(token, pair("A", k))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def replacer():
        try:
            for k in range(rounds):
                while True:
                    seen = b.load(token)
                    try:
                        b.replace(token, seen.messages + pair("B", k), expected_revision=seen.revision)
                        break
                    except StoreConflict:
                        conflicts.append(k)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=appender), threading.Thread(target=replacer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stored = store_opener().load(token)
    assert stored.messages[:2] == exchange(2, "start ")
    pairs = [(stored.messages[i]["content"], stored.messages[i + 1]["content"]) for i in range(2, len(stored.messages), 2)]
    assert all(q[:-1] == r[:-1] and q.endswith("?") and r.endswith("!") for q, r in pairs), pairs  # never interleaved
    for who in "AB":  # nothing lost or doubled, each writer's order kept
        assert [q[:-1] for q, _ in pairs if q.startswith(who)] == [f"{who}{k}" for k in range(rounds)]
    assert stored.revision == 1 + 2 * rounds


def test_a_stale_revision_is_refused_and_writes_nothing(store_opener):
    a, b = store_opener(), store_opener()
    token = a.create(messages=exchange(2))
    seen = b.load(token)
    assert a.append(token, exchange(1, "from A ")) == seen.revision + 1
    with pytest.raises(StoreConflict) as caught:
        b.replace(token, exchange(4, "from B "), expected_revision=seen.revision)
    assert caught.value.code == "store_conflict"
    assert b.load(token).messages == exchange(2) + exchange(1, "from A ")
    fresh = b.load(token)
    assert b.replace(token, exchange(4, "from B "), expected_revision=fresh.revision) == fresh.revision + 1
    a.delete(token)
    with pytest.raises(StoreConflict):  # deleted by the other replica since it was read
        b.replace(token, exchange(1), expected_revision=fresh.revision + 1)


def test_open_store_picks_the_engine_the_settings_name(tmp_path):
    from streaming_engine.stores import open_store

    assert not open_store(tmp_path / "x", persist=False).enabled and not (tmp_path / "x").exists()
    with open_store(tmp_path / "data") as store:
        assert isinstance(store, ChatStore) and store.path == tmp_path / "data" / store_module.DB_FILE_NAME


@pytest.mark.parametrize("url", ["mysql://user:hunter22@db/chats", "sqlite:///x.db", "127.0.0.1:5432/db", "",
                                 "postgresql://user:hunter22@db:notaport/chats"])
def test_a_database_url_that_is_not_postgresql_is_refused_without_echoing_it(url):
    from streaming_engine.store_pg import check_database_url
    from webui.settings import parse_settings

    with pytest.raises(ValueError) as caught:
        check_database_url(url)
    assert "postgresql://" in str(caught.value) and "hunter22" not in str(caught.value)
    with pytest.raises(SystemExit):
        parse_settings(["--database-url", url])
    assert parse_settings([], env={"DATABASE_URL": "postgresql://u:pw@db/chats"}).database_url == \
        "postgresql://u:pw@db/chats"


def test_without_psycopg_the_postgresql_store_says_what_to_install(monkeypatch):
    from streaming_engine.stores import open_store

    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now raises ImportError
    with pytest.raises(StoreError, match=r'pip install "psycopg\[binary\]"') as caught:
        open_store(database_url="postgresql://u@127.0.0.1:1/db")
    assert caught.value.code == "store_driver_missing"


def test_a_postgresql_outage_is_reported_and_the_store_reconnects_losing_nothing_acknowledged(
        postgres_server, fresh_database):
    """The server stops under a writer and comes back: the writer gets `store_unreachable` (no password in it),
    `file_problem()` says so, then writes succeed again on new connections; every acknowledged message is stored."""
    from streaming_engine.store import UNREACHABLE
    from streaming_engine.store_pg import PostgresStore

    # trust authentication ignores the password: it is here to show that no message repeats it
    url = fresh_database.replace("postgres@", "postgres:pw-9731-SECRET@")
    store = PostgresStore(url)
    token = store.create(title="outage")
    acked, failures, stop = [], [], threading.Event()
    progress = threading.Condition()

    def writer():
        k = 0
        while not stop.is_set():
            try:
                store.append(token, [{"role": "user", "content": f"m{k}"}])
                with progress:
                    acked.append(f"m{k}")
                    progress.notify_all()
            except StoreError as exc:
                with progress:
                    failures.append(exc)
                    progress.notify_all()
            k += 1

    def wait_for(what):
        with progress:
            assert progress.wait_for(what, timeout=STAGE_WAIT_S), "the writer did not get there in time"

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: len(acked) >= 5)
        postgres_server.stop()
        try:
            wait_for(lambda: len(failures) >= 3)
            assert {exc.code for exc in failures} == {UNREACHABLE}
            problem = store.file_problem()
            assert problem and "unreachable" in problem and "pw-9731-SECRET" not in problem
            assert all("pw-9731-SECRET" not in str(exc) for exc in failures)
            with pytest.raises(StoreError, match="unreachable"):
                store.load(token)
        finally:
            postgres_server.start()
        before = len(acked)
        wait_for(lambda: len(acked) >= before + 5)
    finally:
        stop.set()
        thread.join()
    assert store.file_problem() is None
    stored = [m["content"] for m in PostgresStore(url).load(token).messages]
    assert set(acked) <= set(stored)  # a write cut off at COMMIT was not acknowledged: it may or may not be there
    assert stored == sorted(stored, key=lambda c: int(c[1:])) and len(set(stored)) == len(stored)
    store.close()


def test_a_postgresql_database_at_schema_1_is_migrated_keeping_every_conversation(fresh_database):
    import psycopg

    from streaming_engine.store import MIGRATIONS, SCHEMA_VERSION, SCHEMA_VERSION_TABLE
    from streaming_engine.store_pg import REAL_TYPE, PostgresStore

    now = time.time()
    with psycopg.connect(fresh_database) as conn:  # one transaction, committed on leaving
        conn.execute(SCHEMA_VERSION_TABLE.format(real=REAL_TYPE))
        for statement in MIGRATIONS[0].statements:
            conn.execute(statement.format(real=REAL_TYPE))
        conn.execute("INSERT INTO schema_version VALUES (1, %s)", (now,))
        conn.execute("INSERT INTO conversations VALUES (%s, 'old chat', 'Be kind.', %s, %s)", ("a" * 32, now, now))
        for seq, m in enumerate(exchange(3, "old ")):
            conn.execute("INSERT INTO messages VALUES (%s, %s, %s, %s, 0)", ("a" * 32, seq, m["role"], m["content"]))
    with PostgresStore(fresh_database) as store:
        loaded = store.load("a" * 32)
        assert (loaded.title, loaded.system_prompt, loaded.messages) == ("old chat", "Be kind.", exchange(3, "old "))
        assert store.append("a" * 32, exchange(1, "new ")) == loaded.revision + 1
        with store._read() as db:
            versions = [v for (v,) in db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()]
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_replicas_starting_together_on_an_empty_postgresql_database_migrate_it_once(fresh_database):
    from streaming_engine.store_pg import PostgresStore

    replicas, errors, together = [], [], threading.Barrier(3)

    def start():
        together.wait()
        try:
            replicas.append(PostgresStore(fresh_database))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(replicas) == 3
    token = replicas[0].create(messages=exchange(2))
    assert replicas[2].load(token).messages == exchange(2)
    with replicas[1]._read() as db:
        assert [v for (v,) in db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()] == list(
            range(1, store_module.SCHEMA_VERSION + 1))
    for store in replicas:
        store.close()


def test_a_postgresql_database_that_is_not_ours_or_is_newer_is_refused_clearly(postgres_server):
    import psycopg

    from streaming_engine.store_pg import PostgresStore

    other = postgres_server.create_database()
    with psycopg.connect(other) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(StoreError, match="not a chat database") as caught:
        PostgresStore(other)
    assert caught.value.code == "store_not_ours"
    newer = postgres_server.create_database()
    PostgresStore(newer).close()
    with psycopg.connect(newer) as conn:
        conn.execute("INSERT INTO schema_version VALUES (%s, 0)", (store_module.SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer version") as caught:
        PostgresStore(newer)
    assert caught.value.code == "store_schema_newer"


def test_the_app_stores_in_postgresql_when_given_a_database_url_and_never_shows_its_password(
        fresh_database, tiny_chat_model, default_tokenizer):
    import app
    from streaming_engine import EngineConfig, StreamingEngine
    from streaming_engine.store_pg import PostgresStore
    from webui import health
    from webui.settings import parse_settings

    url = fresh_database.replace("postgres@", "postgres:pw-4242-SECRET@")  # trust auth: the password is ignored
    settings = parse_settings(["--data-dir", "/nonexistent/ignored"], env={"DATABASE_URL": url})
    assert settings.database_url == url and "pw-4242-SECRET" not in repr(settings)
    with pytest.raises(SystemExit):
        parse_settings(["--database-url", url, "--no-persist"], env={})
    engine = StreamingEngine(tiny_chat_model, default_tokenizer, EngineConfig(start_size=4, recent_size=96))
    try:
        conversations = app.open_conversations(engine, settings)
        assert conversations.persistent and isinstance(conversations.store, PostgresStore)
        assert "storage" not in health.problems()
        token = conversations.store.create(messages=exchange(2))
        with PostgresStore(fresh_database) as replica:
            assert replica.load(token).messages == exchange(2)
        conversations.store.close()
    finally:
        health.PROBLEM_SOURCES.pop("storage", None)


# --- what recall did (schema 3) -------------------------------------------------------------------------------------

def test_what_recall_fed_and_quoted_round_trips_and_its_indices_survive_dropping_the_oldest(
        db, store_opener, monkeypatch):
    messages = exchange(6)
    messages[4] = {**messages[4], "fed": "> quoted: message 0\n\nmessage 4", "recalled": [0, 2]}
    messages[3] = {**messages[3], "stopped": True}  # a reply the user stopped keeps that mark too
    token = db.create(messages=messages, recall=False)
    loaded = store_opener().load(token)
    assert loaded.messages == messages and loaded.recall is False
    db.replace(token, [*messages[:4], {**messages[4], "recalled": [2]}, messages[5]])  # a changed record is rewritten
    assert db.load(token).messages[4]["recalled"] == [2]
    # The store keeps the newest messages only: an index then counts in what is kept, and one that fell off goes.
    monkeypatch.setattr(store_module, "MAX_STORED_MESSAGES", 4)  # messages 2..5 are kept
    kept = db.load(db.create(messages=messages)).messages
    assert kept[2] == {**messages[4], "recalled": [0]}  # message 2 is now index 0; message 0 is gone
    monkeypatch.setattr(store_module, "MAX_STORED_MESSAGES", 2)  # messages 4..5: nothing it quoted is kept
    assert db.load(db.create(messages=messages)).messages[0] == {k: v for k, v in messages[4].items()
                                                                  if k != "recalled"}


@pytest.mark.parametrize("key", MARK_KEYS)
def test_each_mark_of_a_reply_round_trips_and_a_rewrite_that_clears_it_clears_it(db, store_opener, key):
    messages = exchange(4)
    messages[1] = {**messages[1], key: True}
    token = db.create(messages=messages)
    assert store_opener().load(token).messages == messages  # read back by another process's view
    db.replace(token, exchange(4))  # the same text without the mark: only the mark changed, and it goes
    assert store_opener().load(token).messages == exchange(4)


@pytest.mark.parametrize("recalled", [[3], [-1], ["0"], [True], "0"])
def test_a_recalled_index_must_name_an_earlier_message(db, recalled):
    messages = exchange(4)
    messages[2] = {**messages[2], "recalled": recalled}
    with pytest.raises(ValueError, match="recall record 2"):
        db.create(messages=messages)


def test_the_recall_switch_is_set_on_its_own_and_by_a_replace(db, store_opener):
    token = db.create(messages=exchange(2))
    assert db.load(token).recall is True
    revision = db.set_recall(token, False)
    assert revision == db.load(token).revision and store_opener().load(token).recall is False
    db.replace(token, exchange(4))  # recall=None: left as it is
    assert db.load(token).recall is False
    db.replace(token, exchange(4), recall=True)
    assert db.load(token).recall is True
    assert db.set_recall(new_token(), False) is None and db.set_recall("not a token", True) is None
    with pytest.raises(ValueError, match="recall"):
        db.set_recall(token, "no")
