"""What the page shows, as text, HTML and plot data: the inert markdown sanitizer, the cache gauges (each state
named and every number explained), reply and error text, the comparison plots' data frames, and how often a
streaming handler repaints. Pure functions of their inputs; no engine calls, no gradio components.
"""

from __future__ import annotations

import html
import math
import re
import time

from streaming_engine.session import MODES
from streaming_engine.validate import MARK_KEYS

from .settings import STREAM_UI_INTERVAL_S

# --- inert chat text ------------------------------------------------------------------------------------------

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


# --- chat messages --------------------------------------------------------------------------------------------


def user_and_pending_reply(message: str) -> list[dict]:
    """The two Chatbot messages a new turn adds: the user's text and an empty reply that fills as it streams."""
    return [{"role": "user", "content": inert(message)}, {"role": "assistant", "content": ""}]


#: Under a reply that was cut off (the server stopped, or the page went away, while it was written).
INTERRUPTED_NOTE = "*(interrupted: this reply was cut off)*"
#: Under a reply the user stopped.
STOPPED_NOTE = "*(stopped)*"
#: Under a reply that ended at its `max_new_tokens`: mid-sentence, which would otherwise look like a fault. Continue
#: resumes it exactly (not "ask it to go on": a new user turn makes a small model wrap up rather than resume).
TRUNCATED_NOTE = "*(cut at the length limit: press Continue to go on, or raise Max new tokens in Settings)*"
#: The note under a reply carrying each mark (`validate.MARK_KEYS`), as it ended and after a reload alike.
MARK_NOTES = {"interrupted": INTERRUPTED_NOTE, "stopped": STOPPED_NOTE, "truncated": TRUNCATED_NOTE}


def mark_note(message: dict) -> str:
    """The note under a stored reply: that of its first mark in `MARK_KEYS` order, "" when it carries none."""
    return next((MARK_NOTES[key] for key in MARK_KEYS if message.get(key)), "")


def final_reply(event, context_full_note: str, marks: tuple[str, ...] = MARK_KEYS) -> str:
    """The Chatbot text of a finished reply: the reply made inert, plus why it ended when that is not obvious
    (context full; or the note of the mark it keeps, `Event.mark`, among `marks`: stopped by the user, cut at the
    length limit). A reply stopped before its first token says so instead of showing nothing."""
    note = (context_full_note if event.finish_reason == "context_full"
            else MARK_NOTES[event.mark] if event.mark in marks else None)
    return "\n\n".join(part for part in (inert(event.text), note) if part) or "…"


def error_reply(text: str) -> str:
    """The Chatbot text of a turn that failed: the engine's message, marked and made inert."""
    return f"⚠️ {inert(text)}"


def display_messages(history: list[dict]) -> list[dict]:
    """Engine history -> Chatbot messages (system prompt hidden, text made inert)."""
    return [
        {"role": m["role"], "content": inert(m["content"])}
        for m in history if m["role"] in ("user", "assistant")
    ]


#: Put before a message the model can no longer see (all of it, or a part), so the page can fade it (style.css).
FORGOTTEN_MARK = ('<span class="memory-gone" title="This message has left the KV cache: the model no longer sees '
                  'it.">no longer in the model\'s memory</span>\n\n')
PARTLY_FORGOTTEN_MARK = ('<span class="memory-partial" title="Part of this message has left the KV cache.">partly '
                         'out of the model\'s memory ({held} of {tokens} tokens held)</span>\n\n')


#: Put before a reply whose turn recalled evicted messages (the memory map's `recalled`, `session.py`): one link
#: per recalled message to its anchor (`RECALL_TARGET`), numbered as the chat shows messages, from 1.
RECALLED_MARK = ('<span class="memory-recalled" title="Earlier messages that had left the KV cache, quoted back into '
                 'the prompt for this reply (recall).">recalled: {links}</span>\n\n')
