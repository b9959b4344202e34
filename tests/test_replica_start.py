"""A replica whose shared PostgreSQL server is unreachable at start (issue 25): it retries for `--database-wait`
seconds (default `store_pg.START_WAIT_S`), one line per attempt, and either starts serving once the server answers
or refuses to start with the typed code `store_unreachable_at_start` and a non-zero exit status; never serves chats
unsaved. The real app process on a tiny random model; the tests wait on its output and exit, never on the clock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from browser_util import ROOT, free_port, save_model, stop_app, wait_until_serving
from pg_server import PgServer, find_pg_bin

from streaming_engine.store_pg import UNREACHABLE_AT_START

#: What the app prints for each failed attempt (store_pg.open_when_reachable).
WAITING = "waiting for the chat database"
#: Generous bound on any one wait below: the test fails instead of hanging, it never passes by it.
PROCESS_TIMEOUT_S = 300


def start_replica(model_dir: Path, database_url: str, wait_s: float, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "app.py", "--model", str(model_dir), "--port", str(port),
                             "--database-url", database_url, "--database-wait", str(wait_s)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(process: subprocess.Popen, marker: str) -> list[str]:
    """The process's output lines up to and including the first holding `marker` (fails if it exits first)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"the replica exited ({process.wait(PROCESS_TIMEOUT_S)}) without printing {marker!r}:\n"
                         + "".join(lines[-30:]))


@pytest.fixture
def model_dir(tiny_chat_model, default_tokenizer, tmp_path):
    return save_model(tiny_chat_model, default_tokenizer, tmp_path / "tiny-model")


@pytest.mark.parametrize("wait_s", [0, 3])
def test_a_replica_that_never_reaches_its_database_refuses_to_start_with_a_typed_error(model_dir, wait_s):
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (make install-test installs it)")
    nowhere = f"postgresql://chat:secret@127.0.0.1:{free_port()}/chat"  # nothing listens there
    process = start_replica(model_dir, nowhere, wait_s, free_port())
    try:
        output, _ = process.communicate(timeout=PROCESS_TIMEOUT_S)
    finally:
        stop_app(process)
    assert process.returncode != 0
    assert f"error [{UNREACHABLE_AT_START}]" in output and "127.0.0.1" in output
    assert "secret" not in output  # the password is never printed
    attempts = output.count(WAITING)
    assert (attempts == 0) if wait_s == 0 else (attempts >= 1), output
    assert "Running on" not in output  # it never served


def test_a_replica_started_before_its_database_waits_for_it_then_serves(model_dir):
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (make install-test installs it)")
    if find_pg_bin("initdb") is None or find_pg_bin("pg_ctl") is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql-15")
    root = Path(tempfile.mkdtemp(prefix="pgtest-"))  # not under pytest's folder: `nobody` must reach it under root
    server = PgServer(root)
    server.init()  # its port is chosen, nothing listens on it yet
    port = free_port()
    process = start_replica(model_dir, server.url(), PROCESS_TIMEOUT_S, port)
    try:
        read_until(process, WAITING)  # the replica is retrying
        server.start()
        read_until(process, "reached the chat database")
        threading.Thread(target=process.stdout.read, daemon=True).start()  # keep its pipe from filling up
        wait_until_serving(f"http://127.0.0.1:{port}/health", process)
    finally:
        stop_app(process)
        try:
            server.stop()
        except RuntimeError:
            pass
        shutil.rmtree(root, ignore_errors=True)
