"""The off-the-shelf fronts hold against clients that hold connections open (issue 28, item 4, asked of whatever
replaced our own router): nginx and HAProxy as `deploy/` configures them. Many half-sent requests must not keep
others from being served, the front itself must close them once its header timeout passes, and large request
bodies trickled in slowly must not pile up in the front's memory.

The replicas here are two tiny standard-library HTTP servers (no model): what is checked is the front.
"""

from __future__ import annotations

import socket
import urllib.request

import psutil
from browser_util import stop_app
from fronts import FRONTS

#: Half-sent requests held open at once (nginx's test config allows 512 connections per worker).
HALF_SENT = 200
#: Slow uploads held open at once, each with this much of its declared body sent (the issue's attack: 20 × 16 MiB).
SLOW_BODIES, BODY_SENT, BODY_DECLARED = 20, 1 << 20, 16_000_000
#: The fronts' header timeouts are 10 s; a closed connection is waited for this long at most.
CLOSE_WAIT_S = 120


def front_rss(process) -> int:
    """Resident memory of the front: its process and its workers."""
    root = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WAIT_S)
    return sock


def closed_by_front(sock: socket.socket) -> bool:
    """Blocks until the front ends the connection (EOF, a reset, or an error status such as 408 first)."""
    try:
        data = sock.recv(4096)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return data == b"" or data.startswith(b"HTTP/1.1 4") or data.startswith(b"HTTP/1.0 4")


@FRONTS
def test_half_sent_requests_neither_block_others_nor_stay_open_and_slow_bodies_stay_out_of_memory(
        stub_replicas, make_front, tmp_path):
    front, port, _ = make_front(stub_replicas, tmp_path)
    held: list[socket.socket] = []
    try:
        baseline = front_rss(front)
        half_sent = []
        for _ in range(HALF_SENT):
            sock = connect(port)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # the headers never end
            half_sent.append(sock)
        held += half_sent
        body = b"x" * BODY_SENT
        for _ in range(SLOW_BODIES):
            sock = connect(port)
            sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n\r\n" % BODY_DECLARED + body)
            held.append(sock)

        # Everyone else is still served while all of that is held open.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=CLOSE_WAIT_S) as response:
            assert response.status == 200 and response.read() == b"ok"
        # 20 MiB of bodies were sent; a front that kept them in memory would have grown by that much.
        assert front_rss(front) - baseline < SLOW_BODIES * BODY_SENT // 2

        # The front, not the client, ends every request whose headers never came.
        assert all(closed_by_front(sock) for sock in half_sent)
    finally:
        for sock in held:
            sock.close()
        stop_app(front)
