"""The session-affinity router (`webui/router.py`) against stand-in replicas: stickiness by cookie and by session
hash, unbuffered streams, forwarded client addresses, a replica that is down, and a client that leaves."""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from browser_util import free_port

from webui import router as rt

#: Upper bound for anything the tests wait for (never reached when the router works).
WAIT_S = 30.0


class FakeReplica(ThreadingHTTPServer):
    """A replica stand-in: answers with its own name and what it received; streams on /stream."""

    daemon_threads = True

    def __init__(self, name: str):
        self.name = name
        self.release = threading.Event()  # /stream sends its second event once this is set
        self.stream_closed = threading.Event()  # /forever noticed its client (the router) went away
        super().__init__(("127.0.0.1", 0), FakeHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/stream":
            return self.stream()
        if self.path == "/forever":
            return self.forever()
        self.answer(b"")

    def do_POST(self):
        self.answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def answer(self, body: bytes):
        data = json.dumps({"replica": self.server.name, "path": self.path, "body": body.decode(),
                           "x-forwarded-for": self.headers.get("X-Forwarded-For"),
                           "host": self.headers.get("Host"), "cookie": self.headers.get("Cookie")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.chunk(b"data: first\n\n")
        self.server.release.wait(WAIT_S)
        self.chunk(b"data: second\n\n")
        self.chunk(b"")

    def forever(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.chunk(b"data: ALIVE\n\n")
        # Like gradio's heartbeat: nothing more to say for a long while; the client leaving must still be seen.
        self.connection.settimeout(WAIT_S)
        try:
            if self.connection.recv(1) == b"":
                self.server.stream_closed.set()
        except OSError:
            self.server.stream_closed.set()


@pytest.fixture
def replicas():
    made = [FakeReplica("a"), FakeReplica("b")]
    yield made
    for replica in made:
        replica.release.set()
        replica.shutdown()
        replica.server_close()


@pytest.fixture
def front(replicas):
    """The router on a free port in front of the two stand-ins; yields (host, port, router)."""
    server = rt.Router(("127.0.0.1", free_port()), [rt.Replica.parse(f"{r.name}={r.url}") for r in replicas])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address, server
    server.shutdown()
    server.server_close()


def request(address, method="GET", path="/", body=None, headers=None):
    """(status, headers, body) through a fresh connection."""
    conn = http.client.HTTPConnection(*address, timeout=WAIT_S)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def cookie_of(headers) -> str:
    return headers["set-cookie"].split(";")[0]


def test_a_new_client_is_given_a_replica_and_its_cookie_keeps_it_there(front):
    address, _ = front
    firsts = [request(address) for _ in range(4)]
    names = [json.loads(body)["replica"] for _, _, body in firsts]
    assert sorted(names) == ["a", "a", "b", "b"]  # new visitors take turns
    for (_, headers, body), name in zip(firsts, names):
        cookie = cookie_of(headers)
        assert cookie == f"{rt.AFFINITY_COOKIE}={name}"
        assert "HttpOnly" in headers["set-cookie"] and "SameSite=Lax" in headers["set-cookie"]
        for _ in range(5):
            status, again, body = request(address, path="/config", headers={"Cookie": f"theme=dark; {cookie}"})
            assert status == 200 and json.loads(body)["replica"] == name
            assert "set-cookie" not in again  # already pinned
    _, headers, _ = request(address, headers={"Cookie": f"{rt.AFFINITY_COOKIE}=gone-replica"})
    assert cookie_of(headers) in (f"{rt.AFFINITY_COOKIE}=a", f"{rt.AFFINITY_COOKIE}=b")  # unknown name: re-pinned


def test_clients_without_cookies_stay_on_one_replica_by_their_gradio_session_hash(front):
    address, _ = front
    seen = {}
    for n in range(16):
        session = f"session{n}"
        routes = {
            json.loads(request(address, path=f"/gradio_api/queue/data?session_hash={session}")[2])["replica"],
            json.loads(request(address, path=f"/gradio_api/heartbeat/{session}")[2])["replica"],
            json.loads(request(address, "POST", "/gradio_api/queue/join",
                               json.dumps({"data": [], "session_hash": session}),
                               {"Content-Type": "application/json"})[2])["replica"],
        }
        assert len(routes) == 1, session
        seen[session] = routes.pop()
    assert set(seen.values()) == {"a", "b"}  # spread over both


def test_a_stream_passes_through_piece_by_piece(front, replicas):
    address, _ = front
    conn = http.client.HTTPConnection(*address, timeout=WAIT_S)
    conn.request("GET", "/stream", headers={"Cookie": f"{rt.AFFINITY_COOKIE}=a"})
    response = conn.getresponse()
    assert response.getheader("Content-Type") == "text/event-stream"
    # The replica holds its second event back until this side has read the first: a buffering proxy would wait.
    assert response.read1(1024) == b"data: first\n\n"
    replicas[0].release.set()
    rest = response.read()
    conn.close()
    assert rest == b"data: second\n\n"


def test_the_client_address_is_forwarded_and_the_host_kept(front):
    address, _ = front
    body = json.loads(request(address, headers={"Host": "chat.example.org"})[2])
    assert body["x-forwarded-for"] == "127.0.0.1" and body["host"] == "chat.example.org"
    body = json.loads(request(address, headers={"X-Forwarded-For": "198.51.100.4"})[2])
    assert body["x-forwarded-for"] == "198.51.100.4, 127.0.0.1"  # appended, as proxies do
    body = json.loads(request(address, "POST", "/echo", b"x" * 1000)[2])
    assert body["body"] == "x" * 1000


def test_a_pinned_client_whose_replica_is_down_is_told_to_retry_and_new_clients_go_elsewhere(front, replicas):
    address, _ = front
    replicas[1].shutdown()
    replicas[1].server_close()
    status, headers, body = request(address, headers={"Cookie": f"{rt.AFFINITY_COOKIE}=b"})
    assert status == 503 and headers["retry-after"] == str(rt.RETRY_AFTER_S)
    assert b"holding your conversations" in body
    for _ in range(4):
        status, _, body = request(address)
        assert status == 200 and json.loads(body)["replica"] == "a"


def test_a_client_leaving_a_stream_closes_the_replica_connection(front, replicas):
    address, _ = front
    conn = http.client.HTTPConnection(*address, timeout=WAIT_S)
    conn.request("GET", "/forever", headers={"Cookie": f"{rt.AFFINITY_COOKIE}=a"})
    response = conn.getresponse()
    assert response.read1(1024) == b"data: ALIVE\n\n"
    conn.sock.close()  # the tab goes away
    conn.close()
    # Long before the replica's next heartbeat: nothing is written to the client that could fail first.
    assert replicas[0].stream_closed.wait(WAIT_S), "the replica never saw its client go"


def test_oversized_bodies_are_refused(front):
    address, _ = front
    conn = http.client.HTTPConnection(*address, timeout=WAIT_S)
    conn.putrequest("POST", "/upload")
    conn.putheader("Content-Length", str(rt.MAX_BODY_BYTES + 1))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    conn.close()


@pytest.mark.parametrize("specs,match", [
    (["127.0.0.1:7861"], "must look like"),
    (["https://127.0.0.1:7861"], "must look like"),
    (["a=http://127.0.0.1:1", "a=http://127.0.0.1:2"], "names must differ"),
    (["bad name=http://127.0.0.1:1"], "replica name"),
    ([], "at least one"),
])
def test_bad_replica_lists_are_refused(specs, match):
    with pytest.raises(ValueError, match=match):
        rt.Routes([rt.Replica.parse(s) for s in specs])


def test_default_names_are_stable_labels_of_the_address():
    assert rt.Replica.parse("http://127.0.0.1:7861") == rt.Replica.parse("http://127.0.0.1:7861/")
    assert rt.Replica.parse("http://127.0.0.1:7861").name != rt.Replica.parse("http://127.0.0.1:7862").name
    assert rt.Replica.parse("r1=http://10.0.0.2:80") == rt.Replica("r1", "10.0.0.2", 80)


def test_the_cli_refuses_a_missing_or_bad_replica(capsys):
    with pytest.raises(SystemExit):
        rt.main([])
    with pytest.raises(SystemExit):
        rt.main(["--replica", "ftp://x:1"])
    assert "must look like" in capsys.readouterr().err
