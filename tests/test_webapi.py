"""The HTTP API of the launched app (`webui/webapi.py`), called as scripts call it: typed endpoints, JSON results,
every argument checked with a clear message raised the same way everywhere, per-client caps, and "server busy" at
once instead of a wait in gradio's queue."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from browser_util import served

from streaming_engine import EngineConfig, StreamingEngine
from webui.webapi import ENDPOINTS, ERROR_CODES


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


def refusal(call, *args, api_name):
    """The error an endpoint raises for these arguments: (code, message). Every endpoint raises them alike."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        call(*args, api_name=api_name)
    assert caught.value.title in ERROR_CODES, caught.value.title
    return caught.value.title, caught.value.message


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
    assert refusal(c.predict, sid, "hello", value, api_name="/chat") == (
        "invalid_argument", f"max_new_tokens must be an integer in [1, 4096]; {shown}")
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
    assert kind == "event: error" and data["title"] == "invalid_argument", (kind, data)
    assert data["error"].startswith(message)
    assert len(data["error"]) < 300  # an over-long id is never echoed whole


def test_history_and_close_refuse_ids_that_cannot_be_ours_before_any_lookup(launched):
    url, _ = launched
    c = client(url, "203.0.113.3")
    for bad in ("f" * 1000, "../../etc/passwd", ""):
        for api_name in ("/history", "/close_session"):
            code, message = refusal(c.predict, bad, api_name=api_name)
            assert code == "invalid_argument" and message.startswith("session_id must be the id /new_session returned")
            assert "f" * 40 not in message
    for api_name in ("/history", "/chat"):
        code, message = refusal(c.predict, "0" * 32, *(["hi"] if api_name == "/chat" else []), api_name=api_name)
        assert code == "unknown_session" and "unknown or expired session" in message


def test_one_client_cannot_fill_the_server_and_api_sessions_are_marked_as_such(launched):
    """Defect 1 of issue 12 over HTTP: the 36-calls-of-/new_session attack stops at the caller's own cap."""
    url, engine = launched
    attacker, visitor = client(url, "198.51.100.66"), client(url, "198.51.100.7")
    mine = [attacker.predict(api_name="/new_session") for _ in range(2)]
    for _ in range(5):
        code, message = refusal(attacker.predict, api_name="/new_session")
        assert code == "server_busy" and "limit 2 per user" in message
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
        code, message = refusal(second.predict, short_sid, "Me too!", 4, api_name="/chat")
        still_running = engine.scheduler.active_turns
        engine.stop(long_sid)
        watcher.join(60)
    assert code == "refused" and message.startswith("Server busy")
    assert engine.history(short_sid) == []
    assert still_running == 1  # answered while the first reply was still being written


def test_chat_takes_sampling_settings_ints_included_and_refuses_bools(launched):
    """Issue 27 items 1 and 8: /chat's sampling settings, an int where a number belongs (what JSON writes)."""
    url, engine = launched
    c = client(url, "203.0.113.9")
    sid = c.predict(api_name="/new_session")
    try:
        first, stats = c.predict(sid, "hello", 4, 1, 1, 5, 2, 7, api_name="/chat")
        assert first and stats["finish_reason"] in ("eos", "length"), stats
        by_name = c.predict(sid, "again", max_new_tokens=3, temperature=0, seed=3, api_name="/chat")
        assert by_name[1]["reply_tokens"] <= 3
        assert refusal(c.predict, sid, "hello", 4, True, api_name="/chat") == (
            "invalid_argument", "temperature must be a number in [0, 5.0] (0 = greedy); got true")
        code, message = refusal(c.predict, sid, "hello", 4, None, None, None, None, 1.5, api_name="/chat")
        assert code == "invalid_argument" and message.startswith("seed must be an integer")
    finally:
        c.predict(sid, api_name="/close_session")


# --- the API's description, as gradio_client sees it (issue 27, item 8) ------------------------------------------

#: /chat's parameters as callers name them, in order.
CHAT_PARAMETERS = ["session_id", "message", "max_new_tokens", "temperature", "top_p", "top_k",
                   "repetition_penalty", "seed"]


@pytest.fixture(scope="module")
def described(launched):
    url, _ = launched
    return client(url, "203.0.113.20").view_api(return_format="dict", print_info=False)["named_endpoints"]


def test_the_api_names_exactly_the_documented_endpoints(described):
    assert sorted(described) == sorted(ENDPOINTS)


@pytest.mark.parametrize("api_name", ENDPOINTS)
def test_every_endpoint_describes_each_parameter_and_result_with_a_type(described, api_name):
    endpoint = described[api_name]
    for item in endpoint["parameters"] + endpoint["returns"]:
        shown = item["python_type"]["type"]
        assert shown and "Any" not in shown and item["type"], (api_name, item)
    assert endpoint["description"], api_name


def test_chat_shows_its_sampling_parameters_by_name_and_type(described):
    parameters = described["/chat"]["parameters"]
    assert [p["parameter_name"] for p in parameters] == CHAT_PARAMETERS
    shown = {p["parameter_name"]: p["python_type"]["type"] for p in parameters}
    assert shown["max_new_tokens"] == "int" and shown["temperature"] == "None | float"
    assert shown["top_k"] == shown["seed"] == "None | int"
    assert [r["python_type"]["type"].split("(")[0] for r in described["/chat"]["returns"]] == ["str", "dict"]


