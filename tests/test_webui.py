"""The tabs' handlers called directly, without a browser or a server: what each returns for the page.

Handlers are plain functions over the engine (`webui/chat_tab.py`, `webui/compare_tab.py`). Outside a gradio
request, `gr.Warning` is a Python `UserWarning`, which is how these tests see what the user would be told.
"""

from __future__ import annotations

import json
import re

import gradio as gr
import pytest
import pandas as pd

from streaming_engine import MODES, EngineConfig, StreamingEngine
from streaming_engine.history import MAX_HISTORY_BYTES
from webui import chat_tab, compare_tab

SKIP = gr.skip()
#: Chat-tab sampling inputs in slider order: system prompt, temperature, top-p, top-k, max new tokens, penalty.
GREEDY_INPUTS = ("", 0.0, 1.0, 0, 8, 1.0)


@pytest.fixture
def engine(tiny_chat_model, default_tokenizer):
    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=96, max_new_tokens=16))
    yield engine
    for sid in engine.session_ids():
        engine.close(sid)


def gauge_value(html: str, key: str) -> float:
    return float(re.search(rf'data-key="{key}" data-value="([^"]*)"', html).group(1))


def phase(html: str) -> str:
    return re.search(r'data-phase="(\w+)"', html).group(1)


def last(outputs):
    return list(outputs)[-1]


def send(engine, message, messages=None, state=None, inputs=GREEDY_INPUTS):
    """Every output tuple of one Send: (chatbot, message box, gauges, state, saved history)."""
    return list(chat_tab.respond(engine, message, messages or [], state or {}, *inputs))


# --- chat tab -------------------------------------------------------------------------------------------------


def test_send_streams_a_reply_then_settles_with_idle_gauges_and_a_saved_history(engine):
    outputs = send(engine, "Hello <b>there</b>")
    chat, box, gauges, state, saved = outputs[-1]
    assert outputs[0][1] == ""  # the box empties at once
    assert chat[0] == {"role": "user", "content": "Hello &lt;b>there&lt;/b>"}
    assert chat[1]["role"] == "assistant" and chat[1]["content"]
    assert box == "" and phase(gauges) == "idle" and gauge_value(gauges, "turns") == 1
    history = json.loads(saved)["messages"]
    assert [m["content"] for m in history][0] == "Hello <b>there</b>"
    assert state["sid"] in engine.session_ids()
    chat2, *_ = last(chat_tab.respond(engine, "Again", chat, state, *GREEDY_INPUTS))
    assert len(chat2) == 4 and engine.stats(state["sid"])["turns"] == 2  # the same conversation goes on


@pytest.mark.parametrize("inputs,match", [
    (("", 0.0, 1.0, 0, 0, 1.0), "max_new_tokens"),
    (("", 0.0, 0.0, 0, 8, 1.0), "top_p"),
])
def test_a_refused_message_goes_back_to_the_box_and_the_chat_is_unchanged(engine, inputs, match):
    earlier = [{"role": "user", "content": "before"}, {"role": "assistant", "content": "reply"}]
    with pytest.warns(UserWarning, match=match):
        chat, box, _, state, saved = last(chat_tab.respond(engine, "Keep this text", earlier, {}, *inputs))
    assert chat == earlier and box == "Keep this text" and saved == SKIP
    assert engine.history(state["sid"]) == []  # the engine never took it


def test_a_failure_mid_reply_keeps_the_message_and_says_what_went_wrong(engine, monkeypatch):
    import streaming_engine.generation as generation

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(generation, "forward", broken)
    with pytest.warns(UserWarning, match="simulated device failure"):
        chat, box, _, state, saved = last(send(engine, "Will this work?"))
    assert box == "" and chat[0]["content"] == "Will this work?"
    assert chat[1]["content"].startswith("⚠️") and "simulated device failure" in chat[1]["content"]
    assert json.loads(saved)["messages"][0]["content"] == "Will this work?"  # accepted: kept for the reload


def test_an_empty_message_changes_nothing(engine):
    with pytest.warns(UserWarning, match="empty"):
        outputs = send(engine, "   ")
    assert outputs == [([], "   ", SKIP, {}, SKIP)]
    assert engine.session_ids() == []


def test_retry_replaces_the_last_exchange_instead_of_adding_one(engine):
    chat, _, _, state, _ = last(send(engine, "First"))
    chat, _, _, state, _ = last(chat_tab.respond(engine, "Second", chat, state, *GREEDY_INPUTS))
    chat, _, gauges, state, _ = last(chat_tab.retry_last(engine, chat, state, *GREEDY_INPUTS))
    assert [m["content"] for m in chat if m["role"] == "user"] == ["First", "Second"]
    assert gauge_value(gauges, "turns") == 2
    with pytest.warns(UserWarning, match="no message to retry"):
        assert last(chat_tab.retry_last(engine, [], {}, *GREEDY_INPUTS))[1] == SKIP


def test_a_downloaded_history_uploads_into_a_new_conversation_that_continues(engine, tmp_path):
    chat, _, _, state, _ = last(send(engine, "Remember: pineapple"))
    download = chat_tab.export_history(engine, state)
    assert download["visible"] is True
    data = open(download["value"], "rb").read()
    shown, new_state, gauges, saved = chat_tab.upload_history(engine, data, [], {"sid": "stale"})
    assert shown == chat and new_state["sid"] != state["sid"] and gauge_value(gauges, "turns") == 1
    assert json.loads(saved)["messages"] == engine.history(state["sid"])
    chat2, *_ = last(chat_tab.respond(engine, "What was the word?", shown, new_state, *GREEDY_INPUTS))
    assert len(chat2) == 4


