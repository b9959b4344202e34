"""Invariants of the threaded multi-round engine (tiny random model over the real chat tokenizer)."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from streaming_engine import MODES, EngineConfig, StreamingEngine
from streaming_engine.engine import SessionNotFound
from streaming_engine.session import SessionStatus
from streaming_engine.templating import ChatTemplater
from streaming_engine.textstream import TextStream
from streaming_engine.validate import clean_text
from streaming_engine.history import export_history, restore_history

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)


def make_engine(model, tokenizer, start_size=4, recent_size=64, **config):
    config.setdefault("prefill_chunk_size", min(32, recent_size - 1))
    return StreamingEngine(model, tokenizer, EngineConfig(start_size=start_size, recent_size=recent_size, **config))


def run(engine, sid, message, **sampling):
    """One turn: (deltas joined, final event, every event)."""
    events = list(engine.chat(sid, message, **sampling))
    deltas = "".join(e.text for e in events if e.kind == "delta")
    return deltas, events[-1], events


def test_cache_never_exceeds_capacity_over_20_rounds_and_counters_add_up(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 64)
    sid = engine.new_session()
    evicted_before = 0
    for round_number in range(1, 21):
        deltas, final, events = run(engine, sid, f"Round {round_number}: tell me something.", max_new_tokens=12,
                                    temperature=0.9, seed=round_number)
        assert final.kind == "done", final.text
        assert final.stats["reply_tokens"] > 0 and final.text == deltas
        for event in events:
            assert event.stats["cache_tokens"] <= event.stats["cache_capacity"] == 68
        stats = engine.stats(sid)
        assert stats["seen_tokens"] == stats["cache_tokens"] + stats["evicted_tokens"]
        assert stats["turns"] == round_number and stats["sink_tokens"] == 4
        assert stats["evicted_tokens"] >= evicted_before
        evicted_before = stats["evicted_tokens"]
    assert evicted_before > 0
    assert len(engine.history(sid)) == 40


SECOND_TEMPLATE = (  # a Zephyr-style template: different markers, no default system prompt
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", ["default", "zephyr"])
def test_incremental_turns_tokenize_like_the_whole_conversation_template(default_tokenizer, template):
    import copy

    tokenizer = copy.deepcopy(default_tokenizer)
    if template == "zephyr":
        tokenizer.chat_template = SECOND_TEMPLATE
    templater = ChatTemplater(tokenizer)
    replies = ["Paris is the capital.", "Berlin, of course!", "Je ne sais pas 🤷"]
    users = ["Capital of France?", "And Germany?", "Say something in French."]
    messages = [{"role": "system", "content": "Be brief."}]
    stream, fed = "", []
    for user, reply in zip(users, replies):
        messages.append({"role": "user", "content": user})
        text = templater.turn_text(stream, messages)
        fed += templater.encode(text)
        stream += text
        whole = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert fed == list(whole)
        reply_ids = templater.encode(reply) + [tokenizer.eos_token_id]  # what a model would emit
        fed += reply_ids
        stream += tokenizer.decode(reply_ids, skip_special_tokens=False)
        messages.append({"role": "assistant", "content": reply})


def test_engine_stream_text_matches_the_template_render(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 500)
    sid = engine.new_session(system_prompt="You are terse.")
    for question in ["Hi there", "What now?", "Bye"]:
        run(engine, sid, question, max_new_tokens=6, **GREEDY)
    session = engine.session(sid)
    rendered = ChatTemplater(default_tokenizer).render(list(session.fed), add_generation_prompt=False)
    # Everything fed or pending so far is a prefix of the whole conversation as the template writes it.
    assert rendered.startswith(session.stream_text)


def test_chunked_prefill_of_a_prompt_ten_times_the_cache_stays_bounded(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 60)
    sid = engine.new_session()
    long_prompt = " ".join(f"word{i}" for i in range(400))  # ~1,000 tokens for a 64-token cache
    assert len(default_tokenizer(long_prompt)["input_ids"]) > 10 * 64
    _, final, events = run(engine, sid, long_prompt, max_new_tokens=8, **GREEDY)
    assert final.kind == "done"
    assert max(e.stats["cache_tokens"] for e in events) <= 64
    assert final.stats["evicted_tokens"] > 9 * 64
    assert final.stats["kv_bytes"] <= 64 * final.stats["kv_bytes_per_token"]


def test_greedy_streaming_equals_dense_while_nothing_is_evicted(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 1000)
    streaming, dense = engine.new_session("streaming"), engine.new_session("dense", max_context=1004)
    for question in ["Tell me about cats.", "And dogs?", "Which is better?"]:
        a, final_a, _ = run(engine, streaming, question, max_new_tokens=15, **GREEDY)
        b, final_b, _ = run(engine, dense, question, max_new_tokens=15, **GREEDY)
        assert a == b and final_a.stats["reply_tokens"] == final_b.stats["reply_tokens"]
    assert engine.stats(streaming)["evicted_tokens"] == 0


def test_stop_mid_turn_keeps_the_partial_reply_and_the_chat_continues(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 200)
    sid = engine.new_session()
    events, at_stop = [], None
    for event in engine.chat(sid, "Write a very long story.", max_new_tokens=400, **GREEDY):
        events.append(event)
        if at_stop is None and event.kind == "delta" and event.stats.get("reply_tokens", 0) >= 5:
            engine.stop(sid)
            # The worker may run ahead of this reader: what it had written once the stop was asked is the bound
            # (read after the request, so never below it), not the count this event carried.
            at_stop = engine.stats(sid)["reply_tokens"]
    final = events[-1]
    assert final.kind == "done" and final.finish_reason == "stopped"
    assert at_stop is not None and final.stats["reply_tokens"] <= at_stop + 1  # within one decode step
    history = engine.history(sid)
    assert history[-1]["role"] == "assistant" and history[-1]["content"] == final.text
    _, again, _ = run(engine, sid, "Continue.", max_new_tokens=5, **GREEDY)
    assert again.kind == "done"
    stats = engine.stats(sid)
    assert stats["seen_tokens"] == stats["cache_tokens"] + stats["evicted_tokens"]


def test_concurrent_sessions_reply_exactly_as_when_run_alone(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 120)
    prompts = [[f"User {u} says hello {t}" for t in range(3)] for u in range(4)]

    def conversation(user, out):
        sid = engine.new_session()
        out[user] = [run(engine, sid, p, max_new_tokens=10, **GREEDY)[0] for p in prompts[user]]

    alone = {}
    for user in range(4):
        conversation(user, alone)
    together = {}
    threads = [threading.Thread(target=conversation, args=(u, together)) for u in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert together == alone


def test_dense_session_reports_context_full_cleanly(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 200)
    sid = engine.new_session("dense", max_context=90)
    reasons = []
    for i in range(6):
        _, final, _ = run(engine, sid, f"Question {i}?", max_new_tokens=20, **GREEDY)
        assert final.kind == "done"
        reasons.append(final.finish_reason)
        assert final.stats["cache_tokens"] <= 90
    assert "context_full" in reasons and reasons[-1] == "context_full"
    assert engine.stats(sid)["context_full"] is True and engine.session(sid).status is SessionStatus.FULL
    engine.reset(sid)
    assert engine.session(sid).status is SessionStatus.READY
    _, final, _ = run(engine, sid, "Fresh start", max_new_tokens=3, **GREEDY)
    assert final.finish_reason != "context_full"


def test_window_mode_has_no_sinks(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 64)
    sid = engine.new_session("window")
    for i in range(4):
        run(engine, sid, f"Tell me fact number {i}.", max_new_tokens=10, **GREEDY)
    stats = engine.stats(sid)
    assert stats["start_size"] == 0 and stats["sink_tokens"] == 0 and stats["evicted_tokens"] > 0
    assert engine.session(sid).cache.stream_positions[0] > 0  # the very first token is gone


def test_the_session_view_is_read_only_and_its_status_follows_the_cache(tiny_chat_model, default_tokenizer):
    """`engine.session(sid)`: a restored history is UNPRIMED until its next turn re-encodes it, READY after; a
    dense cache out of room is FULL (`test_dense_session_reports_context_full_cleanly`); the view cannot be
    written to."""
    engine = make_engine(tiny_chat_model, default_tokenizer)
    sid = engine.new_session()
    assert engine.session(sid).status is SessionStatus.READY and engine.session(sid).turn is None
    run(engine, sid, "Hello there", max_new_tokens=3, **GREEDY)
    restored = restore_history(engine, export_history(engine, sid))
    view = engine.session(restored)
    assert view.status is SessionStatus.UNPRIMED and not view.replying and view.stream_text == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.status = SessionStatus.READY
    run(engine, restored, "And now?", max_new_tokens=3, **GREEDY)
    after = engine.session(restored)
    assert after.status is SessionStatus.READY and after.turn.finished.is_set() and not after.replying
    with pytest.raises(SessionNotFound):
        engine.session("nope")


def test_export_then_restore_continues_the_conversation(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 64)
    sid = engine.new_session(system_prompt="Be kind.")
    for i in range(5):
        run(engine, sid, f"Message {i} with some words to fill the window.", max_new_tokens=10, **GREEDY)
    exported = export_history(engine, sid)
    data = json.loads(exported)
    assert data["format"] == "streaming-llm-chat" and len(data["messages"]) == 10
    restored = restore_history(engine, exported)
    # A restore takes messages as input, cleaned like typed text (`validate.clean_text`): a random model's reply
    # may hold a carriage return, which the restored copy drops.
    as_input = [{**m, "content": clean_text(m["content"])} for m in engine.history(sid)]
    assert engine.history(restored) == as_input
    _, final, _ = run(engine, restored, "Do you remember?", max_new_tokens=5, **GREEDY)
    assert final.kind == "done"
    stats = engine.stats(restored)
    assert 0 < stats["cache_tokens"] <= stats["cache_capacity"]
    assert engine.history(restored)[:-2] == as_input


@pytest.mark.parametrize("payload,match", [
    ("{not json", "not valid JSON"),
    ('{"format": "other"}', "not a chat history"),
    ('{"format": "streaming-llm-chat", "messages": [{"role": "hacker", "content": "x"}]}', "message 0"),
    ('{"format": "streaming-llm-chat", "messages": "nope"}', "messages"),
    (b"\xff\xfe\x00", "UTF-8"),
])
def test_corrupt_history_is_rejected_and_nothing_changes(tiny_chat_model, default_tokenizer, payload, match):
    engine = make_engine(tiny_chat_model, default_tokenizer)
    before = engine.session_ids()
    with pytest.raises(ValueError, match=match):
        restore_history(engine, payload)
    assert engine.session_ids() == before


@pytest.mark.parametrize("message,settings,match", [
    ("", {}, "empty"),
    ("   \n\t ", {}, "empty"),
    ("hi", {"temperature": -1}, "temperature"),
    ("hi", {"top_p": 0}, "top_p"),
    ("hi", {"top_p": 1.5}, "top_p"),
    ("hi", {"max_new_tokens": -5}, "max_new_tokens"),
    ("hi", {"max_new_tokens": 10**9}, "max_new_tokens"),
    ("hi", {"top_k": -1}, "top_k"),
    ("hi", {"bogus": 1}, "unknown sampling"),
    ("x" * 300_000, {}, "too long"),
])
def test_bad_input_gives_one_clear_error_event_and_the_session_stays_usable(
    tiny_chat_model, default_tokenizer, message, settings, match
):
    engine = make_engine(tiny_chat_model, default_tokenizer)
    sid = engine.new_session()
    events = list(engine.chat(sid, message, **settings))
    assert len(events) == 1 and events[0].kind == "error" and match in events[0].text
    assert events[0].accepted is False and engine.history(sid) == [] and engine.stats(sid)["turns"] == 0
    _, final, _ = run(engine, sid, "hello", max_new_tokens=3, **GREEDY)
    assert final.kind == "done" and final.accepted


def test_every_refusal_says_what_it_is_in_a_typed_code_and_is_final(tiny_chat_model, default_tokenizer):
    """`Event.code` is what the API maps to an HTTP status: bad input "invalid", this chat still replying
    "running", the server at its cap of running replies "busy"; a refusal is the turn's one, final, event."""
    engine = make_engine(tiny_chat_model, default_tokenizer, max_active_turns=1)
    talker, other = engine.new_session(), engine.new_session()
    (invalid,) = list(engine.chat(talker, "   "))
    assert (invalid.code, invalid.accepted, invalid.final) == ("invalid", False, True)
    entered, gate = threading.Event(), threading.Event()

    def hold(module, args):  # the running turn's first pass waits here: it holds the one slot meanwhile
        entered.set()
        assert gate.wait(120), "the test never let the pass go on"

    hook = tiny_chat_model.register_forward_pre_hook(hold)
    try:
        events = engine.start_chat(talker, "hello", max_new_tokens=2, **GREEDY)
        assert entered.wait(120), "the turn never started"
        (running,) = list(engine.chat(talker, "again"))
        (busy,) = list(engine.chat(other, "hello"))
    finally:
        gate.set()
        hook.remove()
    last = list(events)[-1]
    assert (running.code, running.accepted, running.final) == ("running", False, True)
    assert (busy.code, busy.accepted, busy.final) == ("busy", False, True)
    assert last.kind == "done" and last.final and last.code is None


