"""The load-test CLI and the HTTP API it drives: isolation, errors and memory under concurrent sessions.

The server under load runs in a process of its own (`tests/loadtest_server.py`), so the memory it reports through
`/health` is the server's alone, not the pytest process's (which holds every model earlier tests loaded). Memory
bounds are stated per session and per token, from a baseline taken after warm-up with the model loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy
import pytest
from browser_util import ROOT, free_port, save_model, stop_app, wait_until_serving
from fronts import FRONTS

from streaming_engine import EngineConfig, StreamingEngine
from benchmarks import loadtest

#: Peak resident memory the tiny-model server process may reach under this test's load (model, gradio, torch).
TINY_SERVER_PEAK_RSS_BOUND = 3 * 1024**3
#: How long a held forward pass waits for the busy probe before giving up (the test then fails saying why).
GATE_TIMEOUT_S = 120
#: What one open session may add to the server's resident memory beyond its KV cache: its Python objects, the
#: request's buffers and the forward pass's activations (a prefill chunk's logits over a 49k vocabulary are 6-25 MiB).
SESSION_OVERHEAD_BOUND = 64 * 1024**2
#: After warm-up (buffers allocated once), resident memory may grow at most this much per token the load asked for
#: (256 MiB over 8 sessions x 10 turns x 16 tokens, the bound this test always had, stated per token).
RSS_GROWTH_PER_TOKEN_BOUND = 256 * 1024**2 // (8 * 10 * 16)


@contextlib.contextmanager
def server_process(tmp_path, model_dir=None, **config):
    """`tests/loadtest_server.py` on a free port: yields `(url, kv_bytes_per_token)`, killed afterwards."""
    port = free_port()
    log = tmp_path / "server.log"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in config.items()]
    if model_dir is not None:
        args.append(f"--model={model_dir}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "loadtest_server.py"), "--port", str(port),
                                    *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/gradio_api/info", process)
        per_token = int(re.search(r"kv_bytes_per_token=(\d+)", log.read_text()).group(1))
        yield f"http://127.0.0.1:{port}", per_token
    finally:
        stop_app(process)


def health(url: str) -> dict:
    from gradio_client import Client

    return Client(url, verbose=False).predict(api_name="/health")


def warm_baseline(url: str) -> int:
    """The server's resident memory after one short conversation (weights loaded, first-use buffers allocated)."""
    warm = loadtest.run_load(url, sessions=1, turns=2, max_new_tokens=8, deadline_s=300)
    assert warm["errors"] == 0, warm["error_messages"]
    return health(url)["rss_bytes"]


def check_memory(report: dict, baseline: int, sessions: int, cache_tokens: int, kv_per_token: int) -> None:
    """The per-session and per-token bounds (module docstring), with the numbers in the message."""
    # The highest reading while the load ran, not the process's lifetime peak (ru_maxrss), which also holds the
    # start-up transient (loading or converting the model) and so says nothing about what sessions cost.
    under_load = max(rss for _, rss in report["rss_timeline"])
    per_session = (under_load - baseline) / sessions
    session_bound = cache_tokens * kv_per_token + SESSION_OVERHEAD_BOUND
    assert per_session < session_bound, (per_session, session_bound, report["rss_timeline"])
    tokens = report["turns_completed"] * report["max_new_tokens"]
    growth_per_token = report["rss_growth_after_warmup_bytes"] / tokens
    print(f"\nserver memory: baseline {baseline / 2**20:.0f} MiB, peak under load {under_load / 2**20:.0f} MiB, "
          f"{per_session / 2**20:.1f} MiB per session (bound {session_bound / 2**20:.1f}), "
          f"{growth_per_token / 1024:.1f} KiB per token after warm-up (bound {RSS_GROWTH_PER_TOKEN_BOUND / 1024:.1f})")
    assert growth_per_token < RSS_GROWTH_PER_TOKEN_BOUND, (growth_per_token, report["rss_timeline"])


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_chat_model, default_tokenizer, tmp_path_factory):
    return save_model(tiny_chat_model, default_tokenizer, tmp_path_factory.mktemp("loadtest") / "tiny-model")


