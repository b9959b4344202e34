"""The Dense vs Streaming tab: one prompt drives a streaming, a dense and a window-without-sinks session side by
side (greedy, the same settings), with their gauges, memory and latency plots, and an autopilot that feeds a
scripted conversation until dense runs out of context while streaming keeps answering.

Handlers are plain functions whose first argument is the engine; `build_compare_tab` lays out the tab and binds
them. One message reaches every side through `engine.chat_many`, so the engine's scheduler interleaves them.
Outputs of the streaming handlers (`compare_outputs`): progress note, the three chats, the three gauges, the two
plots, the tab state. The plots are native `gr.LinePlot`s fed with small DataFrames (`render.plot_frames`), redrawn
while tokens stream, at most every `PLOT_INTERVAL_S`.
"""

from __future__ import annotations

import html

import gradio as gr

from streaming_engine import MODES, EngineBusy
from streaming_engine.palette import COLORS  # the benchmarks' colours too: a mode looks the same everywhere
from streaming_engine.validate import MAX_MESSAGE_CHARS

from .assets import icon, load_json_list
from .browser_key import bound
from .chat_tab import EMPTY_MESSAGE
from .handlers import bind
from .render import (
    LATENCY_COLUMN,
    LATENCY_MEDIAN_WINDOW,
    MEMORY_COLUMN,
    MODE_COLUMN,
    PLOT_INTERVAL_S,
    PLOT_ORDER,
    X_COLUMN,
    Throttle,
    axis_top,
    error_reply,
    final_reply,
    gauges_html,
    inert,
    plot_frames,
    series_point,
    user_and_pending_reply,
)
from .sessions import TABS, close_sessions, owner_of, session_ids, stop_replies, tab_of, tab_state

# The tab's deliberately small budgets, so dense runs out within a couple of minutes on CPU.
COMPARE_START_SIZE = 4
COMPARE_RECENT_SIZE = 252
COMPARE_DENSE_CONTEXT = 512
COMPARE_WINDOW_SIZE = 256
#: What each side's cache can hold, for its empty gauge.
COMPARE_CAPACITY = {"streaming": COMPARE_START_SIZE + COMPARE_RECENT_SIZE, "dense": COMPARE_DENSE_CONTEXT,
                    "window": COMPARE_WINDOW_SIZE}
#: Each side's attention sinks, for its empty gauge (dense and window keep none).
COMPARE_SINKS = {"streaming": COMPARE_START_SIZE, "dense": 0, "window": 0}
#: Every side decodes greedily with the same penalty, so differences come from the cache alone.
COMPARE_SAMPLING = dict(temperature=0.0, repetition_penalty=1.1)
DEFAULT_COMPARE_NEW_TOKENS = 96
#: The three chats and gauges repaint at most this often while replies stream (seconds): three panes at the chat
#: tab's pace kept a browser's main thread busy all the time with a fast model.
COMPARE_UI_INTERVAL_S = 0.25
#: What to look for in each plot, said under it once it has something to show.
_CACHES = (f"{COMPARE_CAPACITY['window']}-token caches" if COMPARE_CAPACITY["streaming"] == COMPARE_CAPACITY["window"]
           else f"caches ({COMPARE_CAPACITY['streaming']} and {COMPARE_CAPACITY['window']} tokens)")
MEMORY_CAPTION = (f"Dense grows with every token until its {COMPARE_DENSE_CONTEXT}-token budget is full; streaming "
                  f"and window never hold more than their {_CACHES}, so their lines level off however long the chat "
                  "runs.")
LATENCY_CAPTION = "Milliseconds per decoded token; a line ends where its side stops decoding (dense at context full)."
CONTEXT_FULL_NOTE = "**Context full** — dense attention cannot continue."
#: What the autopilot sends when `assets/autopilot.json` is missing.
FALLBACK_SCRIPT = ["Tell me a long story."]


# --- handlers -------------------------------------------------------------------------------------------------


def compare_sessions(engine, state: dict, modes: list[str], owner: str | None = None) -> dict:
    """The tab's session for each of `modes`, created on first use and counted against `owner` (the client; see
    `sessions.owner_of`). Raises `EngineBusy` when the client's or the server's cap is reached."""
    sids = state.setdefault("sids", {})
    for mode in modes:
        if sids.get(mode) in engine.session_ids():
            continue
        if mode == "streaming":
            sids[mode] = engine.new_session("streaming", start_size=COMPARE_START_SIZE,
                                            recent_size=COMPARE_RECENT_SIZE, owner=owner)
        elif mode == "dense":
            sids[mode] = engine.new_session("dense", max_context=COMPARE_DENSE_CONTEXT, owner=owner)
        else:
            sids[mode] = engine.new_session("window", start_size=0, recent_size=COMPARE_WINDOW_SIZE, owner=owner)
    return sids