def test_unknown_session_and_bad_session_settings(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer)
    events = list(engine.chat("nope", "hi"))
    assert events[0].kind == "error" and "unknown or expired session" in events[0].text
    assert events[0].accepted is False
    for kwargs, match in [
        (dict(mode="turbo"), "mode"),
        (dict(start_size=-1), "start_size"),
        (dict(recent_size=0), "recent_size"),
        (dict(recent_size=10_000), "positions"),
        (dict(mode="dense", max_context=10**6), "positions"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.new_session(**kwargs)
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        EngineConfig(recent_size=64, prefill_chunk_size=64)


def test_a_failure_inside_generation_keeps_history_and_the_session_recovers(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 64)
    sid, other = engine.new_session(), engine.new_session()
    run(engine, sid, "First message", max_new_tokens=5, **GREEDY)
    calls = {"n": 0}

    def flaky(module, args):
        calls["n"] += 1
        if calls["n"] >= 3:  # from the third forward pass of the next turn on (a decode step): a lasting fault
            raise RuntimeError("CUDA out of memory (simulated)")

    hook = tiny_chat_model.register_forward_pre_hook(flaky)
    try:
        _, final, _ = run(engine, sid, "Second message", max_new_tokens=10, **GREEDY)
    finally:
        hook.remove()
    assert final.kind == "error" and "out of memory" in final.text
    assert final.accepted  # the turn ran: its message is in the history, unlike a refused one
    history = engine.history(sid)
    assert [m["content"] for m in history if m["role"] == "user"] == ["First message", "Second message"]
    _, final, _ = run(engine, other, "Other tab still works", max_new_tokens=3, **GREEDY)
    assert final.kind == "done"
    _, final, _ = run(engine, sid, "Third message", max_new_tokens=5, **GREEDY)
    assert final.kind == "done"
    assert engine.stats(sid)["cache_tokens"] > 0


@pytest.mark.parametrize("text", ["héllo wörld", "emoji 👋🏽🎉 mixed", "世界 你好", "שלום עולם RTL", "a\u200db"])
def test_text_deltas_never_split_a_character(default_tokenizer, text):
    stream = TextStream(default_tokenizer)
    deltas = [stream.push(t) for t in default_tokenizer(text, add_special_tokens=False)["input_ids"]]
    deltas.append(stream.finish())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stop_strings_are_never_shown_even_partially(default_tokenizer):
    stream = TextStream(default_tokenizer, stop=["END"])
    shown = ""
    for token in default_tokenizer("alpha beta ENDgamma", add_special_tokens=False)["input_ids"]:
        shown += stream.push(token)
        assert "E" not in shown.replace("alpha beta ", "")
    shown += stream.finish()
    assert shown == "alpha beta " and stream.stopped_at is not None


@pytest.mark.model
def test_default_model_answers_three_rounds_on_topic(default_model):
    model, tokenizer = default_model
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=4, recent_size=508, prefill_chunk_size=256))
    sid = engine.new_session()
    expected = [("What is the capital of France?", ["paris"]),
                ("What color is the sky on a clear day?", ["blue"]),
                ("How many legs does a dog have?", ["four", "4"])]
    for question, words in expected:
        _, final, _ = run(engine, sid, question, max_new_tokens=40, **GREEDY)
        assert final.kind == "done" and final.text.strip()
        assert any(w in final.text.lower() for w in words), final.text


