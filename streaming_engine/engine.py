"""`StreamingEngine`: many concurrent, unbounded chat sessions over one shared model.

The engine is the only thing the UI, the CLI and the benchmarks talk to. It validates input, creates and frees
sessions (`streaming`: attention sinks + recent window, the paper; `dense`: a growing cache that stops with
"context_full" at its limit; `window`: recent window without sinks, the baseline that collapses), and turns each
`chat()` call into a turn on the shared scheduler (`chat_many()` sends one message to several sessions at once).
It holds no threading code of its own (see `scheduler.py`), no model arithmetic (see `generation.py`), and keeps
only what it alone can do (sessions, admission, chat, stop, close, caps): history files (`history.py`:
`export_history`, `restore_history`), stateless clients' conversations (`stateless.py`) and the ZeroGPU state
handoff (`handoff.py`) are functions over this engine, next to what they serve.

Fairness: every session may carry an opaque `owner` (the UI passes the client address, or the login user) and an
`origin` ("browser" or "api"). One owner can hold at most `max_sessions_per_owner` sessions, far below the global
`max_sessions`, so a single client can never lock everyone else out; API sessions, which nobody closes for the
caller, are reaped after the shorter `api_idle_timeout_s`. Persistence is not the engine's business: see
`conversations.py` (live sessions bound to stored conversations) and `store.py` (the database).
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .backends.factory import backend_for
from .cache import DEFAULT_RECENT_SIZE, DEFAULT_START_SIZE
from .counters import EngineCounters
from .cuda_graphs import StaticStepConfig
from .eviction import EVICTION_POLICIES, block_for, check_evict_block, check_policy
from .families import check_cache_size, check_supported
from .history import export_history, restore_history
from .recall import check_budget, default_budget
from .sampling import SamplingDefaults, SamplingParams
from .scheduler import SCHEDULERS, TurnHandle
from .session import BUSY_REFUSAL, MODES, RUNNING_REFUSAL, Event, Runtime, Session, SessionView, refused
from .templating import ChatTemplater
from .validate import (  # noqa: F401  (MAX_MESSAGE_CHARS, MAX_OWNER_CHARS, clean_text: re-exported)
    MAX_MESSAGE_CHARS,
    MAX_OWNER_CHARS,
    SESSION_ID_MAX_CHARS,
    check_bool,
    check_choice,
    check_int,
    check_messages,
    check_number,
    check_owner,
    check_recall_records,
    check_text,
    clean_text,
    preview,
)

#: Most prompt tokens fed in one forward pass: bounds a prefill step's memory and how long it holds the worker.
MAX_PREFILL_CHUNK = 512
#: A session untouched this long is closed (its cache freed).
IDLE_TIMEOUT_S = 3600.0
#: An API session untouched this long is closed: scripts that forget `/close_session` must not hold a slot for an
#: hour. Long enough for a script that thinks between calls.
API_IDLE_TIMEOUT_S = 300.0
#: Where a session comes from: "browser" sessions are closed by their tab (or after `IDLE_TIMEOUT_S`); "api"
#: sessions after `API_IDLE_TIMEOUT_S`.
ORIGINS = ("browser", "api")
#: How long `reset`/`close` wait for a running turn to notice its stop flag.
STOP_WAIT_S = 30.0
#: Most conversations decoded together in one forward pass (rows of the batch); more wait for a free row.
MAX_BATCH = 16
# Session caps, the pin limit and the default eviction policy live in `defaults.py` (torch-free, for --help).
from .defaults import (  # noqa: E402,F401  (re-exported)
    DECODE_STEPS,
    DEFAULT_CUDA_GRAPHS,
    DEFAULT_DECODE_STEP,
    DEFAULT_EVICTION,
    DEFAULT_OVERLAP,
    DEFAULT_PIN_LIMIT,
    MAX_ACTIVE_TURNS,
    MAX_SESSIONS,
    MAX_SESSIONS_PER_OWNER,
    OVERLAP_MODES,
)


class EngineBusy(RuntimeError):
    """A limit was reached (sessions or running turns); the message is safe to show to users."""


class PinTooLong(ValueError):
    """A system prompt too long to pin (over `pin_limit`); the message names the limit."""


class SessionNotFound(KeyError):
    """The session id is unknown, closed or expired."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0]) if self.args else "unknown session"


