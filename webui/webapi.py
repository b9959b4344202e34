"""The app's programmatic HTTP API (used by `benchmarks.loadtest` and scripts), registered on the Blocks.

Endpoints (call them with `gradio_client.Client(url).predict(..., api_name=...)`; the "Gradio API" section of
`docs/openai-api.md` has an example):

* `/new_session() -> session_id: str` — a fresh streaming conversation (ids are random 128-bit: unguessable). It
  counts against the caller's per-client cap (its address, or its login user) and is closed after
  `API_IDLE_TIMEOUT_S` without calls (`origin="api"`);
* `/chat(session_id, message, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) ->
  (reply_so_far: str, stats: dict)`, streamed; the sampling settings are optional (null keeps the engine's
  default). With `MAX_ACTIVE_TURNS` replies already being written the answer is "Server busy" at once: the
  endpoint has no queue limit of its own, so the engine's limit decides instead of a wait in gradio's queue;
* `/continue_reply(session_id, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) ->
  (reply_so_far: str, stats: dict)`, streamed as `/chat`: the last reply, cut at its `max_new_tokens` or stopped,
  goes on where it ended (`StreamingEngine.continue_reply`); the reply so far is the whole reply, grown;
* `/history(session_id) -> list[dict]` ({role, content} messages) and `/close_session(session_id) -> "closed"`;
* `/health() -> dict` with the process's current and peak resident memory, open sessions and running turns.

Types: each endpoint is a typed function given to `gr.api`, so `Client.view_api()` shows every parameter's and
result's type (str, int | None, dict …), never "Any". `gr.api` hands the values over as the caller sent them (no
component converts them first), so `streaming_engine.validate` still sees a text where an integer belongs and
says so (type and range named in the message; a session id that cannot be one is refused before any lookup and
never echoed whole). Results are JSON values (objects, lists), not JSON text.

Errors: every endpoint that cannot do what it was asked raises `gr.Error` made by `api_error` — the one place
that maps a failure to its code (`ERROR_CODES`, sent as the error's title) and its human message (the error's
message). A `gradio_client` caller gets an `AppError` whose `.title` is the code and whose message says what to
change; never a traceback. UI glue only: every decision is the engine's.
"""

from __future__ import annotations

import inspect
import resource
import sys
from typing import Callable, Iterator, Union

import gradio as gr
import psutil

from streaming_engine import EngineBusy, SessionNotFound, StreamingEngine, validate

from .sessions import owner_of

#: `/chat`'s reply length when the caller gives none.
DEFAULT_API_MAX_NEW_TOKENS = 128

#: What an API error's code (its `gr.Error` title) means. One home: `api_error` picks from these, tests and docs
#: read them from here.
ERROR_CODES = {
    "invalid_argument": "an argument has the wrong type or is out of range (the message names it and the range)",
    "unknown_session": "the session id is unknown, closed or expired: open a new one with /new_session",
    "server_busy": "a server limit was reached (sessions, or replies being written): try again shortly",
    "refused": "the engine did not take the message (the message says why, e.g. a reply is still being written "
               "or the server is busy); the conversation is unchanged",
    "failed": "the reply failed part-way: the message and the partial reply are in the history",
}

#: A JSON scalar, as the stats and health objects hold them.
Scalar = Union[int, float, str, bool, None]
#: `/chat`'s stats object: cache occupancy, speeds, `finish_reason` on the last update (see `engine.stats`).
Stats = dict[str, Scalar]
#: One message of `/history`: role, content, and flags such as `interrupted`.
Message = dict[str, Union[str, bool]]


def api_error(exc: BaseException | None = None, *, code: str | None = None, message: str | None = None) -> gr.Error:
    """The `gr.Error` an endpoint raises: title = a code from `ERROR_CODES`, message = what happened and what to
    change. From an exception its code follows its type (checked argument, unknown session, busy server)."""
    if code is None:
        code = ("unknown_session" if isinstance(exc, SessionNotFound) else "server_busy" if isinstance(exc, EngineBusy)
                else "invalid_argument")
    if code not in ERROR_CODES:
        raise ValueError(f"unknown API error code {code!r}")
    text = message if message is not None else str(exc)
    return gr.Error(text or ERROR_CODES[code], title=code, print_exception=False)


def given(**settings) -> dict:
    """The optional sampling settings a caller gave (null: the engine's default, so left out)."""
    return {name: value for name, value in settings.items() if value is not None}


def typed(fn: Callable, returns) -> Callable:
    """`fn` with `returns` as its signature's return annotation: what gradio reads as the endpoint's outputs (a
    tuple: one output per item). Needed for a generator, whose honest annotation (an Iterator) gradio cannot split,
    and because postponed annotations would reach gradio as text."""
    fn.__signature__ = inspect.signature(fn).replace(return_annotation=returns)
    return fn


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


