"""The Chat tab: one streaming conversation per browser tab beside live cache gauges, with stop, retry, new chat,
history download/upload, and the conversation brought back after a page reload (browser storage).

Handlers are plain functions whose first argument is the engine; `build_chat_tab` lays out the tab and binds
them. Each returns (or yields) the values of its event's outputs, in the order named on it. A refused message
(empty, bad setting, busy server) goes back into the input box; nothing else changes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import gradio as gr

from streaming_engine import EngineBusy, SessionNotFound
from streaming_engine.engine import MAX_MESSAGE_CHARS
from streaming_engine.sampling import MAX_NEW_TOKENS_LIMIT

from .assets import load_json_list
from .handlers import bind
from .render import (
    Throttle,
    display_messages,
    error_reply,
    final_reply,
    gauges_html,
    inert,
    mark_memory,
    user_and_pending_reply,
)
from .sessions import close_sessions, session_ids, stop_replies, tab_state

BROWSER_STORAGE_KEY = "streaming-llm-chat-history"
CONTEXT_FULL_NOTE = "*(context full)*"
EMPTY_MESSAGE = "The message is empty: type something first."
#: Longest system prompt the settings box takes (the engine's own limit is far larger).
MAX_SYSTEM_PROMPT_CHARS = 4000
#: The "Max new tokens" slider's top; the engine accepts up to `MAX_NEW_TOKENS_LIMIT`.
MAX_NEW_TOKENS_SLIDER = min(1024, MAX_NEW_TOKENS_LIMIT)


# --- handlers -------------------------------------------------------------------------------------------------
# Outputs of a turn (respond, retry_last, stream_turn): chatbot, message box, gauges, state, saved history.


def session_for(engine, state: dict, system_prompt: str) -> str:
    """The tab's conversation, created on first use (raises `EngineBusy` when the server is full)."""
    sid = state.get("sid")
    if sid and sid in engine.session_ids():
        return sid
    sid = engine.new_session("streaming", system_prompt or None)
    state["sid"] = sid
    return sid


def current_stats(engine, state) -> dict | None:
    sid = (state or {}).get("sid")
    try:
        return engine.stats(sid) if sid else None
    except SessionNotFound:
        return None


def stream_turn(engine, message, messages, state, system_prompt, temp, p, k, new_tokens, rep):
    """Shared by Send and Retry: append the turn, stream the reply, keep the gauges live."""
    state = dict(state or {})
    try:
        sid = session_for(engine, state, system_prompt)
    except (EngineBusy, ValueError) as exc:  # busy, or a system prompt too long to pin (the message names the limit)
        gr.Warning(str(exc))
        yield messages, message, gr.skip(), state, gr.skip()
        return
    messages = list(messages or []) + user_and_pending_reply(message)
    yield messages, "", gr.skip(), state, gr.skip()
    reply, throttle = "", Throttle()
    sampling = dict(temperature=float(temp), top_p=float(p), top_k=int(k), max_new_tokens=int(new_tokens),
                    repetition_penalty=float(rep))
    for event in engine.chat(sid, message, **sampling):
        if event.kind == "delta":
            reply += event.text
            if throttle.due():
                messages[-1] = {"role": "assistant", "content": inert(reply)}
                messages = mark_memory(messages, engine.memory_map(sid))  # live: evictions fade older messages
                yield messages, "", gauges_html(event.stats, phase="generating"), state, gr.skip()
        elif event.kind == "done":
            messages[-1] = {"role": "assistant", "content": final_reply(event, CONTEXT_FULL_NOTE)}
            messages = mark_memory(messages, engine.memory_map(sid))
            yield messages, "", gauges_html(event.stats), state, engine.export(sid)
        else:
            gr.Warning(event.text)
            if event.accepted:  # generation failed part-way: the engine kept the message and the partial reply
                messages[-1] = {"role": "assistant", "content": error_reply(event.text)}
                yield messages, "", gauges_html(current_stats(engine, state)), state, engine.export(sid)
            else:  # refused (bad setting, busy): nothing happened, give the text back to edit
                yield messages[:-2], message, gauges_html(current_stats(engine, state)), state, gr.skip()


def respond(engine, message, messages, state, *sampling):
    """Send: one turn with the message in the box."""
    if not isinstance(message, str) or not message.strip():
        gr.Warning(EMPTY_MESSAGE)
        yield messages, message, gr.skip(), state, gr.skip()
        return
    yield from stream_turn(engine, message, messages, state, *sampling)


def retry_last(engine, messages, state, *sampling):
    """Retry: drop the last exchange and send its message again."""
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
    messages = mark_memory(display_messages(engine.history(sid)), engine.memory_map(sid))
    yield from stream_turn(engine, message, messages, state, *sampling)


def stop_reply(engine, state) -> None:
    stop_replies(engine, session_ids(state))