RECALLED_LINK = '<a href="#recalled-{n}" class="recalled-link">message {n}</a>'
#: Put before a message that some turn recalled, so the marker's link has somewhere to go.
RECALL_TARGET = '<span class="recall-target" id="recalled-{n}"></span>'
#: Every marker this module puts before a message's text, as `unmarked` removes them.
_MARKS = re.compile(r'(?:<span class="(?:recall-target|memory-gone|memory-partial|memory-recalled)"[^>]*>.*?</span>'
                    r'(?:\n\n)?)+', re.DOTALL)


def mark_memory(messages: list[dict], memory: list[dict]) -> list[dict]:
    """Chatbot `messages` with a marker before each one the model no longer holds in full, from the engine's
    memory map (`engine.memory_map`, system prompt first when there is one; the reply being written may not be in
    it yet), and before each reply whose turn recalled earlier messages a "recalled" marker linking to them.
    Markers already there are replaced, so this runs on every repaint while tokens are evicted."""
    offset = 1 if memory and memory[0]["role"] == "system" else 0
    entries = memory[offset:]
    recalled_by = {i + 1: [n - offset for n in e.get("recalled", ())] for i, e in enumerate(entries)
                   if e["role"] == "user" and e.get("recalled")}  # reply index -> chat indices it recalled
    targets = {n for ns in recalled_by.values() for n in ns}
    out = []
    for i, message in enumerate(messages):
        state = entries[i] if i < len(entries) else None
        mark = RECALL_TARGET.format(n=i + 1) if i in targets else ""
        if state is not None and state["state"] == "gone":
            mark += FORGOTTEN_MARK
        elif state is not None and state["state"] == "partial":
            mark += PARTLY_FORGOTTEN_MARK.format(held=state["held"], tokens=state["tokens"])
        if recalled_by.get(i) and message["role"] == "assistant":
            links = ", ".join(RECALLED_LINK.format(n=n + 1) for n in recalled_by[i])
            mark += RECALLED_MARK.format(links=links)
        content = message["content"]
        if isinstance(content, str):
            content = mark + unmarked(content)
        elif isinstance(content, list) and content and isinstance(content[0], dict) and "text" in content[0]:
            # The Chatbot hands its messages back as content parts ([{"type": "text", "text": ...}, ...]).
            content = [{**content[0], "text": mark + unmarked(content[0]["text"])}, *content[1:]]
        out.append({**message, "content": content})
    return out


def unmarked(content: str) -> str:
    """A message's text without the markers `mark_memory` put before it (if any)."""
    match = _MARKS.match(content)
    return content[match.end():] if match else content


class Throttle:
    """`due()` is True at most once per `interval` seconds: how often a streaming handler repaints the page."""

    def __init__(self, interval: float = STREAM_UI_INTERVAL_S):
        self.interval = interval
        self._last = float("-inf")

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


# --- gauges ---------------------------------------------------------------------------------------------------

#: One line per gauge for people who have not read the paper: each row's tooltip, and the "What do these mean?"
#: list under the gauges (a phone has no hover).
GAUGE_HELP = {
    "fill": "How many tokens the KV cache holds now, out of the most it may hold. Dark blue: the attention sinks.",
    "sink_tokens": "The first tokens of the conversation, kept forever: the model parks unneeded attention on "
                   "them, and removing them is what breaks plain sliding windows.",
    "evicted_tokens": "Tokens dropped from the middle of the cache so far, oldest first, to keep memory flat.",
    "seen_tokens": "Every token this cache has taken in since it was last (re)built: held + evicted.",
    "kv_bytes": "Memory of the cached keys and values. It stops growing once the cache is full.",
    "tokens_per_s": "Reply speed of the last turn, in tokens per second.",
    "time_to_first_token_s": "Wait between sending and the first word of the reply.",
    "turns": "Messages you have sent in this conversation (kept in the history, even when their tokens are "
             "evicted from the cache).",
    "turns_in_memory": "Turns (your message and its reply) the model still sees whole; older ones have left the "
                       "cache in part or in full, and are shown faded in the chat.",
    "pinned_tokens": "Tokens of the system prompt kept in the cache for good, next to the attention sinks, so the "
                     "model never forgets its instructions.",
    "recalled_tokens": "Tokens of earlier, evicted messages quoted back into the last turn's prompt because they "
                       "matched your message (recall); they are fed and evicted like any other tokens.",
}
#: What the cache is doing, as a short label and one sentence (`{free}`, `{capacity}` and `{turns}` filled in,
#: each a count with its noun: "1 token", "213 tokens", "8 earlier turns").
GAUGE_STATES = {
    "empty": ("Empty", "The cache fills as you chat: room for {capacity}."),
    "filling": ("Filling", "{free} free before the first eviction."),
    "dense": ("Filling", "Dense attention never evicts: {free} left of {capacity}."),
    "reserved": ("Room reserved", "Room made for the reply: {free} free. Each turn evicts once, up front, "
                                  "enough for its prompt and the longest reply allowed."),
    "evicting": ("Evicting", "At capacity: each new token pushes the oldest recent one out; memory stays flat."),
    "restored": ("Restored", "History not in the cache yet ({turns}): your next message rebuilds it (the sinks and "
                             "the most recent part), and tokens seen count from there."),
    "context-full": ("Context full", "Dense attention cannot go on. Reset to start over."),
}


