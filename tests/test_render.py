"""What the page shows (`webui/render.py`): inert chat text, the cache gauges, how a finished reply reads."""

from __future__ import annotations

import math
import re
import typing

import pytest

from streaming_engine import MODES, Event
from streaming_engine.session import FinishReason
from streaming_engine.validate import FINISH_MARKS, MARK_KEYS
from webui.render import (
    AXIS_STEPS,
    LATENCY_COLUMN,
    MARK_NOTES,
    MEMORY_COLUMN,
    MODE_COLUMN,
    TRUNCATED_NOTE,
    axis_top,
    final_reply,
    gauges_html,
    inert,
    mark_note,
    plot_frames,
)


def test_gauges_show_fill_sinks_evictions_and_context_full():
    html = gauges_html({"cache_tokens": 100, "cache_capacity": 100, "sink_tokens": 4, "evicted_tokens": 1234,
                            "seen_tokens": 1334, "kv_bytes": 3 * 2**20, "tokens_per_s": 19.5,
                            "time_to_first_token_s": 0.25, "turns": 7, "mode": "streaming"})
    assert 'data-key="evicted_tokens" data-value="1234"' in html and "1,234" in html
    assert 'data-held="100" data-capacity="100"' in html and "width:100.0%" in html
    assert "3.0 MiB" in html and "19.5 tok/s" in html and "Evicting" in html
    full = gauges_html({"cache_tokens": 512, "cache_capacity": 512, "context_full": True, "mode": "dense"})
    assert "Context full" in full and "dense-full" in full
    assert 'data-value="0"' in gauges_html(None)


@pytest.mark.parametrize("text", ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>",
                                  "![track](http://example.com/p.png)", "<!-- hidden --><b>bold</b>",
                                  "`code` then <iframe src=x>", "```\ncode\n```\n<svg onload=alert(1)>"])
def test_tags_and_images_outside_code_are_rendered_inert(text):
    shown = inert(text)
    for opener in ("<script", "<img", "![", "<!--", "<b>", "<iframe", "<svg"):
        assert opener not in shown


@pytest.mark.parametrize("text", ["```python\nif a < b:\n    print('<b>')\n```", "use `x<y` here",
                                  "``a ` <b>`` and", "~~~\n<div>\n~~~", "```\nstill streaming <tag"])
def test_code_is_shown_verbatim_because_the_renderer_escapes_it_itself(text):
    assert inert(text) == text


def test_plain_comparisons_and_markdown_survive():
    text = "1 < 2 and 3 > 2\n\n* item **bold**\n\n[link](https://arxiv.org/abs/2309.17453)"
    assert inert(text) == text


def test_a_code_span_cannot_hide_a_tag_across_paragraphs():
    assert "<img" not in inert("`a\n\n<img src=x>\n\nb`")


@pytest.mark.parametrize("text,reason,expected", [
    ("Paris.", "eos", "Paris."),
    ("Par", "stopped", "Par\n\n*(stopped)*"),
    ("", "stopped", "*(stopped)*"),  # stopped before the first token: say so, never an empty bubble
    ("The end", "context_full", "The end\n\nFULL"),
    ("", "context_full", "FULL"),
    ("", "eos", "…"),
    ("<b>x</b>", "eos", "&lt;b>x&lt;/b>"),
    ("Once upon", "length", f"Once upon\n\n{TRUNCATED_NOTE}"),
    ("Once upon", "stop", "Once upon"),  # its stop string: where the caller wanted it to end
])
def test_a_finished_reply_says_why_it_ended_when_that_is_not_obvious(text, reason, expected):
    assert final_reply(Event("done", text, {}, reason), "FULL") == expected


def test_every_mark_a_reply_keeps_has_its_note_and_a_page_may_leave_some_unsaid():
    assert set(MARK_NOTES) == set(MARK_KEYS) and set(FINISH_MARKS.values()) <= set(MARK_KEYS)
    assert set(FINISH_MARKS) <= set(typing.get_args(FinishReason))  # keyed by reasons a turn can end with
    for reason, mark in FINISH_MARKS.items():  # the note as it ended is the note after a reload
        assert final_reply(Event("done", "Hi", {}, reason), "FULL") == f"Hi\n\n{mark_note({mark: True})}"
    assert final_reply(Event("done", "Hi", {}, "length"), "FULL", marks=("stopped",)) == "Hi"
    # A turn that failed part-way leaves its reply interrupted; a message never taken, or a delta, marks nothing.
    assert Event("error", "failed").mark == "interrupted"
    assert Event("error", "busy", accepted=False).mark is None and Event("delta", "Hi").mark is None
    assert mark_note({}) == "" and mark_note({"interrupted": True, "truncated": True}) == MARK_NOTES["interrupted"]


CAPACITY = 1024


