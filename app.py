"""StreamingLLM chat, the web app's composition root (Hugging Face Spaces runs this file).

It loads the model, builds the engine, composes the tabs of `webui/` into one page and launches it. Tabs:
**Chat** (`webui/chat_tab.py`), **Dense vs Streaming** (`webui/compare_tab.py`) and **About** (`webui/about.py`),
plus the HTTP API for scripts (`webui/webapi.py`), the OpenAI-compatible API and `/metrics` (`webui/openai_api.py`,
`webui/metrics.py`) and `GET /health` (`webui/health.py`). Every model decision is `StreamingEngine`'s.

Run `python app.py --help`. Every flag has an environment variable for Spaces (see `webui/settings.py`). The model
loads once per process (`webui/startup.py` says from where); conversations are kept server-side
(`streaming_engine.conversations`, in the SQLite database under `--data-dir` unless `--no-persist`), each browser
tab's live sessions are freed within seconds of the tab going away, and every response carries the security headers
of `webui/security.py`. On a ZeroGPU Space the engine is a `RemoteTurnsEngine`: sessions stay in this process and
only each turn's forward passes run in a GPU worker (see `webui/handlers.py`).
"""

from __future__ import annotations

import html
import logging
import os
import sqlite3
import sys

if __name__ == "__main__":
    # Flags first: `--help` and a mistyped flag answer before the imports below, which take seconds (torch,
    # transformers, gradio). `webui.settings` imports nothing heavy; `main` parses the same flags again.
    from webui.settings import parse_settings as _parse_flags_early

    _parse_flags_early(sys.argv[1:])

import gradio as gr  # noqa: E402  (after the early flag check above)
import torch

from streaming_engine import EngineConfig, StreamingEngine
from streaming_engine.conversations import Conversations
from streaming_engine.history import MAX_HISTORY_BYTES
from streaming_engine.loading import DEFAULT_MODEL_NAME
from streaming_engine.remote import RemoteTurnsEngine
from streaming_engine.store import ChatStore, StoreError
from streaming_engine.store_pg import UNREACHABLE_AT_START
from streaming_engine.stores import open_store
from webui import browser_key, files, handlers, http_auth, metrics, openai_api, security, startup, webapi
from webui.about import build_about_tab
from webui.assets import read_css
from webui.chat_tab import build_chat_tab
from webui.compare_tab import build_compare_tab
from webui.health import add_health_route, report_problems
from webui.sessions import tab_closed
from webui.settings import AppSettings, parse_settings


def status_line(engine: StreamingEngine, model_label: str) -> str:
    """The footer: model, where its inputs go and its weights sit, dtype, CPU threads, cache, the decode path
    ("decode eager", "decode static", "decode static+graphs"), ZeroGPU."""
    cfg = engine.config
    described = engine.backend.describe()  # where inputs go and weights sit, dtype, thread count
    parts = [f"Model **{html.escape(model_label)}**", *described.where]
    if described.device.type == "cpu":
        threads = described.threads
        parts.append(f"{threads} CPU thread{'s' if threads != 1 else ''}")
    parts.append(f"cache {cfg.start_size} sinks + {cfg.recent_size} recent tokens")
    parts.append(f"decode {engine.decode_path}")
    if isinstance(engine, RemoteTurnsEngine):
        parts.append("ZeroGPU: each reply runs in a GPU worker")
    return " · ".join(parts)


def build_ui(engine: StreamingEngine, model_label: str, conversations: Conversations | None = None,
             settings: AppSettings | None = None) -> gr.Blocks:
    """The whole page over `engine`: header, the tabs in order, the status footer and the HTTP API.
    `conversations` keeps the chat tab's conversations (default: in memory only, nothing written); `settings`
    says what visitors may choose (default: nothing beyond sampling)."""
    conversations = conversations or Conversations(engine, ChatStore(None))
    cfg = engine.config
    files.private_cache_dir()  # before the Blocks, which reads it: uploads/downloads in a 0700 folder
    with gr.Blocks(title="StreamingLLM chat", delete_cache=files.BLOCKS_DELETE_CACHE) as demo:
        gr.Markdown(
            "# StreamingLLM chat\nConversations that never run out of context: the cache keeps "
            f"**{cfg.start_size} attention sinks** plus the **{cfg.recent_size} most recent tokens**, so memory "
            "stays flat however long you chat. Watch the gauges while the reply streams.",
            elem_id="intro",
        )
        build_chat_tab(demo, conversations, visitor_cache_sizes=bool(settings and settings.visitor_cache_sizes))
        build_compare_tab(engine)
        build_about_tab()
        footer = gr.Markdown(status_line(engine, model_label), elem_classes=["footer-status"], elem_id="status")
        # Read again on each page load: the decode path can change while the app runs (graphs that fail to record
        # fall back to the uncaptured step).
        demo.load(lambda: status_line(engine, model_label), None, footer, queue=False, api_visibility="private")
        webapi.register(engine)
        demo.unload(tab_closed)  # a page went away: free its sessions (see webui/sessions.py)
    return demo


