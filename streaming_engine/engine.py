"""`StreamingEngine`: many concurrent, unbounded chat sessions over one shared model.

The engine is the only thing the UI, the CLI and the benchmarks talk to. It validates input, creates and frees
sessions (`streaming`: attention sinks + recent window, the paper; `dense`: a growing cache that stops with
"context_full" at its limit; `window`: recent window without sinks, the baseline that collapses), and turns each
`chat()` call into a turn on the shared scheduler. It holds no threading code of its own (see `scheduler.py`) and
no model arithmetic (see `generation.py`).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Iterator

from .cache import StartRecentKVCache, enable_streaming_llm
from .sampling import SamplingParams
from .scheduler import SCHEDULERS, TurnHandle, make_scheduler
from .session import EXPORT_FORMAT, MODES, Event, Runtime, Session
from .templating import ChatTemplater

#: Longest accepted user message or system prompt, in characters (a 200,000-character paste must work).
MAX_MESSAGE_CHARS = 250_000
#: Largest accepted exported-history JSON, in bytes.
MAX_HISTORY_BYTES = 8 * 1024 * 1024
#: Most messages accepted in an exported history.
MAX_HISTORY_MESSAGES = 20_000
#: Sessions alive at once before `new_session` answers "busy".
MAX_SESSIONS = 64
#: Turns generating at once before `chat` answers "busy".
MAX_ACTIVE_TURNS = 16
#: A session untouched this long is closed (its cache freed).
IDLE_TIMEOUT_S = 3600.0
#: How long `reset`/`close` wait for a running turn to notice its stop flag.
STOP_WAIT_S = 30.0
#: Most conversations decoded together in one forward pass (rows of the batch); more wait for a free row.
MAX_BATCH = 16

_CONTROL = {c for c in range(32) if chr(c) not in "\n\t"} | {127}


class EngineBusy(RuntimeError):
    """A limit was reached (sessions or running turns); the message is safe to show to users."""


class SessionNotFound(KeyError):
    """The session id is unknown, closed or expired."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0]) if self.args else "unknown session"


@dataclass
class EngineConfig:
    """Engine-wide settings. Sampling fields are the defaults for every `chat` call."""

    start_size: int = 4
    recent_size: int = 2044
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    prefill_chunk_size: int = 512
    dense_max_tokens: int | None = None  # None: the model's maximum positions
    max_sessions: int = MAX_SESSIONS
    max_active_turns: int = MAX_ACTIVE_TURNS
    max_message_chars: int = MAX_MESSAGE_CHARS
    idle_timeout_s: float = IDLE_TIMEOUT_S
    scheduler: str = "batched"  # "batched": continuous batching; "round-robin": the one-per-pass baseline
    max_batch: int = MAX_BATCH

    def __post_init__(self):
        def positive_int(name, minimum=1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("start_size", 0)
        positive_int("recent_size")
        positive_int("prefill_chunk_size")
        positive_int("max_sessions")
        positive_int("max_active_turns")
        positive_int("max_message_chars")
        positive_int("max_batch")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {self.scheduler!r}")
        if self.dense_max_tokens is not None:
            positive_int("dense_max_tokens", 2)
        if self.recent_size <= self.prefill_chunk_size:
            raise ValueError(
                f"recent_size ({self.recent_size}) must exceed the largest prompt chunk "
                f"(prefill_chunk_size={self.prefill_chunk_size}), or a chunk would evict itself"
            )
        if not (isinstance(self.idle_timeout_s, (int, float)) and self.idle_timeout_s > 0):
            raise ValueError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s!r}")
        self.default_sampling()  # validates the sampling defaults

    @property
    def cache_size(self) -> int:
        return self.start_size + self.recent_size

    def default_sampling(self, **overrides) -> SamplingParams:
        values = dict(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**values)


def clean_text(text: str) -> str:
    """Drop control characters (tabs and newlines stay) and replace lone surrogates, which UTF-8 cannot carry."""
    return "".join(
        "\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text if ord(ch) not in _CONTROL
    )


