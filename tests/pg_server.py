"""A real PostgreSQL 15 server for the store tests: its own cluster in a temporary folder, loopback only.

`PgServer` runs `initdb`, `pg_ctl start` and `pg_ctl stop` (the outage test stops and restarts it mid-load).
PostgreSQL refuses to run as root, so under root the commands run as `nobody` through `runuser`, on a folder
owned by `nobody`. The server listens on 127.0.0.1 at a free port, its unix socket inside the cluster folder, with
trust authentication for the loopback only. `postgres_server` (session-scoped, imported by conftest.py) starts one
for the whole run and skips, saying why, when the binaries are missing; `fresh_database` gives each test its own
empty database on it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

#: Where the PostgreSQL programs are looked for, before PATH: /usr/local/bin, then Debian's per-version folders
#: (`apt-get install postgresql-15` puts initdb and pg_ctl there, not on PATH), newest first.
PG_BIN_DIRS = ("/usr/local/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                         key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0,
                                         reverse=True))
#: Seconds `pg_ctl` waits for the server to start or stop (generous: the test machine is 2 shared cores).
PG_CTL_WAIT_S = 120


def find_pg_bin(name: str) -> str | None:
    for folder in PG_BIN_DIRS:
        candidate = Path(folder) / name
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.initdb, self.pg_ctl = find_pg_bin("initdb"), find_pg_bin("pg_ctl")
        self.as_root = os.geteuid() == 0

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        cmd = ["runuser", "-u", "nobody", "--", *argv] if self.as_root else list(argv)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PG_CTL_WAIT_S + 30)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            shutil.chown(self.root, "nobody", "nogroup")
            self.root.chmod(0o700)
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-instructions")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t",
                  str(PG_CTL_WAIT_S), "-o", options, "start")

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-w", "-t", str(PG_CTL_WAIT_S), "-m", "fast", "stop")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL 15 server for the session (skips when PostgreSQL or psycopg is not installed)."""
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (make install-test installs it)")
    probe = PgServer(Path("/nonexistent"))
    if probe.initdb is None or probe.pg_ctl is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found in "
                    f"{', '.join(PG_BIN_DIRS)} or on PATH: install postgresql-15")
    if probe.as_root and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: PostgreSQL cannot be started as another user")
    root = Path(tempfile.mkdtemp(prefix="pgtest-"))
    server = PgServer(root)
    try:
        server.init()
        server.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield server
    finally:
        try:
            server.stop()
        except RuntimeError:
            pass  # already stopped (a failed outage test): the folder goes anyway
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_database(postgres_server) -> str:
    """The URL of a new, empty database on the session's server."""
    return postgres_server.create_database()
