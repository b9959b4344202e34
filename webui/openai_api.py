"""OpenAI-compatible chat API over the engine: `POST /v1/chat/completions` and `GET /v1/models`.

`mount(app, engine, model_name=..., auth=...)` adds the routes to a FastAPI app: the app's own Gradio server
(`demo.app`, see `app.py`) or any FastAPI app a deployment builds around `gr.mount_gradio_app`. Requests pass the
app's login (`http_auth.py`) and the engine's limits (message sizes, sampling ranges, sessions, replies at once);
problems come back as OpenAI-style error objects (`{"error": {"message", "type", "param", "code"}}`).

Stateless clients send the whole conversation with every request. The one thing a StreamingLLM server can do
that others cannot is to keep *all* of those conversations going in bounded memory, so `ConversationPool` looks
for the live session whose conversation is exactly the request minus its last user message
(`engine.find_conversation`) and continues it on its cache as it stands: only the new user turn is encoded, however
long the history. A request that extends no live conversation opens a new session, primed from the attention
sinks and the tail of the history that fits (`engine.open_conversation`). The pool keeps at most
`MAX_API_SESSIONS` of them, closing the least recently used, so API traffic cannot crowd out browser tabs.

Usage counts: `prompt_tokens` is what the reply was conditioned on this turn, split as OpenAI does into
`prompt_tokens_details.cached_tokens` (tokens reused from the live cache) and the rest (encoded for this request);
`completion_tokens` is the reply. The non-standard `streaming_llm` object says whether a session was reused and
what the cache holds.

Routing glue only: every model decision is the engine's.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from streaming_engine import EngineBusy, SessionNotFound, StreamingEngine
from streaming_engine.history import MAX_HISTORY_BYTES
from streaming_engine.sampling import SamplingParams

from .http_auth import credentials_ok

#: Sessions the API keeps alive at once (least recently used closed first); the engine allows 64 in all.
MAX_API_SESSIONS = 16
#: Largest request body accepted, in bytes (the size of an exported history).
MAX_BODY_BYTES = MAX_HISTORY_BYTES
#: `owner` tag of the engine sessions this API opens (only those are ever continued by it).
OWNER = "openai"
#: Request fields understood here; OpenAI rejects unknown fields too, rather than silently ignoring them.
KNOWN_FIELDS = {
    "model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "stream",
    "stream_options", "n", "user", "presence_penalty", "frequency_penalty", "logprobs", "top_k",
    "repetition_penalty",
}
#: Engine finish reasons in OpenAI's words ("context_full": a dense cache ran out, which the API never opens).
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context_full": "length", "stopped": "stop"}


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, the offending parameter and a code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _text_of(content, index: int) -> str:
    """Message content as text: a string, or OpenAI's list of parts with only text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts", param="messages")