def compare_turn(engine, state: dict, message: str, modes: list[str], new_tokens: int, chats: dict):
    """Send one message to every side at once; updates `chats` and the plot series in `state`, and yields the
    latest stats per mode after each (throttled) refresh and once at the end."""
    sids = compare_sessions(engine, state, modes)
    mode_of = {sids[m]: m for m in modes}
    series = state.setdefault("series", {m: [] for m in MODES})
    for mode in modes:
        chats[mode] = list(chats.get(mode) or []) + user_and_pending_reply(message)
    replies, stats, throttle = {m: "" for m in modes}, {}, Throttle(COMPARE_UI_INTERVAL_S)
    for sid, event in engine.chat_many([sids[m] for m in modes], message, max_new_tokens=int(new_tokens),
                                       **COMPARE_SAMPLING):
        mode = mode_of[sid]
        stats[mode] = event.stats or stats.get(mode)
        if event.kind == "delta":
            replies[mode] += event.text
            series[mode].append(series_point(event.stats))
            shown = inert(replies[mode])
        elif event.kind == "done":
            # The turn's last count as a point too (no latency: nothing was decoded), so the plot ends where the
            # side's gauge says "tokens seen" instead of at the last streamed token.
            if event.stats:
                series[mode].append({**series_point(event.stats), "latency": None})
            # Every side stops at the same reply length, which this tab sets for the race; a note under each
            # would only repeat it, so only a stop is noted.
            shown = final_reply(event, CONTEXT_FULL_NOTE, marks=("stopped",))
        else:
            shown = error_reply(event.text)
        chats[mode][-1] = {"role": "assistant", "content": shown}
        if throttle.due():
            yield stats
    yield stats


def compare_outputs(chats: dict, stats: dict, state: dict, note: str, plots=None, phase: str = "idle") -> list:
    """The values of the tab's outputs; sides without news keep their gauges (and the plots unless given)."""
    out = [note]
    for mode in MODES:
        out.append(chats.get(mode, []))
    for mode in MODES:
        out.append(gauges_html(stats.get(mode), mode, phase) if stats.get(mode) else gr.skip())
    out += [plot_update(frame) for frame in plots] if plots else [gr.skip(), gr.skip()]
    out.append(state)
    return out


def plot_update(frame):
    """A plot's new data (None: an empty plot) with its y axis from 0 to `render.axis_top` of the data, so the
    axis, and with it the chart's layout, changes only when the data outgrows it."""
    if frame is None:
        return None
    (y,) = [column for column in (MEMORY_COLUMN, LATENCY_COLUMN) if column in frame]
    return gr.update(value=frame, y_lim=[0, axis_top(float(frame[y].max()))])


def autopilot_note(number: int, total: int, prompt: str, stats: dict, finished: str = "") -> str:
    head = (f"**Autopilot {finished}** after {number} of {total} prompts." if finished else
            f"**Autopilot** prompt {number}/{total}: *{html.escape(prompt[:80])}*")
    dense = stats.get("dense") or {}
    if dense.get("context_full"):
        head += (f" Dense ran out of context at {dense.get('cache_tokens', 0):,} tokens; streaming has "
                 f"seen {(stats.get('streaming') or {}).get('seen_tokens', 0):,} in a "
                 f"{COMPARE_START_SIZE + COMPARE_RECENT_SIZE}-token cache.")
    return head


