"""The web app's settings: command-line flags, each with an environment variable (for Hugging Face Spaces), and
the UI's own defaults and limits. Nothing here loads a model or builds a page.

Library and engine defaults (the paper's 4 + 2000 cache, sampling) live in `streaming_engine`; only what the app
chooses differently, and why, is written here.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

# Only torch-free modules at import time: `python app.py --help` reads this file before anything heavy is imported
# (torch, used to check --device and --dtype, is imported when a value is checked).
from streaming_engine.backends import BACKENDS
from streaming_engine.cli_options import (
    DECODE_ENV,
    RECALL_ENV,
    add_decode_args,
    add_recall_arg,
    env_float,
    env_int,
)
from streaming_engine.defaults import (
    CUDA_GRAPH_MODES,
    DECODE_STEPS,
    DEFAULT_CUDA_GRAPHS,
    DEFAULT_DECODE_STEP,
    DEFAULT_MODEL_NAME,
    DEFAULT_OVERLAP,
    DEFAULT_START_SIZE,
    DEVICE_MAP_STRATEGIES,
    MAX_ACTIVE_TURNS,
    MAX_SESSIONS,
    MAX_SESSIONS_PER_OWNER,
    OVERLAP_MODES,
    PARTIAL_SAVE_INTERVAL_S,
)
from streaming_engine.recall import check_budget
from streaming_engine.store_pg import START_WAIT_S, check_database_url
from streaming_engine.validate import check_choice, check_int, check_number

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
#: Used when the offline package is absent (e.g. on a Space): the same model from the hub.
HUB_DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: The app's recent window: 4 sinks + 1020 recent = a 1,024-token cache, half the library's 4 + 2000. Every decode
#: step attends over the whole cache and a restored or retried chat re-encodes up to half of it, so on a CPU Space
#: a smaller cache keeps replies quick while still holding several turns.
DEFAULT_RECENT_SIZE = 1020
#: Gradio queue defaults (`--queue-concurrency`, `--queue-max-size`): events running at once (the engine
#: batches them, so as many as it runs turns) and events waiting before gradio answers "queue is full".
DEFAULT_QUEUE_CONCURRENCY = MAX_ACTIVE_TURNS
DEFAULT_QUEUE_MAX_SIZE = 64
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
#: Proxies whose `X-Forwarded-For` names the client (uvicorn's `FORWARDED_ALLOW_IPS`): loopback, i.e. a reverse
#: proxy on this machine (nginx or HAProxy from deploy/; in deploy/compose.yaml they share one network namespace).
#: On a Space every request comes through Hugging Face's proxy.
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
    partial_save_interval_s: float = PARTIAL_SAVE_INTERVAL_S
    # A shared PostgreSQL store (issue 25) instead of the SQLite file in data_dir; may hold a password, so kept out
    # of repr (settings get printed and logged).
    database_url: str | None = field(default=None, repr=False)
    # How long a replica waits at start for an unreachable database server before refusing to start.
    database_wait_s: float = START_WAIT_S
    max_sessions: int = MAX_SESSIONS
    max_sessions_per_client: int = MAX_SESSIONS_PER_OWNER
    frame_ancestors: str = DEFAULT_FRAME_ANCESTORS
    forwarded_allow_ips: str = DEFAULT_FORWARDED_ALLOW_IPS
    # Where and how the model runs (see `streaming_engine.loading.load` and `placement.py`).
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    queue_concurrency: int = DEFAULT_QUEUE_CONCURRENCY
    queue_max_size: int = DEFAULT_QUEUE_MAX_SIZE
    #: Visitors may pick the cache sizes of their new chats (at most the owner's `start_size`/`recent_size`).
    visitor_cache_sizes: bool = False
    backend: str = "auto"  # see streaming_engine/backends/choice.py: transformers unless llama.cpp is asked for
    # How the batched decode runs (docs/gpu-decode.md): the static step on CUDA by default, replayed from graphs.
    decode_step: str = DEFAULT_DECODE_STEP
    cuda_graphs: str = DEFAULT_CUDA_GRAPHS
    overlap: str = DEFAULT_OVERLAP
    # Most tokens of evicted messages a turn may quote back (docs/engine.md, "Recall"); 0 = off for the whole
    # server (a chat's own switch and an API request cannot turn it on); None: a quarter of the window.
    recall_budget: int | None = None

    def __post_init__(self):
        check_choice("--backend", self.backend, BACKENDS)
        for name, allowed in (("decode_step", DECODE_STEPS), ("cuda_graphs", CUDA_GRAPH_MODES),
                              ("overlap", OVERLAP_MODES)):
            # a value from the environment: argparse checked the flags
            check_choice(f"--{name.replace('_', '-')} / {DECODE_ENV[name]}", getattr(self, name), allowed)
        check_int("--start-size", self.start_size, 0)
        check_int("--recent-size", self.recent_size, 1)
        if self.recall_budget is not None:
            try:
                check_budget(self.recall_budget, self.recent_size)
            except ValueError as exc:
                raise ValueError(f"--recall-budget / {RECALL_ENV}: {exc}") from None
        check_int("--port", self.port, 1, 65535)
        check_int("--max-sessions", self.max_sessions, 1)
        check_int("--max-sessions-per-client", self.max_sessions_per_client, 1, self.max_sessions)
        if (not self.frame_ancestors.strip() or not self.frame_ancestors.isascii()
                or any(c in self.frame_ancestors for c in ";,\r\n")):
            raise ValueError("--frame-ancestors must be a CSP source list such as \"'self' https://example.org\" "
                             "(no ';', ',' or line breaks)")
        if self.database_url is not None:
            try:
                self.database_url = check_database_url(self.database_url)
            except ValueError as exc:
                raise ValueError(f"--database-url / DATABASE_URL: {exc}") from None
            if not self.persist:
                raise ValueError("give either --database-url or --no-persist, not both")
        if isinstance(self.database_wait_s, bool) or not isinstance(self.database_wait_s, (int, float)) \
                or not 0 <= self.database_wait_s <= 3600:
            raise ValueError(f"--database-wait must be between 0 and 3600 seconds, got {self.database_wait_s!r}")
        check_number("--partial-save-interval", self.partial_save_interval_s, 0)
        check_int("--queue-concurrency", self.queue_concurrency, 1)
        check_int("--queue-max-size", self.queue_max_size, 1)
        if self.threads is not None:
            check_int("--threads", self.threads, 1)
        import torch

        from streaming_engine.loading import pick_dtype
        from streaming_engine.placement import Placement

        if self.device is not None:
            if self.device_map is not None:
                raise ValueError("give either --device or --device-map, not both")
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as exc:
                raise ValueError(f"--device {self.device!r} is not a device: use cpu, cuda, cuda:1, mps") from exc
        if self.dtype is not None and not pick_dtype(self.dtype, torch.device("cpu")).is_floating_point:
            raise ValueError(f"--dtype {self.dtype!r} is not a float type: use float32, bfloat16 or float16")
        Placement(self.device_map, self.max_memory, self.offload_folder)  # raises ValueError naming the flag

    def load_kwargs(self) -> dict:
        """The keyword arguments of `streaming_engine.load` these settings ask for."""
        return dict(trust_remote_code=self.trust_remote_code, device=self.device, dtype=self.dtype,
                    device_map=self.device_map, max_memory=self.max_memory, offload_folder=self.offload_folder,
                    backend=self.backend, n_threads=self.threads)


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
    p.add_argument("--database-url", default=env.get("DATABASE_URL") or None, metavar="postgresql://...",
                   help="store conversations in this PostgreSQL database, shared by every replica, instead of the "
                        "SQLite file in --data-dir (env DATABASE_URL; needs pip install \"psycopg[binary]\")")
    p.add_argument("--database-wait", type=float, default=env_float(env, "DATABASE_WAIT", START_WAIT_S),
                   metavar="SECONDS",
                   help="how long to wait at start for an unreachable --database-url server before refusing to "
                        f"start (env DATABASE_WAIT; default {START_WAIT_S:g})")
    p.add_argument("--partial-save-interval", type=float, metavar="SECONDS",
                   default=env_float(env, "PARTIAL_SAVE_INTERVAL", PARTIAL_SAVE_INTERVAL_S),
                   help="while a reply streams, save its partial text at most this often, so a crash loses at most "
                        f"this much of it (env PARTIAL_SAVE_INTERVAL; default {PARTIAL_SAVE_INTERVAL_S:g})")
    p.add_argument("--no-persist", action="store_true", default=env.get("NO_PERSIST", "").lower() in _TRUE,
                   help="keep conversations in memory only; nothing is written to disk (env NO_PERSIST)")
    p.add_argument("--max-sessions", type=int, default=env_int(env, "MAX_SESSIONS", MAX_SESSIONS),
                   help=f"conversations open at once on this server (env MAX_SESSIONS; default {MAX_SESSIONS})")
    p.add_argument("--max-sessions-per-client", type=int,
                   default=env_int(env, "MAX_SESSIONS_PER_CLIENT", MAX_SESSIONS_PER_OWNER),
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
    where = p.add_argument_group("where the model runs")
    where.add_argument("--device", default=env.get("DEVICE") or None,
                       help="cpu, cuda, cuda:1, mps (env DEVICE; default: cuda when available, else cpu)")
    where.add_argument("--dtype", default=env.get("DTYPE") or None,
                       help="float32, bfloat16 or float16 (env DTYPE; default: bf16/fp16 on CUDA, bf16 on a CPU with "
                            "native bf16 units, else fp32)")
    where.add_argument("--threads", type=int, default=env_int(env, "THREADS"),
                       help="CPU threads for the model (env THREADS; default: torch's choice, one per core)")
    where.add_argument("--device-map", choices=DEVICE_MAP_STRATEGIES, default=env.get("DEVICE_MAP") or None,
                       help="spread the model over every GPU, then CPU RAM, then disk (env DEVICE_MAP)")
    where.add_argument("--max-memory", metavar="DEV=SIZE,...", default=env.get("MAX_MEMORY") or None,
                       help="per-device budget for --device-map, e.g. 0=20GiB,cpu=30GiB (env MAX_MEMORY)")
    where.add_argument("--offload-folder", metavar="DIR", default=env.get("OFFLOAD_FOLDER") or None,
                       help="where --device-map writes weights offloaded to disk (env OFFLOAD_FOLDER)")
    add_decode_args(where, env=env)
    add_recall_arg(p, env=env)
    serving = p.add_argument_group("serving")
    serving.add_argument("--queue-concurrency", type=int,
                         default=env_int(env, "QUEUE_CONCURRENCY", DEFAULT_QUEUE_CONCURRENCY),
                         help=f"events handled at once (env QUEUE_CONCURRENCY; default {DEFAULT_QUEUE_CONCURRENCY})")
    serving.add_argument("--queue-max-size", type=int, default=env_int(env, "QUEUE_MAX_SIZE", DEFAULT_QUEUE_MAX_SIZE),
                         help="events waiting before 'queue is full' "
                              f"(env QUEUE_MAX_SIZE; default {DEFAULT_QUEUE_MAX_SIZE})")
    serving.add_argument("--visitor-cache-sizes", action="store_true",
                         default=env.get("VISITOR_CACHE_SIZES", "").lower() in _TRUE,
                         help="let visitors choose the cache sizes of new chats, up to the configured ones "
                              "(env VISITOR_CACHE_SIZES; default: shown read-only)")
    p.add_argument("--backend", default=env.get("BACKEND", "auto"),
                   help=f"{' | '.join(BACKENDS)} (env BACKEND; default auto: transformers; llama.cpp runs a GGUF on "
                        "the CPU only when asked for)")
    args = p.parse_args(argv)
    try:
        return AppSettings(args.model, args.start_size, args.recent_size, args.host, args.port, args.share,
                           parse_auth(args.auth), args.trust_remote_code, data_dir=args.data_dir,
                           persist=not args.no_persist, partial_save_interval_s=args.partial_save_interval,
                           database_url=args.database_url,
                           database_wait_s=args.database_wait, max_sessions=args.max_sessions,
                           max_sessions_per_client=args.max_sessions_per_client,
                           frame_ancestors=args.frame_ancestors, forwarded_allow_ips=args.forwarded_allow_ips,
                           device=args.device, dtype=args.dtype, threads=args.threads, device_map=args.device_map,
                           max_memory=args.max_memory, offload_folder=args.offload_folder,
                           queue_concurrency=args.queue_concurrency, queue_max_size=args.queue_max_size,
                           visitor_cache_sizes=args.visitor_cache_sizes, backend=args.backend,
                           decode_step=args.decode_step, cuda_graphs=args.cuda_graphs,
                           overlap=args.overlap, recall_budget=args.recall_budget)
    except ValueError as exc:
        p.error(str(exc))

