"""A session's state as a plain, picklable value: how a conversation crosses a process boundary and comes back.

Why: on a Hugging Face ZeroGPU Space the GPU exists only inside a forked worker process, and that worker may be a
fresh fork on every call. The conversation therefore lives in the main process, and each turn ships its state into
the worker and the updated state back (see `remote.py`). Only the *state* crosses: the history, the chat-template
bookkeeping, the counters, and the KV cache's tensors, always on the CPU in transit (a CUDA tensor cannot be sent
to another process by value). On arrival every cache layer goes back to the device its layer executes on, which
`DynamicLayer.device` recorded when the layer first ran. Between turns a conversation's tokens sit in its own
`StartRecentKVCache` (the `solo` cache of its `ConversationCache`; a batch row is only borrowed while a reply
decodes, see `batch_cache.py`), so that cache is what travels.

Boundary: this module copies state between `Session` objects and moves cache tensors; it runs no model, owns no
threads and never decides anything about a turn. What is *not* state stays with each side: a session's lock and
running turn (process-local), its id (each engine names its own sessions) and the cache's rotary module (the model's
own, bound by the receiving engine).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

#: Session attributes that belong to one process and never travel.
LOCAL_SESSION_FIELDS = frozenset({"id", "cache", "lock", "current", "last_active"})
#: Cache attributes that never travel: the model's rotary module (the receiver binds its own).
LOCAL_CACHE_FIELDS = frozenset({"rotary_emb"})


@dataclass
class SessionState:
    """Everything a turn reads or writes, detached from any process: `fields` are the session's attributes,
    `cache` the cache's attributes with every layer's keys and values on the CPU."""

    fields: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values carried (what a handoff moves across the process boundary, each way)."""
        return sum(t.numel() * t.element_size() for layer in self.cache.get("layers", ())
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


def _layer_to(layer, device: torch.device | str):
    """A copy of a cache layer with its tensors on `device`; `layer.device` (where the layer runs) is kept."""
    moved = copy.copy(layer)
    for name in ("keys", "values"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor):
            # A copy even when already there: the sender keeps using its own tensors.
            setattr(moved, name, tensor.to(device, copy=True))
    return moved


def _own_cache(session):
    """The cache holding `session`'s tokens between turns: the `StartRecentKVCache` inside its `ConversationCache`
    (or the session's cache itself, for a plain one)."""
    cache = session.cache
    if getattr(cache, "attached", False):
        raise RuntimeError("a session's state is taken between turns, not while its reply decodes in a batch row")
    return getattr(cache, "solo", cache)


def capture(session) -> SessionState:
    """The state of `session` (between turns), as independent copies with the cache on the CPU."""
    fields = {k: copy.deepcopy(v) for k, v in vars(session).items() if k not in LOCAL_SESSION_FIELDS}
    cache = {}
    for name, value in vars(_own_cache(session)).items():
        if name in LOCAL_CACHE_FIELDS:
            continue
        if name == "layers":
            value = [_layer_to(layer, "cpu") for layer in value]
        elif isinstance(value, torch.Tensor):
            value = value.to("cpu", copy=True)
        cache[name] = value
    return SessionState(fields, cache)


def adopt(session, state: SessionState, *, onto_devices: bool) -> None:
    """Make `session` hold `state`. Its id, lock, running turn and the cache's rotary module stay its own.

    `onto_devices=True` where the turn will run (each layer's keys and values go back to the device that layer
    executes on); False where the state is only kept and read (the tensors stay on the CPU).
    """
    for name, value in state.fields.items():
        setattr(session, name, copy.deepcopy(value))
    cache = _own_cache(session)
    for name, value in state.cache.items():
        if name == "layers":
            value = [_layer_to(layer, getattr(layer, "device", "cpu")) if onto_devices else copy.copy(layer)
                     for layer in value]
        setattr(cache, name, value)
    session.last_active = time.monotonic()
