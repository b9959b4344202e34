"""The app's programmatic HTTP API (used by `streaming_engine.eval.loadtest` and scripts), registered on the Blocks.

Endpoints (call them with `gradio_client.Client(url).predict(..., api_name=...)`):

* `/new_session() -> session_id` — a fresh streaming conversation (ids are random 128-bit: unguessable);
* `/chat(session_id, message, max_new_tokens) -> (reply_so_far, stats_json)`, streamed; a problem comes back as
  `stats_json` holding `{"error": message}`, never as a traceback;
* `/history(session_id) -> json` and `/close_session(session_id) -> "closed"`;
* `/health() -> json` with the process's current and peak resident memory, open sessions and running turns.

UI glue only: every decision is the engine's.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Iterator

import gradio as gr
import psutil

from streaming_engine import EngineBusy, SessionNotFound, StreamingEngine


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def register(engine: StreamingEngine, max_new_tokens_default: int = 128) -> None:
    """Add the API endpoints to the current `gr.Blocks` context."""

    def new_session() -> str:
        try:
            return engine.new_session("streaming")
        except EngineBusy as exc:
            raise gr.Error(str(exc)) from exc

    def chat(session_id: str, message: str, max_new_tokens: int = max_new_tokens_default) -> Iterator[tuple[str, str]]:
        reply = ""
        for event in engine.chat(str(session_id), message, max_new_tokens=int(max_new_tokens)):
            if event.kind == "delta":
                reply += event.text
                yield reply, json.dumps(event.stats)
            elif event.kind == "done":
                yield event.text, json.dumps({**event.stats, "finish_reason": event.finish_reason})
            else:
                yield reply, json.dumps({**event.stats, "error": event.text})

    def history(session_id: str) -> str:
        try:
            return json.dumps(engine.history(str(session_id)), ensure_ascii=False)
        except SessionNotFound as exc:
            raise gr.Error(str(exc)) from exc

    def close_session(session_id: str) -> str:
        engine.close(str(session_id))
        return "closed"

    def health() -> str:
        rss = psutil.Process().memory_info().rss
        return json.dumps({
            "rss_bytes": rss,
            "peak_rss_bytes": max(rss, peak_rss_bytes()),  # the two readings are a moment apart
            "sessions": len(engine.session_ids()),
            "active_turns": engine.scheduler.active_turns,
        })

    gr.api(new_session, api_name="new_session")
    gr.api(chat, api_name="chat")
    gr.api(history, api_name="history")
    gr.api(close_session, api_name="close_session")
    gr.api(health, api_name="health")