#: Each endpoint that takes arguments, called with a session id of the wrong JSON type (a number).
BAD_CALLS = {"/chat": (12, "hi"), "/continue_reply": (12,), "/history": (12,), "/close_session": (12,)}
#: The inputs after those of `BAD_CALLS` that a raw call must still send (gradio fills in none of them).
OPTIONAL_INPUTS = {"/chat": 6, "/continue_reply": 6}


@pytest.mark.parametrize("api_name", sorted(BAD_CALLS))
def test_a_bad_argument_is_refused_alike_on_every_endpoint(launched, api_name):
    url, _ = launched
    code, message = refusal(client(url, "203.0.113.21").predict, *BAD_CALLS[api_name], api_name=api_name)
    assert code == "invalid_argument" and message.startswith("session_id must be the id /new_session returned")
    body = json.dumps({"data": list(BAD_CALLS[api_name]) + [None] * OPTIONAL_INPUTS.get(api_name, 0)})
    kind, data = raw_call(url, api_name.strip("/"), body)  # over plain HTTP: the same code and message
    assert kind == "event: error" and (data["title"], data["error"]) == (code, message)


def test_continue_reply_streams_the_cut_reply_grown_in_place_and_refuses_when_there_is_none(launched):
    from streaming_engine.session import NO_REPLY_TO_CONTINUE

    url, engine = launched
    c = client(url, "203.0.113.23")
    sid = c.predict(api_name="/new_session")
    try:
        assert refusal(c.predict, sid, api_name="/continue_reply") == ("refused", NO_REPLY_TO_CONTINUE)
        cut, stats = c.predict(sid, "Tell me a story", 4, 0, api_name="/chat")
        assert stats["finish_reason"] == "length"
        updates = list(c.submit(sid, 4, 0, api_name="/continue_reply"))
        reply, stats = updates[-1]
        assert all(update[0].startswith(cut) for update in updates) and len(reply) > len(cut)
        assert stats["finish_reason"] == "length" and stats["reply_tokens"] == 4
        assert c.predict(sid, api_name="/history") == [{"role": "user", "content": "Tell me a story"},
                                                     {"role": "assistant", "content": reply}]
    finally:
        c.predict(sid, api_name="/close_session")


def test_results_are_json_objects_and_lists_not_text(launched):
    url, engine = launched
    c = client(url, "203.0.113.22")
    sid = c.predict(api_name="/new_session")
    try:
        assert isinstance(sid, str)
        updates = list(c.submit(sid, "hello", 3, api_name="/chat"))
        assert updates and all(isinstance(reply, str) and isinstance(stats, dict) for reply, stats in updates)
        history = c.predict(sid, api_name="/history")
        assert isinstance(history, list) and [m["role"] for m in history] == ["user", "assistant"]
        assert history == engine.history(sid)
        health = c.predict(api_name="/health")
        assert isinstance(health, dict) and health["sessions"] >= 1
    finally:
        assert c.predict(sid, api_name="/close_session") == "closed"


def test_chat_replies_up_to_the_engine_limit_run_at_once_however_small_the_app_queue(tiny_chat_model,
                                                                                       default_tokenizer):
    """/chat is not bounded by gradio's concurrency (`concurrency_limit=None`): with the app's queue one event wide
    and one deep, as many replies as the engine allows are written at the same time and none is refused with
    gradio's "Queue is full" (a bound that would have to come from the queue, not the engine). The other endpoints
    still answer while they run."""
    from gradio_client.utils import QueueError

    limit = 3
    engine = engine_for(tiny_chat_model, default_tokenizer, max_active_turns=limit)
    with served(engine, "tiny-test-model", queue_concurrency=1, queue_max_size=1) as (url, _):
        callers = [client(url, f"192.0.2.{10 + i}") for i in range(limit)]
        sids = [c.predict(api_name="/new_session") for c in callers]
        jobs = []
        try:
            # One submission at a time, each waited for until its reply is being written (or it ended, refused):
            # a /chat event that is running has left gradio's queue, so a queue one deep holds at most the one
            # being submitted. Submitted all at once, they can all sit in the queue before the first starts, and a
            # one-deep queue then refuses the third whatever the engine allows. Generous deadlines.
            for c, sid in zip(callers, sids):
                jobs.append(c.submit(sid, "Talk for a long time.", 4096, api_name="/chat"))
                deadline = time.monotonic() + 120
                while engine.scheduler.active_turns < len(jobs) and not any(job.done() for job in jobs):
                    assert time.monotonic() < deadline, "the replies never ran together"
                    time.sleep(0.1)
            running = engine.scheduler.active_turns
            health = callers[0].predict(api_name="/health")  # answered through the queue meanwhile
        finally:
            for sid in sids:
                engine.stop(sid)
        outcomes = []
        for job in jobs:
            try:
                job.result(timeout=120)
                outcomes.append("done")
            except QueueError:
                outcomes.append("queue full")
    assert running == limit and health["active_turns"] == limit, (running, outcomes)
    assert outcomes == ["done"] * limit


def test_the_docs_name_every_error_code_the_api_raises():
    from browser_util import ROOT

    page = (ROOT / "docs" / "openai-api.md").read_text()
    assert [code for code in ERROR_CODES if f"`{code}`" not in page] == []