@pytest.mark.parametrize("stats,state,label,says", [
    (None, "empty", "Empty", "room for 1,024 tokens"),
    ({"mode": "streaming", "cache_tokens": 300, "seen_tokens": 300, "turns": 1}, "filling", "Filling",
     "724 tokens free before the first eviction"),
    # The engine made room for the reply before the prompt went in: below capacity, yet evicting.
    ({"mode": "streaming", "cache_tokens": 811, "evicted_tokens": 400, "seen_tokens": 1211, "turns": 5},
     "reserved", "Room reserved", "Room made for the reply: 213 tokens free"),
    ({"mode": "streaming", "cache_tokens": 1024, "evicted_tokens": 400, "seen_tokens": 1424, "turns": 5},
     "evicting", "Evicting", "memory stays flat"),
    # Exactly full before the first eviction: the next token evicts, so not "Filling" with "0 tokens free".
    ({"mode": "streaming", "cache_tokens": 1024, "seen_tokens": 1024, "turns": 2}, "evicting", "Evicting",
     "memory stays flat"),
    # After a reload: the history has 8 turns, the cache is rebuilt on the next message.
    ({"mode": "streaming", "cache_tokens": 0, "seen_tokens": 0, "turns": 8}, "restored", "Restored",
     "History not in the cache yet (8 earlier turns)"),
    ({"mode": "streaming", "cache_tokens": 0, "seen_tokens": 0, "turns": 1}, "restored", "Restored",
     "(1 earlier turn)"),
    ({"mode": "streaming", "cache_tokens": 1023, "evicted_tokens": 400, "seen_tokens": 1423, "turns": 5},
     "reserved", "Room reserved", "Room made for the reply: 1 token free."),
    ({"mode": "dense", "cache_tokens": 512, "cache_capacity": 512, "context_full": True, "turns": 3},
     "context-full", "Context full", "cannot go on"),
])
def test_every_gauge_state_says_what_the_cache_is_doing_without_contradicting_its_numbers(stats, state, label, says):
    if stats is not None:
        stats = {"cache_capacity": CAPACITY, "sink_tokens": min(4, stats["cache_tokens"]), "start_size": 4, **stats}
    html = gauges_html(stats, capacity=CAPACITY)
    assert f'data-state="{state}"' in html and f">{label}</span>" in html and says in html
    capacity = (stats or {}).get("cache_capacity", CAPACITY)
    assert f'data-capacity="{capacity}"' in html and f"/ {capacity:,} tokens" in html
    if state != "evicting":
        assert "Evicting" not in html  # "evicting" is only said at capacity
    # Every number has a one-line explanation, as a tooltip and in the folded list.
    # (10 rows: sinks, evicted, seen, KV memory, speed, first token, turns, turns fully in memory, pinned prompt,
    # recalled; the list also explains the fill bar.)
    assert html.count('class="gauge-row" title="') == 10 and html.count("<li>") == 11


def test_an_empty_gauge_shows_the_configured_capacity_not_one_token():
    assert "0 / 1,024 tokens" in gauges_html(None, capacity=1024)


@pytest.mark.parametrize("timed", [0, 1, 40])
def test_a_plot_is_none_until_it_has_a_point_to_draw_then_a_frame_with_every_mode(timed):
    """Gradio lays a chart's margins out once, from the labels of the first frame it draws: a plot is None (an empty
    plot) until it has a real point, so that first frame is one of real data. Memory has a point from the first
    token; latency only from the first timed one. Once drawn, every mode is in the frame (the legend's colours)."""
    assert plot_frames({}) == (None, None)
    points = [{"seen": n + 1, "kv": 1000 * (n + 1), "latency": 0.02 if n < timed else None} for n in range(40)]
    memory, latency = plot_frames({"streaming": points})
    assert set(memory[MODE_COLUMN]) == set(MODES) and memory[MEMORY_COLUMN].max() > 0
    if timed:
        assert set(latency[MODE_COLUMN]) == set(MODES) and latency[LATENCY_COLUMN].max() == pytest.approx(20)
    else:
        assert latency is None


def test_an_axis_top_covers_its_value_within_five_thirds_and_stands_still_within_a_step():
    values = sorted({round(10 ** (k / 97), 9) for k in range(-300, 500)} | {s * 10.0 ** e for s in AXIS_STEPS
                                                                             for e in range(-3, 5)})
    tops = [axis_top(v) for v in values]
    for value, top in zip(values, tops):
        assert value <= top <= value * 5 / 3 * (1 + 1e-9), value
        exponent = math.floor(math.log10(top) + 1e-9)
        assert any(math.isclose(top, step * 10.0 ** exponent) for step in AXIS_STEPS), top
        assert repr(top) == repr(float(f"{top:.12g}")), top  # no 0.30000000000000004
    assert tops == sorted(tops)  # a growing line never makes its axis shrink
    # Growing through one decade, the axis moves (and the chart is laid out anew) once per step, not per redraw.
    assert len(set(axis_top(v) for v in values if 1 < v <= 10)) == len(AXIS_STEPS) - 1
    assert axis_top(0) == axis_top(-1) == 1.0
    assert axis_top(2.5e-15) == 3e-15 and axis_top(4e12) == 5e12  # any magnitude


