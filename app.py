"""StreamingLLM chat, the web app's composition root (Hugging Face Spaces runs this file).

It loads the model, builds the engine, composes the tabs of `webui/` into one page and launches it. Tabs:
**Chat** (`webui/chat_tab.py`), **Dense vs Streaming** (`webui/compare_tab.py`) and **About** (`webui/about.py`),
plus the HTTP API for scripts (`webui/webapi.py`) and `GET /health` (`webui/health.py`). Every model decision is
`StreamingEngine`'s.

Run `python app.py --help`. Every flag has an environment variable for Spaces (see `webui/settings.py`). The model
loads once per process (`webui/startup.py` says from where); each browser tab gets its own engine sessions, freed
when the tab goes away. On a ZeroGPU Space the engine is a `RemoteTurnsEngine`: sessions stay in this process and
only each turn's forward passes run in a GPU worker (see `webui/handlers.py`).
"""

from __future__ import annotations

import html

import gradio as gr
import torch

from streaming_engine import EngineConfig, StreamingEngine
from streaming_engine.history import MAX_HISTORY_BYTES
from streaming_engine.placement import describe_placement, input_device
from streaming_engine.remote import RemoteTurnsEngine
from webui import handlers, startup, webapi
from webui.about import build_about_tab
from webui.assets import read_css
from webui.chat_tab import build_chat_tab
from webui.compare_tab import build_compare_tab
from webui.health import add_health_route
from webui.settings import AppSettings, parse_settings


def status_line(engine: StreamingEngine, model_label: str) -> str:
    """The footer: model, where its inputs go and its weights sit, dtype, CPU threads, cache, ZeroGPU."""
    model, cfg = engine.model, engine.config
    device = input_device(model)  # not model.device: under offloading that reads "meta"
    parts = [f"Model **{html.escape(model_label)}**", f"{device} ({describe_placement(model)})",
             str(model.dtype).replace("torch.", "")]
    if device.type == "cpu":
        threads = torch.get_num_threads()
        parts.append(f"{threads} CPU thread{'s' if threads != 1 else ''}")
    parts.append(f"cache {cfg.start_size} sinks + {cfg.recent_size} recent tokens")
    if isinstance(engine, RemoteTurnsEngine):
        parts.append("ZeroGPU: each reply runs in a GPU worker")
    return " · ".join(parts)


def build_ui(engine: StreamingEngine, model_label: str, settings: AppSettings | None = None) -> gr.Blocks:
    """The whole page over `engine`: header, the tabs in order, the status footer and the HTTP API."""
    cfg = engine.config
    with gr.Blocks(title="StreamingLLM chat") as demo:
        gr.Markdown(
            "# StreamingLLM chat\nConversations that never run out of context: the cache keeps "
            f"**{cfg.start_size} attention sinks** plus the **{cfg.recent_size} most recent tokens**, so memory "
            "stays flat however long you chat. Watch the gauges while the reply streams.",
            elem_id="intro",
        )
        build_chat_tab(demo, engine, visitor_cache_sizes=bool(settings and settings.visitor_cache_sizes))
        build_compare_tab(engine)
        build_about_tab()
        gr.Markdown(status_line(engine, model_label), elem_classes=["footer-status"], elem_id="status")
        webapi.register(engine)
    return demo


def create_engine(settings: AppSettings) -> tuple[StreamingEngine, str]:
    """Load the model the settings name and wrap it in an engine; returns it with the model's display name.
    On a ZeroGPU Space the engine runs each turn in a GPU worker and keeps the sessions here (`handlers.py`)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    config = EngineConfig(start_size=settings.start_size, recent_size=settings.recent_size)
    gpu = handlers.zerogpu_decorator(config)  # before loading: `spaces` must patch torch first
    source = startup.model_source(settings)
    model, tokenizer = startup.load_model(source, settings)
    if gpu is not None:
        return RemoteTurnsEngine(model, tokenizer, config, run_elsewhere=gpu), source.label
    return StreamingEngine(model, tokenizer, config), source.label


def launch(demo: gr.Blocks, settings: AppSettings, engine: StreamingEngine | None = None,
           prevent_thread_lock: bool = False, **kwargs):
    """Serve `demo` with the queue bounds, the upload limit (a history file), the stylesheet and `GET /health`;
    blocks until the server stops unless `prevent_thread_lock`."""
    demo.queue(default_concurrency_limit=settings.queue_concurrency, max_size=settings.queue_max_size)
    result = demo.launch(
        server_name=settings.host, server_port=settings.port, share=settings.share, auth=settings.auth,
        max_file_size=MAX_HISTORY_BYTES, css=read_css(), footer_links=["api"], prevent_thread_lock=True, **kwargs,
    )
    add_health_route(demo.app, engine)
    if not prevent_thread_lock:
        demo.block_thread()
    return result


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    try:
        engine, label = create_engine(settings)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    launch(build_ui(engine, label, settings), settings, engine)


if __name__ == "__main__":
    main()