def test_rewind_drops_the_last_exchange_and_the_retry_follows_the_earlier_history(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 200)
    sid = engine.new_session()
    first, _, _ = run(engine, sid, "First question", max_new_tokens=6, **GREEDY)
    snapshot = export_history(engine, sid)
    run(engine, sid, "Second question", max_new_tokens=6, **GREEDY)
    assert engine.rewind(sid) == "Second question"
    assert [m["content"] for m in engine.history(sid)] == ["First question", first]
    again, final, _ = run(engine, sid, "Second question", max_new_tokens=6, **GREEDY)
    # The retry sees exactly the history a restore of the first exchange sees.
    restored, _, _ = run(engine, restore_history(engine, snapshot), "Second question", max_new_tokens=6, **GREEDY)
    assert final.kind == "done" and again == restored
    fresh = engine.new_session()
    with pytest.raises(ValueError, match="no message"):
        engine.rewind(fresh)


def test_a_reply_that_runs_to_the_limit_leaves_the_streaming_cache_exactly_full(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 64)
    sid = engine.new_session()
    for i in range(4):
        _, final, _ = run(engine, sid, f"Tell me more, part {i}.", max_new_tokens=16, **GREEDY)
    assert final.finish_reason == "length" and final.stats["evicted_tokens"] > 0
    assert final.stats["cache_tokens"] == final.stats["cache_capacity"] == 68