def run_script(engine, prompts, chats_in, state, include_window, new_tokens, autopilot=False, request=None):
    """Send `prompts` one after another to every side; yields the outputs after each refresh. The sides'
    sessions count against the client and are closed as soon as the page goes (`sessions.TABS`)."""
    # Mutated in place, not copied: gradio keeps this very dict as the tab's state, so the Stop button
    # (which receives it) can flag a running autopilot even before its first refresh.
    state = bound(state, request, copy=False)
    state["stop"] = False
    modes = [m for m in MODES if include_window or m != "window"]
    chats = {m: list(chats_in[i] or []) for i, m in enumerate(MODES)}
    try:
        compare_sessions(engine, state, modes, owner_of(request))
        TABS.on_close(tab_of(request), "compare", lambda: close_sessions(engine, state))
    except EngineBusy as exc:
        gr.Warning(str(exc))
        yield compare_outputs(chats, {}, state, "")
        return
    stats, sent, plot_throttle = {}, 0, Throttle(PLOT_INTERVAL_S)
    for number, prompt in enumerate(prompts, 1):
        if state.get("stop"):
            break
        note = autopilot_note(number, len(prompts), prompt, stats) if autopilot else ""
        for stats in compare_turn(engine, state, prompt, modes, new_tokens, chats):
            plots = plot_frames(state["series"]) if plot_throttle.due() else None  # live, a few times a second
            yield compare_outputs(chats, stats, state, note, plots, phase="generating")
        sent = number
        note = autopilot_note(number, len(prompts), prompt, stats) if autopilot else ""
        yield compare_outputs(chats, stats, state, note, plot_frames(state["series"]))
    if autopilot:
        finished = "stopped" if state.get("stop") else "finished"
        yield compare_outputs(chats, stats, state, autopilot_note(sent, len(prompts), "", stats, finished),
                              plot_frames(state["series"]))


def compare_send(engine, message, c1, c2, c3, state, include_window, new_tokens, request: gr.Request = None):
    """Send to all. Outputs: the message box, then `compare_outputs`."""
    if not isinstance(message, str) or not message.strip():
        gr.Warning(EMPTY_MESSAGE)
        yield [gr.skip()] * (1 + len(compare_outputs({}, {}, {}, "")))  # nothing changes
        return
    for outputs in run_script(engine, [message], [c1, c2, c3], state, include_window, new_tokens, request=request):
        yield ["", *outputs]  # the input box empties with the first refresh


def compare_autopilot(engine, c1, c2, c3, state, include_window, new_tokens, request: gr.Request = None):
    prompts = load_json_list("autopilot.json") or FALLBACK_SCRIPT
    yield from run_script(engine, prompts, [c1, c2, c3], state, include_window, new_tokens, autopilot=True,
                          request=request)


def compare_stop(engine, state, request: gr.Request = None):
    """Stop the replies being written and a running autopilot (before its next prompt)."""
    state = bound(state, request, copy=False)
    state["stop"] = True
    stop_replies(engine, session_ids(state))
    return state


def compare_reset(engine, state, request: gr.Request = None):
    """Stop, close every side's session and clear the tab."""
    state = compare_stop(engine, state, request)
    close_sessions(engine, state)
    empty = [gauges_html(None, m, capacity=COMPARE_CAPACITY[m], start_size=COMPARE_SINKS[m]) for m in MODES]
    return ["", [], [], [], *empty, *plot_frames({}), {}]


# --- layout ---------------------------------------------------------------------------------------------------


def comparison_plot(frame, y: str, label: str, caption: str, elem_id: str) -> gr.LinePlot:
    """One of the tab's plots of `y` against tokens seen, a line per mode, fed by `plot_update`.

    Lines are drawn in the colour map's order, the last on top: streaming, the line this tab is about, goes last so
    that window's line (the same until the cache fills) does not hide it. "~r" ticks: no axis reads "0.000000",
    and 120 stays "120". No fixed height: a block of fixed height hides whatever of the chart overflows it (the x-axis
    title and the caption went first). A plot starts empty (None, see `render.plot_frames`)."""
    return gr.LinePlot(frame, x=X_COLUMN, y=y, color=MODE_COLUMN, color_map={m: COLORS[m] for m in PLOT_ORDER},
                       x_axis_format="~r", y_axis_format="~r", tooltip="none", colors_in_legend=[], label=label,
                       caption=caption, elem_id=elem_id, min_width=280)


