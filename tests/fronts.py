"""The off-the-shelf fronts of `deploy/`, started for a test: nginx with `deploy/nginx.conf` and HAProxy with
`deploy/haproxy.cfg`, their sample replica addresses replaced by the test's ports and their listening port by a free
one. No tests here: `tests/test_replicas.py` (a replica killed mid-reply) and `tests/test_loadtest.py` (what the
load test reports when no replica answers) use them; `tests/test_deploy_files.py` reads the same sample constants.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from browser_util import ROOT, free_port, wait_until_serving

DEPLOY = ROOT / "deploy"
#: The affinity cookie both sample fronts set (its one home is deploy/; tests check they agree).
AFFINITY_COOKIE = "sllm_replica"
#: The replica ports the sample configs list, replaced by the test's own.
SAMPLE_PORTS = (7861, 7862)
SAMPLE_LISTEN_PORT = 7860
#: Where the sample nginx config writes its access log; a test's front writes `<folder>/nginx/access.log`.
NGINX_SAMPLE_ACCESS_LOG = "/var/log/nginx/access.log"


def _with_test_ports(text: str, ports: list[int]) -> str:
    for sample, port in zip(SAMPLE_PORTS, ports, strict=True):
        text = text.replace(f"127.0.0.1:{sample}", f"127.0.0.1:{port}")
    return text


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _installed(program: str, package: str) -> str:
    """The path of a front's program (Debian puts it in /usr/sbin, often off a user's PATH), or skip saying why."""
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin")
    if path is None:
        pytest.skip(f"{program} is not installed (apt-get install {package}; make install-test does)")
    return path


def nginx_front(ports: list[int], folder: Path):
    """nginx with `deploy/nginx.conf` in front of replicas on `ports` (one per sample port); returns `(process,
    port, pins)`, `pins` mapping each cookie value (the replica's address) to its index in `ports`."""
    nginx = _installed("nginx", "nginx-light")
    port = free_port()
    site = _with_test_ports((DEPLOY / "nginx.conf").read_text(), ports)
    site = site.replace(f"listen {SAMPLE_LISTEN_PORT};", f"listen 127.0.0.1:{port};")
    prefix = folder / "nginx"
    prefix.mkdir(exist_ok=True)
    site = site.replace(f"access_log {NGINX_SAMPLE_ACCESS_LOG} ", f"access_log {prefix / 'access.log'} ")
    (prefix / "site.conf").write_text(site)
    temp = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                        "scgi"))
    (prefix / "nginx.conf").write_text(
        ("user root;\n" if _is_root() else "")  # workers must reach the test's private temporary folder
        + f"worker_processes 1; pid {prefix}/nginx.pid; error_log {prefix}/error.log;\n"
        f"events {{ worker_connections 512; }}\n"
        f"http {{ access_log off; {temp} include {prefix}/site.conf; }}\n")
    process = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                               stdout=open(folder / "nginx.log", "ab"), stderr=subprocess.STDOUT)
    wait_until_serving(f"http://127.0.0.1:{port}/", process)
    return process, port, {f"127.0.0.1:{p}": i for i, p in enumerate(ports)}


def haproxy_front(ports: list[int], folder: Path):
    """HAProxy with `deploy/haproxy.cfg` in front of replicas on `ports`; returns `(process, port, pins)`, `pins`
    mapping each cookie value (the server's name) to its index in `ports`."""
    haproxy = _installed("haproxy", "haproxy")
    port = free_port()
    config = _with_test_ports((DEPLOY / "haproxy.cfg").read_text(), ports)
    config = config.replace(f"bind :{SAMPLE_LISTEN_PORT}", f"bind 127.0.0.1:{port}")
    path = folder / "haproxy.cfg"
    path.write_text(config)
    process = subprocess.Popen([haproxy, "-db", "-f", str(path)], stdout=open(folder / "haproxy.log", "ab"),
                               stderr=subprocess.STDOUT)
    wait_until_serving(f"http://127.0.0.1:{port}/", process)
    return process, port, {f"r{i + 1}": i for i in range(len(ports))}


FRONTS = pytest.mark.parametrize("make_front", [nginx_front, haproxy_front], ids=["nginx", "haproxy"])


class _QuietServer(ThreadingHTTPServer):
    """A front that gives up on a slow upload resets its connection to the replica: expected here, not an error."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _StubReplica(BaseHTTPRequestHandler):
    """Answers every GET with 200 "ok"; reads a POST's body as it comes, then answers the same."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_POST(self):  # noqa: N802
        left = int(self.headers.get("Content-Length", 0))
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)
        self.do_GET()

    def log_message(self, *args):
        pass


@contextmanager
def stub_replicas(count: int = 2):
    """`count` tiny standard-library HTTP servers on loopback standing in for replicas (no model), for tests of
    what the front itself does; yields their ports."""
    servers = [_QuietServer(("127.0.0.1", 0), _StubReplica) for _ in range(count)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield [server.server_address[1] for server in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