def register(engine: StreamingEngine, max_new_tokens_default: int = DEFAULT_API_MAX_NEW_TOKENS) -> None:
    """Add the API endpoints to the current `gr.Blocks` context."""

    def new_session(request: gr.Request) -> str:
        """Open a streaming conversation; returns its session id (pass it to the other endpoints)."""
        try:
            return engine.new_session("streaming", owner=owner_of(request), origin="api")
        except EngineBusy as exc:
            raise api_error(exc) from exc

    # The sampling settings after max_new_tokens are optional (null: the engine's default) and come after the
    # existing arguments, so positional callers of the three-argument form are unchanged. The type hints are what
    # callers are told; the values still go through streaming_engine.validate, which names what was wrong.
    def chat(session_id: str, message: str, max_new_tokens: int = max_new_tokens_default,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             repetition_penalty: float | None = None, seed: int | None = None) -> Iterator[tuple[str, Stats]]:
        """Stream one turn. session_id: from /new_session; message: the user's text; max_new_tokens: in [1, 4096];
        temperature: in [0, 5] (0 = greedy); top_p: in (0, 1]; top_k: >= 0 (0 = off); repetition_penalty: in
        (0, 10] (1 = off); seed: >= 0. Ints are accepted where numbers are; null (the default) keeps the engine's
        setting. Yields (reply so far, stats object); the last update's stats has "finish_reason"."""
        try:
            sid, text, sampling = validate.chat_arguments(
                session_id, message, engine.config.max_message_chars, max_new_tokens=max_new_tokens,
                **given(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                        seed=seed))
            engine.stats(sid)  # an unknown id is unknown_session here as on /history, not a refused turn
        except (ValueError, SessionNotFound) as exc:
            raise api_error(exc) from exc
        yield from streamed(engine.chat(sid, text, **sampling))

    def continue_reply(session_id: str, max_new_tokens: int = max_new_tokens_default,
                       temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                       repetition_penalty: float | None = None,
                       seed: int | None = None) -> Iterator[tuple[str, Stats]]:
        """Stream the rest of the last reply, when it was cut at its max_new_tokens or stopped: it goes on where it
        ended. session_id: from /new_session; the sampling settings as for /chat. Yields (the whole reply so far,
        stats object); the last update's stats has "finish_reason". A reply that finished is refused, saying
        so."""
        try:
            sid = validate.session_id(session_id)
            sampling = validate.sampling_arguments(dict(max_new_tokens=max_new_tokens, **given(
                temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)))
            held = engine.history(sid)  # an unknown id is unknown_session here as on /chat
        except (ValueError, SessionNotFound) as exc:
            raise api_error(exc) from exc
        yield from streamed(engine.continue_reply(sid, **sampling), held[-1]["content"] if held else "")

    def streamed(events, reply: str = "") -> Iterator[tuple[str, Stats]]:
        """A turn's events as the endpoints stream them: (the reply so far, after `reply`; stats), the last with
        "finish_reason"; an "error" event raised with its code."""
        for event in events:
            if event.kind == "delta":
                reply += event.text
                yield reply, dict(event.stats)
            elif event.kind == "done":
                yield event.text, {**event.stats, "finish_reason": event.finish_reason}
            else:
                raise api_error(code="failed" if event.accepted else "refused", message=event.text)

    def history(session_id: str) -> list[Message]:
        """The conversation so far: [{role, content}, ...]. session_id: from /new_session."""
        try:
            return engine.history(validate.session_id(session_id))
        except (ValueError, SessionNotFound) as exc:
            raise api_error(exc) from exc

    def close_session(session_id: str) -> str:
        """Close the conversation and free its cache; returns "closed". session_id: from /new_session."""
        try:
            engine.close(validate.session_id(session_id))
        except ValueError as exc:
            raise api_error(exc) from exc
        return "closed"

    def health() -> dict[str, int]:
        """rss_bytes, peak_rss_bytes, sessions (open) and active_turns (replies being written)."""
        rss = psutil.Process().memory_info().rss
        return {
            "rss_bytes": rss,
            "peak_rss_bytes": max(rss, peak_rss_bytes()),  # the two readings are a moment apart
            "sessions": len(engine.session_ids()),
            "active_turns": engine.scheduler.active_turns,
        }

    gr.api(typed(new_session, str), api_name="new_session")
    # No queue limit: the engine answers "Server busy" at once beyond its active-turn limit.
    gr.api(typed(chat, tuple[str, Stats]), api_name="chat", concurrency_limit=None)
    gr.api(typed(continue_reply, tuple[str, Stats]), api_name="continue_reply", concurrency_limit=None)
    gr.api(typed(history, list[Message]), api_name="history")
    gr.api(typed(close_session, str), api_name="close_session")
    gr.api(typed(health, dict[str, int]), api_name="health")


#: The named endpoints `register` adds, in order (tests and docs walk them).
ENDPOINTS = ("/new_session", "/chat", "/continue_reply", "/history", "/close_session", "/health")
