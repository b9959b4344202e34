"""One conversation: its cache, its history, its live statistics, and how a turn runs on them.

A `Session` is touched by one thread at a time: its turns run on the scheduler's worker, and the engine only reads
counters from other threads. `Session.turn()` is the coroutine the scheduler drives: it yields `Event`s for the
reader and forward-pass requests (`generation.Prefill` for a prompt chunk, `generation.Decode` for one token, which
the batched worker gathers across sessions), and receives each request's logits. It runs no forward pass itself.

Bookkeeping that keeps multi-round chat exact:

* `stream_text` is every character the model has been given (or has just sampled) since the session began. The
  next turn's prompt is the chat template's rendering of the whole conversation minus `stream_text` (see
  `templating.py`), so only the new turn is ever encoded.
* The last sampled token of a reply (usually the end-of-turn token) is kept in `pending_ids` and fed at the start
  of the next turn, so it ends up in the cache without an extra forward pass at the end of every reply. A reply
  that ended before its end of turn (cut at `max_new_tokens`, stopped) is `open_reply`: `continue_turn` feeds only
  that waiting token and decodes on, extending the reply in place, exactly as if it had never been cut.
* Everything a turn computes from the history (the rendering, the re-encoded prime, the turn's token ids) is
  computed by `plan_turn` on the *caller's* thread (an HTTP request thread, a gradio handler) before the turn is
  submitted; the coroutine the worker drives only applies that `TurnPlan` and feeds token ids. So a 20,000-message
  history costs its own request seconds of encoding, never the shared worker (every other chat's decode).
* The history is plain Python (`history`: what the user saw; `_raw`: replies as generated, stop strings
  included, for the template). It is appended to before the model runs, so a failure never loses what was written.
  After a failure the cache is dropped and rebuilt from the history on the next turn (`_prime`), the same path a
  restored session takes.

What the model still remembers (see `memory.py`):

* Every message fed is recorded as a span of stream positions (`spans`, parallel to `history`; `system_span`), and
  each message start is marked on the cache as a boundary, which eviction="turns" evicts whole messages between.
* With `pin_system` (streaming mode) the template's whole rendering of the system prompt is fed first, encoded on
  its own, and pinned: the cache's protected head becomes `max(start_size, its tokens)` and it is never evicted.
  Window mode keeps no head by definition and dense never evicts, so neither pins.
* The memory map (per message: tokens, tokens held, state) is recomputed from the cache's stream positions on the
  worker thread before every event (`_refresh_memory`), so readers on other threads get a consistent snapshot.

Recall (see `recall.py`): with a `recall_budget`, `plan_turn` ranks the messages the cache no longer holds (by the
memory map; for a history about to be re-primed, by what the prime leaves out) against the new message and puts
the quoted block of the best ones before the user's text, in the user turn's content. Only the model's copy
(`_raw`) carries the block, so the template renders it as user content (neutralized like any message) and the next
turn's prefix test still matches `stream_text`; `history` keeps what the user typed. The block is encoded as a
piece of its own, so `recalled_tokens` is exactly what was fed; it is evicted like any other tokens.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterator, Literal

import torch

from .defaults import MODES  # noqa: F401  (its home is defaults.py)
from .generation import Decode, Prefill, RowSampling, TurnStopped, generate_reply, prefill_requests
from .memory import MessageSpan, measure, turns_in_memory
from .recall import Snippet, recall_block, recall_snippets
from .sampling import PENALTY_WINDOW, Sampler, SamplingParams
from .textstream import TextStream
from .validate import FINISH_MARKS

EventKind = Literal["delta", "done", "error"]
#: Why a turn ended: the model's end of turn, `max_new_tokens`, a stop string, the user's Stop, a dense cache out
#: of room, or a failure.
FinishReason = Literal["eos", "length", "stop", "stopped", "context_full", "error"]
#: What an "error" event is, for a caller that answers in another protocol (the API maps it to an HTTP status):
#: the server is at its cap of running replies, the input was refused, this chat is still replying, or the turn
#: failed while running (or could not be run).
EventCode = Literal["busy", "invalid", "running", "failed"]


class SessionStatus(enum.Enum):
    """Where a session's cache stands against its history, which decides what its next turn does first."""

    #: The cache holds the conversation as fed (or both are empty): the next turn feeds only its own text.
    READY = "ready"
    #: The history is not (or no longer) in the cache: a restored history, or the turn after a failure or a stop
    #: half-way through re-encoding. The next turn re-encodes the head and the tail that fits (`_prime`).
    UNPRIMED = "unprimed"
    #: A dense cache out of room: every turn ends at once with "context_full" until a reset or a rewind.
    FULL = "full"


#: The wording of each refusal every engine gives (local and ZeroGPU: `StreamingEngine.admit_turn`).
RUNNING_REFUSAL = "A reply is still being written in this chat; stop it or wait."
BUSY_REFUSAL = "Server busy: too many replies are being written right now. Try again shortly."
#: Why a Continue is refused (`Session.continue_refusal`; `CONTINUE_ELSEWHERE` on an engine whose turns run in
#: another process). Each says what to do instead.
NO_REPLY_TO_CONTINUE = "There is no reply to continue yet: send a message first."
REPLY_FINISHED = ("The last reply is finished: only a reply cut at its length limit or stopped can be continued. "
                  "Send a message to go on.")
REPLY_NOT_FOUND = ("The last reply cannot be continued with this model: its chat template changes the reply's text, "
                   "so where the reply ended cannot be found. Send a message such as \"go on\" instead.")
CONTINUE_CONTEXT_FULL = "The chat's context is full: nothing more fits in it. Start a new chat, or retry shorter."
CONTINUE_ELSEWHERE = ("Continue is not available on this server (its replies are written in another process). Send a "
                      "message such as \"go on\" instead.")