@pytest.fixture(scope="module")
def api_server(tiny_model_dir, tmp_path_factory):
    with server_process(tmp_path_factory.mktemp("server"), tiny_model_dir, start_size=4, recent_size=64,
                        prefill_chunk_size=32) as (url, per_token):
        yield url, per_token


@pytest.mark.slow  # a server process of its own: start-up and model load dominate
def test_concurrent_sessions_complete_with_no_errors_no_cross_talk_and_bounded_memory(api_server, monkeypatch):
    url, kv_per_token = api_server
    baseline = warm_baseline(url)
    pooled = []  # the raw samples each percentile of the report was taken over
    percentile = loadtest.percentile
    monkeypatch.setattr(loadtest, "percentile", lambda values, q: pooled.append(list(values)) or percentile(values, q))
    report = loadtest.run_load(url, sessions=4, turns=4, max_new_tokens=8, deadline_s=300)
    assert report["errors"] == 0, report["error_messages"]
    assert report["cross_talk"] == 0
    assert report["turns_completed"] == 16
    # One time-to-first-token per completed turn, each a real (positive) duration; the report's percentiles are
    # numpy's over exactly those samples.
    ttft = pooled[0]
    assert pooled == [ttft, ttft] and len(ttft) == 16 and all(t > 0 for t in ttft)
    assert report["ttft_p50_s"] == float(numpy.percentile(ttft, 50, method="inverted_cdf"))
    assert report["ttft_p95_s"] == float(numpy.percentile(ttft, 95, method="inverted_cdf"))
    assert 0 < report["peak_rss_bytes"] < TINY_SERVER_PEAK_RSS_BOUND
    check_memory(report, baseline, 4, 4 + 64, kv_per_token)
    assert health(url)["sessions"] == 0  # every virtual user closed its session
    assert report["by_route"] == {"": {"users": 4, "turns_completed": 16, "errors": 0, "cross_talk": 0}}
    assert report["busy_probe"] is None


@contextlib.contextmanager
def api_served(engine):
    """Only the app's HTTP API over `engine` (no page), launched in this process; yields its URL. For tests that
    measure no memory."""
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


def test_an_extra_user_beyond_the_turn_limit_is_answered_busy_and_the_probe_reports_it(
        tiny_chat_model, default_tokenizer):
    """The two users' replies are held open (the model's forward pass waits) until the probe has been refused
    `probes` times, so the probe meets a full server by construction, however the machine schedules threads."""
    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=64, prefill_chunk_size=32, max_active_turns=2))
    probes, refused, released = 2, [], threading.Event()
    chat = engine.chat

    def counting_chat(sid, message, **sampling):
        for event in chat(sid, message, **sampling):
            if event.kind == "error" and event.text.startswith("Server busy"):
                refused.append(event)
                if len(refused) >= probes:
                    released.set()
            yield event

    def hold(module, args, kwargs):
        deadline = time.monotonic() + GATE_TIMEOUT_S  # a bound on a broken run, never reached by a working one
        while not released.is_set() and time.monotonic() < deadline:
            released.wait(0.05)  # both users' turns admitted, then the probe's refusals, release the pass

    engine.chat = counting_chat
    gate = tiny_chat_model.register_forward_pre_hook(hold, with_kwargs=True)
    try:
        with api_served(engine) as url:
            report = loadtest.run_load(url, sessions=2, turns=2, max_new_tokens=8, deadline_s=300,
                                       busy_probes=probes)
    finally:
        gate.remove()
    assert released.is_set(), f"the probe was refused {len(refused)} of {probes} times"
    assert report["errors"] == 0 and report["turns_completed"] == 4  # the load itself is never refused
    probe = report["busy_probe"]
    assert probe["tries"] == probe["busy"] == probes == len(refused), probe
    for sample in probe["samples"]:
        assert sample["error"].startswith("Server busy") and sample["active_turns_before"] == 2


