"""OpenAI-compatible chat API over the engine: `POST /v1/chat/completions` and `GET /v1/models`.

`mount(app, engine, model_name=..., auth=...)` adds the routes to a FastAPI app: the app's own Gradio server
(`demo.app`, see `app.py`) or any FastAPI app a deployment builds around `gr.mount_gradio_app`. Requests pass the
app's login (`http_auth.py`) and the engine's limits (message sizes, sampling ranges, sessions, replies at once);
problems come back as OpenAI-style error objects (`{"error": {"message", "type", "param", "code"}}`).

Stateless clients send the whole conversation with every request. The one thing a StreamingLLM server can do
that others cannot is to keep *all* of those conversations going in bounded memory, so `ConversationPool` looks
for the live session whose conversation is exactly the request minus its last user message
(`stateless.find_conversation`) and continues it on its cache as it stands: only the new user turn is encoded, however
long the history. A request that extends no live conversation opens a new session, primed from the attention
sinks and the tail of the history that fits (`stateless.open_conversation`). The pool keeps at most
`MAX_API_SESSIONS` of them, closing the least recently used, so API traffic cannot crowd out browser tabs.

Usage counts: `prompt_tokens` is what the reply was conditioned on this turn, split as OpenAI does into
`prompt_tokens_details.cached_tokens` (tokens reused from the live cache) and the rest (encoded for this request);
`completion_tokens` is the reply. The non-standard `streaming_llm` object says whether a session was reused or
re-primed from the history (a regenerate or an edit is never continued silently), how many of the sent messages
the cache no longer holds whole, and what the cache holds. docs/openai-api.md is the reference.

Numbers: a JSON int where a float belongs (`"temperature": 1`) is accepted and used as a float, an integer-valued
float where an int belongs (`"max_tokens": 4.0`) as an int; `true`/`false` are never numbers. The one conversion
is `SamplingParams`'; the request keeps its checked values. An unknown `model` is a 404 `model_not_found`, and
every other problem under /v1 (unknown path, wrong method) answers in OpenAI's error shape too.

Routing glue only: every model decision is the engine's.
"""

from __future__ import annotations

import asyncio
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
from streaming_engine.admission import MAX_TURNS_PER_CLIENT, FairGate, GateFull
from streaming_engine.engine import refusal
from streaming_engine.history import MAX_HISTORY_BYTES
from streaming_engine.sampling import SamplingParams
from streaming_engine.stateless import find_conversation, open_conversation
from streaming_engine.validate import MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_OWNER_CHARS, check_int, check_text, parse_json

from .http_auth import credentials_ok