def build_compare_tab(engine) -> None:
    """The Dense vs Streaming tab inside the current `gr.Blocks`.

    The three sides sit side by side; on a narrow screen they stay side by side in a row that scrolls sideways,
    one side per screen width (`assets/style.css`), instead of stacking into a very long page.
    """
    compare_state = tab_state(engine)
    with gr.Tab("Dense vs Streaming", id="compare"):
        gr.Markdown(
            "One prompt drives three conversations with the same greedy decoding. **Streaming** keeps "
            f"{COMPARE_START_SIZE} sinks + {COMPARE_RECENT_SIZE} recent tokens; **dense** keeps everything up to "
            f"a deliberately small {COMPARE_DENSE_CONTEXT}-token budget; **window** keeps the last "
            f"{COMPARE_WINDOW_SIZE} tokens without sinks. Press **Autopilot** to feed a scripted conversation "
            "and watch dense hit *context full* while streaming keeps answering with flat memory.",
            elem_id="compare-intro",
        )
        with gr.Row(elem_id="compare-input-row", equal_height=True):
            cmp_msg = gr.Textbox(elem_id="compare-msg", placeholder="One message for all sides…",
                                 show_label=False, scale=6, max_length=MAX_MESSAGE_CHARS)
            cmp_send = gr.Button("Send to all", variant="primary", elem_id="compare-send", scale=1, min_width=60,
                                 icon=icon("send"))
        with gr.Row(elem_id="compare-actions", elem_classes=["icon-row"]):
            cmp_auto = gr.Button("Autopilot", elem_id="compare-autopilot", size="sm", icon=icon("autopilot"),
                                 min_width=40)
            cmp_stop = gr.Button("Stop", elem_id="compare-stop", size="sm", icon=icon("stop"), min_width=40)
            cmp_reset = gr.Button("Reset", elem_id="compare-reset", size="sm", icon=icon("reset"), min_width=40)
        progress = gr.Markdown("", elem_id="compare-progress")
        gr.Markdown("Swipe sideways for the other sides: streaming, dense, window.", elem_id="swipe-hint")
        cmp_chats, cmp_gauges = {}, {}
        with gr.Row(elem_id="compare-panes", equal_height=False):
            for mode in MODES:
                with gr.Column(min_width=260, elem_classes=["compare-pane"]):
                    cmp_chats[mode] = gr.Chatbot(label=mode, elem_id=f"chat-{mode}", height=340,
                                                 sanitize_html=True, allow_tags=False, feedback_options=None)
                    cmp_gauges[mode] = gr.HTML(gauges_html(None, mode, capacity=COMPARE_CAPACITY[mode],
                                                           start_size=COMPARE_SINKS[mode]),
                                               elem_id=f"gauges-{mode}")
        memory_frame, latency_frame = plot_frames({})
        # One legend for both plots, in the page's own text (the plot's built-in legend gets clipped at this size).
        gr.HTML('<div class="plot-legend">' + "".join(
            f'<span class="legend-item"><span class="legend-swatch" style="background:{COLORS[m]}"></span>{m}</span>'
            for m in MODES) + "</div>", elem_id="plot-legend")
        with gr.Row(elem_id="compare-plots"):
            plot_memory = comparison_plot(memory_frame, MEMORY_COLUMN, "KV cache memory vs tokens seen",
                                          MEMORY_CAPTION, "plot-memory")
            plot_latency = comparison_plot(
                latency_frame, LATENCY_COLUMN,
                f"Decode latency vs tokens seen (median of the last {LATENCY_MEDIAN_WINDOW} tokens)",
                LATENCY_CAPTION, "plot-latency")
        with gr.Accordion("Settings", open=False, elem_id="compare-settings"):
            with gr.Row():
                with_window = gr.Checkbox(True, label="Include window attention (no sinks)", elem_id="with-window")
                cmp_new = gr.Slider(16, 256, value=DEFAULT_COMPARE_NEW_TOKENS, step=8,
                                    label="Max new tokens per reply")

    outputs = [progress, *cmp_chats.values(), *cmp_gauges.values(), plot_memory, plot_latency, compare_state]
    inputs = [*cmp_chats.values(), compare_state, with_window, cmp_new]
    running = [
        trigger(bind(compare_send, engine), [cmp_msg, *inputs], [cmp_msg, *outputs],
                concurrency_id="chat", api_visibility="private")
        for trigger in (cmp_msg.submit, cmp_send.click)
    ]
    running.append(cmp_auto.click(bind(compare_autopilot, engine), inputs, outputs, concurrency_id="chat",
                                  api_visibility="private"))
    cmp_stop.click(bind(compare_stop, engine), [compare_state], [compare_state], queue=False,
                   api_visibility="private")
    # Reset also cancels a running send/autopilot, whose last refresh would otherwise repaint the old chats.
    cmp_reset.click(bind(compare_reset, engine), [compare_state], outputs, queue=False, api_visibility="private",
                    cancels=running)
