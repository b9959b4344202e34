"""The Gradio app in process: settings, rendering, and the launched app driven with gradio_client."""

from __future__ import annotations

import json

import pytest
from conftest import free_port

import app
from streaming_engine import EngineConfig, StreamingEngine


@pytest.fixture(scope="module")
def launched(tiny_chat_model, default_tokenizer):
    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=96, prefill_chunk_size=48, max_new_tokens=16))
    settings = app.AppSettings(start_size=4, recent_size=96, port=free_port())
    demo = app.build_ui(engine, settings, "tiny-test-model")
    app.launch(demo, settings, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{settings.port}", engine, demo
    demo.close()


def test_the_launched_app_chats_through_its_api_and_keeps_sessions_apart(launched):
    from gradio_client import Client

    url, engine, _ = launched
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    sid_a, sid_b = a.predict(api_name="/new_session"), b.predict(api_name="/new_session")
    assert sid_a != sid_b
    reply_a, stats_a = a.predict(sid_a, "hello from A", 8, api_name="/chat")
    reply_b, _ = b.predict(sid_b, "hello from B", 8, api_name="/chat")
    stats_a = json.loads(stats_a)
    assert stats_a["finish_reason"] in ("eos", "length") and stats_a["cache_capacity"] == 100
    history_a = json.loads(a.predict(sid_a, api_name="/history"))
    assert [m["content"] for m in history_a] == ["hello from A", reply_a]
    assert "hello from B" not in json.dumps(history_a)
    _, bad = a.predict(sid_a, "", 8, api_name="/chat")
    assert "empty" in json.loads(bad)["error"]
    health = json.loads(a.predict(api_name="/health"))
    assert health["sessions"] >= 2 and health["peak_rss_bytes"] >= health["rss_bytes"] > 0
    for client, sid in ((a, sid_a), (b, sid_b)):
        client.predict(sid, api_name="/close_session")
    assert sid_a not in engine.session_ids()


def test_ui_handlers_are_private_and_the_layout_has_every_control(launched):
    _, _, demo = launched
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    for needed in ("chatbot", "msg", "send", "stop", "retry", "new-chat", "export", "upload", "gauges",
                   "chat-streaming", "chat-dense", "chat-window", "compare-autopilot", "plot-memory", "diagram"):
        assert needed in ids, needed
    public = {d.get("api_name") for d in demo.config["dependencies"] if d.get("api_visibility") == "public"}
    assert public == {"new_session", "chat", "history", "close_session", "health"}


def test_gauges_show_fill_sinks_evictions_and_context_full():
    html = app.gauges_html({"cache_tokens": 100, "cache_capacity": 100, "sink_tokens": 4, "evicted_tokens": 1234,
                            "seen_tokens": 1334, "kv_bytes": 3 * 2**20, "tokens_per_s": 19.5,
                            "time_to_first_token_s": 0.25, "turns": 7, "mode": "streaming"})
    assert 'data-key="evicted_tokens" data-value="1234"' in html and "1,234" in html
    assert 'data-held="100" data-capacity="100"' in html and "width:100.0%" in html
    assert "3.0 MiB" in html and "19.5 tok/s" in html and "Evicting" in html
    full = app.gauges_html({"cache_tokens": 512, "cache_capacity": 512, "context_full": True, "mode": "dense"})
    assert "Context full" in full and "dense-full" in full
    assert 'data-value="0"' in app.gauges_html(None)


@pytest.mark.parametrize("text", ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>",
                                  "![track](http://example.com/p.png)", "<!-- hidden --><b>bold</b>",
                                  "`code` then <iframe src=x>", "```\ncode\n```\n<svg onload=alert(1)>"])
def test_tags_and_images_outside_code_are_rendered_inert(text):
    shown = app.inert(text)
    for opener in ("<script", "<img", "![", "<!--", "<b>", "<iframe", "<svg"):
        assert opener not in shown


@pytest.mark.parametrize("text", ["```python\nif a < b:\n    print('<b>')\n```", "use `x<y` here",
                                  "``a ` <b>`` and", "~~~\n<div>\n~~~", "```\nstill streaming <tag"])
def test_code_is_shown_verbatim_because_the_renderer_escapes_it_itself(text):
    assert app.inert(text) == text


def test_plain_comparisons_and_markdown_survive():
    text = "1 < 2 and 3 > 2\n\n* item **bold**\n\n[link](https://arxiv.org/abs/2309.17453)"
    assert app.inert(text) == text


def test_a_code_span_cannot_hide_a_tag_across_paragraphs():
    assert "<img" not in app.inert("`a\n\n<img src=x>\n\nb`")


@pytest.mark.parametrize("text,reason,expected", [
    ("Paris.", "eos", "Paris."),
    ("Par", "stopped", "Par\n\n*(stopped)*"),
    ("", "stopped", "*(stopped)*"),  # stopped before the first token: say so, never an empty bubble
    ("The end", "context_full", "The end\n\nFULL"),
    ("", "context_full", "FULL"),
    ("", "eos", "…"),
    ("<b>x</b>", "eos", "&lt;b>x&lt;/b>"),
])
def test_a_finished_reply_says_why_it_ended_when_that_is_not_obvious(text, reason, expected):
    from streaming_engine import Event

    assert app.final_reply(Event("done", text, {}, reason), "FULL") == expected


def test_settings_come_from_flags_or_environment_and_bind_to_loopback_by_default():
    settings = app.parse_settings([], env={})
    assert settings.host == "127.0.0.1" and settings.port == 7860 and settings.auth is None
    assert not settings.share and not settings.trust_remote_code
    env = {"MODEL_ID": "some/model", "START_SIZE": "8", "RECENT_SIZE": "500", "PORT": "9000",
           "APP_AUTH": "ann:secret", "SHARE": "true"}
    settings = app.parse_settings([], env=env)
    assert (settings.model, settings.start_size, settings.recent_size, settings.port) == ("some/model", 8, 500, 9000)
    assert settings.auth == ("ann", "secret") and settings.share
    assert app.parse_settings(["--host", "0.0.0.0"], env={}).host == "0.0.0.0"
    assert app.parse_settings([], env={"SPACE_ID": "me/space"}).host == "0.0.0.0"
    for argv in (["--auth", "nopassword"], ["--recent-size", "0"], ["--port", "70000"]):
        with pytest.raises(SystemExit):
            app.parse_settings(argv, env={})


def test_example_and_autopilot_prompts_ship_in_assets():
    assert len(app.load_json_list("examples.json")) >= 4
    assert len(app.load_json_list("autopilot.json")) >= 10
    assert (app.ASSETS / "attention_sinks.png").stat().st_size > 10_000


def test_uploads_are_size_limited_and_the_queue_is_bounded(launched):
    *_, demo = launched
    assert demo.max_file_size == app.MAX_HISTORY_BYTES  # gradio refuses bigger uploads before any handler runs
    assert demo._queue.max_size == app.QUEUE_MAX_SIZE
    assert demo._queue.default_concurrency_limit == app.QUEUE_CONCURRENCY