#: Sessions the API keeps alive at once (least recently used closed first); the engine allows 64 in all.
MAX_API_SESSIONS = 16
#: Pooled sessions one API client may hold: its least recently used one is closed for its next new conversation,
#: so a client can never push other clients' conversations out of the pool.
MAX_API_SESSIONS_PER_CLIENT = 4
#: Replies (decode rows) one API client may have running at once; more of its requests wait in the fair queue.
MAX_API_TURNS_PER_CLIENT = MAX_TURNS_PER_CLIENT
#: Reply slots kept free of API traffic for browser tabs (the API gets the engine's `max_active_turns` minus these).
BROWSER_RESERVED_TURNS = 4
#: Requests one client may have waiting for a slot; more are refused at once (429) instead of piling up.
MAX_API_WAITING_PER_CLIENT = 8
#: How long a request waits in the fair queue before it is answered 429.
API_QUEUE_WAIT_S = 60.0
#: How often a non-streamed request checks whether its client is still connected (then its turn is stopped).
DISCONNECT_POLL_S = 0.25
#: Largest request body accepted, in bytes (the size of an exported history).
MAX_BODY_BYTES = MAX_HISTORY_BYTES
#: Prefix of the `owner` tag of the engine sessions this API opens: one owner per client (see `client_of`), so a
#: request only ever continues its own client's conversations.
OWNER = "openai"
#: Request fields understood here; OpenAI rejects unknown fields too, rather than silently ignoring them.
KNOWN_FIELDS = {
    "model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "stream",
    "stream_options", "n", "user", "presence_penalty", "frequency_penalty", "logprobs", "top_k",
    "repetition_penalty", "recall_budget", "continue_final_message",
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


def client_of(request: Request, auth: tuple[str, str] | None) -> str:
    """Who a request counts against: the client address (behind a trusted proxy, the one it forwards), with the
    login user when `--auth` is on. Every client of one shared login is its own client, so a login is not one
    slot for a whole deployment, and a client cannot pick a name to get more share."""
    host = getattr(request.client, "host", None) or "unknown"
    user = f"{auth[0]}@" if auth else ""
    return f"{OWNER}:{user}{host}"[:MAX_OWNER_CHARS]


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
    the engine's sampling keywords. Raises `APIError` (400) naming the parameter on bad input.

    With `continue_final_message` (vLLM's name for it) the last message is an assistant reply to go on with
    (`StreamingEngine.continue_reply`): `prior` is then the whole conversation and `message` None."""

    body: dict
    default_max_tokens: int
    prior: list[dict] = field(init=False)
    message: str | None = field(init=False)
    continue_final: bool = field(init=False)
    sampling: dict = field(init=False)
    stream: bool = field(init=False)
    include_usage: bool = field(init=False)
    #: Tokens this turn may quote back from evicted messages (an extension; 0 = off); None: the session's default.
    recall_budget: int | None = field(init=False)

    def __post_init__(self):
        body = self.body
        unknown = sorted(set(body) - KNOWN_FIELDS)
        if unknown:
            raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise APIError(400, "you must provide a model parameter", param="model")
        self.continue_final = self._flag("continue_final_message")
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
        self.recall_budget = body.get("recall_budget")
        if self.recall_budget is not None:
            try:  # its upper bound is the session's window, checked when it is applied (`set_recall_budget`)
                self.recall_budget = check_int("recall_budget", self.recall_budget, 0)
            except ValueError as exc:
                raise APIError(400, str(exc), param="recall_budget") from None

    def _flag(self, name: str) -> bool:
        value = self.body.get(name, False)
        if not isinstance(value, bool) and value is not None:
            raise APIError(400, f"{name} must be a boolean", param=name)
        return bool(value)

    def _parse_messages(self, messages) -> None:
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        if len(messages) > MAX_MESSAGES:  # checked here, before any rendering or engine work
            raise APIError(400, f"messages holds {len(messages):,} messages (limit {MAX_MESSAGES:,})",
                           param="messages", code="too_many_messages")
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
        wanted = "assistant" if self.continue_final else "user"
        if parsed[-1]["role"] != wanted:
            raise APIError(400, "with continue_final_message the last message must be the assistant's reply to go on "
                           "with" if self.continue_final else "the last message must come from the user",
                           param="messages")
        try:  # an empty or over-long new message is the caller's mistake (400), refused before a session is used
            check_text(parsed[-1]["content"], "the last message's content", MAX_MESSAGE_CHARS)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_message") from None
        if self.continue_final:
            self.prior, self.message = parsed, None
        else:
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

    def __init__(self, engine: StreamingEngine, limit: int = MAX_API_SESSIONS,
                 per_client: int = MAX_API_SESSIONS_PER_CLIENT):
        self.engine, self.limit, self.per_client = engine, limit, per_client
        self._lock = threading.Lock()
        self._claimed: set[str] = set()
        self._recent: OrderedDict[str, str] = OrderedDict()  # session id -> client, least recently used first

    def acquire(self, prior: list[dict], client: str = OWNER, last_reply_open: bool = False) -> tuple[str, bool]:
        """`(session_id, reused)` for `client`'s conversation whose messages so far are `prior`. Only the same
        client's sessions are continued: an identical history from another client opens its own session.
        `last_reply_open`: `prior` ends with a reply to continue, so a live session counts only if its reply is
        still open, and a new one is opened with it open (re-encoded up to the reply's last token)."""
        with self._lock:
            live = set(self.engine.session_ids())
            for sid in [s for s in self._recent if s not in live]:  # closed by the engine (idle) meanwhile
                del self._recent[sid]
            sid = find_conversation(self.engine, prior, client, exclude=self._claimed)
            if sid is not None and last_reply_open and not self.engine.session(sid).open_reply:
                sid = None  # its reply ended: a session rebuilt with the reply left open can go on with it
            reused = sid is not None
            if not reused:
                self._make_room(client)
                sid = open_conversation(self.engine, prior, client, last_reply_open=last_reply_open)
            self._claimed.add(sid)
            self._recent[sid] = client
            self._recent.move_to_end(sid)
            return sid, reused

    def _make_room(self, client: str) -> None:
        """Close one unclaimed session if `client` is at its own cap (its own oldest) or the pool is full (the
        oldest of whoever holds the most), so a client only ever displaces its own or a bigger holder's."""
        held = [sid for sid, c in self._recent.items() if c == client]
        if len(held) >= self.per_client:
            victims = held
        elif len(self._recent) >= self.limit:
            counts: dict[str, int] = {}
            for c in self._recent.values():
                counts[c] = counts.get(c, 0) + 1
            biggest = max(counts.values())
            victims = [sid for sid, c in self._recent.items() if counts[c] == biggest]
        else:
            return
        for sid in victims:
            if sid not in self._claimed:
                self.engine.close(sid)
                del self._recent[sid]
                return

    def held_by(self, client: str) -> int:
        with self._lock:
            return sum(1 for c in self._recent.values() if c == client)

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
            # Recall (streaming_engine/recall.py): tokens of evicted messages quoted into this turn's prompt (part
            # of prefill_tokens), and which of the request's messages they came from (indices into `messages`).
            "recalled_tokens": int(stats.get("recalled_tokens") or 0),
            "recalled_messages": list(stats.get("recalled_messages") or []),
        }


def _error_from_event(event) -> APIError:
    """The HTTP error for a turn's "error" event, by its `Event.code`: busy (the server's cap, or this chat still
    replying) is 429, a refused message 400, a failure 500."""
    text, code = event.text, getattr(event, "code", None)
    if code in ("busy", "running"):
        return APIError(429, text, "server_busy", code="server_busy")
    if code == "invalid":
        return APIError(400, text, param="messages", code="invalid_message")
    return APIError(500, text, "server_error")


def mount(app: FastAPI, engine: StreamingEngine, *, model_name: str, auth: tuple[str, str] | None = None,
          max_sessions: int = MAX_API_SESSIONS, default_max_tokens: int | None = None) -> ConversationPool:
    """Add `/v1/chat/completions` and `/v1/models` to `app`; returns the pool of API sessions."""
    pool = ConversationPool(engine, max_sessions)
    gate = FairGate(max(1, engine.config.max_active_turns - BROWSER_RESERVED_TURNS), MAX_API_TURNS_PER_CLIENT,
                    MAX_API_WAITING_PER_CLIENT, API_QUEUE_WAIT_S)
    pool.gate = gate  # for /health-style reports and tests
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
        try:  # parse_json: a nesting bomb is a 400 "nested too deep", not a RecursionError (500)
            body = parse_json(raw.decode("utf-8"), "the request body")
        except UnicodeDecodeError as exc:
            raise APIError(400, f"the request body is not UTF-8 ({exc.reason})") from exc
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
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
            client = client_of(request, auth)
            try:  # the fair queue: this client's requests beyond its share wait; others' are not held up
                await gate.enter(client)
            except GateFull as exc:
                raise APIError(429, str(exc), "server_busy", code=exc.code) from exc
        except APIError as exc:
            return exc.response()
        sid = None
        try:
            try:
                sid, reused = await run_in_threadpool(pool.acquire, chat.prior, client, chat.continue_final)
                stats = engine.stats(sid)
            except EngineBusy as exc:
                raise APIError(429, str(exc), "server_busy", code="server_busy") from exc
            except SessionNotFound as exc:  # closed between acquire and here (a reset from elsewhere)
                raise APIError(503, "the conversation was closed meanwhile; retry", "server_error") from exc
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages") from exc
            if chat.recall_budget and not engine.recall_budget_for(stats["mode"], stats["recent_size"]):
                # The deployment turned recall off (`--recall-budget 0`): a client may not turn it back on.
                raise APIError(400, "recall is off on this server: recall_budget may only be 0",
                               param="recall_budget", code="recall_off")
            try:  # per request: a pooled session that an earlier request turned off goes back to its default
                engine.set_recall_budget(sid, chat.recall_budget)
            except ValueError as exc:
                raise APIError(400, str(exc), param="recall_budget") from exc
            account = TurnAccount(stats["cache_tokens"], stats["seen_tokens"], reused,
                                  sum(m["role"] != "system" for m in chat.prior))
            # Submitted now, so a refusal (busy, bad message) is an HTTP status even for a streamed request. A
            # continuation answers with the new text only, as vLLM does: the client has the reply so far.
            held, events = await run_in_threadpool(_submit_turn, engine, sid, chat)
            refused = refusal(events)
            if refused is not None:
                raise _error_from_event(refused)
        except BaseException as exc:  # any failure before the reply starts gives back the claim and the slot
            if sid is not None:
                pool.release(sid)
            gate.leave(client)
            if isinstance(exc, APIError):
                return exc.response()
            raise
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return StreamingResponse(
                _sse(events, pool, engine, sid, account, chat, reply_id, model_name, lambda: gate.leave(client)),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            final = await _last_event_unless_gone(request, engine, sid, events)
        finally:
            pool.release(sid)
            gate.leave(client)
        if final is None:  # the client went away; its turn was stopped, nobody is left to answer
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        if final.kind != "done":
            return _error_from_event(final).response()
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": final.text[len(held):]},
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


def _submit_turn(engine: StreamingEngine, sid: str, chat: ChatRequest) -> tuple[str, Iterator]:
    """Submit the request's turn: (the reply's text so far, which a continuation's answer leaves out; its events).
    Run on a worker thread: reading the history copies it, and submitting renders and encodes."""
    if chat.continue_final:
        return engine.history(sid)[-1]["content"], engine.continue_reply(sid, **chat.sampling)
    return "", engine.start_chat(sid, chat.message, **chat.sampling)


def _last_event(events: Iterator):
    final = None
    for event in events:
        final = event
    return final


async def _last_event_unless_gone(request: Request, engine: StreamingEngine, sid: str, events: Iterator):
    """The turn's last event, read on a worker thread; None when the client disconnected first, in which case the
    turn is stopped (within one decode step) and waited for: a `curl -m 1` must not hold a reply slot for minutes."""
    reader = asyncio.ensure_future(run_in_threadpool(_last_event, events))
    while True:
        done, _ = await asyncio.wait({reader}, timeout=DISCONNECT_POLL_S)
        if done:
            return reader.result()
        if await request.is_disconnected():
            try:
                engine.stop(sid)
            except SessionNotFound:
                pass
            await reader  # the stopped turn ends promptly; its slot is freed by the caller after this
            return None


async def _sse(events, pool: ConversationPool, engine: StreamingEngine, sid: str, account: TurnAccount,
               chat: ChatRequest, reply_id: str, model_name: str, leave):
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
                yield f"data: {json.dumps(_error_from_event(event).body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            try:
                engine.stop(sid)
            except SessionNotFound:
                pass
        pool.release(sid)
        leave()  # the client's reply slot in the fair queue
