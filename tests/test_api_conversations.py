"""Conversations sent whole (stateless HTTP clients, `streaming_engine/stateless.py`): the live session a message
list continues is found, one is opened from a message list otherwise, and keeps process-wide counters that survive closed sessions."""

from __future__ import annotations

import pytest
from conftest import ManualClock

from streaming_engine import EngineConfig, StreamingEngine
from streaming_engine.stateless import find_conversation, open_conversation


@pytest.fixture
def engine(tiny_chat_model, default_tokenizer):
    return StreamingEngine(tiny_chat_model, default_tokenizer,
                           EngineConfig(start_size=4, recent_size=96, prefill_chunk_size=32, max_new_tokens=8,
                                        temperature=0))


def reply(engine, sid, text):
    events = list(engine.chat(sid, text))
    assert events[-1].kind == "done", events[-1].text
    return events[-1].text


def test_a_message_list_continues_its_own_live_session_and_no_other(engine):
    system = {"role": "system", "content": "Be brief."}
    assert find_conversation(engine, [system], "api") is None
    sid = open_conversation(engine, [system], "api")
    answer = reply(engine, sid, "first")
    conversation = [system, {"role": "user", "content": "first"}, {"role": "assistant", "content": answer}]
    assert find_conversation(engine, conversation, "api") == sid
    assert find_conversation(engine, conversation, "someone-else") is None  # never another client's chat
    assert find_conversation(engine, conversation[:-1], "api") is None  # a prefix is not the whole conversation
    assert find_conversation(engine, conversation, "api", exclude={sid}) is None
    ui = engine.new_session("streaming", "Be brief.")  # a browser tab with the same history: not the API's
    reply(engine, ui, "first")
    assert find_conversation(engine, conversation, "api") == sid
    seen = engine.stats(sid)["seen_tokens"]
    reply(engine, sid, "second")
    assert engine.stats(sid)["seen_tokens"] - seen < 40  # only the new turn (and the reply) went in


def test_a_long_message_list_opens_a_session_primed_from_the_tail_that_fits(engine):
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i}"}]
    sid = open_conversation(engine, history, "api")
    assert engine.history(sid) == history
    reply(engine, sid, "and now?")
    stats = engine.stats(sid)
    assert stats["cache_tokens"] <= stats["cache_capacity"] == 100
    with pytest.raises(ValueError, match="message 1"):
        open_conversation(engine, [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], "api")


def test_counters_only_grow_and_outlive_closed_sessions(engine):
    engine.counters.clock = ManualClock()  # every token of this test falls inside the rate window
    before = engine.counters.snapshot()
    sids = [engine.new_session("streaming") for _ in range(2)]
    for sid in sids:
        for turn in range(6):
            reply(engine, sid, f"tell me more, part {turn} " * 4)
    evicted = sum(engine.stats(sid)["evicted_tokens"] for sid in sids)
    after = engine.counters.snapshot()
    assert after["turns_finished"] - before["turns_finished"] == 12 == after["turns_started"] - before["turns_started"]
    assert after["tokens_evicted"] - before["tokens_evicted"] == evicted > 0
    assert after["tokens_generated"] - before["tokens_generated"] >= 12
    assert after["tokens_processed"] - before["tokens_processed"] == sum(engine.stats(s)["seen_tokens"] for s in sids)
    for sid in sids:
        engine.close(sid)
    assert engine.counters.snapshot() == after  # closing a session takes nothing back
    generated = after["tokens_generated"] - before["tokens_generated"]
    assert engine.counters.decode_tokens_per_s() == generated / engine.counters.window_s
    engine.counters.clock.advance(engine.counters.window_s + 1)
    assert engine.counters.decode_tokens_per_s() == 0  # and all of them have left it
