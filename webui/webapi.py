"""The app's programmatic HTTP API (used by `streaming_engine.eval.loadtest` and scripts), registered on the Blocks.

Endpoints (call them with `gradio_client.Client(url).predict(..., api_name=...)`):

* `/new_session() -> session_id` — a fresh streaming conversation (ids are random 128-bit: unguessable). It counts
  against the caller's per-client cap (its address, or its login user) and is closed after
  `API_IDLE_TIMEOUT_S` without calls (`origin="api"`);
* `/chat(session_id, message, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) ->
  (reply_so_far, stats_json)`, streamed (the sampling settings are optional: null keeps the engine's default); a problem comes back as
  `stats_json` holding `{"error": message}` with a message that says what to change, never as a traceback. With
  `MAX_ACTIVE_TURNS` replies already being written the answer is "Server busy" at once: the endpoint has no queue
  limit of its own, so the engine's limit decides instead of a wait in gradio's queue;
* `/history(session_id) -> json` and `/close_session(session_id) -> "closed"`;
* `/health() -> json` with the process's current and peak resident memory, open sessions and running turns.

Every argument is checked by `streaming_engine.apivalidate` (type and range named in the message; a session id
that cannot be one is refused before any lookup and never echoed whole). UI glue only: every decision is the
engine's.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any, Iterator

import gradio as gr
import psutil

from streaming_engine import EngineBusy, SessionNotFound, StreamingEngine, apivalidate

from .sessions import owner_of

#: `/chat`'s reply length when the caller gives none.
DEFAULT_API_MAX_NEW_TOKENS = 128


def peak_rss_bytes() -> int:
    """Peak resident memory of this process. On Linux, VmHWM from /proc/self/status: ru_maxrss carries the parent's
    peak across fork and exec, so a server started from a large process (a test run) would report that one's.
    Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def error_json(message: str, stats: dict | None = None) -> str:
    return json.dumps({**(stats or {}), "error": str(message) or "request refused"})


def register(engine: StreamingEngine, max_new_tokens_default: int = DEFAULT_API_MAX_NEW_TOKENS) -> None:
    """Add the API endpoints to the current `gr.Blocks` context."""

    def new_session(request: gr.Request) -> str:
        try:
            return engine.new_session("streaming", owner=owner_of(request), origin="api")
        except EngineBusy as exc:
            raise gr.Error(str(exc), print_exception=False) from exc

    # Parameters typed `Any` so that gradio hands over exactly what the caller sent (text, null, a list …) and the
    # checks below, not a silent conversion, decide; the docstring tells clients the expected types.
    # The sampling settings after max_new_tokens are optional (null: the engine's default) and come after the
    # existing arguments, so positional callers of the three-argument form are unchanged.
    def chat(session_id: Any, message: Any, max_new_tokens: Any = max_new_tokens_default, temperature: Any = None,
             top_p: Any = None, top_k: Any = None, repetition_penalty: Any = None,
             seed: Any = None) -> Iterator[tuple[str, str]]:
        """Stream one turn. session_id: str (from /new_session); message: str; max_new_tokens: int in [1, 4096];
        temperature: number in [0, 5] (0 = greedy); top_p: number in (0, 1]; top_k: int >= 0 (0 = off);
        repetition_penalty: number in (0, 10] (1 = off); seed: int >= 0. Ints are accepted where numbers are;
        null (the default) keeps the engine's setting. Returns (reply so far, stats JSON); a refused or failed
        turn has "error" in the stats JSON."""
        optional = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                        seed=seed)
        try:
            sid, text, sampling = apivalidate.chat_arguments(
                session_id, message, engine.config.max_message_chars, max_new_tokens=max_new_tokens,
                **{name: value for name, value in optional.items() if value is not None})
        except ValueError as exc:
            yield "", error_json(str(exc))
            return
        reply = ""
        for event in engine.chat(sid, text, **sampling):
            if event.kind == "delta":
                reply += event.text
                yield reply, json.dumps(event.stats)
            elif event.kind == "done":
                yield event.text, json.dumps({**event.stats, "finish_reason": event.finish_reason})
            else:
                yield reply, error_json(event.text, event.stats)

    def history(session_id: Any) -> str:
        """The conversation so far as JSON ([{role, content}, ...]). session_id: str (from /new_session)."""
        try:
            return json.dumps(engine.history(apivalidate.session_id(session_id)), ensure_ascii=False)
        except (ValueError, SessionNotFound) as exc:
            raise gr.Error(str(exc), print_exception=False) from exc

    def close_session(session_id: Any) -> str:
        """Close the conversation and free its cache. session_id: str (from /new_session)."""
        try:
            engine.close(apivalidate.session_id(session_id))
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from exc
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
    # No queue limit: the engine answers "Server busy" at once beyond its active-turn limit.
    gr.api(chat, api_name="chat", concurrency_limit=None)
    gr.api(history, api_name="history")
    gr.api(close_session, api_name="close_session")
    gr.api(health, api_name="health")