def create_engine(settings: AppSettings) -> tuple[StreamingEngine, str]:
    """Load the model the settings name and wrap it in an engine; returns it with the model's display name.
    On a ZeroGPU Space the engine runs each turn in a GPU worker and keeps the sessions here (`handlers.py`)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    config = EngineConfig(start_size=settings.start_size, recent_size=settings.recent_size,
                          max_sessions=settings.max_sessions, max_sessions_per_owner=settings.max_sessions_per_client,
                          decode_step=settings.decode_step, cuda_graphs=settings.cuda_graphs,
                          overlap=settings.overlap, recall_budget=settings.recall_budget)
    gpu = handlers.zerogpu_decorator(config)  # before loading: `spaces` must patch torch first
    source = startup.model_source(settings)
    model, tokenizer = startup.load_model(source, settings)
    if gpu is not None:
        return RemoteTurnsEngine(model, tokenizer, config, run_elsewhere=gpu), source.label
    return StreamingEngine(model, tokenizer, config), source.label


def open_conversations(engine: StreamingEngine, settings: AppSettings) -> Conversations:
    """The engine's conversations over the store the settings name (`open_store`). An unusable store (corrupted,
    read-only data dir, a database server lost later) does not stop start-up: the app warns, chats unsaved (as on a
    full disk), and /health says "degraded" with the reason. A `--database-url` server not reached within
    `--database-wait` seconds does: `StoreError` code `UNREACHABLE_AT_START` (see `store_pg.open_when_reachable`)."""
    try:
        store = open_store(settings.data_dir, database_url=settings.database_url, persist=settings.persist,
                           database_wait_s=settings.database_wait_s, say=_say)
        conversations = Conversations(engine, store, partial_save_interval_s=settings.partial_save_interval_s)
        problem_at_start = None
    except StoreError as exc:
        if exc.code == UNREACHABLE_AT_START:  # a shared store never reached: refuse to start (store_pg says why)
            raise
        problem_at_start = f"{exc}; chats are not saved"
    except (sqlite3.Error, OSError) as exc:  # a read-only dir fails past the open
        problem_at_start = f"{exc}; chats are not saved"
    if problem_at_start is not None:
        logging.getLogger(__name__).warning("%s", problem_at_start)
        print(f"warning: {problem_at_start}", file=sys.stderr)
        conversations = Conversations(engine, ChatStore(None))
    report_problems("storage", lambda: problem_at_start or conversations.storage_problem())
    return conversations


def _say(line: str) -> None:
    """A start-up progress line, on stderr at once (the log a container or supervisor shows)."""
    print(line, file=sys.stderr, flush=True)


def launch(demo: gr.Blocks, settings: AppSettings, engine: StreamingEngine | None = None,
           model_label: str = DEFAULT_MODEL_NAME, prevent_thread_lock: bool = False, **kwargs):
    """Serve `demo` with the queue bounds, the upload limit (a history file), the stylesheet, `GET /health`, the
    security headers on every response and the browser key on the page (`browser_key.py`); with `engine`, also
    mount the plain HTTP APIs (OpenAI-compatible, Prometheus) on the same server, behind the same login. The
    proxies trusted to name the client go to uvicorn (it reads `FORWARDED_ALLOW_IPS` when the server starts).
    Blocks until the server stops unless `prevent_thread_lock`."""
    demo.queue(default_concurrency_limit=settings.queue_concurrency, max_size=settings.queue_max_size)
    os.environ["FORWARDED_ALLOW_IPS"] = settings.forwarded_allow_ips
    result = demo.launch(
        server_name=settings.host, server_port=settings.port, share=settings.share, auth=settings.auth,
        max_file_size=MAX_HISTORY_BYTES, css=read_css(), footer_links=["api"], prevent_thread_lock=True,
        app_kwargs={"middleware": [security.middleware(settings.frame_ancestors), http_auth.throttle_middleware(),
                                   browser_key.middleware()]},
        **kwargs,
    )
    # Gradio's FastAPI app exists once launched.
    add_health_route(demo.app, engine)
    if engine is not None:
        openai_api.mount(demo.app, engine, model_name=model_label, auth=settings.auth)
        metrics.mount(demo.app, engine, auth=settings.auth, queue_length=lambda: len(demo._queue))
    if not prevent_thread_lock:
        demo.block_thread()
    return result


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    try:
        engine, label = create_engine(settings)
        conversations = open_conversations(engine, settings)
    except StoreError as exc:  # the typed code first: scripts and supervisors match on it
        raise SystemExit(f"error [{exc.code}]: {exc}") from exc
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    launch(build_ui(engine, label, conversations, settings), settings, engine, model_label=label)


if __name__ == "__main__":
    main()
