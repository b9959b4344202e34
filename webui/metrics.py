"""`GET /metrics`: the engine's state in Prometheus text format (what llama.cpp's server offers), for scraping.

`mount(app, engine, auth=..., queue_length=...)` adds the route to a FastAPI app (the app's Gradio server or
any FastAPI app). It reads the engine's live sessions, its scheduler and its process-wide counters
(`streaming_engine.counters`); `queue_length` reports requests waiting to start (the app passes Gradio's queue).
Behind the same login as the other HTTP APIs (`http_auth.py`; Prometheus sends it as basic auth or a bearer
token). Names follow Prometheus conventions: `_total` for counters, base units (bytes, seconds).
"""

from __future__ import annotations

from typing import Callable

import psutil
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from streaming_engine import SessionNotFound, StreamingEngine

from .http_auth import credentials_ok

#: Prometheus text exposition format, version 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "streaming_llm"


def _line(name: str, kind: str, help_text: str, value: float) -> str:
    value = float(value)
    shown = str(int(value)) if value.is_integer() else repr(value)
    return f"# HELP {PREFIX}_{name} {help_text}\n# TYPE {PREFIX}_{name} {kind}\n{PREFIX}_{name} {shown}\n"


def _info(name: str, help_text: str, **labels: str) -> str:
    """An info-style gauge: one sample of value 1 whose labels carry the facts."""
    shown = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return f"# HELP {PREFIX}_{name} {help_text}\n# TYPE {PREFIX}_{name} gauge\n{PREFIX}_{name}{{{shown}}} 1\n"


def render(engine: StreamingEngine, queue_length: Callable[[], int] | None = None) -> str:
    """The metrics page as text."""
    kv_bytes = cache_tokens = 0
    session_ids = engine.session_ids()
    for sid in session_ids:
        try:
            stats = engine.stats(sid)
        except SessionNotFound:  # closed while we were reading
            continue
        kv_bytes += int(stats.get("kv_bytes") or 0)
        cache_tokens += int(stats.get("cache_tokens") or 0)
    active = engine.scheduler.active_turns
    counters = engine.counters.snapshot()
    waiting = int(queue_length()) if queue_length is not None else 0
    return "".join((
        _line("sessions_open", "gauge", "Conversations open in the engine.", len(session_ids)),
        _line("turns_active", "gauge", "Replies being generated right now (stepped round-robin).", active),
        _line("queue_length", "gauge", "Requests waiting to start (the web UI's queue).", waiting),
        _line("tokens_generated_total", "counter", "Tokens sampled since the process started.",
              counters["tokens_generated"]),
        _line("tokens_processed_total", "counter", "Tokens fed through the model (prompts and replies).",
              counters["tokens_processed"]),
        _line("tokens_evicted_total", "counter", "Tokens evicted from attention-sink caches.",
              counters["tokens_evicted"]),
        _line("turns_total", "counter", "Replies finished (any ending).", counters["turns_finished"]),
        _line("turn_errors_total", "counter", "Replies that ended in an error.", counters["turn_errors"]),
        _line("kv_cache_bytes", "gauge", "Bytes of keys and values held by all open conversations.", kv_bytes),
        _line("kv_cache_tokens", "gauge", "Tokens held by all open conversations' caches.", cache_tokens),
        _line("decode_tokens_per_second", "gauge",
              f"Tokens sampled per second over the last {engine.counters.window_s:g} s, all sessions.",
              round(engine.counters.decode_tokens_per_s(), 3)),
        _line("process_resident_memory_bytes", "gauge", "Resident memory of the server process.",
              psutil.Process().memory_info().rss),
        _info("decode_path_info", "How decode steps run: eager, static, or static+graphs (replayed CUDA graphs).",
              path=engine.decode_path),
    ))


def mount(app: FastAPI, engine: StreamingEngine, *, auth: tuple[str, str] | None = None,
          queue_length: Callable[[], int] | None = None) -> None:
    """Add `GET /metrics` to `app`."""

    def metrics(request: Request):
        if not credentials_ok(request.headers.get("authorization"), auth):
            return PlainTextResponse("unauthorized\n", status_code=401, headers={"WWW-Authenticate": "Basic"})
        return PlainTextResponse(render(engine, queue_length), media_type=CONTENT_TYPE)

    app.add_api_route("/metrics", metrics, methods=["GET"])