@pytest.mark.parametrize("data,match", [
    (b"{not json", "not valid JSON"),
    (b"x" * (MAX_HISTORY_BYTES + 1), "too large"),
    (None, "no file"),
])
def test_a_bad_upload_is_refused_and_the_chat_stays(engine, data, match):
    before = [{"role": "user", "content": "kept"}]
    with pytest.warns(UserWarning, match=match):
        shown, state, gauges, saved = chat_tab.upload_history(engine, data, before, {"sid": "mine"})
    assert (shown, state, gauges, saved) == (before, {"sid": "mine"}, SKIP, SKIP)


def test_a_reload_restores_the_saved_conversation_once(engine):
    chat, _, _, state, saved = last(send(engine, "Remember me"))
    shown, restored_state, gauges = chat_tab.restore_saved(engine, saved, {})
    assert shown == chat and gauge_value(gauges, "turns") == 1 and restored_state["sid"] != state["sid"]
    assert chat_tab.restore_saved(engine, saved, restored_state)[0] == SKIP  # this tab already has its chat
    assert chat_tab.restore_saved(engine, "{broken", {})[0] == SKIP  # stale storage is ignored


def test_new_chat_closes_the_conversation_and_clears_the_tab(engine):
    _, _, _, state, _ = last(send(engine, "Hi"))
    chat, new_state, gauges, saved, download = chat_tab.start_new_chat(engine, state)
    assert (chat, new_state, saved) == ([], {}, "") and download["visible"] is False
    assert gauge_value(gauges, "turns") == 0 and state["sid"] not in engine.session_ids()
    with pytest.warns(UserWarning, match="Nothing to download"):
        assert chat_tab.export_history(engine, new_state)["visible"] is False
    chat_tab.stop_reply(engine, state)  # stopping a closed conversation is harmless


# --- Dense vs Streaming tab -----------------------------------------------------------------------------------


def compare_send(engine, message, state, include_window=True, new_tokens=8):
    """The last outputs of one Send to all: box, note, 3 chats, 3 gauges, 2 plots, state."""
    return last(compare_tab.compare_send(engine, message, [], [], [], state, include_window, new_tokens))


def test_one_message_reaches_every_side_and_the_plots_follow(engine):
    state = {}
    box, note, *rest = compare_send(engine, "What is the capital of Italy?", state)
    chats, gauges, plots, new_state = rest[:3], rest[3:6], rest[6:8], rest[8]
    assert box == "" and note == "" and new_state is state
    for mode, chat, html in zip(MODES, chats, gauges):
        assert chat[0]["content"] == "What is the capital of Italy?" and chat[1]["content"], mode
        assert gauge_value(html, "turns") == 1 and phase(html) == "idle" and f'data-mode="{mode}"' in html
    assert all(isinstance(frame, pd.DataFrame) and set(frame["mode"]) == set(MODES) for frame in plots)
    assert set(state["sids"]) == set(MODES) and all(state["series"][m] for m in MODES)
    assert gauge_value(gauges[1], "sink_tokens") == 0 and gauge_value(gauges[0], "sink_tokens") == 4


def test_without_window_only_two_sides_run(engine):
    state = {}
    _, _, streaming, dense, window, _, _, window_gauge, *_ = compare_send(engine, "Hi", state, include_window=False)
    assert streaming and dense and window == [] and window_gauge == SKIP
    assert set(state["sids"]) == {"streaming", "dense"}


def test_autopilot_runs_its_script_and_stop_ends_it_after_the_current_prompt(engine, monkeypatch):
    monkeypatch.setattr(compare_tab, "load_json_list", lambda name: ["One.", "Two.", "Three."])
    state = {}
    outputs = list(compare_tab.compare_autopilot(engine, [], [], [], state, True, 8))
    assert outputs[-1][0] == "**Autopilot finished** after 3 of 3 prompts."
    assert all(len(chat) == 6 for chat in outputs[-1][1:4])
    compare_tab.compare_reset(engine, state)
    state = {}
    running = compare_tab.compare_autopilot(engine, [], [], [], state, True, 8)
    first = next(running)
    assert first[0].startswith("**Autopilot** prompt 1/3")
    compare_tab.compare_stop(engine, first[-1])  # the same dict gradio hands the Stop button
    rest = list(running)
    assert rest[-1][0] == "**Autopilot stopped** after 1 of 3 prompts."


def test_reset_closes_every_side_and_clears_the_tab(engine):
    state = {}
    compare_send(engine, "Hello", state)
    sids = list(state["sids"].values())
    outputs = compare_tab.compare_reset(engine, state)
    assert outputs[:4] == ["", [], [], []] and outputs[-1] == {}
    assert all(gauge_value(html, "turns") == 0 for html in outputs[4:7])
    assert not set(sids) & set(engine.session_ids())


def test_an_empty_comparison_message_changes_nothing(engine):
    with pytest.warns(UserWarning, match="empty"):
        outputs = list(compare_tab.compare_send(engine, "", [], [], [], {}, True, 8))
    assert outputs == [[SKIP] * 11] and engine.session_ids() == []


def test_visitor_cache_sizes_apply_to_a_new_chat_and_can_only_shrink_the_cache(engine):
    chat, _, gauges, state, _ = last(chat_tab.respond(engine, "Hi", [], {}, *GREEDY_INPUTS, 2, 32))
    stats = engine.stats(state["sid"])
    assert (stats["start_size"], stats["recent_size"], stats["cache_capacity"]) == (2, 32, 34)
    assert gauge_value(gauges, "sink_tokens") == 2
    for sizes in ((5, 32), (2, 97)):  # the owner's engine has 4 + 96: larger is refused, nothing is sent
        with pytest.warns(UserWarning, match="must be between"):
            chat, box, *_ = last(chat_tab.respond(engine, "Hi", [], {}, *GREEDY_INPUTS, *sizes))
        assert chat == [] and box == "Hi"