def counted(n: int, noun: str) -> str:
    """`n` and its noun, singular for one: "1 token", "1,024 tokens"."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def gauge_state(stats: dict) -> str:
    """Which of `GAUGE_STATES` describes a session's stats."""
    held, capacity = int(stats.get("cache_tokens", 0)), int(stats.get("cache_capacity", 0) or 0)
    if stats.get("context_full"):
        return "context-full"
    if held == 0:
        return "restored" if stats.get("turns") else "empty"
    if stats.get("mode") == "dense":
        return "dense"
    if held >= capacity > 0:  # full, evicted yet or not: the next token pushes the oldest out ("0 free" is no filling)
        return "evicting"
    if not stats.get("evicted_tokens"):
        return "filling"
    return "evicting" if held >= capacity else "reserved"


def human_bytes(n: int | None) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def gauges_html(stats: dict | None, title: str = "Cache", phase: str = "idle", capacity: int | None = None,
                start_size: int | None = None) -> str:
    """The live gauges. Every number carries `data-key`/`data-value` so tests can read it; `phase` is
    "generating" while a reply streams and "idle" otherwise. `capacity` and `start_size` are what an empty gauge
    (no session yet) shows as the cache's size and its sinks, so it reads "0 / 4" sinks as the session will, not
    "0 / 0"."""
    s = dict(stats or {})
    if not s.get("cache_capacity") and capacity:
        s["cache_capacity"] = capacity
    if "start_size" not in s and start_size is not None:
        s["start_size"] = start_size
    held, capacity = int(s.get("cache_tokens", 0)), int(s.get("cache_capacity", 0) or 0)
    sinks = int(s.get("sink_tokens", 0))
    start = int(s.get("start_size", sinks) or 0)
    fill = min(100.0, 100.0 * held / capacity) if capacity else 0.0
    state = gauge_state(s)
    fill_class = "gauge-fill" + {"context-full": " dense-full", "evicting": " full"}.get(state, "")
    label, sentence = GAUGE_STATES[state]
    note = sentence.format(free=counted(max(0, capacity - held), "token"), capacity=counted(capacity, "token"),
                           turns=counted(int(s.get("turns", 0)), "earlier turn"))

    def row(key, name, value, shown):
        tip = html.escape(GAUGE_HELP[key], quote=True)
        return (f'<div class="gauge-row" title="{tip}"><span class="gauge-label">{name}</span>'
                f'<span class="gauge-value" data-key="{key}" data-value="{value}">{shown}</span></div>')

    rate, ttft = s.get("tokens_per_s"), s.get("time_to_first_token_s")
    evicted, seen = int(s.get("evicted_tokens", 0)), int(s.get("seen_tokens", 0))
    help_items = "".join(f"<li><b>{name}</b>: {html.escape(GAUGE_HELP[key])}</li>" for key, name in (
        ("fill", "Cache fill"), ("sink_tokens", "Attention sinks"), ("evicted_tokens", "Evicted"),
        ("seen_tokens", "Tokens seen"), ("kv_bytes", "KV memory"), ("tokens_per_s", "Speed"),
        ("time_to_first_token_s", "First token"), ("turns", "Turns"), ("turns_in_memory", "Turns fully in memory"),
        ("pinned_tokens", "Pinned system prompt"), ("recalled_tokens", "Recalled")))
    return (
        f'<div class="gauges" data-mode="{s.get("mode", "")}" data-phase="{phase}" data-state="{state}" '
        f'data-context-full="{str(bool(s.get("context_full"))).lower()}">'
        f'<div class="gauge-head"><h4>{html.escape(title)}</h4>'
        f'<span class="gauge-state state-{state}" data-key="state">{label}</span></div>'
        f'<div class="gauge-bar" data-key="fill" data-held="{held}" data-capacity="{capacity}" '
        f'title="{html.escape(GAUGE_HELP["fill"], quote=True)}">'
        f'<div class="{fill_class}" style="width:{fill:.1f}%"></div>'
        f'<div class="gauge-sinks" style="width:{100.0 * sinks / capacity if capacity else 0:.2f}%"></div></div>'
        f'<div class="gauge-caption"><span>cache fill</span><span>{held:,} / {capacity:,} tokens</span></div>'
        f'<div class="gauge-note note-{state}" data-key="note">{html.escape(note)}</div>'
        '<div class="gauge-rows">'
        + row("sink_tokens", "Attention sinks", sinks, f"{sinks} / {start}")
        + row("evicted_tokens", "Evicted (total)", evicted, f"{evicted:,}")
        + row("seen_tokens", "Tokens seen", seen, f"{seen:,}")
        + row("kv_bytes", "KV memory", s.get("kv_bytes", 0), human_bytes(s.get("kv_bytes")))
        + row("tokens_per_s", "Speed", rate or 0, f"{rate:.1f} tok/s" if rate else "–")
        + row("time_to_first_token_s", "First token", ttft or 0, f"{ttft:.2f} s" if ttft else "–")
        + row("turns", "Turns", s.get("turns", 0), f"{s.get('turns', 0)}")
        + row("turns_in_memory", "Turns fully in memory", s.get("turns_in_memory", 0),
              f"{s.get('turns_in_memory', 0)} of {s.get('turns', 0)}")
        + row("pinned_tokens", "Pinned system prompt", s.get("pinned_tokens", 0),
              f"{s.get('pinned_tokens', 0)} tokens" if s.get("pinned_tokens") else "–")
        + row("recalled_tokens", "Recalled (last turn)", s.get("recalled_tokens", 0),
              f"{counted(s.get('recalled_tokens', 0), 'token')} from "
              f"{counted(len(s.get('recalled_messages') or ()), 'message')}"
              if s.get("recalled_tokens") else "–")
        + '</div><details class="gauge-help"><summary>What do these mean?</summary>'
        f'<ul>{help_items}</ul></details></div>'
    )