@pytest.mark.slow  # shares that server process
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
            return [(self.reply, {"tokens_per_s": 10.0})]

        def done(self):
            return True

        def result(self, timeout=None):
            return self.reply, {"time_to_first_token_s": 0.1, "tokens_per_s": 10.0}

    class FakeClient:
        def __init__(self, url, verbose=False):
            pass

        def submit(self, session, message, max_new_tokens, api_name):
            return FakeJob("reply")

        def predict(self, *args, api_name):
            if api_name == "/new_session":
                return "s"
            if api_name == "/history":
                return [{"role": "user", "content": "[u9-t0-abc] not mine"}, {"role": "assistant", "content": "reply"}]
            return "closed"

    import gradio_client

    monkeypatch.setattr(gradio_client, "Client", FakeClient)
    result = loadtest.UserResult()
    loadtest.run_user("http://127.0.0.1:1", 0, 1, 8, float("inf"), result)
    assert result.turns_completed == 1
    assert result.cross_talk == 2  # a foreign message, and our own reply missing from our history


#: What each front of `deploy/` answers when none of its replicas answers (see `loadtest.UNAVAILABLE`).
NO_REPLICA_STATUS = {"nginx": 502, "haproxy": 503}


@FRONTS
def test_a_front_with_no_replica_answering_is_reported_as_unavailable_not_as_a_full_queue(
        tiny_chat_model, default_tokenizer, make_front, tmp_path):
    """A load-test user whose front (nginx or HAProxy from `deploy/`) finds every replica down gets the front's own
    status: the report must say the replicas are unavailable. gradio_client calls HAProxy's 503 "Queue is full",
    like the app's own queue bound: read as a queue overflow, an outage misdirected the search behind the revert of
    the typed API."""
    import httpx
    from browser_util import served
    from gradio_client import Client
    from gradio_client.utils import QueueError

    name = make_front.__name__.removesuffix("_front")
    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=60, prefill_chunk_size=32, max_new_tokens=4))
    front = None
    try:
        with served(engine, "tiny-test-model") as (app_url, _):  # the whole app: HAProxy checks its /health
            # The second replica never starts: only the first one answers.
            front, port, _ = make_front([int(app_url.rsplit(":", 1)[1]), free_port()], tmp_path)
            client = Client(f"http://127.0.0.1:{port}", verbose=False)
            client.predict(api_name="/new_session")  # through the front to the live replica
        # That replica is gone too: the front has nowhere to send the next request.
        with pytest.raises((QueueError, httpx.HTTPStatusError)) as refused:
            client.predict(api_name="/new_session")
    finally:
        if front is not None:
            stop_app(front)
    status = NO_REPLICA_STATUS[name]
    if isinstance(refused.value, QueueError):
        assert status == 503 and "Queue is full" in str(refused.value)  # what gradio_client says of any 503
    else:
        assert refused.value.response.status_code == status
    assert loadtest.error_text(refused.value) == loadtest.UNAVAILABLE[status]  # what the report says


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_only_a_fronts_no_replica_statuses_are_reported_as_unavailable(status):
    """nginx's 504 (no replica answered in time) cannot be caused on loopback, where a dead replica refuses at once;
    the mapping is checked on the exception gradio_client raises for it. A 500 is the app's, not the front's."""
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1:7860/gradio_api/queue/join")
    error = httpx.HTTPStatusError("server error", request=request, response=httpx.Response(status, request=request))
    text = loadtest.error_text(error)
    assert text.startswith("unavailable: ") == (status != 500)
    assert text.startswith(f"unavailable: HTTP {status} ") or status == 500


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


#: README's stated bound for the default-model server process under 8 sessions x 10 turns (model, torch, gradio).
DEFAULT_SERVER_PEAK_RSS_BOUND = 3 * 1024**3


@pytest.mark.model
def test_default_model_serves_8_sessions_by_10_turns_with_zero_errors_and_flat_memory(tmp_path):
    with server_process(tmp_path, start_size=4, recent_size=252, prefill_chunk_size=128) as (url, kv_per_token):
        baseline = warm_baseline(url)
        report = loadtest.run_load(url, sessions=8, turns=10, max_new_tokens=16, deadline_s=1200)
    assert report["errors"] == 0, report["error_messages"]
    assert report["cross_talk"] == 0 and report["turns_completed"] == 80
    assert report["peak_rss_bytes"] < DEFAULT_SERVER_PEAK_RSS_BOUND
    check_memory(report, baseline, 8, 4 + 252, kv_per_token)