@pytest.mark.parametrize("modes", [["streaming"], list(MODES), ["streaming", "streaming", "window"]])
def test_chat_many_gives_every_session_the_reply_it_gets_alone(tiny_chat_model, default_tokenizer, modes):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 120)
    question = "Tell me about the sea."
    solo = [run(engine, engine.new_session(mode), question, max_new_tokens=12, **GREEDY)[0] for mode in modes]
    sids = [engine.new_session(mode) for mode in modes]
    texts, finals = {sid: "" for sid in sids}, {}
    for sid, event in engine.chat_many(sids, question, max_new_tokens=12, **GREEDY):
        assert sid not in finals, "no event after a session's final one"
        if event.kind == "delta":
            texts[sid] += event.text
        else:
            finals[sid] = event
    assert [texts[sid] for sid in sids] == solo
    assert all(finals[sid].kind == "done" and finals[sid].accepted and finals[sid].text == texts[sid]
               for sid in sids)
    assert all(engine.stats(sid)["turns"] == 1 for sid in sids)


def test_chat_many_refuses_per_session_and_still_answers_the_others(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer)
    good, gone = engine.new_session(), engine.new_session()
    engine.close(gone)
    events = list(engine.chat_many([gone, good], "hello", max_new_tokens=3, **GREEDY))
    assert events[0][0] == gone and events[0][1].kind == "error" and events[0][1].accepted is False
    assert [sid for sid, _ in events[1:]] == [good] * (len(events) - 1)
    assert events[-1][1].kind == "done"
    refused = list(engine.chat_many([good], "", max_new_tokens=3))
    assert len(refused) == 1 and refused[0][1].accepted is False and "empty" in refused[0][1].text