# --- comparison plots -----------------------------------------------------------------------------------------

#: Points per mode sent to a plot: a long autopilot run is thinned to this many (evenly, the last kept), so an
#: update stays a few kilobytes and the browser redraws it quickly however long the run (measured: drawing 200
#: points per mode took a busy page's main thread about three times as long as 50).
PLOT_POINTS_PER_MODE = 120
#: Per-token latency is plotted as a rolling median over this many tokens: single tokens jitter by a factor of two
#: on a busy CPU, the median shows the trend (flat for a bounded cache, rising for dense).
LATENCY_MEDIAN_WINDOW = 25
#: The plots are redrawn at most this often while tokens stream (seconds): each redraw rebuilds the chart.
PLOT_INTERVAL_S = 1.0
#: The order the plots draw their lines in, the last on top: streaming last, so that window's line, identical until
#: the cache fills, does not hide it.
PLOT_ORDER = tuple(m for m in MODES if m != "streaming") + ("streaming",)
#: Where a plot's y axis may end: the data's highest point rounded up to one of these times a power of ten
#: (`axis_top`). The axis moves only when the data outgrows it (or shrinks well below it), and each move makes
#: gradio draw the chart anew, laying its margins out again for the new labels. A data update alone never does,
#: and a margin has room for only about two more digits than the labels it was laid out for: beyond that the
#: y-axis title is pushed out of the block. Between moves the axis stands still instead of rescaling at every
#: redraw.
AXIS_STEPS = (1, 1.5, 2, 3, 5, 7.5, 10)
#: Column names, which are also the plots' axis titles.
X_COLUMN, MEMORY_COLUMN, LATENCY_COLUMN, MODE_COLUMN = "tokens seen", "KV cache (MiB)", "ms per token", "mode"


