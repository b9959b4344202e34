"""How a tab's plain handler functions become gradio event handlers, and how the app meets ZeroGPU.

Tab modules write handlers as `def handler(engine, *inputs)` so tests can call them with any engine; `bind` is the
one place that adapts them for gradio.

ZeroGPU: on a Hugging Face ZeroGPU Space (`SPACES_ZERO_GPU` set by the platform) a GPU exists only inside
functions decorated with `spaces.GPU`, each call running in a forked worker process. No handler is decorated:
handlers run in the main process, where the sessions live, and the engine is a `RemoteTurnsEngine`
(`streaming_engine/remote.py`) that sends each turn's forward passes, with the session's state, into one
`spaces.GPU` call. Every handler therefore sees the same conversations. `zerogpu_decorator` and
`zerogpu_duration` are the only ZeroGPU-specific code in the app.
"""

from __future__ import annotations

import inspect
import math
import os
import typing
from typing import Callable

#: Longest GPU time one call may ask for (seconds); the platform refuses longer requests for ordinary accounts.
ZEROGPU_MAX_DURATION_S = 120
#: Fixed part of a call's estimate (seconds): a fresh worker fork, the weights moved to the GPU, the cache's round
#: trip and the prompt. Generous on purpose: asking for too little ends a reply mid-way.
ZEROGPU_BASE_S = 10
#: Estimated GPU seconds per generated token per conversation in the call. The slowest turn measured with
#: `tools/zerogpu_cost.py` (H200, fresh worker per call) took 0.10 s per token, fixed costs included; decoding
#: alone about 0.07. The estimate only decides how much quota a call reserves: what is not used is not charged.
ZEROGPU_S_PER_TOKEN = 0.08
_TRUE = ("1", "t", "true", "yes")


def bind(fn: Callable, engine) -> Callable:
    """`fn` with `engine` (or any first argument: the tabs pass their `Conversations`) bound in, keeping its name
    (gradio names events after it) and the signature and type hints of its other parameters, so that gradio
    passes a `gr.Request` to a parameter annotated with it.

    A real function, not `functools.partial` (gradio reads no type hints from a partial) nor `functools.wraps`
    (its `__wrapped__` would make gradio read `fn`'s signature, engine included).
    """
    if inspect.isgeneratorfunction(fn):
        def bound(*args, **kwargs):
            return (yield from fn(engine, *args, **kwargs))
    else:
        def bound(*args, **kwargs):
            return fn(engine, *args, **kwargs)
    parameters = list(inspect.signature(fn).parameters.values())[1:]
    hints = typing.get_type_hints(fn)
    bound.__name__ = bound.__qualname__ = fn.__name__
    bound.__doc__ = fn.__doc__
    bound.__signature__ = inspect.Signature(parameters)
    bound.__annotations__ = {p.name: hints[p.name] for p in parameters if p.name in hints}
    return bound


def on_zerogpu(env=None) -> bool:
    """True on a ZeroGPU Space (the platform sets `SPACES_ZERO_GPU=true`)."""
    env = os.environ if env is None else env
    return str(env.get("SPACES_ZERO_GPU", "")).lower() in _TRUE


def zerogpu_duration(config) -> Callable[..., int]:
    """The `duration` function for `spaces.GPU`: called with a remote call's arguments (states, message,
    sampling, stop slots; see `RemoteTurnsEngine.turns_in_worker`), it returns the seconds to reserve."""

    def duration(states, message, sampling, slots) -> int:
        new_tokens = int(sampling.get("max_new_tokens") or config.max_new_tokens)
        estimate = ZEROGPU_BASE_S + ZEROGPU_S_PER_TOKEN * new_tokens * max(1, len(states))
        return min(ZEROGPU_MAX_DURATION_S, math.ceil(estimate))

    return duration


def zerogpu_decorator(config, env=None) -> Callable[[Callable], Callable] | None:
    """`spaces.GPU(duration=...)` on a ZeroGPU Space, else None (the engine then runs turns in-process).

    Import this before any model is placed on the GPU: `spaces` must patch torch before CUDA is touched."""
    if not on_zerogpu(env):
        return None
    import spaces  # type: ignore  # present on every ZeroGPU Space

    return spaces.GPU(duration=zerogpu_duration(config))