@dataclass
class Event:
    """What a turn reports: `kind` is "delta" (`text` is new text, maybe empty), "done" (`text` is the whole
    reply, `finish_reason` says why it ended) or "error" (`text` is the message).

    `accepted` is False only on the single error event of a turn that never started (bad input, busy server):
    the message was not taken and the conversation is unchanged. Every other event belongs to a turn whose
    message is in the history. `code` says what an "error" event is (`EventCode`); None on other events.
    """

    kind: EventKind
    text: str = ""
    stats: dict = field(default_factory=dict)
    finish_reason: FinishReason | None = None
    accepted: bool = True
    code: EventCode | None = None

    @property
    def final(self) -> bool:
        """The turn's last event ("done" or "error")."""
        return self.kind in ("done", "error")

    @property
    def mark(self) -> str | None:
        """The mark (`validate.MARK_KEYS`) that the reply of a turn ending with this event keeps: "interrupted"
        when the turn failed part-way, else its finish reason's (`FINISH_MARKS`); None for no mark, for a message
        never taken and for an event that is not final."""
        if self.kind == "error":
            return "interrupted" if self.accepted else None
        return FINISH_MARKS.get(self.finish_reason) if self.kind == "done" else None


@dataclass(frozen=True)
class SessionView:
    """A read-only look at one session for code outside the engine (tests, monitoring, benchmarks), taken when
    asked (`StreamingEngine.session`): who holds it, where its cache stands, its running turn. `cache` is the
    backend's cache object, for reading its counters and positions; nothing outside the worker feeds it."""

    id: str
    mode: str
    #: The stateless client it was opened for (`stateless.py`), None for others.
    client: str | None
    status: SessionStatus
    #: The running turn's handle (or the last one's, once finished): what `Scheduler.on_pass` reports it by.
    turn: object | None
    #: A turn is running now (its handle not finished).
    replying: bool
    turns: int
    last_active: float
    stream_text: str
    recent_ids: tuple[int, ...]
    cache: object
    #: The messages as the model was given them (system prompt first when there is one, a recalled block quoted
    #: into its user message), aligned with `StreamingEngine.history`, which keeps what was typed.
    fed: tuple[dict, ...]
    #: Where each message's tokens sit in the stream: parallel to the history (None: never fed), and the system
    #: prompt's (None without one).
    spans: tuple
    system_span: object | None
    system_prompt: str | None
    start_size: int
    recent_size: int
    #: The last reply ended before its end of turn, so `StreamingEngine.continue_reply` may extend it.
    open_reply: bool = False


def refused(text: str, code: EventCode, stats: dict | None = None) -> Event:
    """The one event of a turn that never started (bad input, busy, still replying): the message was not taken."""
    return Event("error", text, stats or {}, "error", accepted=False, code=code)


@dataclass
class Runtime:
    """What a turn needs from the engine (shared by every session)."""

    model: object
    tokenizer: object
    templater: object
    eos_ids: set
    device: torch.device
    #: Called as `(phase, session_id)`, phase "start" / "done", around `Session.plan_turn`'s rendering and encoding,
    #: on whichever thread runs it: lets tests observe what the worker does meanwhile, by events.
    on_encode: Callable[[str, str], None] | None = None


