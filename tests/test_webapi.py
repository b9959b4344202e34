"""The HTTP API of the launched app (`webui/webapi.py`), called as scripts call it: every argument checked with a
clear message, per-client caps, and "server busy" at once instead of a wait in gradio's queue."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest
from browser_util import served

from streaming_engine import EngineConfig, StreamingEngine


def engine_for(model, tokenizer, **overrides):
    config = dict(start_size=4, recent_size=96, prefill_chunk_size=48, max_new_tokens=8)
    return StreamingEngine(model, tokenizer, EngineConfig(**{**config, **overrides}))


@pytest.fixture(scope="module")
def launched(tiny_chat_model, default_tokenizer):
    engine = engine_for(tiny_chat_model, default_tokenizer, max_sessions=6, max_sessions_per_owner=2)
    with served(engine, "tiny-test-model") as (url, _):
        yield url, engine


def client(url, address=None):
    """A gradio client; `address` is the client address it claims through a trusted proxy (loopback forwards)."""
    from gradio_client import Client

    return Client(url, verbose=False, headers={"X-Forwarded-For": address} if address else None)


#: /chat's five optional sampling settings, left to the engine (a raw call must name every input).
NULLS = ", null" * 5


def raw_call(url: str, api_name: str, body: str) -> list:
    """POST a JSON body as written (NaN included) to gradio's plain HTTP API; the data of its last event."""
    request = urllib.request.Request(f"{url}/gradio_api/call/{api_name}", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}/gradio_api/call/{api_name}/{event_id}", timeout=120) as response:
        events = response.read().decode().strip().split("\n\n")
    kind, data = events[-1].split("\n", 1)
    return kind, json.loads(data.removeprefix("data: "))


@pytest.mark.parametrize("value,shown", [
    ("x", "got text 'x'"), (None, "got null"), ([1], "got a list"), ({}, "got an object"), (True, "got true"),
    (1.5, "got 1.5"), (0, "got 0"), (10**6, "got 1000000"),
])
def test_chat_refuses_a_bad_max_new_tokens_naming_the_allowed_type_and_range(launched, value, shown):
    url, engine = launched
    c = client(url, "203.0.113.1")
    sid = c.predict(api_name="/new_session")
    reply, stats = c.predict(sid, "hello", value, api_name="/chat")
    assert reply == "" and json.loads(stats)["error"] == f"max_new_tokens must be an integer in [1, 4096]; {shown}"
    assert engine.history(sid) == []  # nothing was taken
    c.predict(sid, api_name="/close_session")


@pytest.mark.parametrize("body,message", [
    ('{"data": ["%s", "hi", NaN' + NULLS + ']}', "max_new_tokens must be an integer in [1, 4096]; got NaN"),
    ('{"data": ["%s", null, 4' + NULLS + ']}', "message must be text (a JSON string) of at most 250,000 characters; got null"),
    ('{"data": ["%s", ["hi"], 4' + NULLS + ']}', "message must be text (a JSON string) of at most 250,000 characters; got a list"),
    ('{"data": ["%s", "   ", 4' + NULLS + ']}', "message is empty: type something first"),
    ('{"data": [12, "hi", 4' + NULLS + ']}', "session_id must be the id /new_session returned"),
    ('{"data": ["' + "f" * 100_000 + '", "hi", 4' + NULLS + ']}', "session_id must be the id /new_session returned"),
])
def test_every_chat_argument_is_checked_with_a_message_and_never_a_null_error(launched, body, message):
    # A raw call names every input (gradio's HTTP API fills in no defaults): the five sampling settings are null.
    url, engine = launched
    sid = client(url, "203.0.113.2").predict(api_name="/new_session")
    kind, data = raw_call(url, "chat", body.replace("%s", sid))
    engine.close(sid)
    (reply, stats), = data  # the endpoint's one output: (reply so far, stats JSON)
    error = json.loads(stats)["error"]
    assert kind == "event: complete" and reply == "" and error.startswith(message)
    assert len(error) < 300  # an over-long id is never echoed whole