def series_point(stats: dict) -> dict:
    """One point of a mode's plot series, from a delta event's stats."""
    return {"seen": stats["seen_tokens"], "kv": stats["kv_bytes"], "latency": stats.get("last_token_latency_s")}


def _thin(rows: list, limit: int = PLOT_POINTS_PER_MODE) -> list:
    if len(rows) <= limit:
        return rows
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit - 1)] + [rows[-1]]


def _rolling_median(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = sorted(values[max(0, i - window + 1): i + 1])
        mid = len(chunk) // 2
        out.append(chunk[mid] if len(chunk) % 2 else (chunk[mid - 1] + chunk[mid]) / 2)
    return out


def plot_frames(series: dict[str, list[dict]]):
    """The two plots' data as DataFrames (for `gr.LinePlot`): KV memory and rolling-median latency against tokens
    seen, one line per mode. `series[mode]` is a list of `series_point` dicts.

    A plot with nothing to draw yet gets None (gradio shows an empty plot), never a frame of bare axes: the chart
    lays out its margins when it is first drawn, from the tick labels it has then, and later data only replaces
    its points. Drawn first from an empty frame, its margin fitted "0" or no label at all, and the wider labels
    of real data ("650") pushed the y-axis title out of the block."""
    import pandas as pd

    # Every mode starts with a point at 0 tokens seen (no memory yet; latency unknown, so NaN, which is not drawn):
    # the plot fixes its colour legend from the data it first gets, so every mode must be in it from the start.
    memory = [{X_COLUMN: 0, MEMORY_COLUMN: 0.0, MODE_COLUMN: mode} for mode in PLOT_ORDER]
    latency = [{X_COLUMN: 0, LATENCY_COLUMN: math.nan, MODE_COLUMN: mode} for mode in PLOT_ORDER]
    for mode, points in sorted(series.items(), key=lambda item: PLOT_ORDER.index(item[0])):
        memory += [{X_COLUMN: p["seen"], MEMORY_COLUMN: p["kv"] / 2**20, MODE_COLUMN: mode} for p in _thin(points)]
        timed = [p for p in points if p.get("latency") is not None]
        medians = _rolling_median([p["latency"] * 1000 for p in timed], LATENCY_MEDIAN_WINDOW)
        latency += _thin([{X_COLUMN: p["seen"], LATENCY_COLUMN: m, MODE_COLUMN: mode}
                          for p, m in zip(timed, medians)])
    # Numeric dtypes set by `_frame`: gradio reads an axis's type from the column's dtype, and an object column
    # (what pandas infers from rows it cannot type) would make every tick a category.
    # Every row past the starting points is a real point (memory from a token, latency from a timed one).
    drawn = len(PLOT_ORDER)
    return tuple(_frame(rows, y) if len(rows) > drawn else None
                 for rows, y in ((memory, MEMORY_COLUMN), (latency, LATENCY_COLUMN)))


def axis_top(value: float) -> float:
    """The top of a y axis that shows `value`: the smallest `AXIS_STEPS` step times a power of ten at or above it
    (1.0 for nothing above zero). At most 5/3 of `value`, so the lines fill most of the plot's height."""
    if not value > 0:
        return 1.0
    scale = 10.0 ** math.floor(math.log10(value))
    # To 12 significant digits: 3 * 0.1 is 0.30000000000000004, which would be the axis's top label.
    tops = (float(f"{step * scale:.12g}") for step in AXIS_STEPS)
    return next(top for top in tops if top >= value)


def _frame(rows: list[dict], y: str):
    import pandas as pd

    frame = pd.DataFrame(rows, columns=[X_COLUMN, y, MODE_COLUMN])
    return frame.astype({X_COLUMN: "int64", y: "float64", MODE_COLUMN: "object"})
