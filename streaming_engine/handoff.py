"""A session's state as a plain, picklable value: how a conversation crosses a process boundary and comes back.

Why: on a Hugging Face ZeroGPU Space the GPU exists only inside a forked worker process, and that worker may be a
fresh fork on every call. The conversation therefore lives in the main process, and each turn ships its state into
the worker and the updated state back (see `remote.py`). Only the *state* crosses: the history, the chat-template
bookkeeping, the counters, and the KV cache's contents, always on the CPU in transit (a CUDA tensor cannot be sent
to another process by value).

`export_state`, `open_state` and `import_state` do it for a session of a `StreamingEngine` (the ZeroGPU engine's
main process and its worker, `remote.py`): this module is the engine's one friend that handles a `Session` itself,
under its lock, because a state is the session's own attributes and nothing public exposes them.

Boundary: this module copies a `Session`'s own attributes; what the cache holds and how it travels is the
backend's (`backends.base.Backend.cache_state` / `load_cache_state`: on transformers the conversation's own
`StartRecentKVCache`, each layer back on the device it executes on). It runs no model, owns no threads and never
decides anything about a turn. What is *not* state stays with each side: a session's lock and running turn
(process-local), its id (each engine names its own sessions) and the cache object itself (the receiving engine's
backend made it).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from .engine import STOP_WAIT_S, EngineBusy
from .session import RUNNING_REFUSAL

#: Session attributes that belong to one process and never travel.
LOCAL_SESSION_FIELDS = frozenset({"id", "cache", "lock", "current", "last_active"})


@dataclass
class SessionState:
    """Everything a turn reads or writes, detached from any process: `fields` are the session's attributes,
    `cache` what the backend's `cache_state` took from its cache (tensors on the CPU), `kv_bytes` the bytes of keys
    and values carried (what a handoff moves across the process boundary, each way)."""

    fields: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    kv_bytes: int = 0


def capture(session, backend) -> SessionState:
    """The state of `session` (between turns), as independent copies, its cache's taken by `backend`."""
    fields = {k: copy.deepcopy(v) for k, v in vars(session).items() if k not in LOCAL_SESSION_FIELDS}
    cache, kv_bytes = backend.cache_state(session.cache)
    return SessionState(fields, cache, kv_bytes)


def adopt(session, state: SessionState, backend, *, onto_devices: bool) -> None:
    """Make `session` hold `state`. Its id, lock, running turn and cache object stay its own.

    `onto_devices=True` where the turn will run (the backend puts the cache's contents where the model runs);
    False where the state is only kept and read (on transformers the tensors stay on the CPU).
    """
    for name, value in state.fields.items():
        setattr(session, name, copy.deepcopy(value))
    backend.load_cache_state(session.cache, state.cache, onto_devices=onto_devices)
    session.last_active = time.monotonic()


def export_state(engine, session_id: str) -> SessionState:
    """Session `session_id`'s whole state as a picklable value, cache tensors on the CPU. Taken between turns: a turn
    still running is waited for (at most `STOP_WAIT_S`), then `EngineBusy`."""
    session = engine._get(session_id)
    handle = session.current
    if handle is not None and not handle.finished.wait(STOP_WAIT_S):
        raise EngineBusy(RUNNING_REFUSAL)
    with session.lock:
        return capture(session, engine.backend)


def open_state(engine, state: SessionState, *, owner: str | None = None, origin: str = "browser") -> str:
    """A new session of `engine` (its own id) holding `state`, its cache on the devices the model runs on."""
    fields = state.fields
    mode = fields["mode"]
    session_id = engine.new_session(
        mode, fields.get("system_prompt"),
        start_size=None if mode == "dense" else fields["start_size"],
        recent_size=None if mode == "dense" else fields["recent_size"],
        max_context=fields.get("context_limit") if mode == "dense" else None,
        owner=owner, origin=origin,
        # As the session was made: one kept unpinned (a restored too-long system prompt) must not be refused.
        pin_system=bool(fields.get("pin_system", False)), eviction=state.cache.get("eviction", "tokens"),
        recall_budget=fields.get("recall_budget", 0),
    )
    import_state(engine, session_id, state, onto_devices=True)
    return session_id


def import_state(engine, session_id: str, state: SessionState, *, onto_devices: bool = False) -> None:
    """Replace session `session_id`'s state with `state` (its id, tag and running-turn handle stay).
    `onto_devices=False` keeps the cache on the CPU: for a process that only holds conversations and never runs the
    model."""
    session = engine._get(session_id)
    with session.lock:
        adopt(session, state, engine.backend, onto_devices=onto_devices)