def start_new_chat(engine, state):
    """Outputs: chatbot, state, gauges, saved history, download file."""
    close_sessions(engine, state)
    return [], {}, gauges_html(None), "", gr.update(visible=False, value=None)


def export_history(engine, state):
    """Output: the download file (a JSON history in a fresh temporary folder)."""
    sid = (state or {}).get("sid")
    if not sid or sid not in engine.session_ids():
        gr.Warning("Nothing to download yet: send a message first.")
        return gr.update(visible=False)
    folder = Path(tempfile.mkdtemp(prefix="streaming-llm-"))
    path = folder / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(engine.export(sid), encoding="utf-8")
    return gr.update(visible=True, value=str(path))


def upload_history(engine, data, messages, state):
    """Outputs: chatbot, state, gauges, saved history. The engine checks size, encoding and schema."""
    state = dict(state or {})
    try:
        if data is None:
            raise ValueError("no file received")
        sid = engine.restore(bytes(data))
    except (ValueError, EngineBusy) as exc:
        gr.Warning(f"Could not load that history: {exc}")
        return messages, state, gr.skip(), gr.skip()
    close_sessions(engine, state)
    state = {"sid": sid}
    gr.Info("History loaded: the conversation continues from here.")
    messages = mark_memory(display_messages(engine.history(sid)), engine.memory_map(sid))
    return messages, state, gauges_html(engine.stats(sid)), engine.export(sid)


def restore_saved(engine, saved_json, state):
    """On page load: bring back the conversation kept in browser storage. Outputs: chatbot, state, gauges."""
    state = dict(state or {})
    if state.get("sid") or not saved_json:
        return gr.skip(), state, gr.skip()
    try:
        sid = engine.restore(saved_json)
    except (ValueError, EngineBusy):
        return gr.skip(), state, gr.skip()
    state["sid"] = sid
    messages = mark_memory(display_messages(engine.history(sid)), engine.memory_map(sid))
    return messages, state, gauges_html(engine.stats(sid))


# --- layout ---------------------------------------------------------------------------------------------------


def build_chat_tab(demo: gr.Blocks, engine) -> None:
    """The Chat tab inside the current `gr.Blocks` (`demo`, whose page load restores a saved conversation)."""
    cfg = engine.config
    chat_state = tab_state(engine)
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
                    pinned = (f"pinned in the model's memory, up to {cfg.pin_limit} tokens" if cfg.pin_system
                              else "not pinned: it leaves the memory like any message")
                    system = gr.Textbox(label=f"System prompt (applies to new chats; {pinned})", lines=2,
                                        max_length=MAX_SYSTEM_PROMPT_CHARS, elem_id="system")
                    with gr.Row():
                        temperature = gr.Slider(0, 2, value=cfg.temperature, step=0.05,
                                                label="Temperature (0 = greedy)")
                        top_p = gr.Slider(0.05, 1, value=cfg.top_p, step=0.05, label="Top-p")
                    with gr.Row():
                        top_k = gr.Slider(0, 200, value=cfg.top_k, step=1, label="Top-k (0 = off)")
                        max_new = gr.Slider(1, MAX_NEW_TOKENS_SLIDER, value=cfg.max_new_tokens, step=1,
                                            label="Max new tokens", elem_id="max-new-tokens")
                        repetition = gr.Slider(1.0, 2.0, value=cfg.repetition_penalty, step=0.05,
                                               label="Repetition penalty")
            with gr.Column(scale=1, min_width=260):
                gauges = gr.HTML(gauges_html(None), elem_id="gauges")
    sampling_inputs = [system, temperature, top_p, top_k, max_new, repetition]

    turn_outputs = [chatbot, msg, gauges, chat_state, saved]
    for trigger in (msg.submit, send.click):
        trigger(bind(respond, engine, gpu=True), [msg, chatbot, chat_state, *sampling_inputs], turn_outputs,
                concurrency_id="chat", api_visibility="private")
    retry.click(bind(retry_last, engine, gpu=True), [chatbot, chat_state, *sampling_inputs], turn_outputs,
                concurrency_id="chat", api_visibility="private")
    stop.click(bind(stop_reply, engine), [chat_state], None, queue=False, api_visibility="private")
    new_chat.click(bind(start_new_chat, engine), [chat_state], [chatbot, chat_state, gauges, saved, export_file],
                   queue=False, api_visibility="private")
    export_btn.click(bind(export_history, engine), [chat_state], [export_file], api_visibility="private")
    upload.upload(bind(upload_history, engine), [upload, chatbot, chat_state], [chatbot, chat_state, gauges, saved],
                  api_visibility="private")
    demo.load(bind(restore_saved, engine), [saved, chat_state], [chatbot, chat_state, gauges],
              api_visibility="private")
