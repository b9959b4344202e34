"""How a tab's plain handler functions become gradio event handlers: the engine bound in, and, on a Hugging Face
ZeroGPU Space, the GPU attached for the handler's duration.

Tab modules write handlers as `def handler(engine, *inputs)` so tests can call them with any engine; `bind` is the
one place that adapts them for gradio. Nothing else lives here.
"""

from __future__ import annotations

import inspect
import typing
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
    """`fn` with `engine` (or any first argument: the tabs pass their `Conversations`) bound in, keeping its name
    (gradio names events after it) and the signature and type hints of its other parameters, so that gradio
    passes a `gr.Request` to a parameter annotated with it.

    `gpu=True` for handlers that run the model (on ZeroGPU they get the GPU; elsewhere nothing changes).
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
    return _gpu(bound) if gpu else bound
