"""The load-test CLI and the HTTP API it drives: isolation, errors and memory under concurrent sessions."""

from __future__ import annotations

import contextlib
import json

import pytest
from browser_util import free_port

from streaming_engine import EngineConfig, StreamingEngine
from streaming_engine.eval import loadtest

#: Peak resident memory the tiny-model server may reach under this test's load (model, gradio, torch included).
TINY_SERVER_PEAK_RSS_BOUND = 3 * 1024**3


@contextlib.contextmanager
def api_served(engine):
    """Only the app's HTTP API over `engine` (no page), launched in this process; yields its URL."""
    import gradio as gr

    from webui import webapi

    with gr.Blocks() as demo:
        webapi.register(engine)
    port = free_port()
    demo.queue(default_concurrency_limit=16).launch(server_name="127.0.0.1", server_port=port,
                                                    prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def api_server(tiny_chat_model, default_tokenizer):
    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=64, prefill_chunk_size=32))
    with api_served(engine) as url:
        yield url, engine


def test_concurrent_sessions_complete_with_no_errors_no_cross_talk_and_bounded_memory(api_server):
    url, engine = api_server
    report = loadtest.run_load(url, sessions=4, turns=4, max_new_tokens=8, deadline_s=300)
    assert report["errors"] == 0, report["error_messages"]
    assert report["cross_talk"] == 0
    assert report["turns_completed"] == 16
    assert report["ttft_p50_s"] is not None and report["ttft_p95_s"] >= report["ttft_p50_s"]
    assert 0 < report["peak_rss_bytes"] < TINY_SERVER_PEAK_RSS_BOUND
    assert engine.session_ids() == []  # every virtual user closed its session
    assert report["by_route"] == {"": {"users": 4, "turns_completed": 16, "errors": 0, "cross_talk": 0}}
    assert report["busy_probe"] is None


def test_an_extra_user_beyond_the_turn_limit_is_answered_busy_and_the_probe_reports_it(
        tiny_chat_model, default_tokenizer):
    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=64, prefill_chunk_size=32, max_active_turns=2))
    with api_served(engine) as url:
        report = loadtest.run_load(url, sessions=2, turns=4, max_new_tokens=400, deadline_s=300, busy_probes=2)
    assert report["errors"] == 0 and report["turns_completed"] == 8  # the load itself is never refused
    probe = report["busy_probe"]
    assert probe["tries"] >= 1 and probe["busy"] >= 1, probe
    for sample in probe["samples"]:
        if sample.get("busy"):
            assert sample["error"].startswith("Server busy") and sample["active_turns_before"] >= 2


def test_cli_writes_the_report_and_a_memory_plot_and_exits_zero_on_a_clean_run(api_server, tmp_path, capsys):
    url, _ = api_server
    output = tmp_path / "load.json"
    code = loadtest.main(["--url", url, "--sessions", "2", "--turns", "2", "--max-new-tokens", "4",
                          "--output", str(output)])
    assert code == 0
    report = json.loads(output.read_text(encoding="utf-8"))
    assert report["turns_completed"] == 4 and report["errors"] == 0 and report["cross_talk"] == 0
    for key in ("turns_completed", "errors", "cross_talk", "ttft_p50_s", "ttft_p95_s", "tokens_per_s",
                "peak_rss_bytes"):
        assert key in report, key
    png = output.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in capsys.readouterr().err


def test_cross_talk_is_detected_when_a_history_holds_someone_elses_turn(monkeypatch):
    """A fake server whose history answers with another user's conversation must be flagged."""

    class FakeJob:
        def __init__(self, reply):
            self.reply = reply

        def outputs(self):
            return [(self.reply, json.dumps({"tokens_per_s": 10.0}))]

        def done(self):
            return True

        def result(self, timeout=None):
            return self.reply, json.dumps({"time_to_first_token_s": 0.1, "tokens_per_s": 10.0})

    class FakeClient:
        def __init__(self, url, verbose=False):
            pass

        def submit(self, session, message, max_new_tokens, api_name):
            return FakeJob("reply")

        def predict(self, *args, api_name):
            if api_name == "/new_session":
                return "s"
            if api_name == "/history":
                return json.dumps([{"role": "user", "content": "[u9-t0-abc] not mine"},
                                   {"role": "assistant", "content": "reply"}])
            return "closed"

    import gradio_client

    monkeypatch.setattr(gradio_client, "Client", FakeClient)
    result = loadtest.UserResult()
    loadtest.run_user("http://127.0.0.1:1", 0, 1, 8, float("inf"), result)
    assert result.turns_completed == 1
    assert result.cross_talk == 2  # a foreign message, and our own reply missing from our history


@pytest.mark.parametrize("argv,message", [
    (["--url", "http://10.0.0.5:7860"], "not a loopback"),
    (["--sessions", "0"], "--sessions"),
    (["--turns", "1000"], "--turns"),
])
def test_cli_refuses_remote_targets_and_unbounded_runs(argv, message, capsys):
    with pytest.raises(SystemExit):
        loadtest.main(argv)
    assert message in capsys.readouterr().err


def test_loopback_detection():
    assert loadtest.is_loopback("http://127.0.0.1:7860") and loadtest.is_loopback("http://localhost:1")
    assert loadtest.is_loopback("http://[::1]:80")
    assert not loadtest.is_loopback("http://192.168.1.2:7860") and not loadtest.is_loopback("http://example.com")


#: README's stated bound for the default-model server under 8 sessions x 10 turns (model, torch, gradio included).
DEFAULT_SERVER_PEAK_RSS_BOUND = 3 * 1024**3
#: After the first quarter of the run (warm-up: buffers allocated once), resident memory may not climb more than this.
RSS_GROWTH_BOUND = 256 * 1024**2


@pytest.mark.model
def test_default_model_serves_8_sessions_by_10_turns_with_zero_errors_and_flat_memory(default_model):
    model, tokenizer = default_model
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=4, recent_size=252, prefill_chunk_size=128))
    with api_served(engine) as url:
        report = loadtest.run_load(url, sessions=8, turns=10, max_new_tokens=16, deadline_s=1200)
    assert report["errors"] == 0, report["error_messages"]
    assert report["cross_talk"] == 0 and report["turns_completed"] == 80
    assert report["peak_rss_bytes"] < DEFAULT_SERVER_PEAK_RSS_BOUND
    assert report["rss_growth_after_warmup_bytes"] < RSS_GROWTH_BOUND