def test_history_and_close_refuse_ids_that_cannot_be_ours_before_any_lookup(launched):
    from gradio_client.exceptions import AppError

    url, _ = launched
    c = client(url, "203.0.113.3")
    for bad in ("f" * 1000, "../../etc/passwd", ""):
        for api_name in ("/history", "/close_session"):
            with pytest.raises(AppError, match="session_id must be the id /new_session returned") as caught:
                c.predict(bad, api_name=api_name)
            assert "f" * 40 not in str(caught.value)
    with pytest.raises(AppError, match="unknown or expired session"):
        c.predict("0" * 32, api_name="/history")


def test_one_client_cannot_fill_the_server_and_api_sessions_are_marked_as_such(launched):
    """Defect 1 of issue 12 over HTTP: the 36-calls-of-/new_session attack stops at the caller's own cap."""
    from gradio_client.exceptions import AppError

    url, engine = launched
    attacker, visitor = client(url, "198.51.100.66"), client(url, "198.51.100.7")
    mine = [attacker.predict(api_name="/new_session") for _ in range(2)]
    for _ in range(5):
        with pytest.raises(AppError, match="limit 2 per user"):
            attacker.predict(api_name="/new_session")
    theirs = visitor.predict(api_name="/new_session")
    assert engine.open_sessions("addr:198.51.100.66") == 2 and engine.open_sessions("addr:198.51.100.7") == 1
    assert {engine._tags[sid].origin for sid in mine + [theirs]} == {"api"}  # reaped after the API's idle timeout
    for sid in mine:
        attacker.predict(sid, api_name="/close_session")
    assert attacker.predict(api_name="/new_session")  # a closed session frees its slot at once
    for sid in list(engine.session_ids()):
        engine.close(sid)


def test_a_caller_beyond_the_active_turn_limit_is_told_busy_at_once(tiny_chat_model, default_tokenizer):
    """Defect 5 of issue 12: with the app's queue as wide as the engine's turn limit, the next caller used to wait
    in gradio's queue for a running reply to end; now the engine answers it while that reply is still running."""
    engine = engine_for(tiny_chat_model, default_tokenizer, max_active_turns=1)
    with served(engine, "tiny-test-model", queue_concurrency=1) as (url, _):
        first, second = client(url, "192.0.2.1"), client(url, "192.0.2.2")
        long_sid, short_sid = first.predict(api_name="/new_session"), second.predict(api_name="/new_session")
        running = first.submit(long_sid, "Talk for a long time.", 4096, api_name="/chat")
        started = threading.Event()

        def watch():
            for _ in running:
                started.set()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert started.wait(120), "the long reply never started streaming"
        reply, stats = second.predict(short_sid, "Me too!", 4, api_name="/chat")
        still_running = engine.scheduler.active_turns
        engine.stop(long_sid)
        watcher.join(60)
    assert json.loads(stats)["error"].startswith("Server busy") and reply == ""
    assert still_running == 1  # answered while the first reply was still being written


def test_chat_takes_sampling_settings_ints_included_and_refuses_bools(launched):
    """Issue 27 items 1 and 8: /chat's sampling settings, an int where a number belongs (what JSON writes)."""
    url, engine = launched
    c = client(url, "203.0.113.9")
    sid = c.predict(api_name="/new_session")
    try:
        first, stats = c.predict(sid, "hello", 4, 1, 1, 5, 2, 7, api_name="/chat")
        assert first and "error" not in json.loads(stats), stats
        _, refused = c.predict(sid, "hello", 4, True, api_name="/chat")
        assert json.loads(refused)["error"] == "temperature must be a number in [0, 5.0]; got true"
        _, refused = c.predict(sid, "hello", 4, None, None, None, None, 1.5, api_name="/chat")
        assert json.loads(refused)["error"].startswith("seed must be an integer")
    finally:
        c.predict(sid, api_name="/close_session")
