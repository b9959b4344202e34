"""What the page shows, as text, HTML and figures: the inert markdown sanitizer, the cache gauges, reply and error
text, the comparison plots, and how often a streaming handler repaints. Pure functions of their inputs; no engine
calls, no gradio components.
"""

from __future__ import annotations

import html
import re
import time

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


def final_reply(event, context_full_note: str) -> str:
    """The Chatbot text of a finished reply: the reply made inert, plus why it ended when that is not obvious
    (stopped by the user, context full). A reply stopped before its first token says so instead of showing nothing."""
    note = {"stopped": "*(stopped)*", "context_full": context_full_note}.get(event.finish_reason)
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


def mark_memory(messages: list[dict], memory: list[dict]) -> list[dict]:
    """Chatbot `messages` with a marker before each one the model no longer holds in full, from the engine's
    memory map (`engine.memory_map`, system prompt first when there is one; the reply being written may not be in
    it yet). Markers already there are replaced, so this runs on every repaint while tokens are evicted."""
    entries = [e for e in memory if e["role"] != "system"]
    out = []
    for i, message in enumerate(messages):
        state = entries[i] if i < len(entries) else None
        mark = ""
        if state is not None and state["state"] == "gone":
            mark = FORGOTTEN_MARK
        elif state is not None and state["state"] == "partial":
            mark = PARTLY_FORGOTTEN_MARK.format(held=state["held"], tokens=state["tokens"])
        content = message["content"]
        if isinstance(content, str):
            content = mark + _unmarked(content)
        elif isinstance(content, list) and content and isinstance(content[0], dict) and "text" in content[0]:
            # The Chatbot hands its messages back as content parts ([{"type": "text", "text": ...}, ...]).
            content = [{**content[0], "text": mark + _unmarked(content[0]["text"])}, *content[1:]]
        out.append({**message, "content": content})
    return out


def _unmarked(content: str) -> str:
    if content.startswith(FORGOTTEN_MARK):
        return content[len(FORGOTTEN_MARK):]
    if content.startswith('<span class="memory-partial"'):
        return content.split("</span>\n\n", 1)[-1]
    return content


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
        + row("Turns fully in memory", "turns_in_memory", s.get("turns_in_memory", 0),
              f"{s.get('turns_in_memory', 0)} of {s.get('turns', 0)}")
        + row("Pinned system prompt", "pinned_tokens", s.get("pinned_tokens", 0),
              f"{s.get('pinned_tokens', 0)} tokens" if s.get("pinned_tokens") else "–")
        + note + "</div>"
    )


# --- comparison plots -----------------------------------------------------------------------------------------


def series_point(stats: dict) -> dict:
    """One point of a mode's plot series, from a delta event's stats."""
    return {"seen": stats["seen_tokens"], "kv": stats["kv_bytes"], "latency": stats.get("last_token_latency_s")}


def memory_and_latency_figures(series: dict[str, list[dict]]) -> list:
    """Two matplotlib figures, KV memory and per-token latency against tokens seen, one line per mode.

    `series[mode]` is a list of `series_point` dicts. Colours are the benchmarks' (`eval/plots.py`), so a mode
    looks the same in the app and in the README's plots.
    """
    from matplotlib import pyplot as plt

    from streaming_engine.eval.plots import COLORS

    # Streaming and window hold the same number of tokens, so their memory lines coincide: dash window's.
    styles = {"window": "--"}
    figures = []
    for key, ylabel, scale in (("kv", "KV cache (MiB)", 1 / 2**20), ("latency", "ms per token", 1000)):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        drawn = False
        for mode, points in series.items():
            pts = [(p["seen"], p[key] * scale) for p in points if p.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=mode, color=COLORS.get(mode), linestyle=styles.get(mode, "-"),
                        linewidth=1.3)
                drawn = True
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        fig.tight_layout()
        figures.append(fig)
        plt.close(fig)
    return figures
