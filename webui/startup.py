"""What the app does and says while it starts: which model it loads from where, a quick look at whether the model
hub answers before waiting on it, and, when loading fails, an error that says how to get a model that works.

Boundary: choosing the model's source and reporting progress; the loading itself is `streaming_engine.load`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from dataclasses import dataclass

from streaming_engine import load
from streaming_engine.backends import backend_line, choose_backend
from streaming_engine.modelfiles import (
    DEFAULT_MODEL_INSTALL,
    DEFAULT_MODEL_NAME,
    default_model_available,
    local_path_only,
)

from .settings import HUB_DEFAULT_MODEL, AppSettings

#: Where the Hugging Face hub answers, and how long the start-up check waits for it. huggingface_hub itself retries
#: an unreachable hub for about a minute before giving up; this check answers in seconds.
HUB_ADDRESS = ("huggingface.co", 443)
HUB_CHECK_TIMEOUT_S = 3.0


class StartupError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSource:
    """What `load` gets (`name`; None: the offline default), how the page names it, and whether it is the hub copy
    of the default, used because the offline package is missing."""

    name: str | None
    label: str
    hub_fallback: bool = False

    @property
    def from_hub(self) -> bool:
        """Whether loading it asks the hub: a name not on disk that has a hub id's shape (a missing path is
        reported as missing by `load`, never looked up on the hub)."""
        return self.name is not None and not os.path.exists(self.name) and not local_path_only(self.name)


def model_source(settings: AppSettings) -> ModelSource:
    """The user's model; else the offline default; else (package missing, e.g. on a Space) its hub copy."""
    if settings.model:
        return ModelSource(settings.model, settings.model)
    if default_model_available():
        return ModelSource(None, DEFAULT_MODEL_NAME)
    return ModelSource(HUB_DEFAULT_MODEL, HUB_DEFAULT_MODEL, hub_fallback=True)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def hub_reachable(address=HUB_ADDRESS, timeout: float = HUB_CHECK_TIMEOUT_S) -> bool:
    """True when the hub accepts a connection within `timeout` (and offline mode is not asked for)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline(offline: bool):
    """Within: huggingface_hub reads only its local cache (a model preloaded on a Space still loads)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def failure_message(source: ModelSource, exc: Exception, hub_up: bool) -> str:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    hub = "the Hugging Face hub is unreachable and the model is not in the local cache" if not hub_up else reason
    if source.hub_fallback:
        return (f"no model to load. The offline default {DEFAULT_MODEL_NAME} is not installed; it needs no hub: "
                f"`{DEFAULT_MODEL_INSTALL}`. Its hub copy {HUB_DEFAULT_MODEL} could not be loaded either: {hub}.")
    if source.from_hub and not hub_up:
        fix = ("or omit --model to use the offline default" if default_model_available()
               else f"or install the offline default ({DEFAULT_MODEL_INSTALL}) and omit --model")
        return f"could not load {source.name}: {hub}; download it once while online, {fix}."
    return reason if reason.startswith("could not load") else f"could not load {source.label}: {reason}"


def load_model(source: ModelSource, settings: AppSettings):
    """`(model, tokenizer)` as the settings ask, saying what happens; raises `StartupError` with the fix."""
    if source.hub_fallback:
        say(f"The offline default model is not installed ({DEFAULT_MODEL_INSTALL} adds it); "
            f"loading {HUB_DEFAULT_MODEL} from the Hugging Face hub instead.")
    hub_up = hub_reachable() if source.from_hub else True
    if source.from_hub and not hub_up:
        say("The Hugging Face hub is unreachable: looking in the local cache only.")
    # Which backend runs, and why, before anything is loaded: `auto` must never switch silently.
    say(backend_line(*choose_backend(settings.backend, source.name, settings.device, settings.device_map,
                                     settings.dtype)))
    say(f"Loading {source.label}…")
    started = time.perf_counter()
    try:
        with hub_offline(not hub_up):
            model, tokenizer = load(source.name, **settings.load_kwargs())
    except (OSError, ValueError, RuntimeError) as exc:
        raise StartupError(failure_message(source, exc, hub_up)) from exc
    say(f"Model ready in {time.perf_counter() - started:.1f} s.")
    return model, tokenizer
