"""StreamingLLM chat: the Gradio Blocks web app. UI code only; every model decision is `StreamingEngine`'s.

Tabs: **Chat** (streamed replies beside live cache gauges), **Dense vs Streaming** (one prompt drives a dense, a
streaming and a window-without-sinks session side by side, with memory and latency plots and an autopilot that
runs the dense cache out of context), and **About** (what attention sinks are).

Run `python app.py --help`. Every flag has an environment variable for Hugging Face Spaces (MODEL_ID, START_SIZE,
RECENT_SIZE, HOST, PORT, SHARE, APP_AUTH). The model loads once per process; each browser tab gets its own engine
session, freed when the tab goes away or after `SESSION_TTL_S` without activity.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import queue
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

import webapi
from streaming_engine import EngineBusy, EngineConfig, SessionNotFound, StreamingEngine, load
from streaming_engine.engine import MAX_ACTIVE_TURNS, MAX_HISTORY_BYTES, MAX_MESSAGE_CHARS
from streaming_engine.loading import DEFAULT_MODEL_NAME, default_model_available
from streaming_engine.sampling import MAX_NEW_TOKENS_LIMIT
from webui import metrics, openai_api


def _assets_dir() -> Path:
    """`assets/` of a source checkout, else the copy an installed wheel ships inside the `webui` package."""
    here = Path(__file__).resolve().parent / "assets"
    return here if here.is_dir() else Path(metrics.__file__).resolve().parent / "assets"


ASSETS = _assets_dir()
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
#: Used when the offline package is absent (e.g. on a Space): the same model from the hub.
HUB_DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_START_SIZE = 4
DEFAULT_RECENT_SIZE = 1020
#: Gradio queue: events running at once (the engine interleaves them) and events waiting before "busy".
QUEUE_CONCURRENCY = MAX_ACTIVE_TURNS
QUEUE_MAX_SIZE = 64
#: A tab's session is freed this long after its last activity (or when the tab closes).
SESSION_TTL_S = 3600
#: UI refreshes while streaming are throttled to this interval (seconds).
STREAM_UI_INTERVAL_S = 0.12
#: The comparison tab's deliberately small budgets, so dense runs out within a couple of minutes on CPU.
COMPARE_START_SIZE = 4
COMPARE_RECENT_SIZE = 252
COMPARE_DENSE_CONTEXT = 512
COMPARE_WINDOW_SIZE = 256
COMPARE_MODES = ("streaming", "dense", "window")
BROWSER_STORAGE_KEY = "streaming-llm-chat-history"


@dataclass
class AppSettings:
    model: str | None = None
    start_size: int = DEFAULT_START_SIZE
    recent_size: int = DEFAULT_RECENT_SIZE
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    share: bool = False
    auth: tuple[str, str] | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        if not 0 <= self.start_size:
            raise ValueError(f"--start-size must be >= 0, got {self.start_size}")
        if not 1 <= self.recent_size:
            raise ValueError(f"--recent-size must be >= 1, got {self.recent_size}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be in [1, 65535], got {self.port}")


def parse_auth(text: str | None) -> tuple[str, str] | None:
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
                   help="attention sinks kept (env START_SIZE)")
    p.add_argument("--recent-size", type=int, default=int(env.get("RECENT_SIZE", DEFAULT_RECENT_SIZE)),
                   help="recent tokens kept (env RECENT_SIZE)")
    p.add_argument("--host", default=env.get("HOST") or env.get("GRADIO_SERVER_NAME") or
                   ("0.0.0.0" if on_space else DEFAULT_HOST), help="bind address (env HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(env.get("PORT") or env.get("GRADIO_SERVER_PORT") or DEFAULT_PORT))
    p.add_argument("--share", action="store_true", default=env.get("SHARE", "").lower() in ("1", "true", "yes"),
                   help="create a public gradio.live link (env SHARE)")
    p.add_argument("--auth", default=env.get("APP_AUTH"), help="require a login, user:password (env APP_AUTH)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code (off by default)")
    args = p.parse_args(argv)
    model = args.model
    if model is None and not default_model_available():
        model = HUB_DEFAULT_MODEL
    try:
        return AppSettings(model, args.start_size, args.recent_size, args.host, args.port, args.share,
                           parse_auth(args.auth), args.trust_remote_code)
    except ValueError as exc:
        p.error(str(exc))


# --- rendering ------------------------------------------------------------------------------------------------

#: A fence line opens or closes a fenced code block (``` or ~~~, three or more).
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
#: An inline code span: a backtick run closed by a run of the same length, within one paragraph (no blank line).
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(?:(?!\n[ \t]*\n).)+?(?<!`)\1(?!`)", re.DOTALL)
#: Prose that a markdown renderer would turn into a tag (`<b`, `</`, `<!--`, `<?`) or an image (`![`).
_TAG_OPEN = re.compile(r"<(?=[A-Za-z/!?])")
_MD_IMAGE = re.compile(r"!\[")


def _inert_prose(text: str) -> str:
    return _MD_IMAGE.sub(r"!\\[", _TAG_OPEN.sub("&lt;", text))


def _inert_inline(text: str) -> str:
    """Escape prose between inline code spans; the spans are shown verbatim by the renderer, so they stay raw."""
    out, last = [], 0
    for match in _CODE_SPAN.finditer(text):
        out += [_inert_prose(text[last:match.start()]), match.group(0)]
        last = match.end()
    return "".join(out + [_inert_prose(text[last:])])


def inert(text: str) -> str:
    """Chat text (user or model) for the Chatbot: markdown still renders (lists, code), but no tag is ever
    interpreted and no image is loaded.

    Tags and `![` outside code become literal text. Code (fenced blocks, inline spans) is left alone because the
    renderer already shows it verbatim, and an entity there would show up as "&lt;". A fence still open at the end
    (a reply mid-stream) runs to the end, as markdown renders it. Gradio's sanitizer stays on as a second layer.
    """
    out, prose, fence = [], [], None
    for line in text.splitlines(keepends=True):
        match = _FENCE.match(line)
        if fence is None and match:
            out.append(_inert_inline("".join(prose)))
            prose, fence = [], match.group(1)
            out.append(line)
        elif fence is not None:
            out.append(line)
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                    and not line.strip()[len(match.group(1)):].strip():
                fence = None
        else:
            prose.append(line)
    out.append(_inert_inline("".join(prose)))
    return "".join(out)


def human_bytes(n: int | None) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def gauges_html(stats: dict | None, title: str = "Cache", phase: str = "idle") -> str:
    """The live gauges. Every number carries `data-key`/`data-value` so tests can read it; `phase` is
    "generating" while a reply streams and "idle" otherwise."""
    s = dict(stats or {})
    held, capacity = int(s.get("cache_tokens", 0)), int(s.get("cache_capacity", 0) or 1)
    sinks = int(s.get("sink_tokens", 0))
    fill = min(100.0, 100.0 * held / capacity)
    fill_class = "gauge-fill" + (" dense-full" if s.get("context_full") else " full" if held >= capacity else "")

    def row(label, key, value, shown):
        return (f'<div class="gauge-row"><span class="gauge-label">{label}</span>'
                f'<span class="gauge-value" data-key="{key}" data-value="{value}">{shown}</span></div>')

    rate, ttft = s.get("tokens_per_s"), s.get("time_to_first_token_s")
    note = ""
    if s.get("context_full"):
        note = '<div class="gauge-note bad">Context full: dense attention cannot go on. Reset to start over.</div>'
    elif s.get("evicted_tokens"):
        note = '<div class="gauge-note">Evicting: the cache is at capacity, memory stays flat.</div>'
    mode = s.get("mode", "")
    return (
        f'<div class="gauges" data-mode="{mode}" data-phase="{phase}" '
        f'data-context-full="{str(bool(s.get("context_full"))).lower()}"><h4>{html.escape(title)}</h4>'
        f'<div class="gauge-bar" data-key="fill" data-held="{held}" data-capacity="{capacity}">'
        f'<div class="{fill_class}" style="width:{fill:.1f}%"></div>'
        f'<div class="gauge-sinks" style="width:{100.0 * sinks / capacity:.2f}%"></div></div>'
        f'<div class="gauge-caption"><span>cache fill</span><span>{held:,} / {capacity:,} tokens</span></div>'
        + row("Attention sinks held", "sink_tokens", sinks, f"{sinks}")
        + row("Evicted tokens (total)", "evicted_tokens", s.get("evicted_tokens", 0), f"{s.get('evicted_tokens', 0):,}")
        + row("Tokens seen (total)", "seen_tokens", s.get("seen_tokens", 0), f"{s.get('seen_tokens', 0):,}")
        + row("KV memory", "kv_bytes", s.get("kv_bytes", 0), human_bytes(s.get("kv_bytes")))
        + row("Decode speed", "tokens_per_s", rate or 0, f"{rate:.1f} tok/s" if rate else "–")
        + row("Time to first token", "time_to_first_token_s", ttft or 0, f"{ttft:.2f} s" if ttft else "–")
        + row("Turns", "turns", s.get("turns", 0), f"{s.get('turns', 0)}")
        + note + "</div>"
    )


def final_reply(event, context_full_note: str) -> str:
    """The Chatbot text of a finished reply: the reply made inert, plus why it ended when that is not obvious
    (stopped by the user, context full). A reply stopped before its first token says so instead of showing nothing."""
    note = {"stopped": "*(stopped)*", "context_full": context_full_note}.get(event.finish_reason)
    return "\n\n".join(part for part in (inert(event.text), note) if part) or "…"


def display_messages(history: list[dict]) -> list[dict]:
    """Engine history -> Chatbot messages (system prompt hidden, text made inert)."""
    return [
        {"role": m["role"], "content": inert(m["content"])}
        for m in history if m["role"] in ("user", "assistant")
    ]


def load_json_list(name: str) -> list[str]:
    try:
        data = json.loads((ASSETS / name).read_text(encoding="utf-8"))
        return [str(x) for x in data]
    except (OSError, ValueError):
        return []


# --- optional ZeroGPU support -----------------------------------------------------------------------------------

try:  # Hugging Face ZeroGPU Spaces attach a GPU only inside functions decorated with spaces.GPU.
    import spaces  # type: ignore

    gpu_task = spaces.GPU(duration=120)
except Exception:  # noqa: BLE001 - the package is optional and absent off Spaces
    def gpu_task(fn):
        return fn


# --- the UI -----------------------------------------------------------------------------------------------------


def build_ui(engine: StreamingEngine, settings: AppSettings, model_label: str) -> gr.Blocks:
    cfg = engine.config

    def close_session(state):
        if isinstance(state, dict):
            for sid in [state.get("sid"), *(state.get("sids") or {}).values()]:
                if sid:
                    engine.close(sid)

    def session_for(state: dict, system_prompt: str) -> str:
        sid = state.get("sid")
        if sid and sid in engine.session_ids():
            return sid
        sid = engine.new_session("streaming", system_prompt or None)
        state["sid"] = sid
        return sid

    def current_stats(state) -> dict | None:
        sid = (state or {}).get("sid")
        try:
            return engine.stats(sid) if sid else None
        except SessionNotFound:
            return None

    with gr.Blocks(title="StreamingLLM chat") as demo:
        gr.Markdown(
            "# StreamingLLM chat\nConversations that never run out of context: the cache keeps "
            f"**{cfg.start_size} attention sinks** plus the **{cfg.recent_size} most recent tokens**, so memory "
            "stays flat however long you chat. Watch the gauges while the reply streams."
        )
        chat_state = gr.State({}, time_to_live=SESSION_TTL_S, delete_callback=close_session)
        saved = gr.BrowserState("", storage_key=BROWSER_STORAGE_KEY)

        with gr.Tab("Chat", id="chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(elem_id="chatbot", height=520, sanitize_html=True, allow_tags=False,
                                         buttons=["copy"], feedback_options=None, show_label=False,
                                         placeholder="Ask anything. The conversation can go on forever.")
                    with gr.Row():
                        msg = gr.Textbox(elem_id="msg", placeholder="Type a message and press Enter…",
                                         show_label=False, scale=8, lines=1, max_lines=8,
                                         max_length=MAX_MESSAGE_CHARS, autofocus=True)
                        send = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=80)
                    with gr.Row():
                        stop = gr.Button("Stop", elem_id="stop", size="sm")
                        retry = gr.Button("Retry", elem_id="retry", size="sm")
                        new_chat = gr.Button("New chat", elem_id="new-chat", size="sm")
                        export_btn = gr.Button("Download history", elem_id="export", size="sm")
                        upload = gr.UploadButton("Upload history", file_types=[".json"], type="binary",
                                                 elem_id="upload", size="sm")
                    export_file = gr.File(label="Your conversation (JSON)", visible=False, elem_id="export-file")
                    examples = load_json_list("examples.json")
                    if examples:
                        gr.Examples([[e] for e in examples], inputs=msg, label="Try one")
                    with gr.Accordion("Settings", open=False):
                        system = gr.Textbox(label="System prompt (applies to new chats)", lines=2,
                                            max_length=4000, elem_id="system")
                        with gr.Row():
                            temperature = gr.Slider(0, 2, value=cfg.temperature, step=0.05,
                                                    label="Temperature (0 = greedy)")
                            top_p = gr.Slider(0.05, 1, value=cfg.top_p, step=0.05, label="Top-p")
                        with gr.Row():
                            top_k = gr.Slider(0, 200, value=cfg.top_k, step=1, label="Top-k (0 = off)")
                            max_new = gr.Slider(1, min(1024, MAX_NEW_TOKENS_LIMIT), value=cfg.max_new_tokens,
                                                step=1, label="Max new tokens", elem_id="max-new-tokens")
                            repetition = gr.Slider(1.0, 2.0, value=cfg.repetition_penalty, step=0.05,
                                                   label="Repetition penalty")
                with gr.Column(scale=1, min_width=260):
                    gauges = gr.HTML(gauges_html(None), elem_id="gauges")
        sampling_inputs = [system, temperature, top_p, top_k, max_new, repetition]

        def stream_turn(message, messages, state, system_prompt, temp, p, k, new_tokens, rep):
            """Shared by Send and Retry: append the turn, stream the reply, keep the gauges live."""
            state = dict(state or {})
            try:
                sid = session_for(state, system_prompt)
            except EngineBusy as exc:
                gr.Warning(str(exc))
                yield messages, message, gr.skip(), state, gr.skip()
                return
            messages = list(messages or []) + [{"role": "user", "content": inert(message)},
                                               {"role": "assistant", "content": ""}]
            yield messages, "", gr.skip(), state, gr.skip()
            reply, last_ui = "", 0.0
            sampling = dict(temperature=float(temp), top_p=float(p), top_k=int(k),
                            max_new_tokens=int(new_tokens), repetition_penalty=float(rep))
            turns_before = sum(m["role"] == "user" for m in engine.history(sid))
            for event in engine.chat(sid, message, **sampling):
                if event.kind == "delta":
                    reply += event.text
                    if time.monotonic() - last_ui >= STREAM_UI_INTERVAL_S:
                        last_ui = time.monotonic()
                        messages[-1] = {"role": "assistant", "content": inert(reply)}
                        yield messages, "", gauges_html(event.stats, phase="generating"), state, gr.skip()
                elif event.kind == "done":
                    messages[-1] = {"role": "assistant", "content": final_reply(event, "*(context full)*")}
                    yield messages, "", gauges_html(event.stats), state, engine.export(sid)
                else:
                    gr.Warning(event.text)
                    accepted = sum(m["role"] == "user" for m in engine.history(sid)) > turns_before
                    if accepted:  # generation failed mid-way: the engine kept the message and the partial reply
                        messages[-1] = {"role": "assistant", "content": f"⚠️ {html.escape(event.text)}"}
                        yield messages, "", gauges_html(current_stats(state)), state, engine.export(sid)
                    else:  # refused (bad setting, busy): nothing happened, give the text back to edit
                        yield messages[:-2], message, gauges_html(current_stats(state)), state, gr.skip()

        @gpu_task
        def respond(message, messages, state, *sampling):
            if not isinstance(message, str) or not message.strip():
                gr.Warning("The message is empty: type something first.")
                yield messages, message, gr.skip(), state, gr.skip()
                return
            yield from stream_turn(message, messages, state, *sampling)

        @gpu_task
        def retry_last(messages, state, *sampling):
            state = dict(state or {})
            sid = state.get("sid")
            try:
                if not sid:
                    raise ValueError("there is no message to retry yet")
                message = engine.rewind(sid)
            except (ValueError, SessionNotFound, EngineBusy) as exc:
                gr.Warning(str(exc))
                yield messages, gr.skip(), gr.skip(), state, gr.skip()
                return
            yield from stream_turn(message, display_messages(engine.history(sid)), state, *sampling)

        def stop_reply(state):
            sid = (state or {}).get("sid")
            if sid:
                try:
                    engine.stop(sid)
                except SessionNotFound:
                    pass

        def start_new_chat(state):
            close_session(state)
            return [], {}, gauges_html(None), "", gr.update(visible=False, value=None)

        def export_history(state):
            sid = (state or {}).get("sid")
            if not sid or sid not in engine.session_ids():
                gr.Warning("Nothing to download yet: send a message first.")
                return gr.update(visible=False)
            folder = Path(tempfile.mkdtemp(prefix="streaming-llm-"))
            path = folder / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json"
            path.write_text(engine.export(sid), encoding="utf-8")
            return gr.update(visible=True, value=str(path))

        def upload_history(data, messages, state):
            state = dict(state or {})
            try:
                if data is None:
                    raise ValueError("no file received")
                if len(data) > MAX_HISTORY_BYTES:
                    raise ValueError(f"file too large (limit {MAX_HISTORY_BYTES // 2**20} MiB)")
                sid = engine.restore(bytes(data))
            except (ValueError, EngineBusy) as exc:
                gr.Warning(f"Could not load that history: {exc}")
                return messages, state, gr.skip(), gr.skip()
            close_session(state)
            state = {"sid": sid}
            gr.Info("History loaded: the conversation continues from here.")
            return display_messages(engine.history(sid)), state, gauges_html(engine.stats(sid)), engine.export(sid)

        def on_load(saved_json, state):
            """A reload in the same browser: bring back the conversation kept in browser storage."""
            state = dict(state or {})
            if state.get("sid") or not saved_json:
                return gr.skip(), state, gr.skip()
            try:
                sid = engine.restore(saved_json)
            except (ValueError, EngineBusy):
                return gr.skip(), state, gr.skip()
            state["sid"] = sid
            return display_messages(engine.history(sid)), state, gauges_html(engine.stats(sid))

        chat_outputs = [chatbot, msg, gauges, chat_state, saved]
        for trigger in (msg.submit, send.click):
            trigger(respond, [msg, chatbot, chat_state, *sampling_inputs], chat_outputs,
                    concurrency_id="chat", api_visibility="private")
        retry.click(retry_last, [chatbot, chat_state, *sampling_inputs], chat_outputs,
                    concurrency_id="chat", api_visibility="private")
        stop.click(stop_reply, [chat_state], None, queue=False, api_visibility="private")
        new_chat.click(start_new_chat, [chat_state], [chatbot, chat_state, gauges, saved, export_file],
                       queue=False, api_visibility="private")
        export_btn.click(export_history, [chat_state], [export_file], api_visibility="private")
        upload.upload(upload_history, [upload, chatbot, chat_state], [chatbot, chat_state, gauges, saved],
                      api_visibility="private")
        demo.load(on_load, [saved, chat_state], [chatbot, chat_state, gauges], api_visibility="private")

        # --- Dense vs Streaming ---------------------------------------------------------------------------------
        compare_state = gr.State({}, time_to_live=SESSION_TTL_S, delete_callback=close_session)
        with gr.Tab("Dense vs Streaming", id="compare"):
            gr.Markdown(
                "One prompt drives three conversations with the same greedy decoding. **Streaming** keeps "
                f"{COMPARE_START_SIZE} sinks + {COMPARE_RECENT_SIZE} recent tokens; **dense** keeps everything up to "
                f"a deliberately small {COMPARE_DENSE_CONTEXT}-token budget; **window** keeps the last "
                f"{COMPARE_WINDOW_SIZE} tokens without sinks. Press **Autopilot** to feed a scripted conversation "
                "and watch dense hit *context full* while streaming keeps answering with flat memory."
            )
            with gr.Row():
                cmp_msg = gr.Textbox(elem_id="compare-msg", placeholder="One message for all sides…",
                                     show_label=False, scale=6, max_length=MAX_MESSAGE_CHARS)
                cmp_send = gr.Button("Send to all", variant="primary", elem_id="compare-send", scale=1)
                cmp_auto = gr.Button("Autopilot", elem_id="compare-autopilot", scale=1)
                cmp_stop = gr.Button("Stop", elem_id="compare-stop", scale=1)
                cmp_reset = gr.Button("Reset", elem_id="compare-reset", scale=1)
            with gr.Row():
                with_window = gr.Checkbox(True, label="Include window attention (no sinks)", elem_id="with-window")
                cmp_new = gr.Slider(16, 256, value=96, step=8, label="Max new tokens per reply")
            progress = gr.Markdown("", elem_id="compare-progress")
            cmp_chats, cmp_gauges = {}, {}
            with gr.Row():
                for mode in COMPARE_MODES:
                    with gr.Column(min_width=260):
                        cmp_chats[mode] = gr.Chatbot(label=mode, elem_id=f"chat-{mode}", height=340,
                                                     sanitize_html=True, allow_tags=False, feedback_options=None)
                        cmp_gauges[mode] = gr.HTML(gauges_html(None, mode), elem_id=f"gauges-{mode}")
            with gr.Row():
                plot_memory = gr.Plot(label="KV cache memory vs tokens seen", elem_id="plot-memory")
                plot_latency = gr.Plot(label="Per-token decode latency vs tokens seen", elem_id="plot-latency")

        def compare_sessions(state: dict, modes: list[str]) -> dict:
            sids = state.setdefault("sids", {})
            for mode in modes:
                if sids.get(mode) in engine.session_ids():
                    continue
                if mode == "streaming":
                    sids[mode] = engine.new_session("streaming", start_size=COMPARE_START_SIZE,
                                                    recent_size=COMPARE_RECENT_SIZE)
                elif mode == "dense":
                    sids[mode] = engine.new_session("dense", max_context=COMPARE_DENSE_CONTEXT)
                else:
                    sids[mode] = engine.new_session("window", start_size=0, recent_size=COMPARE_WINDOW_SIZE)
            return sids

        def compare_plots(series: dict):
            from matplotlib import pyplot as plt

            colors = {"streaming": "#1f77b4", "dense": "#6c757d", "window": "#d62728"}
            # Streaming and window hold the same number of tokens, so their memory lines coincide: dash window's.
            styles = {"window": "--"}
            figures = []
            for key, ylabel, scale in (("kv", "KV cache (MiB)", 1 / 2**20), ("latency", "ms per token", 1000)):
                fig, ax = plt.subplots(figsize=(6, 3.2))
                for mode, points in series.items():
                    pts = [(p["seen"], p[key] * scale) for p in points if p.get(key) is not None]
                    if pts:
                        ax.plot(*zip(*pts), label=mode, color=colors.get(mode), linestyle=styles.get(mode, "-"),
                                linewidth=1.3)
                ax.set_xlabel("tokens seen")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                if series:
                    ax.legend(fontsize=8)
                fig.tight_layout()
                figures.append(fig)
                plt.close(fig)
            return figures

        def compare_turn(state: dict, message: str, modes: list[str], new_tokens: int, chats: dict):
            """Send one message to every side at once; yields after each refresh."""
            sids = compare_sessions(state, modes)
            series = state.setdefault("series", {m: [] for m in COMPARE_MODES})
            events: queue.Queue = queue.Queue()

            def pump(mode):
                for event in engine.chat(sids[mode], message, temperature=0.0, max_new_tokens=int(new_tokens),
                                         repetition_penalty=1.1):
                    events.put((mode, event))
                events.put((mode, None))

            for mode in modes:
                chats[mode] = list(chats.get(mode) or []) + [{"role": "user", "content": inert(message)},
                                                             {"role": "assistant", "content": ""}]
                threading.Thread(target=pump, args=(mode,), daemon=True).start()
            replies, open_modes, stats, last_ui = {m: "" for m in modes}, set(modes), {}, 0.0
            while open_modes:
                mode, event = events.get()
                if event is None:
                    open_modes.discard(mode)
                    continue
                stats[mode] = event.stats or stats.get(mode)
                if event.kind == "delta":
                    replies[mode] += event.text
                    s = event.stats
                    series[mode].append({"seen": s["seen_tokens"], "kv": s["kv_bytes"],
                                         "latency": s.get("last_token_latency_s")})
                    shown = inert(replies[mode])
                elif event.kind == "done":
                    shown = final_reply(event, "**Context full** — dense attention cannot continue.")
                else:
                    shown = f"⚠️ {inert(event.text)}"
                chats[mode][-1] = {"role": "assistant", "content": shown}
                if time.monotonic() - last_ui >= STREAM_UI_INTERVAL_S or not open_modes:
                    last_ui = time.monotonic()
                    yield stats
            yield stats

        def compare_outputs(chats, stats, state, note, plots=None, phase="idle"):
            out = [note]
            for mode in COMPARE_MODES:
                out.append(chats.get(mode, []))
            for mode in COMPARE_MODES:
                out.append(gauges_html(stats.get(mode), mode, phase) if stats.get(mode) else gr.skip())
            out += list(plots) if plots else [gr.skip(), gr.skip()]
            out.append(state)
            return out

        compare_out = [progress, *cmp_chats.values(), *cmp_gauges.values(), plot_memory, plot_latency, compare_state]

        def autopilot_note(number: int, total: int, prompt: str, stats: dict, finished: str = "") -> str:
            head = (f"**Autopilot {finished}** after {number} of {total} prompts." if finished else
                    f"**Autopilot** prompt {number}/{total}: *{html.escape(prompt[:80])}*")
            dense = stats.get("dense") or {}
            if dense.get("context_full"):
                head += (f" Dense ran out of context at {dense.get('cache_tokens', 0):,} tokens; streaming has "
                         f"seen {(stats.get('streaming') or {}).get('seen_tokens', 0):,} in a "
                         f"{COMPARE_START_SIZE + COMPARE_RECENT_SIZE}-token cache.")
            return head

        def run_script(prompts, chats_in, state, include_window, new_tokens, autopilot=False):
            # Mutated in place, not copied: gradio keeps this very dict as the tab's state, so the Stop button
            # (which receives it) can flag a running autopilot even before its first refresh.
            state = state if isinstance(state, dict) else {}
            state["stop"] = False
            modes = [m for m in COMPARE_MODES if include_window or m != "window"]
            chats = {m: list(chats_in[i] or []) for i, m in enumerate(COMPARE_MODES)}
            try:
                compare_sessions(state, modes)
            except EngineBusy as exc:
                gr.Warning(str(exc))
                yield compare_outputs(chats, {}, state, "")
                return
            stats, sent = {}, 0
            for number, prompt in enumerate(prompts, 1):
                if state.get("stop"):
                    break
                note = autopilot_note(number, len(prompts), prompt, stats) if autopilot else ""
                for stats in compare_turn(state, prompt, modes, new_tokens, chats):
                    yield compare_outputs(chats, stats, state, note, phase="generating")
                sent = number
                note = autopilot_note(number, len(prompts), prompt, stats) if autopilot else ""
                yield compare_outputs(chats, stats, state, note, compare_plots(state["series"]))
            if autopilot:
                finished = "stopped" if state.get("stop") else "finished"
                yield compare_outputs(chats, stats, state, autopilot_note(sent, len(prompts), "", stats, finished),
                                      compare_plots(state["series"]))

        @gpu_task
        def compare_send(message, c1, c2, c3, state, include_window, new_tokens):
            if not isinstance(message, str) or not message.strip():
                gr.Warning("The message is empty: type something first.")
                yield [gr.skip()] * (1 + len(compare_out))  # nothing changes
                return
            for outputs in run_script([message], [c1, c2, c3], state, include_window, new_tokens):
                yield ["", *outputs]  # the input box empties with the first refresh

        @gpu_task
        def compare_autopilot(c1, c2, c3, state, include_window, new_tokens):
            prompts = load_json_list("autopilot.json") or ["Tell me a long story."]
            yield from run_script(prompts, [c1, c2, c3], state, include_window, new_tokens, autopilot=True)

        def compare_stop(state):
            if isinstance(state, dict):
                state["stop"] = True
                for sid in (state.get("sids") or {}).values():
                    try:
                        engine.stop(sid)
                    except SessionNotFound:
                        pass
            return state

        def compare_reset(state):
            compare_stop(state)
            close_session(state)
            empty = [gauges_html(None, m) for m in COMPARE_MODES]
            return ["", [], [], [], *empty, None, None, {}]

        cmp_inputs = [*cmp_chats.values(), compare_state, with_window, cmp_new]
        running = [
            trigger(compare_send, [cmp_msg, *cmp_inputs], [cmp_msg, *compare_out], concurrency_id="chat",
                    api_visibility="private")
            for trigger in (cmp_msg.submit, cmp_send.click)
        ]
        running.append(cmp_auto.click(compare_autopilot, cmp_inputs, compare_out, concurrency_id="chat",
                                      api_visibility="private"))
        cmp_stop.click(compare_stop, [compare_state], [compare_state], queue=False, api_visibility="private")
        # Reset also cancels a running send/autopilot, whose last refresh would otherwise repaint the old chats.
        cmp_reset.click(compare_reset, [compare_state], compare_out, queue=False, api_visibility="private",
                        cancels=running)

        with gr.Tab("About", id="about"):
            gr.Markdown(
                "## Why attention sinks?\n"
                "Autoregressive LLMs put a surprising share of their attention on the very first tokens of a "
                "sequence, whatever those tokens say: softmax attention must sum to one, and the first tokens, "
                "visible to every later token, become a place to park attention that is not needed elsewhere. "
                "Window attention evicts them as soon as the text outgrows the cache, and quality collapses. "
                "**StreamingLLM** keeps a few of them (the *attention sinks*, `start_size`) next to a sliding window "
                "of the `recent_size` most recent tokens, and gives every cached token its position *in the cache*. "
                "Memory and per-token cost stay constant, and quality stays close to dense attention, for streams "
                "of millions of tokens."
            )
            gr.Image(str(ASSETS / "attention_sinks.png"), show_label=False, interactive=False,
                     elem_id="diagram", buttons=[])
            gr.Markdown(
                "In this app the cache is a `transformers.Cache` subclass: when tokens are evicted, the keys "
                "behind the gap are re-rotated once to their new positions; attention code is untouched.\n\n"
                "**Paper:** Guangxuan Xiao, Yuandong Tian, Beidi Chen, Song Han, Mike Lewis. *Efficient Streaming "
                "Language Models with Attention Sinks.* ICLR 2024. "
                "[arXiv:2309.17453](https://arxiv.org/abs/2309.17453)"
            )

        gr.Markdown(
            f"Model **{html.escape(model_label)}** · {engine.model.device} · "
            f"{str(engine.model.dtype).replace('torch.', '')} · cache {cfg.start_size} sinks + {cfg.recent_size} "
            "recent tokens", elem_classes=["footer-status"], elem_id="status",
        )
        webapi.register(engine)
    return demo


def create_engine(settings: AppSettings) -> tuple[StreamingEngine, str]:
    model, tokenizer = load(settings.model, trust_remote_code=settings.trust_remote_code)
    config = EngineConfig(
        start_size=settings.start_size,
        recent_size=settings.recent_size,
        prefill_chunk_size=max(1, min(512, settings.recent_size // 2)),
    )
    return StreamingEngine(model, tokenizer, config), settings.model or DEFAULT_MODEL_NAME


def launch(demo: gr.Blocks, settings: AppSettings, engine: StreamingEngine | None = None,
           model_label: str = DEFAULT_MODEL_NAME, **kwargs):
    css = (ASSETS / "style.css").read_text(encoding="utf-8")
    demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    keep_running = not kwargs.pop("prevent_thread_lock", False)
    result = demo.launch(
        server_name=settings.host, server_port=settings.port, share=settings.share, auth=settings.auth,
        max_file_size=MAX_HISTORY_BYTES, css=css, footer_links=["api"], prevent_thread_lock=True, **kwargs,
    )
    if engine is not None:  # plain HTTP APIs on the same server (gradio's FastAPI app), behind the same login
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
    launch(build_ui(engine, settings, label), settings, engine=engine, model_label=label)


if __name__ == "__main__":
    main()