class StreamingEngine:
    """Multi-session chat over one model. Thread-safe; generation runs on one worker thread."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        if self.max_positions is not None and self.config.cache_size > self.max_positions:
            raise ValueError(
                f"start_size + recent_size = {self.config.cache_size} exceeds the model's "
                f"{self.max_positions} positions"
            )
        self._template_cache = enable_streaming_llm(model, self.config.start_size, self.config.recent_size)
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.runtime = Runtime(model, tokenizer, ChatTemplater(tokenizer), eos_ids, model.device)
        # Prompt chunks per worker iteration are bounded by one chunk's worth of tokens, so a long paste in one
        # chat delays the others' next token by at most one chunk's forward pass.
        self.scheduler = make_scheduler(self.config.scheduler, model, max_batch=self.config.max_batch,
                                        prefill_budget=self.config.prefill_chunk_size)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    # --- sessions ----------------------------------------------------------------------------------------------

    def new_session(
        self,
        mode: str = "streaming",
        system_prompt: str | None = None,
        *,
        start_size: int | None = None,
        recent_size: int | None = None,
        max_context: int | None = None,
    ) -> str:
        """Create a conversation and return its id. Sizes default to the engine config (window: no sinks)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if system_prompt is not None:
            system_prompt = self._check_text(system_prompt, "system prompt", allow_empty=True) or None
        session = self._make_session(mode, system_prompt, start_size, recent_size, max_context)
        with self._lock:
            self._close_idle_locked()
            if len(self._sessions) >= self.config.max_sessions:
                raise EngineBusy(
                    f"Server busy: {len(self._sessions)} conversations are open (limit {self.config.max_sessions}). "
                    "Please try again in a few minutes."
                )
            self._sessions[session.id] = session
        return session.id

    def _make_session(self, mode, system_prompt, start_size, recent_size, max_context) -> Session:
        cfg = self.config
        start = (0 if mode == "window" else cfg.start_size) if start_size is None else start_size
        recent = cfg.recent_size if recent_size is None else recent_size
        for name, value, minimum in (("start_size", start, 0), ("recent_size", recent, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if mode == "window" and start != 0:
            raise ValueError("window mode keeps no attention sinks: start_size must be 0")
        limit = None
        if mode == "dense":
            limit = max_context or cfg.dense_max_tokens or self.max_positions or (start + recent)
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 2:
                raise ValueError(f"max_context must be an integer >= 2, got {limit!r}")
            if self.max_positions is not None and limit > self.max_positions:
                raise ValueError(f"max_context ({limit}) exceeds the model's {self.max_positions} positions")
            # Dense never evicts; a plain growing cache with counters, positions = stream positions.
            cache = StartRecentKVCache(0, limit, pos_shift=False)
            start, recent = 0, limit
        else:
            if self.max_positions is not None and start + recent > self.max_positions:
                raise ValueError(
                    f"start_size + recent_size = {start + recent} exceeds the model's {self.max_positions} positions"
                )
            cache = StartRecentKVCache(start, recent, rotary_emb=self._template_cache.rotary_emb)
        # A chunk must leave room in the window for itself; small windows get smaller chunks.
        chunk = max(1, min(cfg.prefill_chunk_size, recent // 2))
        return Session(
            uuid.uuid4().hex,
            mode,
            cache,
            system_prompt=system_prompt,
            start_size=start,
            recent_size=recent,
            context_limit=limit,
            chunk_size=chunk,
        )

    def _get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"unknown or expired session {session_id!r}; start a new chat")
        return session

    def session_ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def stats(self, session_id: str) -> dict:
        return self._get(session_id).stats()

    def history(self, session_id: str) -> list[dict]:
        session = self._get(session_id)
        system = [{"role": "system", "content": session.system_prompt}] if session.system_prompt else []
        return system + [dict(m) for m in session.history]

    def stop(self, session_id: str) -> None:
        """End the running turn within one decode step; its partial reply stays in history and cache."""
        handle = self._get(session_id).current
        if handle is not None:
            handle.stop()

    def _wait_idle(self, session: Session) -> None:
        handle = session.current
        if handle is not None:
            handle.stop()
            if not handle.finished.wait(STOP_WAIT_S):
                raise EngineBusy("the running reply did not stop in time; try again")

    def reset(self, session_id: str) -> None:
        """Forget the conversation (history, cache, counters); the session id stays valid."""
        session = self._get(session_id)
        self._wait_idle(session)
        with session.lock:
            session.clear()

    def rewind(self, session_id: str) -> str:
        """Drop the last user turn and its reply (for "retry"); returns that user message.

        The cache is rebuilt from the remaining history on the next turn, like a restored session.
        """
        session = self._get(session_id)
        self._wait_idle(session)
        with session.lock:
            return session.rewind()

    def close(self, session_id: str) -> None:
        """Stop and free the session. Closing an unknown id is a no-op (a tab may close twice)."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            handle = session.current
            if handle is not None:
                handle.stop()
                # The worker owns the cache until the turn ends (it may be a row of the shared batch right now).
                if not handle.finished.wait(STOP_WAIT_S):
                    return
            session.cache.reset()

    def close_idle(self) -> int:
        """Close sessions idle for longer than `idle_timeout_s`; returns how many."""
        with self._lock:
            return self._close_idle_locked()

    def _close_idle_locked(self) -> int:
        cutoff = time.monotonic() - self.config.idle_timeout_s
        stale = [
            sid
            for sid, s in self._sessions.items()
            if s.last_active < cutoff and (s.current is None or s.current.finished.is_set())
        ]
        for sid in stale:
            self._sessions.pop(sid).cache.reset()
        return len(stale)

    # --- chatting ----------------------------------------------------------------------------------------------

    def _check_text(self, text, what: str, allow_empty: bool = False) -> str:
        if not isinstance(text, str):
            raise ValueError(f"{what} must be text, got {type(text).__name__}")
        if len(text) > self.config.max_message_chars:
            raise ValueError(
                f"{what} is too long: {len(text):,} characters (limit {self.config.max_message_chars:,})"
            )
        text = clean_text(text)
        if not allow_empty and not text.strip():
            raise ValueError(f"{what} is empty: type something first")
        return text

    def chat(self, session_id: str, message: str, **sampling) -> Iterator[Event]:
        """Run one user turn; yields "delta" events and ends with one "done" or "error" event.

        Sampling keywords: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop.
        Problems the user can fix (empty message, bad setting, busy server) come back as an "error" event.
        """
        try:
            session = self._get(session_id)
            message = self._check_text(message, "message")
            unknown = set(sampling) - {f for f in SamplingParams.__dataclass_fields__}
            if unknown:
                raise ValueError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
            params = self.config.default_sampling(**sampling)
        except (ValueError, TypeError, SessionNotFound) as exc:
            yield Event("error", str(exc), {}, "error")
            return
        with session.lock:
            if session.current is not None and not session.current.finished.is_set():
                yield Event("error", "A reply is still being written in this chat; stop it or wait.", session.stats(), "error")
                return
            if self.scheduler.active_turns >= self.config.max_active_turns:
                yield Event("error", "Server busy: too many replies are being written right now. Try again shortly.",
                            session.stats(), "error")
                return
            handle = TurnHandle(
                on_crash=lambda exc: Event("error", f"Generation failed ({type(exc).__name__}).", {}, "error")
            )
            handle.steps = session.turn(self.runtime, message, params, handle.stop_event)
            session.current = handle
            self.scheduler.submit(handle)
        yield from self.scheduler.read(handle)

    # --- export / restore --------------------------------------------------------------------------------------

    def export(self, session_id: str) -> str:
        """The conversation as JSON (format `streaming-llm-chat`), for download and `restore`."""
        return json.dumps(self._get(session_id).export(), ensure_ascii=False, indent=2)

    def restore(self, exported: str | bytes, mode: str | None = None) -> str:
        """Open a new session holding an exported history; its cache is rebuilt (sinks + the tail that fits)
        on the first turn. Raises `ValueError` with a clear message on a corrupt or oversized file."""
        if isinstance(exported, bytes):
            if len(exported) > MAX_HISTORY_BYTES:
                raise ValueError(f"history file is too large (limit {MAX_HISTORY_BYTES // (1024 * 1024)} MiB)")
            try:
                exported = exported.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError("history file is not UTF-8 text") from exc
        if not isinstance(exported, str) or len(exported.encode("utf-8", "surrogatepass")) > MAX_HISTORY_BYTES:
            raise ValueError(f"history must be JSON text of at most {MAX_HISTORY_BYTES // (1024 * 1024)} MiB")
        try:
            data = json.loads(exported)
        except json.JSONDecodeError as exc:
            raise ValueError(f"history file is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise ValueError(f"not a chat history exported by this app (expected format {EXPORT_FORMAT!r})")
        messages = data.get("messages")
        if not isinstance(messages, list) or len(messages) > MAX_HISTORY_MESSAGES:
            raise ValueError(f"history 'messages' must be a list of at most {MAX_HISTORY_MESSAGES} messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"history message {i} must be {{'role': 'user'|'assistant', 'content': text}}")
            clean.append({"role": m["role"], "content": self._check_text(m["content"], f"message {i}", allow_empty=True)})
        mode = mode or data.get("mode") or "streaming"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        system_prompt = data.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError("history 'system_prompt' must be text or null")
        session_id = self.new_session(mode, system_prompt)
        self._get(session_id).load_history(clean)
        return session_id

    def config_dict(self) -> dict:
        return asdict(self.config)
