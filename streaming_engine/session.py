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
  of the next turn, so it ends up in the cache without an extra forward pass at the end of every reply.
* The history is plain Python (`history`: what the user saw; `_raw`: replies as generated, stop strings
  included, for the template). It is appended to before the model runs, so a failure never loses what was written.
  After a failure the cache is dropped and rebuilt from the history on the next turn (`_prime`), the same path a
  restored session takes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Generator, Iterator, Literal

import torch

from .batch_cache import ConversationCache
from .cache import StartRecentKVCache
from .generation import Decode, Prefill, TurnStopped, generate_reply, prefill_requests
from .sampling import PENALTY_WINDOW, Sampler, SamplingParams
from .textstream import TextStream

#: The conversation kinds every layer offers (engine, CLIs, benchmarks, the comparison tab), in display order.
MODES = ("streaming", "dense", "window")

EventKind = Literal["delta", "done", "error"]
#: Why a turn ended: the model's end of turn, `max_new_tokens`, a stop string, the user's Stop, a dense cache out
#: of room, or a failure.
FinishReason = Literal["eos", "length", "stop", "stopped", "context_full", "error"]


@dataclass
class Event:
    """What a turn reports: `kind` is "delta" (`text` is new text, maybe empty), "done" (`text` is the whole
    reply, `finish_reason` says why it ended) or "error" (`text` is the message).

    `accepted` is False only on the single error event of a turn that never started (bad input, busy server):
    the message was not taken and the conversation is unchanged. Every other event belongs to a turn whose
    message is in the history.
    """

    kind: EventKind
    text: str = ""
    stats: dict = field(default_factory=dict)
    finish_reason: FinishReason | None = None
    accepted: bool = True


