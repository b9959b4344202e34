"""A page's server-side state answers only to the browser that opened it (issue 28, item 9).

gradio keys a page's `gr.State` by the page's session hash, which the page's own requests carry in the clear
(`?session_hash=` on the event stream, `/heartbeat/<hash>`): whoever learns it, from a log line or a shared screen,
could send events as that page and act in its chat. So each browser gets a random key in an HttpOnly cookie, set
on the HTML page's response when the request has none (`BrowserKeyCookie`, ASGI), and every handler reads its
state through `bound`: a state answers only to requests that carry the key it was first used with. A request with
the same session hash but another browser's key, or none, gets an empty state, a page of its own; the page that
owned the state re-attaches from its browser record at its next event, as after a server restart
(`chat_tab.attach`), so nothing of it is lost. A browser that never sends the cookie (cookies blocked, the app in a
cross-site frame) leaves its state unbound, as before.

What this does not cover: gradio's event stream itself (`/queue/data`) is read by session hash, so whoever knows
a page's hash can still read events streamed to that page; docs/security.md says so.

Boundary: the cookie and the check. Which handlers hold state is the tabs' business; they call `bound`.
"""

from __future__ import annotations

import secrets
from http.cookies import CookieError, SimpleCookie

from starlette.middleware import Middleware

#: The cookie holding this browser's key.
BROWSER_KEY_COOKIE = "streaming_llm_browser"
#: Where a page's state keeps the key it is bound to.
STATE_KEY = "browser"
#: Random bytes in a key (URL-safe base64 in the cookie): unguessable, like the session hash it guards.
KEY_BYTES = 18
#: A year: the key identifies a browser, not a visit; clearing cookies only re-binds open pages (see above).
COOKIE_MAX_AGE_S = 365 * 24 * 3600


def valid_key(value) -> bool:
    return isinstance(value, str) and 16 <= len(value) <= 64 and value.replace("-", "").replace("_", "").isalnum()


def browser_key(request) -> str | None:
    """The browser key a gradio `Request` carries, or None (no request, no cookie, or a malformed one)."""
    if request is None:
        return None
    try:
        value = dict(getattr(request, "cookies", None) or {}).get(BROWSER_KEY_COOKIE)
    except Exception:  # noqa: BLE001 - a request object without cookies (tests, a direct call) names no browser
        return None
    return value if valid_key(value) else None


def bound(state, request, *, copy: bool = True) -> dict:
    """`state` if it answers to this request's browser (a copy, unless `copy=False`: a tab that flags a running
    loop through the very dict gradio keeps), else a new empty state bound to that browser (see the module doc).
    An unbound state is bound to the request's key at its first use with one."""
    if not isinstance(state, dict):
        state = {}
    elif copy:
        state = dict(state)
    key, owner = browser_key(request), state.get(STATE_KEY)
    if owner is None:
        if key is not None:
            state[STATE_KEY] = key
        return state
    if owner == key:
        return state
    return {STATE_KEY: key} if key is not None else {}


def _cookie_of(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            try:
                morsel = SimpleCookie(value.decode("latin-1")).get(BROWSER_KEY_COOKIE)
            except CookieError:
                return None
            if morsel is not None and valid_key(morsel.value):
                return morsel.value
    return None


def set_cookie_header(key: str, secure: bool) -> bytes:
    attributes = f"{BROWSER_KEY_COOKIE}={key}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Lax"
    return (attributes + ("; Secure" if secure else "")).encode("latin-1")


class BrowserKeyCookie:
    """ASGI middleware: an HTML response to a request without a valid browser key sets a new one. Only the page
    itself (HTML), not its assets or event streams: a page load sets one key, so the page's first events already
    carry the key its state binds to."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _cookie_of(scope) is not None:
            return await self.app(scope, receive, send)
        secure = scope.get("scheme") == "https"

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                if any(name.lower() == b"content-type" and value.startswith(b"text/html") for name, value in headers):
                    cookie = set_cookie_header(secrets.token_urlsafe(KEY_BYTES), secure)
                    message = {**message, "headers": [*headers, (b"set-cookie", cookie)]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)


def middleware() -> Middleware:
    """The middleware entry for `launch(app_kwargs={"middleware": [...]})`."""
    return Middleware(BrowserKeyCookie)
