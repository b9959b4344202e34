"""No client can lock others out, API sessions do not linger, and an upload never raises the memory bound."""

from __future__ import annotations

import json
import threading
import time

import pytest

from streaming_engine import EngineBusy, EngineConfig, SessionNotFound, StreamingEngine
from streaming_engine.history import restore_history

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)


def engine_for(model, tokenizer, **overrides):
    config = dict(start_size=4, recent_size=64, prefill_chunk_size=32)
    config.update(overrides)
    return StreamingEngine(model, tokenizer, EngineConfig(**config))


@pytest.mark.parametrize("per_owner", [1, 3])
def test_one_owner_hits_its_own_cap_and_everyone_else_still_gets_a_session(
    tiny_chat_model, default_tokenizer, per_owner
):
    engine = engine_for(tiny_chat_model, default_tokenizer, max_sessions=8, max_sessions_per_owner=per_owner)
    mine = [engine.new_session(owner="10.0.0.1", origin="api") for _ in range(per_owner)]
    for _ in range(3):  # a script hammering /new_session only ever gets its own "busy"
        with pytest.raises(EngineBusy, match=f"limit {per_owner} per user"):
            engine.new_session(owner="10.0.0.1", origin="api")
    assert engine.open_sessions("10.0.0.1") == per_owner and engine.open_sessions() == per_owner
    visitor = engine.new_session(owner="10.0.0.2")  # a browser visitor is unaffected
    assert list(engine.chat(visitor, "hi", max_new_tokens=2, **GREEDY))[-1].kind == "done"
    engine.close(mine[0])  # closing frees the slot at once
    engine.new_session(owner="10.0.0.1", origin="api")


def test_the_global_cap_still_holds_across_owners(tiny_chat_model, default_tokenizer):
    engine = engine_for(tiny_chat_model, default_tokenizer, max_sessions=3, max_sessions_per_owner=2)
    for owner in ("a", "b", "c"):
        engine.new_session(owner=owner)
    with pytest.raises(EngineBusy, match="Server busy"):
        engine.new_session(owner="d")


def test_api_sessions_are_reaped_sooner_than_browser_sessions(tiny_chat_model, default_tokenizer):
    engine = engine_for(tiny_chat_model, default_tokenizer, idle_timeout_s=3600, api_idle_timeout_s=60,
                        max_sessions_per_owner=2)
    browser = engine.new_session(owner="x")
    api = engine.new_session(owner="x", origin="api")
    cache = engine.session(api).cache
    assert list(engine.chat(api, "hi", max_new_tokens=2, **GREEDY))[-1].kind == "done"
    # Both sessions age past the API timeout but not the browser one (no sleep: the engine's clock is moved on).
    engine.clock = lambda: time.monotonic() + 120
    engine.new_session(owner="x")  # creating a session reaps first: the idle API session's slot is reused
    assert api not in engine.session_ids() and browser in engine.session_ids()
    assert cache.kv_bytes() == 0 and engine.open_sessions("x") == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(owner=""), "owner"), (dict(owner="x" * 300), "owner"), (dict(owner=5), "owner"),
    (dict(origin="robot"), "origin"),
])
def test_bad_owner_or_origin_is_refused(tiny_chat_model, default_tokenizer, kwargs, match):
    engine = engine_for(tiny_chat_model, default_tokenizer)
    with pytest.raises(ValueError, match=match):
        engine.new_session(**kwargs)
    assert engine.session_ids() == []


@pytest.mark.parametrize("field,value", [("max_sessions_per_owner", 0), ("api_idle_timeout_s", 0),
                                         ("api_idle_timeout_s", True)])
def test_fairness_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(recent_size=64, prefill_chunk_size=32, **{field: value})


def dense_upload(turns: int) -> str:
    messages = []
    for i in range(turns):
        messages += [{"role": "user", "content": f"Question {i}: " + "tell me more " * 30},
                     {"role": "assistant", "content": "Here is more. " * 30}]
    return json.dumps({"format": "streaming-llm-chat", "version": 1, "mode": "dense", "start_size": 0,
                       "recent_size": 100_000, "messages": messages})