@dataclass
class ChatRequest:
    """A validated `/v1/chat/completions` body: the conversation before the new user message, that message, and
    the engine's sampling keywords. Raises `APIError` (400) naming the parameter on bad input."""

    body: dict
    default_max_tokens: int
    prior: list[dict] = field(init=False)
    message: str = field(init=False)
    sampling: dict = field(init=False)
    stream: bool = field(init=False)
    include_usage: bool = field(init=False)

    def __post_init__(self):
        body = self.body
        unknown = sorted(set(body) - KNOWN_FIELDS)
        if unknown:
            raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise APIError(400, "you must provide a model parameter", param="model")
        self._parse_messages(body.get("messages"))
        self.stream = self._flag("stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise APIError(400, "stream_options may only hold include_usage", param="stream_options")
        self.include_usage = bool(options.get("include_usage", False))
        # `True == 1` and `False == 0` in Python: a JSON true is no number, so bools are refused by type first.
        if isinstance(body.get("n"), bool) or body.get("n", 1) not in (1, None):
            raise APIError(400, "only n=1 is supported: one conversation, one reply", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if isinstance(body.get(name), bool) or body.get(name, 0) not in (0, 0.0, None):
                raise APIError(400, f"{name} is not supported (use repetition_penalty)", param=name)
        if body.get("logprobs"):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        self._parse_sampling(body)

    def _flag(self, name: str) -> bool:
        value = self.body.get(name, False)
        if not isinstance(value, bool) and value is not None:
            raise APIError(400, f"{name} must be a boolean", param=name)
        return bool(value)

    def _parse_messages(self, messages) -> None:
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        parsed = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise APIError(400, f"messages[{i}] must be an object", param="messages")
            role = "system" if m.get("role") == "developer" else m.get("role")
            if role not in ("system", "user", "assistant"):
                raise APIError(400, f"messages[{i}].role must be system, developer, user or assistant",
                               param="messages")
            if role == "system" and i != 0:
                raise APIError(400, "a system message is only supported as the first message", param="messages")
            parsed.append({"role": role, "content": _text_of(m.get("content"), i)})
        if parsed[-1]["role"] != "user":
            raise APIError(400, "the last message must come from the user", param="messages")
        self.prior, self.message = parsed[:-1], parsed[-1]["content"]

    def _parse_sampling(self, body: dict) -> None:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        sampling = {
            "max_new_tokens": self.default_max_tokens if max_tokens is None else max_tokens,
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "top_k": body.get("top_k"),
            "repetition_penalty": body.get("repetition_penalty"),
            "seed": body.get("seed"),
            "stop": body.get("stop"),
        }
        sampling = {k: v for k, v in sampling.items() if v is not None}
        try:
            # The engine's own ranges and types, checked before any session is touched; the checked values go on
            # (`"temperature": 1` arrives as 1.0), so nothing downstream sees a JSON int where a float belongs.
            checked = SamplingParams(**sampling)
        except (ValueError, TypeError) as exc:
            name = str(exc).split(" ", 1)[0]
            # Named as the client sent it: max_completion_tokens wins over max_tokens when both are there.
            sent = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            param = {"max_new_tokens": sent}.get(name, name)
            message = str(exc).replace("max_new_tokens", sent, 1)
            raise APIError(400, message, param=param if param in KNOWN_FIELDS else None) from exc
        self.sampling = {name: getattr(checked, name) for name in sampling}


class ConversationPool:
    """The API's sessions: find the one a request continues, or open one; keep at most `limit`, least recently
    used closed first. A session is *claimed* while a request runs on it, so two concurrent requests with the same
    history never share one."""

    def __init__(self, engine: StreamingEngine, limit: int = MAX_API_SESSIONS):
        self.engine, self.limit = engine, limit
        self._lock = threading.Lock()
        self._claimed: set[str] = set()
        self._recent: OrderedDict[str, None] = OrderedDict()

    def acquire(self, prior: list[dict]) -> tuple[str, bool]:
        """`(session_id, reused)` for a conversation whose messages so far are `prior`."""
        with self._lock:
            live = set(self.engine.session_ids())
            for sid in [s for s in self._recent if s not in live]:  # closed by the engine (idle) meanwhile
                del self._recent[sid]
            sid = self.engine.find_conversation(prior, OWNER, exclude=self._claimed)
            reused = sid is not None
            if not reused:
                self._make_room()
                sid = self.engine.open_conversation(prior, OWNER)
            self._claimed.add(sid)
            self._recent[sid] = None
            self._recent.move_to_end(sid)
            return sid, reused

    def _make_room(self) -> None:
        for sid in list(self._recent):
            if len(self._recent) < self.limit:
                return
            if sid not in self._claimed:
                self.engine.close(sid)
                del self._recent[sid]

    def release(self, sid: str) -> None:
        with self._lock:
            self._claimed.discard(sid)

    def session_ids(self) -> list[str]:
        with self._lock:
            return list(self._recent)


@dataclass
class TurnAccount:
    """What a turn cost, from the session's counters before it and its last statistics."""

    cached_tokens: int
    seen_before: int
    reused: bool
    history_messages: int = 0  # messages before the new user turn (the system prompt not counted)

    def usage(self, stats: dict) -> dict:
        reply = int(stats.get("reply_tokens", 0))
        # Every token that went through the model this turn, minus the reply's own tokens fed back (all but the
        # last one, which waits for the next turn): what was encoded for this request.
        fed = int(stats.get("seen_tokens", 0)) - self.seen_before
        encoded = max(0, fed - max(reply - 1, 0))
        return {
            "prompt_tokens": self.cached_tokens + encoded,
            "completion_tokens": reply,
            "total_tokens": self.cached_tokens + encoded + reply,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def extra(self, stats: dict) -> dict:
        usage = self.usage(stats)
        # prompt_tokens is what the reply was conditioned on, which a bounded cache caps however long the history
        # a client sends: say how much of that history is not behind the reply, and whether it was re-encoded
        # (a regenerate or an edit never continues a live cache; it re-primes one, and says so here).
        return {
            "session_reused": self.reused,
            "reprimed": not self.reused and self.history_messages > 0,
            "prefill_tokens": usage["prompt_tokens"] - self.cached_tokens,
            "cache_tokens": stats.get("cache_tokens"),
            "cache_capacity": stats.get("cache_capacity"),
            "evicted_tokens": stats.get("evicted_tokens"),
            "history_messages": self.history_messages,
            "history_messages_dropped": int(stats.get("messages_forgotten") or 0),
        }


def _error_from_event(text: str) -> APIError:
    if text.startswith("Server busy"):
        return APIError(429, text, "server_busy", code="server_busy")
    return APIError(500, text, "server_error")


def mount(app: FastAPI, engine: StreamingEngine, *, model_name: str, auth: tuple[str, str] | None = None,
          max_sessions: int = MAX_API_SESSIONS, default_max_tokens: int | None = None) -> ConversationPool:
    """Add `/v1/chat/completions` and `/v1/models` to `app`; returns the pool of API sessions."""
    pool = ConversationPool(engine, max_sessions)
    default_max_tokens = default_max_tokens or engine.config.max_new_tokens
    created = int(time.time())

    def check_auth(request: Request) -> None:
        if not credentials_ok(request.headers.get("authorization"), auth):
            raise APIError(401, "Incorrect API key provided: pass the app's user:password as the API key",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise APIError(413, f"request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            # ValueError also covers a number of more than 4,300 digits (Python's int limit), RecursionError a
            # `[[[[…` bomb: both are bad input, never a server error.
            reason = "nested too deep" if isinstance(exc, RecursionError) else str(exc)[:200]
            raise APIError(400, f"the request body is not valid JSON ({reason})") from exc
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def model_not_found(model: str) -> APIError:
        shown = model if len(model) <= 100 else model[:100] + "…"
        return APIError(404, f"The model '{shown}' does not exist; this server serves '{model_name}'",
                        param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "streaming-llm"}

    async def list_models(request: Request):
        try:
            check_auth(request)
        except APIError as exc:
            return exc.response()
        return {"object": "list", "data": [model_card()]}

    async def get_model(request: Request, model: str):
        try:
            check_auth(request)
            if model != model_name:
                raise model_not_found(model)
        except APIError as exc:
            return exc.response()
        return model_card()

    async def chat_completions(request: Request):
        try:
            check_auth(request)
            chat = ChatRequest(await read_json(request), default_max_tokens)
            if chat.body["model"] != model_name:  # as OpenAI and llama.cpp's server do: no silent substitute
                raise model_not_found(chat.body["model"])
            try:
                sid, reused = await run_in_threadpool(pool.acquire, chat.prior)
            except EngineBusy as exc:
                raise APIError(429, str(exc), "server_busy", code="server_busy") from exc
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages") from exc
        except APIError as exc:
            return exc.response()
        try:
            stats = engine.stats(sid)
        except SessionNotFound:  # closed between acquire and here (a reset from elsewhere): start over next time
            pool.release(sid)
            return APIError(503, "the conversation was closed meanwhile; retry", "server_error").response()
        account = TurnAccount(stats["cache_tokens"], stats["seen_tokens"], reused,
                              sum(m["role"] != "system" for m in chat.prior))
        events = engine.chat(sid, chat.message, **chat.sampling)
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return StreamingResponse(
                _sse(events, pool, engine, sid, account, chat, reply_id, model_name),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            final = await run_in_threadpool(_last_event, events)
        finally:
            pool.release(sid)
        if final.kind != "done":
            return _error_from_event(final.text).response()
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": final.text},
                "finish_reason": FINISH_REASONS.get(final.finish_reason, "stop"),
                "logprobs": None,
            }],
            "usage": account.usage(final.stats),
            "streaming_llm": account.extra(final.stats),
        }

    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    # Anything else under /v1 answers in OpenAI's error shape, not FastAPI's `{"detail": ...}`: clients read
    # `error.message`. Registered last, so it only sees what no route above took.
    known = {"/v1/models": "GET", "/v1/chat/completions": "POST"}

    async def not_found(request: Request, path: str):
        route = f"/v1/{path}"
        if route in known:
            return APIError(405, f"{request.method} is not allowed on {route}; use {known[route]}",
                            code="method_not_allowed").response()
        if route.startswith("/v1/models/"):
            return APIError(405, f"{request.method} is not allowed on {route}; use GET",
                            code="method_not_allowed").response()
        return APIError(404, f"Unknown endpoint {request.method} {route[:200]}; this server serves "
                             "GET /v1/models and POST /v1/chat/completions", code="unknown_url").response()

    app.add_api_route("/v1/{path:path}", not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    return pool


def _last_event(events: Iterator):
    final = None
    for event in events:
        final = event
    return final


async def _sse(events, pool: ConversationPool, engine: StreamingEngine, sid: str, account: TurnAccount,
               chat: ChatRequest, reply_id: str, model_name: str):
    """The reply as server-sent events: OpenAI's `chat.completion.chunk` objects, then `data: [DONE]`."""
    created = int(time.time())

    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            # One event at a time on a worker thread: the event loop stays free, and a client that goes away
            # cancels this generator, whose `finally` stops the turn.
            event = await run_in_threadpool(next, events, None)
            if event is None:
                break
            if event.kind == "delta":
                if event.text:
                    yield chunk({"content": event.text})
            elif event.kind == "done":
                finished = True
                yield chunk({}, FINISH_REASONS.get(event.finish_reason, "stop"))
                if chat.include_usage:
                    body = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                            "model": model_name, "choices": [], "usage": account.usage(event.stats),
                            "streaming_llm": account.extra(event.stats)}
                    yield f"data: {json.dumps(body)}\n\n"
                break
            else:
                finished = True
                yield f"data: {json.dumps(_error_from_event(event.text).body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            try:
                engine.stop(sid)
            except SessionNotFound:
                pass
        pool.release(sid)
