"""The web app's settings: command-line flags, each with an environment variable (for Hugging Face Spaces), and
the UI's own defaults and limits. Nothing here loads a model or builds a page.

Library and engine defaults (the paper's 4 + 2000 cache, sampling) live in `streaming_engine`; only what the app
chooses differently, and why, is written here.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from streaming_engine.cache import DEFAULT_START_SIZE
from streaming_engine.checks import check_int
from streaming_engine.engine import MAX_ACTIVE_TURNS, MAX_SESSIONS, MAX_SESSIONS_PER_OWNER
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
#: A browser tab's sessions are freed this long after its last activity, if its closing went unnoticed (a closed
#: tab is noticed at once: see `UNLOAD_GRACE_S`).
SESSION_TTL_S = 3600
#: UI refreshes while a reply streams are throttled to this interval (seconds).
STREAM_UI_INTERVAL_S = 0.12
#: A closed (or reloading) tab's conversation keeps its live session this long, so that the reloaded page
#: re-attaches to it instead of rebuilding the cache (a reload on a busy server can take several seconds); then the
#: session is freed (the stored conversation stays, and a later page re-opens it from the store).
UNLOAD_GRACE_S = 10.0
#: Who may embed the app in a frame (`Content-Security-Policy: frame-ancestors`): this site and the Hugging Face
#: page that shows a Space.
DEFAULT_FRAME_ANCESTORS = "'self' https://huggingface.co"
#: Proxies whose `X-Forwarded-For` names the client (uvicorn's `FORWARDED_ALLOW_IPS`): loopback, i.e. a router or
#: reverse proxy on this machine. On a Space every request comes through Hugging Face's proxy.
DEFAULT_FORWARDED_ALLOW_IPS = "127.0.0.1,::1"
SPACE_FORWARDED_ALLOW_IPS = "*"
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
    # Conversations, limits and headers (issue 12): where chats are stored, how many sessions one client and the
    # whole server may hold, who may frame the page, and which proxies may name the client.
    data_dir: str | None = None  # None: streaming_engine.store.default_data_dir()
    persist: bool = True
    max_sessions: int = MAX_SESSIONS
    max_sessions_per_client: int = MAX_SESSIONS_PER_OWNER
    frame_ancestors: str = DEFAULT_FRAME_ANCESTORS
    forwarded_allow_ips: str = DEFAULT_FORWARDED_ALLOW_IPS

    def __post_init__(self):
        check_int("--start-size", self.start_size, 0)
        check_int("--recent-size", self.recent_size, 1)
        check_int("--port", self.port, 1, 65535)
        check_int("--max-sessions", self.max_sessions, 1)
        check_int("--max-sessions-per-client", self.max_sessions_per_client, 1, self.max_sessions)
        if (not self.frame_ancestors.strip() or not self.frame_ancestors.isascii()
                or any(c in self.frame_ancestors for c in ";,\r\n")):
            raise ValueError("--frame-ancestors must be a CSP source list such as \"'self' https://example.org\" "
                             "(no ';', ',' or line breaks)")


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
    p.add_argument("--data-dir", default=env.get("DATA_DIR") or None,
                   help="folder of the conversation database chats.sqlite (env DATA_DIR; default "
                        "~/.cache/streaming-llm)")
    p.add_argument("--no-persist", action="store_true", default=env.get("NO_PERSIST", "").lower() in _TRUE,
                   help="keep conversations in memory only; nothing is written to disk (env NO_PERSIST)")
    p.add_argument("--max-sessions", type=int, default=env.get("MAX_SESSIONS") or MAX_SESSIONS,
                   help=f"conversations open at once on this server (env MAX_SESSIONS; default {MAX_SESSIONS})")
    p.add_argument("--max-sessions-per-client", type=int,
                   default=env.get("MAX_SESSIONS_PER_CLIENT") or MAX_SESSIONS_PER_OWNER,
                   help="conversations one client address (or login user) may hold open (env "
                        f"MAX_SESSIONS_PER_CLIENT; default {MAX_SESSIONS_PER_OWNER})")
    p.add_argument("--frame-ancestors", default=env.get("FRAME_ANCESTORS") or DEFAULT_FRAME_ANCESTORS,
                   help=f"pages allowed to embed the app, a CSP source list (env FRAME_ANCESTORS; default "
                        f"{DEFAULT_FRAME_ANCESTORS})")
    p.add_argument("--forwarded-allow-ips",
                   default=env.get("FORWARDED_ALLOW_IPS") or (SPACE_FORWARDED_ALLOW_IPS if on_space
                                                               else DEFAULT_FORWARDED_ALLOW_IPS),
                   help="proxies trusted to name the client in X-Forwarded-For, comma-separated or * (env "
                        f"FORWARDED_ALLOW_IPS; default {DEFAULT_FORWARDED_ALLOW_IPS}, * on a Space)")
    args = p.parse_args(argv)
    model = args.model
    if model is None and not default_model_available():
        model = HUB_DEFAULT_MODEL
    try:
        return AppSettings(model, args.start_size, args.recent_size, args.host, args.port, args.share,
                           parse_auth(args.auth), args.trust_remote_code, data_dir=args.data_dir,
                           persist=not args.no_persist, max_sessions=args.max_sessions,
                           max_sessions_per_client=args.max_sessions_per_client,
                           frame_ancestors=args.frame_ancestors, forwarded_allow_ips=args.forwarded_allow_ips)
    except ValueError as exc:
        p.error(str(exc))
