"""StreamingLLM chat, the web app's composition root (Hugging Face Spaces runs this file).

It loads the model, builds the engine, composes the tabs of `webui/` into one page and launches it. Tabs:
**Chat** (`webui/chat_tab.py`), **Dense vs Streaming** (`webui/compare_tab.py`) and **About** (`webui/about.py`),
plus the HTTP API for scripts (`webui/webapi.py`). Every model decision is `StreamingEngine`'s.

Run `python app.py --help`. Every flag has an environment variable for Spaces (see `webui/settings.py`). The model
loads once per process; each browser tab gets its own engine sessions, freed when the tab goes away.
"""

from __future__ import annotations

import html

import gradio as gr

from streaming_engine import EngineConfig, StreamingEngine, load
from streaming_engine.history import MAX_HISTORY_BYTES
from streaming_engine.loading import DEFAULT_MODEL_NAME
from webui import metrics, openai_api, webapi
from webui.about import build_about_tab
from webui.assets import read_css
from webui.chat_tab import build_chat_tab
from webui.compare_tab import build_compare_tab
from webui.settings import QUEUE_CONCURRENCY, QUEUE_MAX_SIZE, AppSettings, parse_settings


def build_ui(engine: StreamingEngine, model_label: str) -> gr.Blocks:
    """The whole page over `engine`: header, the tabs in order, the status footer and the HTTP API."""
    cfg = engine.config
    with gr.Blocks(title="StreamingLLM chat") as demo:
        gr.Markdown(
            "# StreamingLLM chat\nConversations that never run out of context: the cache keeps "
            f"**{cfg.start_size} attention sinks** plus the **{cfg.recent_size} most recent tokens**, so memory "
            "stays flat however long you chat. Watch the gauges while the reply streams."
        )
        build_chat_tab(demo, engine)
        build_compare_tab(engine)
        build_about_tab()
        gr.Markdown(
            f"Model **{html.escape(model_label)}** · {engine.model.device} · "
            f"{str(engine.model.dtype).replace('torch.', '')} · cache {cfg.start_size} sinks + {cfg.recent_size} "
            "recent tokens", elem_classes=["footer-status"], elem_id="status",
        )
        webapi.register(engine)
    return demo


def create_engine(settings: AppSettings) -> tuple[StreamingEngine, str]:
    """Load the model the settings name and wrap it in an engine; returns it with the model's display name."""
    model, tokenizer = load(settings.model, trust_remote_code=settings.trust_remote_code, backend=settings.backend)
    config = EngineConfig(start_size=settings.start_size, recent_size=settings.recent_size)
    return StreamingEngine(model, tokenizer, config), settings.model or DEFAULT_MODEL_NAME


def launch(demo: gr.Blocks, settings: AppSettings, engine: StreamingEngine | None = None,
           model_label: str = DEFAULT_MODEL_NAME, **kwargs):
    """Serve `demo` with the queue bounds, the upload limit (a history file) and the stylesheet; with `engine`,
    also mount the plain HTTP APIs (OpenAI-compatible, Prometheus) on the same server, behind the same login."""
    demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    keep_running = not kwargs.pop("prevent_thread_lock", False)
    result = demo.launch(
        server_name=settings.host, server_port=settings.port, share=settings.share, auth=settings.auth,
        max_file_size=MAX_HISTORY_BYTES, css=read_css(), footer_links=["api"], prevent_thread_lock=True, **kwargs,
    )
    if engine is not None:  # gradio's FastAPI app exists once launched
        openai_api.mount(demo.app, engine, model_name=model_label, auth=settings.auth)
        metrics.mount(demo.app, engine, auth=settings.auth, queue_length=lambda: len(demo._queue))
    if keep_running:
        demo.block_thread()
    return result


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    try:
        engine, label = create_engine(settings)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    launch(build_ui(engine, label), settings, engine=engine, model_label=label)


if __name__ == "__main__":
    main()
