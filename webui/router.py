"""A session-affinity router: one address in front of N app replicas, each client kept on the replica that holds
its conversations. Standard library only; run it with `python -m webui.router --help`.

Why affinity: a conversation lives in the process that holds its KV cache, and is stored in that replica's own
SQLite file (`--data-dir` per replica). Another replica has neither, so every request of a browser must reach
the same replica, and after that replica restarts the browser must come back to it (its conversations are there).

Routing, first match wins:

1. The affinity cookie (`sllm_replica=<replica name>`) names a configured replica: that one. If it does not answer,
   the answer is 503 with `Retry-After` — never another replica, which would show an empty chat list.
2. A gradio page or client session hash (`session_hash=` in the query, `/heartbeat/<hash>`, or the JSON body of
   `queue/join`): the replica rendezvous hashing assigns to it (stable while the replica list stays the same), for
   clients that send no cookies.
3. Anything else (a new visitor): the next replica in turn that accepts a connection.

Every response to a request without a valid cookie sets it, so a browser sticks from its first page load on, and so
does `gradio_client`, which keeps the cookies of its first `/config` response. Replica names are stable labels
(`--replica NAME=URL`; by default a hash of the URL), so reordering the list moves nobody.

Streaming: a response without a length (gradio's server-sent events) is relayed piece by piece as it arrives,
never buffered; a client that goes away closes the replica connection at once, so gradio's `unload` runs and
frees the tab's session. `X-Forwarded-For` (appended), `-Host` and `-Proto` tell the replica who the client is;
the app trusts them from loopback (`--forwarded-allow-ips`), so per-client caps still count real clients.

One thread per client connection (`ThreadingHTTPServer`): fine for a few hundred concurrent streams. For more, or
for TLS, put a real proxy in front, or use it instead: `deploy/nginx.conf` implements the same cookie affinity.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import itertools
import json
import logging
import re
import select
import socket
import sys
import threading
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger("webui.router")

#: The cookie that pins a client to its replica; its value is the replica's name.
AFFINITY_COOKIE = "sllm_replica"
#: How long a browser keeps it: as long as the store keeps an unused conversation (`store.RETENTION_DAYS`).
COOKIE_MAX_AGE_S = 90 * 86400
#: Largest request body relayed (a history upload is at most 8 MiB; multipart framing adds a little).
MAX_BODY_BYTES = 16 * 2**20
#: Largest `queue/join` body parsed for its session hash (larger bodies are routed without it).
MAX_PARSED_BODY_BYTES = 2**20
#: Seconds to wait for a replica to accept a connection before trying the next (or answering 503).
CONNECT_TIMEOUT_S = 5.0
#: Seconds a replica may stay silent mid-response (gradio's event streams send a heartbeat every 15 s).
READ_TIMEOUT_S = 3600.0
#: How often the disconnect watcher looks at a streaming client's socket (seconds).
WATCH_INTERVAL_S = 0.5
#: Bytes relayed per read of a streamed response (whatever has arrived is sent at once, up to this much).
RELAY_CHUNK_BYTES = 64 * 1024
#: A replica that does not answer: clients are asked to retry after this many seconds.
RETRY_AFTER_S = 5
#: Headers that describe one connection, not the message (RFC 9110 §7.6.1): never relayed.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "transfer-encoding", "upgrade"})
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SESSION_HASH = re.compile(r"[A-Za-z0-9_-]{1,128}")
_HEARTBEAT = re.compile(r"/heartbeat/([A-Za-z0-9_-]{1,128})/?$")


@dataclass(frozen=True)
class Replica:
    """One app process the router sends to."""

    name: str
    host: str
    port: int

    @classmethod
    def parse(cls, spec: str) -> "Replica":
        """`http://host:port` or `NAME=http://host:port`; the name defaults to a short hash of the address."""
        name, sep, url = spec.partition("=")
        if not sep:
            name, url = "", spec
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ValueError(f"a replica must look like http://HOST:PORT or NAME=http://HOST:PORT; got {spec!r}")
        try:
            port = parts.port or 80
        except ValueError:
            raise ValueError(f"bad port in replica {spec!r}") from None
        name = name or hashlib.sha256(f"{parts.hostname}:{port}".encode()).hexdigest()[:10]
        if not _NAME.fullmatch(name):
            raise ValueError(f"a replica name may use letters, digits, '.', '_' and '-' (1-64); got {name!r}")
        return cls(name, parts.hostname, port)


class Routes:
    """Which replica serves a request (see the module docstring). Thread-safe."""

    def __init__(self, replicas: list[Replica]):
        if not replicas:
            raise ValueError("give at least one replica")
        names = [r.name for r in replicas]
        if len(set(names)) != len(names):
            raise ValueError(f"replica names must differ; got {', '.join(names)}")
        self.replicas = list(replicas)
        self.by_name = {r.name: r for r in replicas}
        self._turn = itertools.cycle(range(len(replicas)))
        self._lock = threading.Lock()

    def pinned(self, cookie_header: str | None) -> Replica | None:
        """The replica the request's affinity cookie names, if it names a configured one."""
        if not cookie_header:
            return None
        try:
            jar = SimpleCookie(cookie_header)
        except CookieError:
            return None
        morsel = jar.get(AFFINITY_COOKIE)
        return self.by_name.get(morsel.value) if morsel is not None else None

    def for_session(self, session_hash: str) -> Replica:
        """Rendezvous (highest-random-weight) hashing: each key goes to the replica with the highest
        hash(key, name), so adding or removing a replica only moves the keys that were or will be on it."""
        return max(self.replicas, key=lambda r: hashlib.sha256(f"{session_hash}\0{r.name}".encode()).digest())

    def in_turn(self) -> list[Replica]:
        """All replicas, starting with the next one in turn (the rest are fallbacks when it does not answer)."""
        with self._lock:
            start = next(self._turn)
        return self.replicas[start:] + self.replicas[:start]