@dataclass(frozen=True)
class SessionTag:
    """Who holds a session: an opaque `owner` (None: not counted against a per-owner cap) and its `origin`."""

    owner: str | None = None
    origin: str = "browser"

    @classmethod
    def checked(cls, owner, origin) -> "SessionTag":
        check_owner(owner)
        check_choice("origin", origin, ORIGINS)
        return cls(owner, origin)


@dataclass(kw_only=True)
class EngineConfig(SamplingDefaults):
    """Engine-wide settings. The sampling fields (inherited from `SamplingDefaults`: max_new_tokens,
    temperature, top_p, top_k, repetition_penalty) are the defaults for every `chat` call.

    `prefill_chunk_size=None` (the default) derives the chunk from the window with `prefill_chunk_for`; after
    construction the field always holds the chunk size in use. `evict_block=None` likewise becomes
    `eviction.DEFAULT_EVICT_BLOCK`, or the whole recent window when that is shorter; a session with a smaller
    window than the engine's evicts in blocks of at most its window.
    """

    start_size: int = DEFAULT_START_SIZE
    recent_size: int = DEFAULT_RECENT_SIZE
    prefill_chunk_size: int | None = None
    dense_max_tokens: int | None = None  # None: the model's maximum positions
    max_sessions: int = MAX_SESSIONS
    max_sessions_per_owner: int = MAX_SESSIONS_PER_OWNER
    max_active_turns: int = MAX_ACTIVE_TURNS
    max_message_chars: int = MAX_MESSAGE_CHARS
    idle_timeout_s: float = IDLE_TIMEOUT_S
    api_idle_timeout_s: float = API_IDLE_TIMEOUT_S
    scheduler: str = "batched"  # "batched": continuous batching; "round-robin": the one-per-pass baseline
    max_batch: int = MAX_BATCH
    # The batched decode: "auto" (the static step on CUDA, eager on CPU and MPS), "static" or "eager" (gpu-decode.md)
    decode_step: str = DEFAULT_DECODE_STEP
    cuda_graphs: str = DEFAULT_CUDA_GRAPHS  # the static step's CUDA graphs: "auto" (on CUDA), "on" (or an error), "off"
    overlap: str = DEFAULT_OVERLAP  # the static step launched one step ahead: "auto" (on CUDA), "on", "off" (overlap.py)
    pin_system: bool = True  # streaming sessions keep their system prompt with the sinks (never evicted)
    pin_limit: int = DEFAULT_PIN_LIMIT  # most tokens a pinned system prompt may take; a longer one is refused
    eviction: str = DEFAULT_EVICTION  # "tokens" (the paper) or "turns" (whole past messages)
    evict_block: int | None = None  # fewest tokens one eviction takes; None: eviction.block_for(recent_size)
    # Most tokens of evicted messages recalled into one turn (recall.py); None: recall.default_budget of the
    # session's window for streaming sessions (others: off); 0: off.
    recall_budget: int | None = None

    def __post_init__(self):
        check_int("start_size", self.start_size, 0)
        check_int("recent_size", self.recent_size, 1)
        if self.prefill_chunk_size is None:
            self.prefill_chunk_size = prefill_chunk_for(self.recent_size)
        check_int("prefill_chunk_size", self.prefill_chunk_size, 1)
        for name in ("max_sessions", "max_sessions_per_owner", "max_active_turns", "max_message_chars",
                     "max_batch"):
            check_int(name, getattr(self, name), 1)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_choice("decode_step", self.decode_step, DECODE_STEPS)
        StaticStepConfig(cuda_graphs=self.cuda_graphs)  # its one check: the mode, and "on" needs CUDA
        check_choice("overlap", self.overlap, OVERLAP_MODES)
        if self.dense_max_tokens is not None:
            check_int("dense_max_tokens", self.dense_max_tokens, 2)
        if self.recent_size <= self.prefill_chunk_size:
            raise ValueError(
                f"recent_size ({self.recent_size}) must exceed the largest prompt chunk "
                f"(prefill_chunk_size={self.prefill_chunk_size}), or a chunk would evict itself"
            )
        check_bool("pin_system", self.pin_system)
        check_int("pin_limit", self.pin_limit, 1)
        check_policy(self.eviction)
        if self.evict_block is None:
            self.evict_block = block_for(self.recent_size)
        check_evict_block(self.evict_block, self.recent_size)
        if self.recall_budget is not None:
            check_budget(self.recall_budget, self.recent_size)
        self.idle_timeout_s = check_number("idle_timeout_s", self.idle_timeout_s, 0, low_open=True)
        self.api_idle_timeout_s = check_number("api_idle_timeout_s", self.api_idle_timeout_s, 0, low_open=True)
        # Validates the sampling defaults and keeps them as SamplingParams made them (`temperature=1` -> 1.0).
        checked = self.default_sampling()
        for name in self.sampling_defaults():
            setattr(self, name, getattr(checked, name))

    @property
    def cache_size(self) -> int:
        return self.start_size + self.recent_size

    def default_sampling(self, **overrides) -> SamplingParams:
        values = self.sampling_defaults()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**values)


