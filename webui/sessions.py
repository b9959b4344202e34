"""A browser tab's engine sessions and conversations: whom they count against, and freeing them when the tab goes.

* `owner_of(request)` — the owner a tab's or an API caller's sessions count against (the engine caps sessions per
  owner): the login user and the client address when `--auth` is on, else the client address (behind a trusted proxy, the address it
  forwards; see `--forwarded-allow-ips`).
* `TABS`, the process's `TabRegistry` — which conversation each open page shows and which engine sessions it holds,
  keyed by gradio's per-page session hash. When a page goes away (closed, reloaded, navigated off), gradio calls
  the app's `unload` handler at once (`app.py` binds `tab_closed`): the page's own sessions (the comparison
  tab's) are closed then, and its conversation's live session `UNLOAD_GRACE_S` later unless another page shows it
  again by then, which is what a reload does. The stored conversation stays either way.
* `tab_state`, `conversation_state` — per-tab `gr.State`s whose delete callbacks are the backstop for a page whose
  closing went unnoticed (gradio drops them an hour later).

A handler called without a request (tests, scripts) has no owner and no tab: nothing is counted or tracked.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, Iterable

import gradio as gr

from streaming_engine import SessionNotFound
from streaming_engine.validate import MAX_OWNER_CHARS

from .settings import SESSION_TTL_S, UNLOAD_GRACE_S


def owner_of(request) -> str | None:
    """`"user:<name>@<client address>"` for a logged-in user, `"addr:<client address>"` otherwise; None without a
    request. The address is kept with the login because `--auth` is one shared login: counting it as one client
    capped the whole deployment at `max_sessions_per_owner` conversations (issue 28, item 3)."""
    if request is None:
        return None
    user = getattr(request, "username", None)
    host = getattr(getattr(request, "client", None), "host", None)
    if isinstance(user, str) and user:
        return f"user:{user}@{host or 'unknown'}"[:MAX_OWNER_CHARS]
    return f"addr:{host}"[:MAX_OWNER_CHARS] if host else None


def tab_of(request) -> str | None:
    """The page's gradio session hash (one per page load), or None."""
    tab = getattr(request, "session_hash", None) if request is not None else None
    return tab if isinstance(tab, str) and tab else None


def session_ids(state) -> list[str]:
    """Every engine session a tab state holds (`{"sid": id}` or `{"sids": {mode: id}}`)."""
    if not isinstance(state, dict):
        return []
    return [sid for sid in [state.get("sid"), *(state.get("sids") or {}).values()] if sid]


def close_sessions(engine, state) -> None:
    """Close every session of `state` (closing an unknown id is a no-op)."""
    for sid in session_ids(state):
        engine.close(sid)


def stop_replies(engine, sids: Iterable[str]) -> None:
    """Stop whatever these sessions are generating; sessions already gone are skipped."""
    for sid in sids:
        try:
            engine.stop(sid)
        except SessionNotFound:
            pass


class TabRegistry:
    """Open pages (by session hash): the conversation each shows, and what to close when it goes. Thread-safe."""

    def __init__(self, grace_s: float = UNLOAD_GRACE_S,
                 schedule: Callable[[float, Callable[[], None]], None] | None = None):
        self.grace_s = grace_s
        self._schedule = schedule or _later
        self._shown: dict[str, tuple[str, Callable[[str], None]]] = {}  # tab -> (token, release)
        self._closers: dict[str, dict[str, Callable[[], None]]] = {}  # tab -> {name: close}
        self._lock = threading.Lock()

    def show(self, tab: str | None, token: str | None, release: Callable[[str], None] | None = None) -> None:
        """The page `tab` now shows conversation `token` (None: none); `release(token)` frees its live session.
        The conversation it showed before is not released here: the caller does that when `held` says no page
        shows it any more."""
        if tab is None:
            return
        with self._lock:
            if token is None:
                self._shown.pop(tab, None)
            else:
                self._shown[tab] = (token, release or (lambda _token: None))

    def held(self, token: str | None) -> bool:
        """Whether any open page shows `token`."""
        with self._lock:
            return token is not None and any(shown == token for shown, _ in self._shown.values())

    def on_close(self, tab: str | None, name: str, close: Callable[[], None]) -> None:
        """Call `close()` when page `tab` goes (one callback per `name`; a later one replaces it)."""
        if tab is not None:
            with self._lock:
                self._closers.setdefault(tab, {})[name] = close

    def tabs(self) -> int:
        """How many open pages show a conversation or hold sessions."""
        with self._lock:
            return len(self._shown.keys() | self._closers.keys())

    def tokens(self) -> set[str]:
        """The conversations open pages show."""
        with self._lock:
            return {token for token, _ in self._shown.values()}

    def leave(self, tab: str | None) -> None:
        """Page `tab` went away: close its sessions now, release its conversation after the grace period."""
        if tab is None:
            return
        with self._lock:
            closers = self._closers.pop(tab, {})
            shown = self._shown.pop(tab, None)
        for close in closers.values():
            close()
        if shown is not None:
            token, release = shown
            self._schedule(self.grace_s, functools.partial(self._release_unless_shown, token, release))

    def _release_unless_shown(self, token: str, release: Callable[[str], None]) -> None:
        if not self.held(token):
            release(token)


def _later(delay_s: float, fn: Callable[[], None]) -> None:
    """Run `fn` on its own thread after `delay_s` seconds."""
    timer = threading.Timer(delay_s, fn)
    timer.daemon = True
    timer.start()


#: This process's open pages (session hashes are random per page load, so several apps in one process can share it).
TABS = TabRegistry()


def tab_closed(request: gr.Request) -> None:
    """gradio's `unload` handler: the page behind `request` went away."""
    TABS.leave(tab_of(request))


def tab_state(engine) -> gr.State:
    """A per-browser-tab state dict whose engine sessions are closed when gradio drops it (an hour after the tab
    went, or after `SESSION_TTL_S` of inactivity): the backstop when the tab's `unload` was never seen."""

    # A function, not `functools.partial`: gradio deep-copies component props (this callback included) on every
    # page load, and copies a function by reference, but a partial with everything it holds, the model too.
    def close(state) -> None:
        close_sessions(engine, state)

    return gr.State({}, time_to_live=SESSION_TTL_S, delete_callback=close)


def conversation_state(conversations) -> gr.State:
    """The chat tab's per-page state `{"token": …}`; when gradio drops it (the backstop, as for `tab_state`), the
    conversation's live session is freed unless another page shows it. The stored conversation stays."""

    def release(state) -> None:
        token = state.get("token") if isinstance(state, dict) else None
        if token and not TABS.held(token):
            conversations.release(token)

    return gr.State({}, time_to_live=SESSION_TTL_S, delete_callback=release)