def session_hash_of(path: str, body: bytes, content_type: str) -> str | None:
    """Gradio's session hash in a request, where gradio puts it: the query, a heartbeat path, a `queue/join` body."""
    parts = urlsplit(path)
    for value in parse_qs(parts.query).get("session_hash", []):
        if _SESSION_HASH.fullmatch(value):
            return value
    match = _HEARTBEAT.search(parts.path)
    if match:
        return match.group(1)
    if body and len(body) <= MAX_PARSED_BODY_BYTES and "json" in content_type and parts.path.endswith("/queue/join"):
        try:
            value = json.loads(body).get("session_hash")
        except (ValueError, AttributeError, RecursionError):
            return None
        if isinstance(value, str) and _SESSION_HASH.fullmatch(value):
            return value
    return None


class BadRequest(Exception):
    """The client's request cannot be relayed (status, message)."""


class ProxyHandler(BaseHTTPRequestHandler):
    """Relays one client connection's requests to the replicas. `server.routes` holds the replica list."""

    protocol_version = "HTTP/1.1"
    server_version = "streaming-llm-router"

    def do_GET(self):
        self.relay()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def log_message(self, format, *args):  # noqa: A002 - the standard library's name
        logger.debug("%s %s", self.address_string(), format % args)

    # --- the request --------------------------------------------------------------------------------------------

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self.read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not length.isdigit():
            raise BadRequest(400, "bad Content-Length")
        if int(length) > MAX_BODY_BYTES:
            raise BadRequest(413, f"request body over {MAX_BODY_BYTES // 2**20} MiB")
        return self.rfile.read(int(length))

    def read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise BadRequest(400, "bad chunked body") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY_BYTES:
                raise BadRequest(413, f"request body over {MAX_BODY_BYTES // 2**20} MiB")
            body += self.rfile.read(size)
            self.rfile.readline(1024)

    def upstream_headers(self, body: bytes) -> list[tuple[str, str]]:
        listed = {h.strip().lower() for h in self.headers.get("Connection", "").split(",")}
        headers = [(k, v) for k, v in self.headers.items()
                   if k.lower() not in HOP_BY_HOP | listed | {"content-length", "x-forwarded-for"}]
        forwarded = self.headers.get("X-Forwarded-For")
        client = self.client_address[0]
        headers.append(("X-Forwarded-For", f"{forwarded}, {client}" if forwarded else client))
        if "X-Forwarded-Host" not in self.headers and self.headers.get("Host"):
            headers.append(("X-Forwarded-Host", self.headers["Host"]))
        if "X-Forwarded-Proto" not in self.headers:
            headers.append(("X-Forwarded-Proto", "http"))
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        return headers

    # --- relaying -----------------------------------------------------------------------------------------------

    def relay(self) -> None:
        routes: Routes = self.server.routes
        try:
            body = self.read_body()
        except BadRequest as exc:
            self.close_connection = True
            self.send_text(*exc.args)
            return
        pinned = routes.pinned(self.headers.get("Cookie"))
        if pinned is not None:
            candidates, sticky = [pinned], True
        else:
            session = session_hash_of(self.path, body, self.headers.get("Content-Type", ""))
            candidates, sticky = ([routes.for_session(session)], True) if session else (routes.in_turn(), False)
        for replica in candidates:
            try:
                upstream = http.client.HTTPConnection(replica.host, replica.port, timeout=CONNECT_TIMEOUT_S)
                upstream.connect()
            except OSError:
                logger.warning("replica %s (%s:%d) does not answer", replica.name, replica.host, replica.port)
                continue
            try:
                self.forward(upstream, replica, body, set_cookie=pinned is None)
            finally:
                upstream.close()
            return
        what = "The server holding your conversations" if sticky else "No server"
        self.send_text(503, f"{what} is not answering right now (restarting?). Try again in a few seconds.",
                       retry_after=True)

    def forward(self, upstream: http.client.HTTPConnection, replica: Replica, body: bytes, set_cookie: bool) -> None:
        upstream.sock.settimeout(READ_TIMEOUT_S)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.upstream_headers(body):
                upstream.putheader(name, value)
            upstream.endheaders(body or None)
            response = upstream.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            logger.warning("replica %s failed before answering: %s", replica.name, exc)
            self.send_text(502, "The server did not answer this request. Try again.", retry_after=True)
            return
        listed = {h.strip().lower() for h in (response.getheader("Connection") or "").split(",")}
        length = response.getheader("Content-Length")
        no_body = self.command == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200
        streamed = not no_body and (length is None or response.chunked)
        if streamed and self.request_version == "HTTP/1.0":  # no chunked encoding: the end of the body is the close
            self.close_connection = True
        try:
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP | listed:
                    self.send_header(name, value)
            if set_cookie:
                self.send_header("Set-Cookie", self.server.cookie(replica))
            chunked = streamed and self.request_version != "HTTP/1.0"
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if no_body:
                return
            if streamed:
                self.relay_stream(response, upstream, chunked)
            else:
                self.wfile.write(response.read())
        except (OSError, http.client.HTTPException) as exc:
            # The client went away (the usual end of an event stream), or the replica died mid-response: this
            # connection cannot be reused either way.
            level = logging.DEBUG if getattr(self, "client_gone", False) else logging.WARNING
            logger.log(level, "relay from %s ended early: %r", replica.name, exc)
            self.close_connection = True

    def relay_stream(self, response: http.client.HTTPResponse, upstream: http.client.HTTPConnection,
                     chunked: bool = True) -> None:
        """Send each piece as it arrives (as one HTTP chunk), until the replica ends the response or the client
        leaves (then the replica connection is shut at once, so the app sees its client go)."""
        done = threading.Event()
        watcher = threading.Thread(target=self.watch_client, args=(upstream, done), daemon=True)
        watcher.start()
        try:
            while True:
                piece = response.read1(RELAY_CHUNK_BYTES)
                if not piece:
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                self.wfile.flush()
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        finally:
            done.set()

    def watch_client(self, upstream: http.client.HTTPConnection, done: threading.Event) -> None:
        """While a stream is relayed, notice the client closing its connection and shut the replica's."""
        client = self.connection
        while not done.is_set():
            try:
                readable, _, _ = select.select([client], [], [], WATCH_INTERVAL_S)
                if not readable:
                    continue
                if client.recv(1, socket.MSG_PEEK):
                    return  # the client sent more (a next request): it is still there
            except (OSError, ValueError):
                pass
            break  # end of file or an error: the client is gone
        if not done.is_set():
            self.close_connection = self.client_gone = True
            try:
                upstream.sock.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass

    def send_text(self, status: int, text: str, retry_after: bool = False) -> None:
        data = (text + "\n").encode()
        try:
            self.send_response_only(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            if retry_after:
                self.send_header("Retry-After", str(RETRY_AFTER_S))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:
            self.close_connection = True


class Router(ThreadingHTTPServer):
    """The listening router (`serve_forever()`; `shutdown()` from another thread to stop)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], replicas: list[Replica], *, cookie_secure: bool = False):
        self.routes = Routes(replicas)
        self.cookie_secure = cookie_secure
        super().__init__(address, ProxyHandler)

    def handle_error(self, request, client_address):
        """A client resetting its connection between requests is routine; anything else is logged in full."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            logger.debug("connection from %s ended: %r", client_address[0], sys.exc_info()[1])
        else:
            super().handle_error(request, client_address)

    def cookie(self, replica: Replica) -> str:
        secure = "; Secure" if self.cookie_secure else ""
        return f"{AFFINITY_COOKIE}={replica.name}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Lax{secure}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m webui.router", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--replica", action="append", required=True, metavar="[NAME=]URL",
                   help="an app replica, e.g. http://127.0.0.1:7861 (repeat for each; names must stay stable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--cookie-secure", action="store_true", help="mark the affinity cookie Secure (behind HTTPS)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        replicas = [Replica.parse(spec) for spec in args.replica]
        router = Router((args.host, args.port), replicas, cookie_secure=args.cookie_secure)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    logger.info("routing http://%s:%d to %s", args.host, args.port,
                ", ".join(f"{r.name}=http://{r.host}:{r.port}" for r in replicas))
    try:
        router.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        router.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