@dataclass
class Runtime:
    """What a turn needs from the engine (shared by every session)."""

    model: object
    tokenizer: object
    templater: object
    eos_ids: set
    device: torch.device


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
    ):
        self.id = session_id
        self.mode = mode
        # Where this conversation's tokens are: its own cache, or a batch row while it decodes (see batch_cache.py).
        # (A llama.cpp cache, `llamacpp/cache.py`, is its own wrapper: it lives in a sequence of a shared context.)
        self.cache = ConversationCache(cache) if isinstance(cache, StartRecentKVCache) else cache
        self.system_prompt = system_prompt or None
        self.start_size = start_size
        self.recent_size = recent_size
        self.context_limit = context_limit  # dense only: most tokens the cache may hold
        self.chunk_size = chunk_size
        self.history: list[dict] = []
        self._raw: list[dict] = []
        self.stream_text = ""
        self.pending_ids: list[int] = []
        self.recent_ids: deque[int] = deque(maxlen=PENALTY_WINDOW)
        self.turns = 0
        self.context_full = False
        self.needs_prime = False
        self.current = None  # the running TurnHandle, if any
        self.owner: str | None = None  # who opened it, e.g. "openai" for the HTTP API (see engine.find_conversation)
        self.lock = threading.Lock()
        self.last_active = time.monotonic()
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

    def stats(self) -> dict:
        held = self.cache.get_seq_length()
        kv_bytes = self.cache.kv_bytes()
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
            "context_full": self.context_full,
        }

    def load_history(self, messages: list[dict]) -> None:
        """Adopt a validated history; the cache is rebuilt from it on the next turn."""
        self.history = [dict(m) for m in messages]
        self._raw = [dict(m) for m in messages]
        self.turns = sum(1 for m in messages if m["role"] == "user")
        self.needs_prime = bool(messages)

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
        self.stream_text, self.pending_ids = "", []
        self.recent_ids.clear()
        self.turns, self.reply_tokens = 0, 0
        self.context_full = self.needs_prime = False
        self.time_to_first_token_s = self.tokens_per_s = self.last_token_latency_s = None

    # --- a turn ------------------------------------------------------------------------------------------------

    def turn(self, rt: Runtime, message: str, params: SamplingParams, stop_event: threading.Event) -> Generator:
        """Coroutine of one user turn for the scheduler: yields `Event`s for the reader and forward-pass requests
        (`generation.Prefill` / `Decode`), and receives each request's answer (see `generation.py`)."""
        started = time.perf_counter()
        self.last_active = time.monotonic()
        self.turns += 1
        self.reply_tokens = 0
        self.time_to_first_token_s = self.tokens_per_s = self.last_token_latency_s = None
        self.history.append({"role": "user", "content": message})
        self._raw.append({"role": "user", "content": message})
        if self.context_full:
            yield self._final("", "context_full")
            return
        stream = TextStream(rt.tokenizer, params.stop)
        reply_ids: list[int] = []
        try:
            if self.needs_prime:
                yield from self._prime(rt)
            text = rt.templater.turn_text(self.stream_text, self.template_messages())
            prompt_ids = self.pending_ids + rt.templater.encode(text)
            self.pending_ids = []
            self.stream_text += text
            self.recent_ids.extend(prompt_ids)
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
                    yield Event("delta", "", self.stats())
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
                    yield Event("delta", stream.push(step.token_id), self.stats())
                else:
                    reason = step.reason
            if reason == "stopped" and stream.stopped_at is not None and not stop_event.is_set():
                reason = "stop"
            tail = stream.finish()
            self._record_reply(rt, reply_ids, stream, reason)
            if tail:
                yield Event("delta", tail, self.stats())
            yield self._final(stream.emitted, reason)
        except TurnStopped:  # stopped while the history was being re-encoded: it is re-encoded next turn
            self._record_reply(rt, reply_ids, stream, "stopped")
            yield self._final(stream.emitted, "stopped")
        except Exception as exc:  # noqa: BLE001 - report, keep the history, rebuild the cache next turn
            self._record_reply(rt, reply_ids, stream, "error")
            self.cache.reset()
            self.stream_text, self.pending_ids = "", []
            self.needs_prime = True
            yield Event(
                "error",
                f"Generation failed ({type(exc).__name__}: {exc}). Your conversation is kept; "
                "send a message to continue or start a new chat.",
                self.stats(),
                "error",
            )
        finally:
            self.last_active = time.monotonic()

    def _final(self, text: str, reason: str) -> Event:
        if reason == "context_full":
            self.context_full = True
        return Event("done", text, self.stats(), reason)

    def _record_reply(self, rt: Runtime, reply_ids: list[int], stream: TextStream, reason: str) -> None:
        if not reply_ids:
            return
        ended_with_eos = reply_ids[-1] in rt.eos_ids
        raw = rt.tokenizer.decode(reply_ids[:-1] if ended_with_eos else reply_ids, skip_special_tokens=False)
        self.stream_text += rt.tokenizer.decode(reply_ids, skip_special_tokens=False)
        self.pending_ids = reply_ids[-1:]
        shown = stream.emitted if reason != "error" else stream.text()
        self.history.append({"role": "assistant", "content": shown})
        self._raw.append({"role": "assistant", "content": raw})

    def _prime(self, rt: Runtime) -> Generator:
        """Re-encode the history into an empty cache, keeping the sinks and the tail that fits (yields `Prefill`
        requests). Until it completes, `needs_prime` stays set, so a stop or a failure half-way is retried."""
        self.cache.reset()
        self.stream_text, self.pending_ids = "", []
        messages = self.template_messages()[:-1]  # everything before the user turn now running
        if not any(m["role"] != "system" for m in messages):
            self.needs_prime = False
            return
        text = rt.templater.render(messages, add_generation_prompt=False)
        ids = rt.templater.encode(text)
        if self.mode == "dense":
            budget = max(1, self.context_limit // 2)
            head = 0
        else:
            # Leave half of the recent window free for the coming turn.
            budget = self.start_size + max(1, self.recent_size // 2)
            head = self.start_size
        if len(ids) > budget:
            ids = ids[:head] + ids[len(ids) - (budget - head):]
        yield from prefill_requests(self.cache, ids, self.chunk_size, self.evicts)
        self.needs_prime = False
        self.stream_text = text
        self.recent_ids.extend(ids)