def test_leaving_chat_many_early_stops_every_turn_and_keeps_partial_replies(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 600, prefill_chunk_size=256)
    sids = [engine.new_session(), engine.new_session()]
    reader = engine.chat_many(sids, "Talk for a long time.", max_new_tokens=400, **GREEDY)
    for _, event in reader:
        if event.stats.get("reply_tokens", 0) >= 2:
            break
    reader.close()  # what a closed browser tab does to the comparison handler
    for sid in sids:
        assert engine.session(sid).turn.finished.wait(10)
        assert engine.stats(sid)["reply_tokens"] < 400
        assert engine.history(sid)[0]["content"] == "Talk for a long time."
    _, final, _ = run(engine, sids[0], "Still there?", max_new_tokens=3, **GREEDY)
    assert final.kind == "done"


def test_the_engines_old_history_methods_still_work_and_warn(tiny_chat_model, default_tokenizer):
    engine = StreamingEngine(tiny_chat_model, default_tokenizer, EngineConfig(start_size=4, recent_size=60))
    sid = engine.new_session("streaming", "Be brief.")
    list(engine.chat(sid, "Hello there", max_new_tokens=3, temperature=0))
    with pytest.warns(DeprecationWarning, match="export_history"):
        old = engine.export(sid, title="t")
    new = export_history(engine, sid, title="t")
    drop_stamp = lambda text: {k: v for k, v in json.loads(text).items() if k != "exported_at"}  # noqa: E731
    assert drop_stamp(old) == drop_stamp(new)
    with pytest.warns(DeprecationWarning, match="restore_history"):
        restored = engine.restore(old, "window")
    assert engine.history(restored) == engine.history(sid) and engine.stats(restored)["mode"] == "window"