def prefill_chunk_for(recent_size: int, ceiling: int = MAX_PREFILL_CHUNK) -> int:
    """The prompt chunk for a recent window of `recent_size` tokens: at most `ceiling`, and at most half the
    window, so a chunk always leaves room in the window for itself and the tokens just before it."""
    return max(1, min(ceiling, recent_size // 2))


class StreamingEngine:
    """Multi-session chat over one model. Thread-safe; generation runs on one worker thread."""

    #: Whether `continue_reply` can run here (a page shows its Continue button only then).
    continues_replies = True

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        # What runs the model (see backends/base.py): its caches, forward passes and worker policy come from the
        # backend; sessions, admission, turns and counters are the same on every backend.
        self.backend = backend_for(model, self.config)
        self.max_positions = self.backend.max_positions
        if self.max_positions is not None and self.config.cache_size > self.max_positions:
            raise ValueError(
                f"start_size + recent_size = {self.config.cache_size} exceeds the model's "
                f"{self.max_positions} positions"
            )
        check_supported(model.config)
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.runtime = Runtime(model, tokenizer, ChatTemplater(tokenizer), eos_ids, self.backend.input_device)
        # Prompt chunks per worker iteration are bounded by one chunk's worth of tokens, so a long paste in one
        # chat delays the others' next token by at most one chunk's forward pass.
        self.scheduler = self.backend.make_scheduler(self.config.scheduler, max_batch=self.config.max_batch,
                                                     prefill_budget=self.config.prefill_chunk_size,
                                                     decode_step=self.config.decode_step,
                                                     cuda_graphs=self.config.cuda_graphs,
                                                     overlap=self.config.overlap)
        self.counters = EngineCounters()  # process-wide totals for monitoring
        self._sessions: dict[str, Session] = {}
        self._tags: dict[str, SessionTag] = {}  # session id -> who holds it (same keys as `_sessions`)
        self._lock = threading.Lock()
        #: The time idleness is judged at, and new sessions stamp their activity with (monotonic seconds): a test
        #: moves it on instead of sleeping.
        self.clock = time.monotonic

    @property
    def decode_path(self) -> str:
        """Which decode path runs (`scheduler.DECODE_PATHS`): "eager", "static" or "static+graphs", with
        "+overlap" when the static step launches one step ahead."""
        return self.scheduler.decode_path

    # --- sessions ----------------------------------------------------------------------------------------------

    def new_session(
        self,
        mode: str = "streaming",
        system_prompt: str | None = None,
        *,
        start_size: int | None = None,
        recent_size: int | None = None,
        max_context: int | None = None,
        owner: str | None = None,
        origin: str = "browser",
        pin_system: bool | None = None,
        eviction: str | None = None,
        recall_budget: int | None = None,
    ) -> str:
        """Create a conversation and return its id. Sizes, `pin_system`, `eviction` and `recall_budget` default to
        the engine config (window: no sinks, nothing pinned, no recall; dense: nothing evicted).

        A pinned system prompt longer than `pin_limit` tokens (or than the cache can spare) is refused with a
        `ValueError` naming the limit: the session would otherwise silently lose the instructions it was given.

        `owner` (opaque: a client address or login user; None = not counted) may hold at most
        `max_sessions_per_owner` sessions; `origin` ("browser" or "api") picks the idle timeout.
        Raises `EngineBusy` (message safe to show) at either cap, `ValueError` on bad arguments.
        """
        check_choice("mode", mode, MODES)
        tag = SessionTag.checked(owner, origin)
        if system_prompt is not None:
            system_prompt = self._check_text(system_prompt, "system prompt", allow_empty=True) or None
        session = self._make_session(mode, system_prompt, start_size, recent_size, max_context,
                                     self.config.pin_system if pin_system is None else pin_system,
                                     self.config.eviction if eviction is None else eviction, recall_budget)
        with self._lock:
            self._close_idle_locked()
            cap = self.config.max_sessions_per_owner
            if tag.owner is not None and (held := self._held_by_locked(tag.owner)) >= cap:
                raise EngineBusy(
                    f"You have {held} conversations open (limit {cap} per user). Close another tab or chat, "
                    "or wait a few minutes for an idle one to be closed."
                )
            if len(self._sessions) >= self.config.max_sessions:
                raise EngineBusy(
                    f"Server busy: {len(self._sessions)} conversations are open (limit {self.config.max_sessions}). "
                    "Please try again in a few minutes."
                )
            self._sessions[session.id] = session
            self._tags[session.id] = tag
        return session.id

    def _new_session_pinned_if_possible(self, mode, system_prompt, **kwargs) -> str:
        """A session for a conversation that already exists (a restored file, an API request): a system prompt
        too long to pin is kept unpinned rather than refused, so the conversation stays openable."""
        try:
            return self.new_session(mode, system_prompt, **kwargs)
        except PinTooLong:
            return self.new_session(mode, system_prompt, pin_system=False, **kwargs)

    def _held_by_locked(self, owner: str) -> int:
        return sum(1 for tag in self._tags.values() if tag.owner == owner)

    def open_sessions(self, owner: str | None = None) -> int:
        """How many sessions are open (all of them, or those of `owner`)."""
        with self._lock:
            return len(self._sessions) if owner is None else self._held_by_locked(owner)

    def _make_session(self, mode, system_prompt, start_size, recent_size, max_context, pin_system,
                      eviction, recall_budget=None) -> Session:
        cfg = self.config
        check_policy(eviction)
        check_bool("pin_system", pin_system)
        start = check_int("start_size", (0 if mode == "window" else cfg.start_size) if start_size is None
                          else start_size, 0)
        recent = check_int("recent_size", cfg.recent_size if recent_size is None else recent_size, 1)
        if mode == "window" and start != 0:
            raise ValueError("window mode keeps no attention sinks: start_size must be 0")
        limit = None
        if mode == "dense":
            limit = check_int("max_context", max_context or cfg.dense_max_tokens or self.max_positions
                              or (start + recent), 2)
            if self.max_positions is not None and limit > self.max_positions:
                raise ValueError(f"max_context ({limit}) exceeds the model's {self.max_positions} positions")
            # Dense never evicts; a plain growing cache with counters, positions = stream positions.
            cache = self._new_cache(0, limit, pos_shift=False)
            start, recent = 0, limit
        else:
            if self.max_positions is not None and start + recent > self.max_positions:
                raise ValueError(
                    f"start_size + recent_size = {start + recent} exceeds the model's {self.max_positions} positions"
                )
            check_cache_size(self.model.config, start + recent)
            cache = self._new_cache(start, recent, eviction=eviction)
        # A session's window may be smaller than the engine's: its chunk follows the same rule, capped by the config.
        chunk = prefill_chunk_for(recent, cfg.prefill_chunk_size)
        pin_system = pin_system and mode == "streaming" and system_prompt is not None
        if pin_system:
            self._check_pin(system_prompt, start + recent, chunk)
        return Session(
            uuid.uuid4().hex,
            mode,
            cache,
            system_prompt=system_prompt,
            start_size=start,
            recent_size=recent,
            context_limit=limit,
            chunk_size=chunk,
            pin_system=pin_system,
            recall_budget=check_budget(self.recall_budget_for(mode, recent) if recall_budget is None
                                       else recall_budget, recent),
            clock=self.clock,  # a plain function (a session is pickled for the ZeroGPU handoff)
        )

    def recall_budget_for(self, mode: str, recent_size: int) -> int:
        """The recall budget a new session of `mode` with a window of `recent_size` gets by default: the config's
        `recall_budget`, or `recall.default_budget` of the window for streaming (other modes: 0, so the comparison
        tab compares caches, not recall)."""
        if mode != "streaming":
            return 0
        budget = self.config.recall_budget
        return default_budget(recent_size) if budget is None else min(budget, recent_size - 1)

    def set_recall_budget(self, session_id: str, budget: int | None) -> int:
        """Turn a conversation's recall off (0), on at `budget` tokens, or back to its default (None); applies
        from its next turn. Returns the budget now in force. The per-conversation switch of the Chat tab."""
        session = self._get(session_id)
        if budget is None:
            budget = self.recall_budget_for(session.mode, session.recent_size)
        budget = check_budget(budget, session.recent_size)
        with session.lock:
            session.recall_budget = budget
        return budget

    def _new_cache(self, start: int, recent: int, pos_shift: bool = True, eviction: str = DEFAULT_EVICTION):
        """An empty cache for one conversation on this engine's backend (the session pins its system prompt on
        it later, `Session.pin`; `eviction` and the config's `evict_block` are the policy of `eviction.py`, the same
        on every backend)."""
        block = block_for(recent, self.config.evict_block)
        return self.backend.new_cache(start, recent, pos_shift=pos_shift, eviction=eviction, evict_block=block)

    def system_tokens(self, system_prompt: str) -> int:
        """Tokens of the chat template's whole rendering of `system_prompt`: what pinning it keeps."""
        templater = self.runtime.templater
        return len(templater.encode(templater.system_text(system_prompt)))

    def _check_pin(self, system_prompt: str, cache_size: int, chunk: int) -> None:
        """Refuse a system prompt too long to pin: over `pin_limit`, or leaving the window no room for a prompt
        chunk next to the head (a chunk that does not fit would evict itself)."""
        tokens = self.system_tokens(system_prompt)
        limit = min(self.config.pin_limit, cache_size - chunk - 1)
        if tokens > limit:
            because = (f"the pin limit (pin_limit={self.config.pin_limit})" if limit == self.config.pin_limit else
                       f"what this {cache_size}-token cache can spare ({limit})")
            raise PinTooLong(
                f"the system prompt takes {tokens} tokens as the chat template writes it, more than {because} "
                f"allows to pin: shorten it, or turn pinning off (pin_system=False / --no-pin-system)"
            )

    def _get(self, session_id: str) -> Session:
        # A malformed id is refused before any lookup, and never echoed whole (it may be megabytes long).
        if isinstance(session_id, str) and len(session_id) <= SESSION_ID_MAX_CHARS:
            with self._lock:
                session = self._sessions.get(session_id)
        else:
            session = None
        if session is None:
            raise SessionNotFound(f"unknown or expired session {preview(session_id)}; start a new chat")
        return session

    def session(self, session_id: str) -> SessionView:
        """A read-only view of the session (`session.SessionView`); raises `SessionNotFound`."""
        return self._get(session_id).view()

    def session_ids(self, client: str | None = None) -> list[str]:
        """Ids of the live sessions; with `client`, only those opened for that stateless client (`stateless.py`)."""
        with self._lock:
            if client is None:
                return list(self._sessions)
            return [sid for sid, session in self._sessions.items() if session.client == client]

    def stats(self, session_id: str) -> dict:
        return self._get(session_id).stats()

    def memory_map(self, session_id: str) -> list[dict]:
        """What the model still holds of each message, aligned with `history(session_id)` (system prompt first
        when there is one): dicts `{"role", "tokens", "held", "state"}`, `state` being "full", "partial",
        "gone", or "pending" until a restored history is re-encoded by its next turn; `tokens` is None for a message never fed into this cache (skipped when the history was
        re-encoded). Computed from the cache's stream positions as of the session's last event."""
        return self._get(session_id).memory_map()

    def history(self, session_id: str) -> list[dict]:
        session = self._get(session_id)
        system = [{"role": "system", "content": session.system_prompt}] if session.system_prompt else []
        return system + [dict(m) for m in session.history]

    def recall_records(self, session_id: str) -> list[dict]:
        """What recall did, per message of `history(session_id)` *after* the system prompt: `{"fed", "recalled"}`
        for a user message whose turn quoted earlier messages (the text the model was given; their indices in that
        same list), `{}` otherwise. `open_history(..., records=...)` takes it back."""
        return self._get(session_id).recall_records()

    def stop(self, session_id: str) -> None:
        """End the running turn within one decode step; its partial reply stays in history and cache."""
        handle = self._get(session_id).current
        if handle is not None:
            handle.stop()

    def settle(self, session_id: str, timeout: float = STOP_WAIT_S) -> None:
        """Wait (at most `timeout`) for a turn that was told to stop to end, so that its partial reply is in the
        history; a turn still running normally is left alone. For a page re-attaching after its reader left."""
        handle = self._get(session_id).current
        if handle is not None and handle.stop_event.is_set():
            handle.finished.wait(timeout)

    def replying(self, session_id: str) -> bool:
        """Whether a turn is running in this session (a reply being written): `chat` would refuse a message now."""
        handle = self._get(session_id).current
        return handle is not None and not handle.finished.is_set()

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
        if not isinstance(session_id, str):
            return
        with self._lock:
            session = self._sessions.pop(session_id, None)
            self._tags.pop(session_id, None)
        if session is not None:
            handle = session.current
            if handle is not None:
                handle.stop()
                # The worker owns the cache until the turn ends (it may be a row of the shared batch right now).
                if not handle.finished.wait(STOP_WAIT_S):
                    return
            session.cache.reset()

    def close_idle(self) -> int:
        """Close sessions idle for longer than their origin's timeout; returns how many."""
        with self._lock:
            return self._close_idle_locked()

    def _close_idle_locked(self) -> int:
        now = self.clock()
        timeout = {"browser": self.config.idle_timeout_s, "api": self.config.api_idle_timeout_s}
        stale = [
            sid
            for sid, s in self._sessions.items()
            if s.last_active < now - timeout[self._tags[sid].origin]
            and (s.current is None or s.current.finished.is_set())
        ]
        for sid in stale:
            self._sessions.pop(sid).cache.reset()
            del self._tags[sid]
        return len(stale)

    # --- chatting ----------------------------------------------------------------------------------------------

    def _check_text(self, text, what: str, allow_empty: bool = False) -> str:
        """Text the model will read: within this engine's `max_message_chars`, control characters dropped."""
        return check_text(text, what, self.config.max_message_chars, allow_empty=allow_empty, clean=True)

    def clean_messages(self, messages, what: str = "messages", *, system_first: bool = False) -> list[dict]:
        """A conversation sent whole (`validate.check_messages`), each text checked and cleaned like `chat` input
        (empty ones allowed: a reply may have been empty)."""
        return [{"role": m["role"], "content": self._check_text(m["content"], f"message {i}", allow_empty=True)}
                for i, m in enumerate(check_messages(messages, what, system_first=system_first))]

    def chat(self, session_id: str, message: str, **sampling) -> Iterator[Event]:
        """Run one user turn; yields "delta" events and ends with one "done" or "error" event.

        Sampling keywords: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop.
        Problems the user can fix (empty message, bad setting, busy server) come back as one "error" event with
        `accepted=False`: the message was not taken and the conversation is unchanged. An "error" event with
        `accepted=True` means the turn ran and failed part-way; the message and any partial reply are kept.
        """
        yield from self.start_chat(session_id, message, **sampling)

    def start_chat(self, session_id: str, message: str, **sampling) -> Iterator[Event]:
        """`chat`, but the turn is submitted (or refused) now rather than at the first `next()`: a caller that must
        answer before reading (an HTTP status for a refusal) looks at `refusal(events)` first."""
        turn = self._start_turn(session_id, message, sampling)
        if isinstance(turn, Event):
            return Refused(turn)
        return self.scheduler.read(turn)

    def continue_reply(self, session_id: str, **sampling) -> Iterator[Event]:
        """Extend the last reply where it ended: one cut at `max_new_tokens`, stopped, or cut off by a failure
        (`Session.continue_turn`), from the cache as it ended, or from a cache rebuilt with the reply left open
        (a history opened with `last_reply_open`). Submitted now, like `start_chat`; its events are a turn's, the
        new text as "delta"s and the whole reply in the "done" event, and the history's last message grows in
        place. Refused (one event, `accepted` False, saying why and what to do instead) when there is no such
        reply."""
        turn = self.admit_turn(session_id, None, sampling, self._submit)
        return Refused(turn) if isinstance(turn, Event) else self.scheduler.read(turn)

    def chat_many(self, session_ids: Iterable[str], message: str, **sampling) -> Iterator[tuple[str, Event]]:
        """Send one user message to several sessions at once; yields `(session_id, event)` as events arrive.

        Each session runs its own turn on the shared scheduler, exactly as a separate `chat` call would, and its
        events end with one "done" or "error" event. Refusals (`accepted=False`) come first. Leaving the loop
        early stops every turn still running.
        """
        refused, handles = [], {}
        for sid in dict.fromkeys(session_ids):
            turn = self._start_turn(sid, message, sampling)
            if isinstance(turn, Event):
                refused.append((sid, turn))
            else:
                handles[sid] = turn
        try:
            yield from refused
        except GeneratorExit:  # the reader left before the fan-in began, so nobody else will stop these turns
            for handle in handles.values():
                handle.stop()
            raise
        yield from self.scheduler.read_many(handles)

    def admit_turn(self, session_id: str, message: str | None, sampling: dict, start: Callable) -> object:
        """Admission of one turn, the same on every engine (local, ZeroGPU): check the message and the sampling
        settings, refuse while the chat is still replying, take a slot (`_take_slot`: None when the server is at
        its cap), then, under the session's lock, `start(session, message, params, slot)`, whose result is
        returned; or the refusal event (`refused`, with its `code`) when the message is not taken. A `message` of
        None asks to continue the last reply (`continue_reply`), refused unless `Session.continue_refusal` allows."""
        try:
            session = self._get(session_id)
            message = None if message is None else self._check_text(message, "message")
            unknown = set(sampling) - set(SamplingParams.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
            params = self.config.default_sampling(**sampling)
        except (ValueError, TypeError, SessionNotFound) as exc:
            return refused(str(exc), "invalid")
        with session.lock:
            if session.current is not None and not session.current.finished.is_set():
                return refused(RUNNING_REFUSAL, "running", session.stats())
            cannot = session.continue_refusal() if message is None else None
            if cannot is not None:
                return refused(cannot, "invalid", session.stats())
            slot = self._take_slot()
            if slot is None:
                return refused(BUSY_REFUSAL, "busy", session.stats())
            return start(session, message, params, slot)

    def _take_slot(self):
        """A token for one more running turn, or None at `max_active_turns` (the scheduler counts them)."""
        return True if self.scheduler.active_turns < self.config.max_active_turns else None

    def _start_turn(self, session_id: str, message: str, sampling: dict) -> TurnHandle | Event:
        """Admit and submit one turn: its handle, or the refusal event when the message is not taken."""
        return self.admit_turn(session_id, message, sampling, self._submit)

    def _submit(self, session: Session, message: str | None, params: SamplingParams, slot) -> TurnHandle | Event:
        handle = TurnHandle(on_crash=lambda exc: Event("error", f"Generation failed ({type(exc).__name__}).", {},
                                                       "error", code="failed"))
        if message is None:  # a continuation feeds no text: only a history out of the cache is re-encoded
            try:
                prime = session.plan_continue(self.runtime)
            except ValueError as exc:  # the reply's end cannot be found in the rendering
                return refused(str(exc), "invalid", session.stats())
            turn = session.continue_turn(self.runtime, params, handle.stop_event, prime)
        else:
            # Rendering and encoding the history happen here, on the caller's thread: the worker gets token ids.
            plan = session.plan_turn(self.runtime, message, params.max_new_tokens)
            turn = session.turn(self.runtime, message, params, handle.stop_event, plan)
        handle.steps = self.counters.watch(session, turn)
        session.current = handle
        self.scheduler.submit(handle)
        return handle

    # --- history files (history.py): kept for one release ---------------------------------------------------------

    def export(self, session_id: str, *, title: str | None = None) -> str:
        """Deprecated: `streaming_engine.history.export_history(engine, session_id, title=...)`."""
        warnings.warn("StreamingEngine.export is deprecated: use streaming_engine.history.export_history",
                      DeprecationWarning, stacklevel=2)
        return export_history(self, session_id, title=title)

    def restore(self, exported: str | bytes, mode: str | None = None, **options) -> str:
        """Deprecated: `streaming_engine.history.restore_history(engine, exported, mode, ...)`."""
        warnings.warn("StreamingEngine.restore is deprecated: use streaming_engine.history.restore_history",
                      DeprecationWarning, stacklevel=2)
        return restore_history(self, exported, mode, **options)

    def open_history(
        self,
        messages: list[dict],
        system_prompt: str | None = None,
        *,
        mode: str = "streaming",
        owner: str | None = None,
        origin: str = "browser",
        client: str | None = None,
        records: list[dict] | None = None,
        last_reply_open: bool = False,
    ) -> str:
        """Open a new session (engine sizes) that continues `messages` ({"role": "user"|"assistant", "content"}
        dicts, extra keys ignored). Nothing is computed now: the cache is re-primed from the history (sinks + the
        tail that fits) on the next turn. `history.restore_history`, re-opening a stored conversation and a stateless client's
        conversation (`stateless.open_conversation`, which names its `client`) all come here. `records`: what
        recall did, as `recall_records` gave it (a stored conversation's), checked by `check_recall_records`.
        `last_reply_open`: the last message is a reply that ended before its end of turn (marked cut, stopped or
        interrupted where it was kept), so `continue_reply` may extend it."""
        clean = self.clean_messages(messages, "history 'messages'")
        records = check_recall_records(records, clean) if records is not None else None
        session_id = self._new_session_pinned_if_possible(mode, system_prompt, owner=owner, origin=origin)
        session = self._get(session_id)
        session.client = client
        session.load_history(clean, records, last_reply_open)
        return session_id


class Refused:
    """The events of a refused turn (its one "error" event, `accepted` False), marked so that `refusal` can tell
    without reading: a page shows nothing of a message that was not taken."""

    def __init__(self, event: Event):
        self.event, self._events = event, iter([event])

    def __iter__(self):
        return self

    def __next__(self) -> Event:
        return next(self._events)


def refusal(events) -> Event | None:
    """The refusal event of `start_chat`'s events when the turn was not taken (bad input, busy), else None."""
    return events.event if isinstance(events, Refused) else None

