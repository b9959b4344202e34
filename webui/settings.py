"""The web app's settings: command-line flags, each with an environment variable (for Hugging Face Spaces), and
the UI's own defaults and limits. Nothing here loads a model or builds a page.

Library and engine defaults (the paper's 4 + 2000 cache, sampling) live in `streaming_engine`; only what the app
chooses differently, and why, is written here.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from streaming_engine.backends import BACKENDS
from streaming_engine.cache import DEFAULT_START_SIZE
from streaming_engine.checks import check_int
from streaming_engine.engine import MAX_ACTIVE_TURNS
from streaming_engine.loading import DEFAULT_MODEL_NAME, default_model_available

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
#: Used when the offline package is absent (e.g. on a Space): the same model from the hub.
HUB_DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: The app's recent window: 4 sinks + 1020 recent = a 1,024-token cache, half the library's 4 + 2000. Every decode
#: step attends over the whole cache and a restored or retried chat re-encodes up to half of it, so on a CPU Space
#: a smaller cache keeps replies quick while still holding several turns.
DEFAULT_RECENT_SIZE = 1020
#: Gradio queue: events running at once (the engine interleaves them) and events waiting before "busy".
QUEUE_CONCURRENCY = MAX_ACTIVE_TURNS
QUEUE_MAX_SIZE = 64
#: A browser tab's sessions are freed this long after its last activity (or when the tab closes).
SESSION_TTL_S = 3600
#: UI refreshes while a reply streams are throttled to this interval (seconds).
STREAM_UI_INTERVAL_S = 0.12
_TRUE = ("1", "true", "yes")


@dataclass
class AppSettings:
    """How the app is served. Raises `ValueError` naming the flag on a bad value."""

    model: str | None = None
    start_size: int = DEFAULT_START_SIZE
    recent_size: int = DEFAULT_RECENT_SIZE
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    share: bool = False
    auth: tuple[str, str] | None = None
    trust_remote_code: bool = False
    backend: str = "auto"  # see streaming_engine/backends.py: llama.cpp for a GGUF on the CPU when installed

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        check_int("--start-size", self.start_size, 0)
        check_int("--recent-size", self.recent_size, 1)
        check_int("--port", self.port, 1, 65535)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """`"user:password"` -> `("user", "password")`; nothing -> None (no login)."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth / APP_AUTH must look like user:password")
    return user, password


def parse_settings(argv: list[str] | None = None, env: dict | None = None) -> AppSettings:
    """Command-line flags, each defaulting to its environment variable (for Spaces)."""
    env = os.environ if env is None else env
    on_space = bool(env.get("SPACE_ID"))
    p = argparse.ArgumentParser(prog="python app.py", description="StreamingLLM chat web app")
    p.add_argument("--model", default=env.get("MODEL_ID"),
                   help=f"hub id or local path (env MODEL_ID; default: offline {DEFAULT_MODEL_NAME})")
    p.add_argument("--start-size", type=int, default=int(env.get("START_SIZE", DEFAULT_START_SIZE)),
                   help=f"attention sinks kept (env START_SIZE; default {DEFAULT_START_SIZE})")
    p.add_argument("--recent-size", type=int, default=int(env.get("RECENT_SIZE", DEFAULT_RECENT_SIZE)),
                   help=f"recent tokens kept (env RECENT_SIZE; default {DEFAULT_RECENT_SIZE})")
    p.add_argument("--host", default=env.get("HOST") or env.get("GRADIO_SERVER_NAME") or
                   ("0.0.0.0" if on_space else DEFAULT_HOST), help=f"bind address (env HOST; default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=int(env.get("PORT") or env.get("GRADIO_SERVER_PORT") or DEFAULT_PORT))
    p.add_argument("--share", action="store_true", default=env.get("SHARE", "").lower() in _TRUE,
                   help="create a public gradio.live link (env SHARE)")
    p.add_argument("--auth", default=env.get("APP_AUTH"), help="require a login, user:password (env APP_AUTH)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code (off by default)")
    p.add_argument("--backend", default=env.get("BACKEND", "auto"),
                   help=f"{' | '.join(BACKENDS)} (env BACKEND; default auto: llama.cpp for a GGUF model on a CPU "
                        "when llama-cpp-python is installed, else transformers)")
    args = p.parse_args(argv)
    model = args.model
    if model is None and not default_model_available():
        model = HUB_DEFAULT_MODEL
    try:
        return AppSettings(model, args.start_size, args.recent_size, args.host, args.port, args.share,
                           parse_auth(args.auth), args.trust_remote_code, args.backend)
    except ValueError as exc:
        p.error(str(exc))
