"""How a tab's plain handler functions become gradio event handlers: the engine bound in, and, on a Hugging Face
ZeroGPU Space, the GPU attached for the handler's duration.

Tab modules write handlers as `def handler(engine, *inputs)` so tests can call them with any engine; `bind` is the
one place that adapts them for gradio. Nothing else lives here.
"""

from __future__ import annotations

import functools
from typing import Callable

#: Longest a ZeroGPU handler may hold the GPU (seconds): a whole autopilot run on a small model.
ZEROGPU_DURATION_S = 120

try:  # ZeroGPU Spaces attach a GPU only inside functions decorated with spaces.GPU.
    import spaces  # type: ignore

    _gpu = spaces.GPU(duration=ZEROGPU_DURATION_S)
except Exception:  # noqa: BLE001 - the package is optional and absent off Spaces
    def _gpu(fn):
        return fn


def bind(fn: Callable, engine, *, gpu: bool = False) -> Callable:
    """`fn` with `engine` as its first argument, keeping its name (gradio names events after it).

    `gpu=True` for handlers that run the model (on ZeroGPU they get the GPU; elsewhere nothing changes).
    Not `functools.wraps`: its `__wrapped__` would make gradio read `fn`'s signature, engine included.
    """
    bound = functools.partial(fn, engine)
    bound.__name__ = fn.__name__
    return _gpu(bound) if gpu else bound
