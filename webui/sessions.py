"""A browser tab's engine sessions: the per-tab state that owns them, and closing or stopping them.

Each tab module keeps its session ids in a `gr.State` dict made by `tab_state`: `{"sid": id}` for one
conversation, `{"sids": {mode: id}}` for several. When the browser tab goes away (or stays idle for
`SESSION_TTL_S`), gradio drops the state and the sessions are closed, freeing their caches.
"""

from __future__ import annotations

from typing import Iterable

import gradio as gr

from streaming_engine import SessionNotFound

from .settings import SESSION_TTL_S


def session_ids(state) -> list[str]:
    """Every engine session a tab state holds."""
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


def tab_state(engine) -> gr.State:
    """A per-browser-tab state dict whose sessions are closed when gradio drops it."""

    # A function, not `functools.partial`: gradio deep-copies component props (this callback included) on every
    # page load, and copies a function by reference, but a partial with everything it holds, the model too.
    def close(state) -> None:
        close_sessions(engine, state)

    return gr.State({}, time_to_live=SESSION_TTL_S, delete_callback=close)
