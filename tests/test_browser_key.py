"""A page's server-side state answers only to the browser that opened it (`webui/browser_key.py`, issue 28 item 9):
a request that borrows a page's gradio session hash without that browser's key cookie gets a page of its own, and
the page that owns the state loses nothing. The cookie comes with the HTML page, HttpOnly."""

from __future__ import annotations

import asyncio
import warnings
from types import SimpleNamespace

import pytest
from browser_util import served
from chat_page import Page
from test_app import fetch
from test_webui import conv, engine, request  # noqa: F401 - fixtures

from webui import chat_tab, compare_tab
from webui.browser_key import BROWSER_KEY_COOKIE, STATE_KEY, BrowserKeyCookie, bound, browser_key

KEY_A, KEY_B = "a" * 24, "b" * 24


def from_browser(key: str | None, tab: str = "page-1"):
    """A request of the page `tab` (its session hash) from the browser whose key cookie is `key` (None: none)."""
    req = request(tab=tab)
    req.cookies = {BROWSER_KEY_COOKIE: key} if key else {}
    return req


@pytest.mark.parametrize("state, key, expected", [
    ({}, None, {}),  # no cookie, nothing to bind to: unbound, as before
    ({"token": "t"}, KEY_A, {"token": "t", STATE_KEY: KEY_A}),  # first use with a key binds
    ({"token": "t", STATE_KEY: KEY_A}, KEY_A, {"token": "t", STATE_KEY: KEY_A}),  # its own browser
    ({"token": "t", STATE_KEY: KEY_A}, KEY_B, {STATE_KEY: KEY_B}),  # another browser: a page of its own
    ({"token": "t", STATE_KEY: KEY_A}, None, {}),  # no cookie at all: not the owner either
    (None, KEY_A, {STATE_KEY: KEY_A}),
    ("not a dict", KEY_A, {STATE_KEY: KEY_A}),
])
def test_a_state_answers_only_to_the_browser_it_was_first_used_with(state, key, expected):
    assert bound(state, from_browser(key)) == expected


def test_a_malformed_or_missing_cookie_names_no_browser():
    assert browser_key(None) is None
    assert browser_key(SimpleNamespace()) is None
    for value in ("short", "x" * 65, "has space in it!!!!!!!", "semi;colon-is-not-ok-here"):
        assert browser_key(SimpleNamespace(cookies={BROWSER_KEY_COOKIE: value})) is None
    assert browser_key(from_browser(KEY_A)) == KEY_A


def test_a_borrowed_session_hash_without_the_browser_key_reaches_none_of_the_page_s_chat(conv):  # noqa: F811
    """The owner chats; a request with the owner's session hash and another key (or none) can neither export its
    conversation nor stop its reply nor see it on load; the owner's next events still find it."""
    owner = Page(conv, req=from_browser(KEY_A))
    owner.send("My secret plan is 4471")
    token = owner.state["token"]
    assert owner.state[STATE_KEY] == KEY_A
    for intruder in (from_browser(KEY_B), from_browser(None)):
        with warnings.catch_warnings(record=True) as told:
            warnings.simplefilter("always")
            exported = chat_tab.export_history(conv, owner.state, chat_tab.empty_record(), request=intruder)
        assert exported["visible"] is False and told  # "nothing to export yet": no conversation on that page
        assert chat_tab.bound(owner.state, intruder).get("token") is None
        loaded = chat_tab.load_conversation(conv, chat_tab.empty_record(), owner.state, request=intruder)
        assert loaded[0] != owner.chat  # not the owner's chat
    exported = chat_tab.export_history(conv, owner.state, owner.record, request=owner.req)
    assert exported["visible"] is True and "4471" in open(exported["value"], encoding="utf-8").read()
    owner.send("And the second part")
    assert owner.state["token"] == token and len(owner.texts("user")) == 2


def test_an_overwritten_state_is_re_attached_from_the_owner_s_browser_record(conv):  # noqa: F811
    """If an intruder's event replaced the page's state (gradio keeps what a handler returns), the owner's next
    message re-attaches its conversation from its own browser record: nothing is lost."""
    owner = Page(conv, req=from_browser(KEY_A))
    owner.send("First message")
    token = owner.state["token"]
    owner.state = chat_tab.bound(owner.state, from_browser(KEY_B))  # what the intruder's event left behind
    owner.send("Second message")
    assert owner.state["token"] == token and owner.state[STATE_KEY] == KEY_A
    assert [m["content"] for m in conv.messages(token) if m["role"] == "user"] == ["First message", "Second message"]


def test_the_compare_tab_s_sessions_answer_only_to_their_browser(engine):  # noqa: F811
    state = {}
    list(compare_tab.compare_send(engine, "Hi", [], [], [], state, True, 4, request=from_browser(KEY_A)))
    sids = dict(state["sids"])
    stopped = compare_tab.compare_stop(engine, state, request=from_browser(KEY_B))
    assert "sids" not in stopped and state["sids"] == sids  # the intruder got an empty state; the page kept its own
    assert set(sids.values()) <= set(engine.session_ids())


def run_asgi(middleware, path: str, content_type: bytes, cookie: bytes | None = None, scheme: str = "http"):
    """The response headers `middleware` sends for one GET of `path` answered with `content_type`."""
    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    headers = [(b"cookie", cookie)] if cookie else []
    scope = {"type": "http", "path": path, "method": "GET", "headers": headers, "scheme": scheme}
    asyncio.run(middleware(app)(scope, receive, send))
    return [value for name, value in sent[0]["headers"] if name == b"set-cookie"]


def test_the_key_cookie_comes_with_the_html_page_only_and_only_when_missing():
    first = run_asgi(BrowserKeyCookie, "/", b"text/html; charset=utf-8")
    assert len(first) == 1 and first[0].startswith(f"{BROWSER_KEY_COOKIE}=".encode())
    assert b"HttpOnly" in first[0] and b"SameSite=Lax" in first[0] and b"Secure" not in first[0]
    assert b"Secure" in run_asgi(BrowserKeyCookie, "/", b"text/html", scheme="https")[0]
    assert run_asgi(BrowserKeyCookie, "/config", b"application/json") == []  # not on the page's requests
    assert run_asgi(BrowserKeyCookie, "/", b"text/html", cookie=f"{BROWSER_KEY_COOKIE}={KEY_A}".encode()) == []
    # A malformed key is replaced.
    assert len(run_asgi(BrowserKeyCookie, "/", b"text/html", cookie=f"{BROWSER_KEY_COOKIE}=bad".encode())) == 1
    keys = {run_asgi(BrowserKeyCookie, "/", b"text/html")[0].split(b";")[0] for _ in range(5)}
    assert len(keys) == 5  # random per browser


def test_the_served_page_sets_the_key_cookie(engine):  # noqa: F811
    with served(engine, "tiny") as (url, _):
        _, page_headers, _ = fetch(f"{url}/")
        _, config_headers, _ = fetch(f"{url}/config")
    assert page_headers.get("set-cookie", "").startswith(f"{BROWSER_KEY_COOKIE}=")
    assert BROWSER_KEY_COOKIE not in config_headers.get("set-cookie", "")
