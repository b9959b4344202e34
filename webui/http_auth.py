"""The login check for the app's plain HTTP APIs (OpenAI-compatible chat, Prometheus metrics).

The browser UI logs in through Gradio's form; programs cannot, so the same `--auth user:password` credentials are
accepted the ways HTTP clients send them: `Authorization: Bearer user:password` (what OpenAI clients send as
their API key) or HTTP Basic (what Prometheus and curl `-u` send). No credentials configured: open, as the UI.
"""

from __future__ import annotations

import base64
import binascii
import hmac


def credentials_ok(authorization: str | None, auth: tuple[str, str] | None) -> bool:
    """Whether an `Authorization` header value carries the app's `(user, password)`; always True without auth."""
    if auth is None:
        return True
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    user, sep, password = value.partition(":")
    # Compare both parts in constant time, and both always, so timing tells nothing about which one was wrong.
    user_ok = hmac.compare_digest(user.encode("utf-8"), auth[0].encode("utf-8"))
    password_ok = hmac.compare_digest(password.encode("utf-8"), auth[1].encode("utf-8"))
    return bool(sep) and user_ok and password_ok


# --- throttling wrong passwords and API keys ---------------------------------------------------------------------

import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict, deque  # noqa: E402
from collections.abc import Callable  # noqa: E402

#: Wrong logins (gradio's form) or API keys (a 401 from any plain HTTP API) one client address may make per window
#: before its logins are refused outright (50 wrong passwords took 0.9 s before issue 28).
MAX_FAILED_LOGINS = 10
#: The window over which failures count, and how long a client at the limit is refused, in seconds.
LOGIN_FAILURE_WINDOW_S = 60.0
#: Client addresses tracked at once (the least recently failing are forgotten first), so the table stays small.
MAX_TRACKED_CLIENTS = 10_000
#: The path of gradio's login form.
LOGIN_PATH = "/login"


class LoginThrottle:
    """ASGI middleware: a client address with `MAX_FAILED_LOGINS` failures in the last `LOGIN_FAILURE_WINDOW_S`
    gets 429 for every login attempt (a POST to `/login`, any request carrying `Authorization`) until the oldest
    failure ages out, right or wrong credentials alike, so guessing cannot go on. A failure is a 401 answer, or a
    non-2xx/3xx answer to `/login`. Counting on the response keeps it independent of how each route checks."""

    def __init__(self, app, max_failures: int = MAX_FAILED_LOGINS, window_s: float = LOGIN_FAILURE_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        # `clock`: seconds, monotonic; a test passes its own and moves it on instead of waiting out the window.
        self.app, self.max_failures, self.window_s, self.clock = app, max_failures, window_s, clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent_locked(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, client: str, now: float | None = None) -> float | None:
        """Seconds until `client` may try again, or None when it is not throttled."""
        now = self.clock() if now is None else now
        with self._lock:
            times = self._recent_locked(client, now)
            return times[0] + self.window_s - now if len(times) >= self.max_failures else None

    def failed(self, client: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        with self._lock:
            times = self._recent_locked(client, now)
            times.append(now)
            self._failures[client] = times
            self._failures.move_to_end(client)
            while len(self._failures) > MAX_TRACKED_CLIENTS:
                self._failures.popitem(last=False)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown", 0))[0]
        is_login = scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == LOGIN_PATH
        attempts = is_login or any(name == b"authorization" for name, _ in scope.get("headers", []))
        if attempts:
            wait = self.retry_after(client)
            if wait is not None:
                body = json.dumps({"error": {
                    "message": f"Too many failed logins from this address; try again in {wait:.0f} s.",
                    "type": "rate_limit_exceeded", "param": None, "code": "too_many_failed_logins"}}).encode()
                await send({"type": "http.response.start", "status": 429, "headers": [
                    (b"content-type", b"application/json"), (b"retry-after", str(max(1, round(wait))).encode()),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return

        async def watch(message):
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 401 or (is_login and status >= 400):
                    self.failed(client)
            await send(message)

        return await self.app(scope, receive, watch)


def throttle_middleware():
    """The middleware entry for `launch(app_kwargs={"middleware": [...]})`."""
    from starlette.middleware import Middleware

    return Middleware(LoginThrottle)