class Session:
    def __init__(
        self,
        session_id: str,
        mode: str,
        cache,
        *,
        system_prompt: str | None,
        start_size: int,
        recent_size: int,
        context_limit: int | None,
        chunk_size: int,
        pin_system: bool = False,
        recall_budget: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.id = session_id
        self.mode = mode
        # The backend's cache for this conversation (`Backend.new_cache`): where its tokens live is the backend's
        # business (its own cache or a batch row on transformers, a sequence of a shared context on llama.cpp).
        self.cache = cache
        self.system_prompt = system_prompt or None
        self.start_size = start_size
        self.recent_size = recent_size
        self.context_limit = context_limit  # dense only: most tokens the cache may hold
        self.chunk_size = chunk_size
        self.pin_system = bool(pin_system) and mode == "streaming"
        # Most tokens one turn's recall block may take (0: recall off); the engine checks it (`engine.recall_budget_for`).
        self.recall_budget = recall_budget
        # Parallel to `history`: for a user message, the history indices its turn recalled (empty for the rest).
        self.recalled: list[tuple[int, ...]] = []
        self.recalled_tokens = 0  # the last turn's recall block, in tokens fed
        self.recalled_tokens_total = 0
        self.history: list[dict] = []
        self.spans: list[MessageSpan | None] = []  # parallel to `history`: stream positions of each message
        self.system_span: MessageSpan | None = None
        self._reply_start = 0  # stream position of the running reply's first token
        self._memory: list[dict] = []  # the memory map as of the last event (see `_refresh_memory`)
        self._raw: list[dict] = []
        self.stream_text = ""
        self.pending_ids: list[int] = []
        # The last reply ended before its end of turn (cut, stopped, cut off): `continue_turn` may extend it, from the
        # cache as it ended, or from a cache rebuilt with the reply left open (`plan_continue`).
        self.open_reply = False
        self.recent_ids: deque[int] = deque(maxlen=PENALTY_WINDOW)
        self.turns = 0
        self.status = SessionStatus.READY
        self.current = None  # the running TurnHandle, if any
        #: The stateless client whose conversation this is (`stateless.py`: only its own requests continue it); not
        #: the per-owner cap's `SessionTag.owner`.
        self.client: str | None = None
        self.lock = threading.Lock()
        self.clock = clock  # stamps `last_active` (the engine's, so that a test can move time on)
        self.last_active = clock()
        self.time_to_first_token_s: float | None = None
        self.tokens_per_s: float | None = None
        self.last_token_latency_s: float | None = None
        self.reply_tokens = 0

    # --- views -------------------------------------------------------------------------------------------------

    @property
    def evicts(self) -> bool:
        return self.mode != "dense"

    @property
    def capacity(self) -> int:
        return self.context_limit if self.mode == "dense" else self.start_size + self.recent_size

    def template_messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [dict(m) for m in self._raw]

    def memory_map(self) -> list[dict]:
        """Per message (system prompt first when there is one, then the history): `role`, `tokens`, `held` and
        `state` ("full", "partial", "gone"; "pending" before a restored history is re-encoded), as of the last
        event; a user message whose turn recalled earlier messages also has `recalled`, their indices in this same
        list. A copy, safe to read from any thread."""
        return [{**entry, **({"recalled": list(entry["recalled"])} if "recalled" in entry else {})}
                for entry in self._memory]

    def view(self) -> SessionView:
        """This session as a `SessionView` (a snapshot; the cache is the live object)."""
        turn = self.current
        return SessionView(self.id, self.mode, self.client, self.status, turn,
                           turn is not None and not turn.finished.is_set(), self.turns, self.last_active,
                           self.stream_text, tuple(self.recent_ids), self.cache, tuple(self.template_messages()),
                           tuple(self.spans), self.system_span, self.system_prompt, self.start_size,
                           self.recent_size, self.open_reply)

    def _refresh_memory(self) -> None:
        """Recompute the memory map from the cache's stream positions (worker thread, or an idle session)."""
        held, seen = self.cache.stream_positions, self.cache.seen_tokens
        entries = [{"role": "system", **measure(self.system_span, held, seen)}] if self.system_prompt else []
        offset = len(entries)  # the map (and `recalled`) count the system prompt first, as `engine.history` does
        for k, (message, span) in enumerate(zip(self.history, self.spans)):
            entries.append({"role": message["role"], **measure(span, held, seen)})
            if k < len(self.recalled) and self.recalled[k]:  # which earlier messages this turn quoted back
                entries[-1]["recalled"] = [i + offset for i in self.recalled[k]]
        if self.status is SessionStatus.UNPRIMED:  # a restored history, not encoded yet: the next turn re-encodes what fits
            entries = [{**entry, "state": "pending"} if entry["tokens"] is None else entry for entry in entries]
        self._memory = entries

    def _live_stats(self) -> dict:
        self._refresh_memory()
        return self.stats()

    def stats(self) -> dict:
        held = self.cache.get_seq_length()
        kv_bytes = self.cache.kv_bytes()
        memory = self._memory
        return {
            "mode": self.mode,
            "cache_tokens": held,
            "cache_capacity": self.capacity,
            "start_size": self.start_size,
            "recent_size": self.recent_size,
            "sink_tokens": min(self.start_size, held),
            "evicted_tokens": self.cache.evicted_tokens,
            "seen_tokens": self.cache.seen_tokens,
            "turns": self.turns,
            "kv_bytes": kv_bytes,
            "kv_bytes_per_token": kv_bytes // held if held else 0,
            "tokens_per_s": self.tokens_per_s,
            "time_to_first_token_s": self.time_to_first_token_s,
            "reply_tokens": self.reply_tokens,
            "last_token_latency_s": self.last_token_latency_s,
            "context_limit": self.capacity,
            "context_full": self.status is SessionStatus.FULL,
            "pinned_tokens": self.cache.pinned,
            "eviction": self.cache.eviction if self.evicts else None,
            "turns_in_memory": turns_in_memory(memory),
            "messages_in_memory": sum(e["state"] == "full" for e in memory if e["role"] != "system"),
            "messages_forgotten": sum(e["state"] != "full" for e in memory if e["role"] != "system"),
            "recall_budget": self.recall_budget,
            "recalled_tokens": self.recalled_tokens,
            "recalled_messages": self._last_recalled(),
            "recalled_tokens_total": self.recalled_tokens_total,
        }

    def _last_recalled(self) -> list[int]:
        """The messages the latest user turn recalled, numbered as in the memory map (system prompt first)."""
        offset = 1 if self.system_prompt else 0
        for k in range(min(len(self.history), len(self.recalled)) - 1, -1, -1):
            if self.history[k]["role"] == "user":
                return [i + offset for i in self.recalled[k]]
        return []

    def recall_records(self) -> list[dict]:
        """Parallel to `history`: for a user message whose turn recalled earlier messages, `{"fed": the text the
        model was given, "recalled": [their indices in the history]}`; `{}` for every other message. What a store
        keeps so that `load_history(..., records)` gives the model the same context again."""
        records = []
        for k, message in enumerate(self.history):
            quoted = self.recalled[k] if k < len(self.recalled) else ()
            fed = self._raw[k]["content"] if k < len(self._raw) else message["content"]
            records.append({"fed": fed, "recalled": list(quoted)} if message["role"] == "user" and quoted else {})
        return records

    def load_history(self, messages: list[dict], records: list[dict] | None = None,
                     last_reply_open: bool = False) -> None:
        """Adopt a validated history; the cache is rebuilt from it on the next turn. `records` (validated,
        parallel to `messages`, as `recall_records` gives them): what each user turn fed the model and quoted, so
        the re-primed cache holds the quoted passages again and the markers stay; without them a stored history
        keeps what was typed only. `last_reply_open`: the last message is a reply that ended before its end of
        turn (cut, stopped, cut off), which `continue_turn` may then extend."""
        records = records or [{}] * len(messages)
        self.history = [dict(m) for m in messages]
        self._raw = [{**m, "content": r.get("fed", m["content"])} for m, r in zip(messages, records)]
        self.spans = [None] * len(messages)  # nothing of it is in the cache until `_prime`
        self.recalled = [tuple(r.get("recalled", ())) for r in records]
        self.turns = sum(1 for m in messages if m["role"] == "user")
        self.open_reply = bool(last_reply_open) and bool(messages) and messages[-1]["role"] == "assistant"
        self.status = SessionStatus.UNPRIMED if messages else SessionStatus.READY
        self._refresh_memory()

    def rewind(self) -> str:
        """Remove the last user message and everything after it; the cache is rebuilt on the next turn."""
        last_user = max((i for i, m in enumerate(self.history) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ValueError("there is no message to retry yet")
        message = self.history[last_user]["content"]
        kept = self.history[:last_user]
        self.clear()
        self.load_history(kept)
        return message

    def clear(self) -> None:
        """Forget everything (the `reset` of a conversation)."""
        self.cache.reset()
        self.history, self._raw = [], []
        self.spans, self.system_span = [], None
        self.recalled, self.recalled_tokens, self.recalled_tokens_total = [], 0, 0
        self.stream_text, self.pending_ids = "", []
        self.open_reply = False
        self.recent_ids.clear()
        self.turns, self.reply_tokens = 0, 0
        self.status = SessionStatus.READY
        self.time_to_first_token_s = self.tokens_per_s = self.last_token_latency_s = None
        self._refresh_memory()

    # --- a turn ------------------------------------------------------------------------------------------------

    def plan_turn(self, rt: Runtime, message: str, reply_tokens: int = 0) -> "TurnPlan":
        """Render and encode what a turn of `message` will feed (the re-encoded history when it needs priming, then
        the recall block and the turn's own text), without changing the session: run on the caller's thread before
        the turn is submitted (module docstring), under the session's lock, so nothing else changes it until the
        turn runs. `reply_tokens` (the turn's `max_new_tokens`) caps the recall block so that the reply keeps its
        room (`recall_room`). A failure is kept in the plan and raised inside the turn, which reports it as any
        failure of a turn."""
        if rt.on_encode is not None:
            rt.on_encode("start", self.id)
        try:
            return self._plan_turn(rt, message, reply_tokens)
        finally:
            if rt.on_encode is not None:
                rt.on_encode("done", self.id)

    def _plan_turn(self, rt: Runtime, message: str, reply_tokens: int) -> "TurnPlan":
        try:
            if self.status is SessionStatus.FULL:
                return TurnPlan()
            prime = self._plan_prime(rt) if self.status is SessionStatus.UNPRIMED else None
            stream_text = self.stream_text if prime is None else prime.stream_text
            plain = self._render_turn(rt, stream_text, message)
            plain.prime = prime
            if self.recall_budget <= 0:
                return plain
            turn_tokens = len(plain.system_ids) + len(plain.ids)
            room = self.recall_room(turn_tokens, reply_tokens)
            if room <= 0:
                return plain
            # What the turn itself will push out counts as evicted: a block fed into a nearly full window evicts
            # the oldest held messages, which must then be quotable or the fact is neither held nor quoted.
            evicted = self._evicted_messages(prime, turn_tokens + min(self.recall_budget, room))
            if not evicted:
                return plain
            count = lambda text: len(rt.templater.encode(rt.templater.neutralize(text)))  # noqa: E731
            gone = {e["index"] for e in evicted}  # once, not per message: a history may hold 20,000 of them
            held = [m for k, m in enumerate(self.history) if k not in gone]
            snippets = recall_snippets(evicted, message, min(self.recall_budget, room), count, held=held)
            if not snippets:
                return plain
            recalled = self._render_turn(rt, stream_text, message, snippets)
            if recalled is None:
                return plain
            recalled.prime = prime
            return recalled
        except Exception as exc:  # noqa: BLE001 - reported by the turn (accepted, history kept), as before
            return TurnPlan(error=exc)

    def _render_turn(self, rt: Runtime, stream_text: str, message: str,
                     snippets: list[Snippet] | None = None) -> "TurnPlan | None":
        """The turn's text and ids, with the recall block of `snippets` before `message` in the user content (then
        encoded as a piece of its own between the text around it; None when the template does not keep it
        verbatim, so the caller feeds the turn without it). Without snippets: the text exactly as before recall."""
        block = recall_block(snippets or [])
        content = block + message
        messages = self.template_messages() + [{"role": "user", "content": content}]
        text = rt.templater.turn_text(stream_text, messages)
        system_text = ""
        if not stream_text and self.system_prompt:  # the conversation's first text opens with the prompt
            system_text = rt.templater.system_text(self.system_prompt, text)
        system_ids = rt.templater.encode(system_text) if system_text else []
        rest = text[len(system_text):]
        if not block:
            return TurnPlan(None, text, system_text, system_ids, rt.templater.encode(rest))
        quoted = rt.templater.neutralize(block)
        at = rest.find(quoted)
        if at < 0:
            return None
        before, after = rt.templater.encode(rest[:at]), rt.templater.encode(rest[at + len(quoted):])
        recall_ids = rt.templater.encode(quoted)
        return TurnPlan(None, text, system_text, system_ids, before + recall_ids + after, content=content,
                        recalled=tuple(snippets), recalled_tokens=len(recall_ids))

    def recall_room(self, turn_tokens: int, reply_tokens: int) -> int:
        """Most tokens a recall block may take next to a turn of `turn_tokens`: what the window after the protected
        head leaves once the turn and the reply's share (its `reply_tokens`, at most half the window) are counted,
        so the block is still in the cache when the reply begins."""
        if not self.evicts:
            return 0
        window = self.capacity - max(self.start_size, self.cache.pinned)
        return window - turn_tokens - min(max(reply_tokens, 0), window // 2)

    def _evicted_messages(self, prime: "PrimePlan | None", incoming: int = 0) -> list[dict]:
        """The history messages the cache will not hold whole once `incoming` more tokens are fed (recall's
        candidates: those it holds no longer, and those the turn's own text and block push out), as `{"index",
        "role", "content"}` with the history's text (what was typed, never an earlier recall block). For a history
        about to be re-primed: the messages the prime leaves out or cuts. Messages that a turn still held after the
        feed already quoted are left out, so one fact is not quoted twice into the cache."""
        offset = 1 if self.system_prompt else 0
        if prime is not None:
            if prime.empty:
                return []
            if prime.parts is None:  # cut as one run: no per-message view, so every message may be missing
                gone = set(range(len(self.history))) if prime.cut else set()
            else:
                whole = {k - offset for k, _, missing in prime.parts if k >= offset and not missing}
                gone = set(range(len(self.history))) - whole
            quoted: set[int] = set()
        else:
            after = self._states_after(incoming)
            gone = {k for k, state in enumerate(after) if state in ("gone", "partial")}
            quoted = {i for k, state in enumerate(after) if state == "full"
                      for i in (self.recalled[k] if k < len(self.recalled) else ())}
        return [{"index": k, "role": self.history[k]["role"], "content": self.history[k]["content"]}
                for k in sorted(gone - quoted) if self.history[k]["content"]]

    def _states_after(self, incoming: int) -> list[str]:
        """Each history message's memory state (`memory.STATES`) once `incoming` more tokens have gone into the
        window: the oldest tokens past the protected head leave first, one for each token beyond the window (the
        fewest any eviction policy takes; a block policy may take more)."""
        held, seen = self.cache.stream_positions, self.cache.seen_tokens
        head = max(self.start_size, self.cache.pinned)
        over = len(held) - head + incoming - (self.capacity - head)
        if self.evicts and over > 0:
            held = held[:head] + held[head + over:]
        return [measure(span, held, seen)["state"] for span in self.spans]

    def turn(self, rt: Runtime, message: str, params: SamplingParams, stop_event: threading.Event,
             plan: "TurnPlan | None" = None) -> Generator:
        """Coroutine of one user turn for the scheduler: yields `Event`s for the reader and forward-pass requests
        (`generation.Prefill` / `Decode`), and receives each request's answer (see `generation.py`).

        `plan` is `plan_turn(rt, message)`, made by the caller before submitting; without one it is made here, on
        the worker (only for callers that drive a turn alone)."""
        if plan is None:
            plan = self.plan_turn(rt, message)
        started = time.perf_counter()
        self.last_active = self.clock()
        self.turns += 1
        self.reply_tokens = 0
        self.time_to_first_token_s = self.tokens_per_s = self.last_token_latency_s = None
        self.history.append({"role": "user", "content": message})
        self._raw.append({"role": "user", "content": plan.content if plan.content is not None else message})
        self.spans.append(None)
        self.recalled.append(tuple(s.index for s in plan.recalled))
        self.recalled_tokens = plan.recalled_tokens
        self.recalled_tokens_total += plan.recalled_tokens
        if self.status is SessionStatus.FULL:
            self.open_reply = False
            yield self._final("", "context_full")
            return

        def feed() -> Generator:
            if plan.error is not None:
                raise plan.error
            if plan.prime is not None:
                yield from self._prime(plan.prime)
            prompt_ids = self._turn_ids(plan)
            self.pending_ids = []
            self.stream_text += plan.text
            self.recent_ids.extend(prompt_ids)
            return prompt_ids

        yield from self._run(rt, params, stop_event, started, feed())

    def continue_refusal(self) -> str | None:
        """Why `continue_turn` cannot extend the last reply now (the wording a person reads), or None when it can:
        the reply must be the last message and have ended before its end of turn (cut at `max_new_tokens`,
        stopped, cut off: `open_reply`), in a cache that has room. It need not be in the cache: `plan_continue`
        rebuilds one with it left open."""
        if not self.history or self.history[-1]["role"] != "assistant":
            return NO_REPLY_TO_CONTINUE
        if self.status is SessionStatus.FULL:
            return CONTINUE_CONTEXT_FULL
        return None if self.open_reply else REPLY_FINISHED

    def plan_continue(self, rt: Runtime) -> "PrimePlan | None":
        """What `continue_turn` re-encodes first, on the caller's thread (as `plan_turn`): None when the cache holds
        the reply as it ended; for a history not in the cache (`UNPRIMED`: re-opened, or after a failure), the
        prime of the history with its last reply left open, its last token held back (`PrimePlan.hold_last`).
        Raises ValueError (`REPLY_NOT_FOUND`) when the rendering does not show where the reply's text ends."""
        return self._plan_prime(rt, open_last=True) if self.status is SessionStatus.UNPRIMED else None

    def continue_turn(self, rt: Runtime, params: SamplingParams, stop_event: threading.Event,
                      prime: "PrimePlan | None" = None) -> Generator:
        """Coroutine that extends the last reply where it ended, as `turn` runs a new one (the engine admits it only
        when `continue_refusal()` is None). No template text is fed: the reply's last token, held in
        `pending_ids`, goes into the cache and decoding goes on from there, so a greedy reply cut at N tokens and
        continued for M is token for token the reply of N + M tokens. The new text joins the last message of the
        history (and of `_raw` and `stream_text`), whose span stays open; its "done" event carries the whole
        reply. `prime` (`plan_continue`): the history re-encoded first, up to the reply's last token, which is then
        the one held back."""
        started = time.perf_counter()
        self.last_active = self.clock()
        self.reply_tokens = 0
        self.time_to_first_token_s = self.tokens_per_s = self.last_token_latency_s = None

        def feed() -> Generator:
            if prime is not None:
                yield from self._prime(prime)
            held, self.pending_ids = self.pending_ids, []
            return held

        yield from self._run(rt, params, stop_event, started, feed(), continuing=True)

    def _run(self, rt: Runtime, params: SamplingParams, stop_event: threading.Event, started: float,
             feed: Generator, continuing: bool = False) -> Generator:
        """The body `turn` and `continue_turn` share: `feed` (a coroutine, so it may yield the re-encoding's
        passes) returns the prompt ids, then the reply is generated, recorded and reported. `continuing`: the
        prompt is the held last token of the reply being continued, decoded with the new ones as their context."""
        stream = TextStream(rt.tokenizer, params.stop)
        reply_ids: list[int] = []
        context = None
        self.open_reply = False
        prefix = self.history[-1]["content"] if continuing else ""
        try:
            prompt_ids = yield from feed
            seen = self.cache.seen_tokens
            if continuing:
                context = prompt_ids
                stream = TextStream(rt.tokenizer, params.stop, context=context)
            reason = yield from self._reply(rt, prompt_ids, params, stop_event, stream, reply_ids, started)
            if reason == "stopped" and stream.stopped_at is not None and not stop_event.is_set():
                reason = "stop"
            tail = stream.finish()
            self._record_reply(rt, reply_ids, stream, reason, context, fed=self.cache.seen_tokens > seen)
            if tail:
                yield Event("delta", tail, self._live_stats())
            yield self._final(prefix + stream.emitted, reason)
        except TurnStopped:  # stopped while the history was being re-encoded: it is re-encoded next turn
            self._record_reply(rt, reply_ids, stream, "stopped")
            self.open_reply = continuing  # a reply being continued is still open, as it was
            yield self._final(prefix + stream.emitted, "stopped")
        except Exception as exc:  # noqa: BLE001 - report, keep the history, rebuild the cache next turn
            self._record_reply(rt, reply_ids, stream, "error", context)
            self.cache.reset()
            self.stream_text, self.pending_ids = "", []
            self.spans, self.system_span = [None] * len(self.history), None
            self.status = SessionStatus.UNPRIMED
            # A reply cut off by the failure may be continued once the cache is rebuilt (`plan_continue`).
            self.open_reply = bool(reply_ids) or continuing
            yield Event(
                "error",
                f"Generation failed ({type(exc).__name__}: {exc}). Your conversation is kept; "
                "send a message to continue or start a new chat.",
                self._live_stats(),
                "error",
                code="failed",
            )
        finally:
            self.last_active = self.clock()

    def _reply(self, rt: Runtime, prompt_ids: list[int], params: SamplingParams, stop_event: threading.Event,
               stream: TextStream, reply_ids: list[int], started: float) -> Generator:
        """Feed `prompt_ids` and sample the reply into `reply_ids`, yielding the passes and a "delta" per token;
        returns why it ended (`FinishReason`)."""
        sampler = Sampler(params, rt.device)
        steps = generate_reply(
            self.cache,
            prompt_ids,
            lambda logits: sampler(logits, self.recent_ids),
            max_new_tokens=params.max_new_tokens,
            eos_ids=rt.eos_ids,
            evict=self.evicts,
            chunk_size=self.chunk_size,
            context_limit=self.context_limit,
            should_stop=lambda: stop_event.is_set() or stream.stopped_at is not None,
            # The same settings and history for a worker that samples the batch on the device (static step).
            sampling=RowSampling(params, self.recent_ids),
        )
        reason = "stopped"
        last_time = first_time = None
        answer = None
        while True:
            try:
                step = steps.send(answer)
            except StopIteration:
                break
            answer = None
            if isinstance(step, (Prefill, Decode)):
                answer = yield step  # the worker runs the forward pass (batched with others for a Decode)
            elif step.kind == "prefill":
                yield Event("delta", "", self._live_stats())
            elif step.kind == "token":
                now = time.perf_counter()
                if last_time is None:
                    self.time_to_first_token_s = now - started
                    first_time = now
                else:
                    self.last_token_latency_s = now - last_time
                    self.tokens_per_s = len(reply_ids) / max(now - first_time, 1e-9)
                last_time = now
                reply_ids.append(step.token_id)
                self.recent_ids.append(step.token_id)
                self.reply_tokens = len(reply_ids)
                yield Event("delta", stream.push(step.token_id), self._live_stats())
            else:
                reason = step.reason
        return reason

    def _final(self, text: str, reason: str) -> Event:
        if reason == "context_full":
            self.status = SessionStatus.FULL
        return Event("done", text, self._live_stats(), reason)

    def _record_reply(self, rt: Runtime, reply_ids: list[int], stream: TextStream, reason: str,
                      context: list[int] | None = None, fed: bool = True) -> None:
        """Add the reply to the history (or, continuing one, `context` its held ids, join the new text to it). Its
        last token waits in `pending_ids`, fed at the start of the next turn; a reply that ended before its end of
        turn (cut at `max_new_tokens`, or stopped) stays open to `continue_turn`. `fed`: whether the turn fed
        anything (a continuation stopped before its first pass still holds its token back)."""
        if not reply_ids:
            if context is not None and not fed:  # nothing reached the cache: the reply is still open, as it was
                self.pending_ids, self.open_reply = context, True
            return
        ended_with_eos = reply_ids[-1] in rt.eos_ids
        raw = _decoded_after(rt.tokenizer, context, reply_ids[:-1] if ended_with_eos else reply_ids)
        self.stream_text += _decoded_after(rt.tokenizer, context, reply_ids)
        self.pending_ids = reply_ids[-1:]
        self.open_reply = reason in ("length", "stopped") and not ended_with_eos
        shown = stream.emitted if reason != "error" else stream.text()
        if context is not None:
            self.history[-1]["content"] += shown
            self._raw[-1]["content"] += raw
            return
        self.history.append({"role": "assistant", "content": shown})
        self._raw.append({"role": "assistant", "content": raw})
        self.spans.append(None)
        self.recalled.append(())
        self._open_span(self._reply_start, len(self.history) - 1)

    def _open_span(self, start: int, index: int | None) -> None:
        """Message `index` of the history (None: the system prompt) begins at stream position `start`: the span
        still open ends there, and the cache learns the boundary."""
        for span in (self.system_span, *self.spans):
            if span is not None and span.end is None:
                span.end = max(span.start, start)
        if index is None:
            self.system_span = MessageSpan(start)
        else:
            self.spans[index] = MessageSpan(start)
        self.cache.mark_boundary(start)

    def _turn_ids(self, plan: "TurnPlan") -> list[int]:
        """Token ids of a turn (after the pending end-of-turn token), recording where each message begins. The
        first text of a conversation opens with the system prompt: encoded on its own (and pinned)."""
        start = self.cache.seen_tokens
        if plan.system_text:
            self._open_span(start, None)
            if self.pin_system:
                self.cache.pin(len(plan.system_ids))
        ids = self.pending_ids + plan.system_ids + plan.ids
        self._open_span(start + len(plan.system_ids), len(self.history) - 1)
        self._reply_start = start + len(ids)
        self.cache.mark_boundary(self._reply_start)
        return ids

    def _plan_prime(self, rt: Runtime, open_last: bool = False) -> "PrimePlan":
        """The re-encoding of the history before the new turn (see `_prime`); reads the session, changes nothing.
        `open_last`: the last message is a reply to continue, so the rendering stops where its text ends (the
        template's end-of-turn marker left out) and its last token is held back (`plan_continue`)."""
        messages = self.template_messages()  # everything before the user turn about to run
        if not any(m["role"] != "system" for m in messages):
            return PrimePlan("", [], None, empty=True)
        text = rt.templater.render(messages, add_generation_prompt=False)
        closing = _closing(rt, text, messages[-1]["content"]) if open_last else ""
        text = text[:len(text) - len(closing)]
        parts = self._prime_parts(rt, messages)
        if parts is not None and closing:
            parts = _opened(rt, messages, parts, closing)
        if parts is not None:
            return PrimePlan(text, [], parts, hold_last=open_last)
        # A template that rewrites earlier turns: no per-message cut, so no spans either.
        ids = rt.templater.encode(text)
        budget, head = self._prime_budget(0)
        cut = len(ids) > budget
        if cut:
            ids = ids[:head] + ids[len(ids) - (budget - head):]
        return PrimePlan(text, ids, None, cut=cut, hold_last=open_last)

    def _prime(self, plan: "PrimePlan") -> Generator:
        """Re-encode the history into an empty cache, keeping the protected head (the pinned system prompt, or the
        sinks) and the tail that fits (yields `Prefill` requests), as `plan` (`_plan_prime`) says. Each message
        was encoded on its own so that its span is known; under eviction="turns" the tail starts at a message.
        Until it completes, the status stays `UNPRIMED`, so a stop or a failure half-way is retried. With
        `plan.hold_last` the last token is not fed but left in `pending_ids`, as a reply's last sampled token is."""
        self.cache.reset()
        self.stream_text, self.pending_ids = "", []
        self.spans, self.system_span = [None] * len(self.history), None
        if plan.empty:
            self.status = SessionStatus.READY
            return
        ids = plan.ids
        if plan.parts is not None:
            offset = 1 if self.system_prompt else 0
            ids, pinned = [], 0
            for k, part, missing in plan.parts:
                self._open_span(len(ids), None if k < offset else k - offset)
                (self.system_span if k < offset else self.spans[k - offset]).missing = missing
                if k < offset and self.pin_system:
                    pinned = len(part)
                ids += part
            self.cache.pin(pinned)
        held = ids[-1:] if plan.hold_last else []
        yield from prefill_requests(self.cache, ids[:len(ids) - len(held)], self.chunk_size, self.evicts)
        self.status = SessionStatus.READY
        self.stream_text, self.pending_ids = plan.text, held
        self.recent_ids.extend(ids)

    def _prime_budget(self, pinned: int) -> tuple[int, int]:
        """(tokens to re-encode, of which the head) for a cache rebuilt from the history: the head plus half of
        the room after it, so the coming turn has the other half (dense: half its limit, no head)."""
        if self.mode == "dense":
            return max(1, self.context_limit // 2), 0
        head = max(self.start_size, pinned)
        return head + max(1, (self.start_size + self.recent_size - head) // 2), head

    def _prime_parts(self, rt: Runtime, messages: list[dict]) -> list[tuple[int, list[int], int]] | None:
        """What `_prime` feeds, as `(message index in messages, ids, tokens of it left out)` in stream order:
        the head (the pinned system prompt whole, or the first tokens as sinks) and the tail that fits. None when
        the template cannot be cut into messages."""
        encode = rt.templater.encode
        texts: dict[int, str] = {}

        def piece(k: int) -> list[int] | None:
            # `local_piece`: each piece costs a few messages' rendering, not the whole history's (which made
            # priming a long history quadratic); all of them are checked against the real rendering below.
            try:
                text = rt.templater.local_piece(messages, k)
            except Exception:  # noqa: BLE001 - a template that refuses a partial conversation
                return None
            if text is None:
                return None
            texts[k] = text
            return encode(text)

        head: list[list] = []
        if self.pin_system and messages[0]["role"] == "system":
            ids = piece(0)
            if ids is None:
                return None
            head = [[0, ids, 0]]
            budget, sinks = self._prime_budget(len(ids))
        else:
            budget, sinks = self._prime_budget(0)
            taken = 0
            while taken < sinks and len(head) < len(messages):  # the sinks: the conversation's first tokens
                ids = piece(len(head))
                if ids is None:
                    return None
                take = min(sinks - taken, len(ids))
                head.append([len(head), ids[:take], len(ids) - take, ids])
                taken += take
        room = budget - sum(len(part[1]) for part in head)
        tail, used = [], 0
        for k in range(len(messages) - 1, len(head) - 1, -1):
            ids = piece(k)
            if ids is None:
                return None
            tail.insert(0, [k, ids, 0])
            used += len(ids)
            if used > room:
                break
        else:  # everything after the head fits: the head's messages go in whole if they fit too
            sink_parts = [part for part in head if len(part) == 4]  # [k, sink ids, missing, whole ids]
            if sink_parts and used + sum(len(part[3]) for part in sink_parts) <= budget:
                head = [[part[0], part[3], 0] for part in sink_parts]
        if self.cache.eviction == "turns":
            while len(tail) > 1 and used > room:  # whole messages from the front
                used -= len(tail.pop(0)[1])
        if used > room:  # the oldest message of the tail in part (one message longer than the room, or "tokens")
            cut = used - room
            tail[0][1], tail[0][2] = tail[0][1][cut:], tail[0][2] + cut
        if not rt.templater.pieces_agree(messages, texts):
            return None
        return [(k, ids, missing) for k, ids, missing, *_ in head + tail]


@dataclass
class PrimePlan:
    """How a history is re-encoded into an empty cache (`Session._plan_prime`): the rendering `text` (what the
    stream holds afterwards), and either `parts` (`(message index, ids, tokens left out)` per message, in stream
    order) or, for a template that cannot be cut into messages, the kept `ids` as one run. `empty`: nothing to
    encode (no message besides the system prompt)."""

    text: str
    ids: list[int]
    parts: list[tuple[int, list[int], int]] | None
    empty: bool = False
    cut: bool = False  # `ids` leave part of the rendering out (the one-run case)
    hold_last: bool = False  # the last id is not fed but held back, a reply's last token (`Session.plan_continue`)

    @property
    def stream_text(self) -> str:
        return "" if self.empty else self.text


@dataclass
class TurnPlan:
    """What a turn feeds, rendered and encoded on the caller's thread (`Session.plan_turn`): the prime (None when
    the cache is current), the turn's `text`, the part of it that renders the system prompt (`system_text`,
    encoded alone as `system_ids` to be pinned) and the rest's `ids`. `error`: what went wrong while planning.

    With recall: `content` is the user content fed (the recall block, then the message; None: the message alone),
    `recalled` the snippets quoted and `recalled_tokens` the block's tokens within `ids`."""

    prime: PrimePlan | None = None
    text: str = ""
    system_text: str = ""
    system_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    error: Exception | None = None
    content: str | None = None
    recalled: tuple[Snippet, ...] = ()
    recalled_tokens: int = 0


def _decoded_after(tokenizer, context: list[int] | None, ids: list[int]) -> str:
    """The text `ids` add after `context` (special tokens kept): decoded together with it, so that a leading
    space or a character split across the boundary comes out as one decode of the whole reply would give it."""
    if not context:
        return tokenizer.decode(ids, skip_special_tokens=False)
    head = tokenizer.decode(context, skip_special_tokens=False)
    whole = tokenizer.decode(context + ids, skip_special_tokens=False)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(ids, skip_special_tokens=False)


#: A reply's text in the short conversation that shows what a template writes after a reply (`_closing`).
_PROBE_REPLY = "Probe reply 7f3a"


def _closing(rt: Runtime, text: str, content: str) -> str:
    """What the rendering `text` writes after the last message, a reply with `content`: the template's
    end-of-turn marker, which a continued reply must not be fed. Learnt from a two-message probe conversation,
    then checked against `text`; raises ValueError (`REPLY_NOT_FOUND`) when `text` does not end with the reply's
    text and that marker (a template that strips or rewrites replies)."""
    try:
        probe = rt.templater.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}],
                                    add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that refuses the probe cannot be read this way
        raise ValueError(REPLY_NOT_FOUND) from None
    at = probe.rfind(_PROBE_REPLY)
    closing = probe[at + len(_PROBE_REPLY):] if at >= 0 else None
    shown = rt.templater.neutralize(content)
    if closing is None or not shown or not text.endswith(shown + closing):
        raise ValueError(REPLY_NOT_FOUND)
    return closing


def _opened(rt: Runtime, messages: list[dict], parts: list, closing: str) -> list:
    """`parts` (`Session._prime_parts`) with the last message's piece re-encoded without `closing`, its front cut
    (tokens left out) kept as it was. Raises ValueError (`REPLY_NOT_FOUND`) when the piece does not end so."""
    k, ids, missing = parts[-1]
    piece = rt.templater.local_piece(messages, k)
    if k != len(messages) - 1 or piece is None or not piece.endswith(closing):
        raise ValueError(REPLY_NOT_FOUND)
    open_ids = rt.templater.encode(piece[:len(piece) - len(closing)])[missing:]
    if not open_ids:
        raise ValueError(REPLY_NOT_FOUND)
    return parts[:-1] + [(k, open_ids, missing)]