def test_a_plot_update_spans_its_data_from_zero_and_keeps_its_axis_while_the_data_fits():
    from webui.compare_tab import plot_update

    points = [{"seen": n + 1, "kv": 2**20 * (n + 1) / 10, "latency": 0.2 + n / 1000} for n in range(30)]
    memory, latency = (plot_update(frame) for frame in plot_frames({"dense": points}))
    assert memory["y_lim"] == [0, 3] and latency["y_lim"] == [0, 300]  # 3.0 MiB; medians just over 200 ms
    assert plot_update(plot_frames({"dense": points[:25]})[0])["y_lim"] == [0, 3]  # 2.5 MiB: the axis stays
    assert plot_update(None) is None


def test_the_plots_draw_streaming_last_and_their_axes_never_read_0_000000(tiny_chat_model, default_tokenizer):
    """Issue 27 item 9: each plot draws its lines in its colour map's order, the last on top: streaming must come
    last, or window's identical line hides it. Ticks use "~r" (an empty axis reads "0", 120 reads "120"), and the
    legend's items sit in a box of their own that the stylesheet spaces, each swatch before its own word."""
    import gradio as gr

    from streaming_engine import MODES, EngineConfig, StreamingEngine
    from webui import compare_tab
    from benchmarks.plots import COLORS
    from webui.render import MODE_COLUMN, PLOT_ORDER, plot_frames

    assert PLOT_ORDER[-1] == "streaming" and sorted(PLOT_ORDER) == sorted(MODES)
    point = {"seen": 10, "kv": 2**20, "latency": 0.01}
    for frame in plot_frames({mode: [point] for mode in MODES}):
        assert list(dict.fromkeys(frame[MODE_COLUMN])) == list(PLOT_ORDER)
    engine = StreamingEngine(tiny_chat_model, default_tokenizer, EngineConfig(start_size=4, recent_size=32))
    with gr.Blocks() as demo:
        compare_tab.build_compare_tab(engine)
    plots = [b for b in demo.blocks.values() if isinstance(b, gr.LinePlot)]
    assert len(plots) == 2
    for plot in plots:
        assert list(plot.color_map) == list(PLOT_ORDER)
        assert plot.x_axis_format == plot.y_axis_format == "~r"
    (legend,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "plot-legend"]
    assert legend.value.startswith('<div class="plot-legend">')
    words = re.findall(r'background:(#\w+)"></span>(\w+)</span>', legend.value)
    assert words == [(COLORS[m], m) for m in MODES]


def test_a_reply_that_recalled_messages_links_to_each_of_them_and_repaints_without_stacking_markers():
    from webui.render import FORGOTTEN_MARK, RECALLED_MARK, mark_memory, unmarked

    memory = [{"role": "system", "tokens": 9, "held": 9, "state": "full"},
              {"role": "user", "tokens": 20, "held": 0, "state": "gone"},
              {"role": "assistant", "tokens": 8, "held": 0, "state": "gone"},
              {"role": "user", "tokens": 30, "held": 30, "state": "full", "recalled": [1, 2]},
              {"role": "assistant", "tokens": 5, "held": 5, "state": "full"}]
    shown = [{"role": r, "content": c} for r, c in
             (("user", "my code is 4471"), ("assistant", "noted"), ("user", "my code?"), ("assistant", "4471"))]
    marked = mark_memory(shown, memory)
    reply = marked[3]["content"]
    assert reply.startswith(RECALLED_MARK.split("{")[0]) and reply.endswith("4471")
    assert 'href="#recalled-1"' in reply and 'href="#recalled-2"' in reply  # chat numbering, from 1
    assert marked[0]["content"].startswith('<span class="recall-target" id="recalled-1">')
    assert FORGOTTEN_MARK in marked[0]["content"] and 'id="recalled-2"' in marked[1]["content"]
    assert "recalled" not in marked[2]["content"]  # the question itself carries no marker
    again = mark_memory(marked, memory)
    assert again == marked
    assert [unmarked(m["content"]) for m in again] == [m["content"] for m in shown]
    # While the reply streams, the memory map has no entry for it yet: the marker is there already.
    streaming = mark_memory(shown[:3] + [{"role": "assistant", "content": "4"}], memory[:4])
    assert "memory-recalled" in streaming[3]["content"]


def test_the_gauges_count_recalled_tokens():
    html = gauges_html({"cache_tokens": 90, "cache_capacity": 128, "recalled_tokens": 21,
                        "recalled_messages": [1, 2]})
    assert 'data-key="recalled_tokens" data-value="21"' in html and "21 tokens from 2 messages" in html
    assert 'data-key="recalled_tokens" data-value="0"' in gauges_html({"cache_tokens": 5, "cache_capacity": 128})