@pytest.mark.parametrize("turns", [1, 12])
def test_an_uploaded_history_can_never_raise_the_memory_bound(tiny_chat_model, default_tokenizer, turns):
    engine = engine_for(tiny_chat_model, default_tokenizer)
    sid = restore_history(engine, dense_upload(turns))
    events = list(engine.chat(sid, "Continue.", max_new_tokens=8, **GREEDY))
    stats = events[-1].stats
    assert events[-1].kind == "done" and stats["mode"] == "streaming"
    assert (stats["start_size"], stats["recent_size"]) == (4, 64)
    assert max(e.stats.get("cache_tokens", 0) for e in events) <= 68
    assert len(engine.history(sid)) == 2 * turns + 2  # the whole history is kept for the user


def test_only_an_explicit_caller_may_take_the_mode_from_the_file(tiny_chat_model, default_tokenizer):
    engine = engine_for(tiny_chat_model, default_tokenizer)
    assert engine.stats(restore_history(engine, dense_upload(1), allow_file_mode=True))["mode"] == "dense"
    assert engine.stats(restore_history(engine, dense_upload(1), "window"))["mode"] == "window"


@pytest.mark.parametrize("bad", ["f" * 37, "a" * 1_000_000, None, 12, ["x"]],
                         ids=["37-hex", "1M-chars", "null", "number", "list"])
def test_overlong_or_malformed_session_ids_are_refused_without_being_echoed(tiny_chat_model, default_tokenizer, bad):
    engine = engine_for(tiny_chat_model, default_tokenizer)
    events = list(engine.chat(bad, "hi"))
    assert len(events) == 1 and events[0].kind == "error" and "unknown or expired session" in events[0].text
    assert len(events[0].text) < 200
    with pytest.raises(SessionNotFound) as caught:
        engine.history(bad)
    assert len(str(caught.value)) < 200
    engine.close(bad)  # a no-op, never an error


def test_a_huge_history_is_encoded_on_the_callers_thread_while_other_replies_keep_decoding(
    tiny_chat_model, default_tokenizer
):
    """Issue 28 item 1: encoding a 20,000-message history must not stall the shared worker. The encoding hook of
    the big request waits until the other chat has decoded three more tokens: were the encoding on the worker,
    those tokens could never come and the wait would run out."""
    engine = engine_for(tiny_chat_model, default_tokenizer, max_new_tokens=4096)
    decoded = threading.Condition()
    steps = {"decode": 0}

    def on_pass(kind, handles):
        with decoded:
            steps[kind] = steps.get(kind, 0) + 1
            decoded.notify_all()

    engine.scheduler.on_pass = on_pass
    other = engine.new_session(owner="a")
    reader = threading.Thread(target=lambda: list(engine.chat(other, "Tell a long story.", max_new_tokens=4000,
                                                              **GREEDY)), daemon=True)
    reader.start()
    with decoded:
        assert decoded.wait_for(lambda: steps["decode"] >= 1, timeout=120), "the other reply never started"
    big = engine.open_history([{"role": "user" if i % 2 == 0 else "assistant", "content": "x"}
                               for i in range(20_000)], owner="b")
    log = []

    def on_encode(phase, session_id):
        if session_id != big:
            return
        with decoded:
            log.append((phase, threading.current_thread().name, steps["decode"]))
            if phase == "start":
                decoded.wait_for(lambda: steps["decode"] >= log[0][2] + 3, timeout=120)

    engine.runtime.on_encode = on_encode
    try:
        events = list(engine.chat(big, "hi", max_new_tokens=2, **GREEDY))
    finally:
        engine.stop(other)
        reader.join(120)
    assert events[-1].kind == "done", events[-1].text
    (started, thread, before), (finished, _, after) = log
    assert (started, finished) == ("start", "done") and thread != engine.scheduler._name
    assert after - before >= 3  # the other chat's tokens kept coming while the history was being encoded
