"""What the model still remembers: the pinned system prompt, turn-aware eviction and the memory map, through the
engine (tiny random model over the real chat tokenizer, batched and round-robin workers)."""

from __future__ import annotations

import pytest

from streaming_engine import EngineConfig, StreamingEngine
from streaming_engine.engine import DEFAULT_PIN_LIMIT, PinTooLong
from streaming_engine.memory import MessageSpan, measure, turns_in_memory
from streaming_engine.history import export_history, restore_history

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
SYSTEM = "You are a pirate. Always answer in French and end every answer with the word 'arr'."


def make_engine(model, tokenizer, start_size=4, recent_size=90, **config):
    config.setdefault("prefill_chunk_size", 24)
    return StreamingEngine(model, tokenizer, EngineConfig(start_size=start_size, recent_size=recent_size, **config))


def chat(engine, sid, message, max_new_tokens=12):
    events = list(engine.chat(sid, message, max_new_tokens=max_new_tokens, **GREEDY))
    assert events[-1].kind == "done", events[-1].text
    return events


def check_map_against_stream_positions(engine, sid):
    """The memory map's counts are the cache's stream positions, message by message."""
    session = engine.session(sid)
    held = session.cache.stream_positions
    entries = engine.memory_map(sid)
    assert [e["role"] for e in entries] == [m["role"] for m in engine.history(sid)]
    spans = ([session.system_span] if session.system_span is not None else []) + list(session.spans)
    for entry, span in zip(entries, spans):
        if span is None:  # never encoded here; a "recalled" marker (which messages its turn quoted) may stay
            assert {k: v for k, v in entry.items() if k != "recalled"} == {
                "role": entry["role"], "tokens": None, "held": 0, "state": "gone"}
            continue
        end = session.cache.seen_tokens if span.end is None else span.end
        assert entry["held"] == sum(span.start <= p < end for p in held)
    # Every held token belongs to exactly one message: the spans tile the stream.
    assert sum(e["held"] for e in entries) == len(held) == engine.stats(sid)["cache_tokens"]
    return entries


@pytest.mark.parametrize("scheduler", ["batched", "round-robin"])
@pytest.mark.parametrize("eviction", ["tokens", "turns"])
def test_a_pinned_system_prompt_outlives_every_turn_and_the_map_agrees_with_stream_positions(
        tiny_chat_model, default_tokenizer, eviction, scheduler):
    engine = make_engine(tiny_chat_model, default_tokenizer, eviction=eviction, scheduler=scheduler)
    sid = engine.new_session(system_prompt=SYSTEM)
    pinned = engine.system_tokens(SYSTEM)
    for turn in range(12):
        for event in chat(engine, sid, f"Question number {turn}: what do you think about ships?"):
            assert event.stats["pinned_tokens"] == pinned
        entries = check_map_against_stream_positions(engine, sid)
        assert entries[0] == {"role": "system", "tokens": pinned, "held": pinned, "state": "full"}
    session = engine.session(sid)
    assert session.cache.stream_positions[:pinned] == list(range(pinned))
    stats = engine.stats(sid)
    assert stats["evicted_tokens"] > 200 and stats["eviction"] == eviction
    assert entries[1]["state"] == "gone" and entries[-1]["state"] == "full"  # the first question is forgotten
    assert 0 < stats["turns_in_memory"] < stats["turns"] == 12
    assert stats["messages_forgotten"] + stats["messages_in_memory"] == 24
    states = [e["state"] for e in entries[1:]]
    assert states == sorted(states, key=("gone", "partial", "full").index)  # oldest first
    # "turns" never leaves part of a message (these messages are shorter than the window); "tokens" may cut one,
    # but only one: the oldest message still held (the order above puts it first).
    assert states.count("partial") == 0 if eviction == "turns" else states.count("partial") <= 1


def test_unpinned_sessions_lose_their_system_prompt(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, pin_system=False)
    sid = engine.new_session(system_prompt=SYSTEM)
    for turn in range(8):
        chat(engine, sid, f"Question number {turn}: what do you think about ships?")
    entries = check_map_against_stream_positions(engine, sid)
    assert engine.stats(sid)["pinned_tokens"] == 0
    assert entries[0]["state"] == "partial" and entries[0]["held"] == 4  # the 4 sinks are all that is left


@pytest.mark.parametrize("scheduler", ["batched", pytest.param("round-robin", marks=pytest.mark.slow)])
def test_turn_eviction_gives_the_same_replies_batched_or_alone_when_replies_outgrow_the_window(
        tiny_chat_model, default_tokenizer, scheduler, monkeypatch):
    """Replies longer than the reserved room evict during decoding (a batch row under the batched worker): still
    whole messages, and the same text as the round-robin worker, which decodes on each conversation's own cache."""
    from streaming_engine.batch_cache import BatchedSinkCache

    row_evictions = []
    original = BatchedSinkCache.evict_oldest
    monkeypatch.setattr(BatchedSinkCache, "evict_oldest",
                        lambda self, conv, count: row_evictions.append(count) or original(self, conv, count))
    texts, positions = {}, {}
    for worker in ("round-robin", scheduler):
        engine = make_engine(tiny_chat_model, default_tokenizer, 4, 60, eviction="turns", scheduler=worker)
        sids = [engine.new_session(system_prompt="Be brief."), engine.new_session()]
        replies = []
        for turn in range(5):
            for sid, event in engine.chat_many(sids, f"Tell me a long story number {turn}.", max_new_tokens=40,
                                               **GREEDY):
                if event.kind == "done":
                    replies.append((sid == sids[0], event.text))
            for sid in sids:
                entries = check_map_against_stream_positions(engine, sid)
                # Past messages are whole or gone; only the last reply (longer than the room) may be cut.
                assert all(e["state"] != "partial" for e in entries[1:-1] if e["role"] != "system")
        texts[worker] = sorted(replies)
        positions[worker] = [engine.session(sid).cache.stream_positions for sid in sids]
    assert texts["round-robin"] == texts[scheduler]
    assert positions["round-robin"] == positions[scheduler]
    assert bool(row_evictions) == (scheduler == "batched")  # batch rows did evict (and round to messages)
    assert scheduler == "round-robin" or max(row_evictions) > 1


def test_a_system_prompt_over_the_pin_limit_is_refused_naming_the_limit(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, 4, 2000, pin_limit=40)
    long_prompt = "Follow these rules. " * 30
    with pytest.raises(PinTooLong, match="pin_limit=40"):
        engine.new_session(system_prompt=long_prompt)
    sid = engine.new_session(system_prompt=long_prompt, pin_system=False)
    assert engine.stats(sid)["pinned_tokens"] == 0
    small = make_engine(tiny_chat_model, default_tokenizer, 4, 40)  # the cache cannot spare 256 tokens either
    with pytest.raises(PinTooLong, match="44-token cache can spare"):
        small.new_session(system_prompt=long_prompt)
    # A restored conversation (or an API request) keeps a long system prompt unpinned instead of failing.
    exported = export_history(engine, sid)
    restored = restore_history(engine, exported)
    assert engine.history(restored)[0] == {"role": "system", "content": long_prompt}
    assert engine.stats(restored)["pinned_tokens"] == 0
    assert EngineConfig().pin_limit == DEFAULT_PIN_LIMIT == 256
    with pytest.raises(ValueError, match="eviction must be one of tokens, turns"):
        EngineConfig(eviction="lru")


@pytest.mark.parametrize("eviction", ["tokens", "turns"])
def test_a_restored_history_keeps_its_pinned_prompt_and_whole_messages(tiny_chat_model, default_tokenizer, eviction):
    engine = make_engine(tiny_chat_model, default_tokenizer, eviction=eviction)
    sid = engine.new_session(system_prompt=SYSTEM)
    for turn in range(10):
        chat(engine, sid, f"Question number {turn}: what do you think about ships?")
    restored = restore_history(engine, export_history(engine, sid))
    assert [e["state"] for e in engine.memory_map(restored)] == ["pending"] * 21  # encoded by the next turn
    markers = [e.get("recalled") for e in engine.memory_map(sid)]
    assert [e.get("recalled") for e in engine.memory_map(restored)] == markers  # what each turn quoted stays
    chat(engine, restored, "Do you remember?")
    entries = check_map_against_stream_positions(engine, restored)
    pinned = engine.system_tokens(SYSTEM)
    assert entries[0] == {"role": "system", "tokens": pinned, "held": pinned, "state": "full"}
    assert engine.session(restored).cache.stream_positions[:pinned] == list(range(pinned))
    states = [e["state"] for e in entries[1:]]
    assert states[0] == "gone" and states[-1] == "full" and "full" in states[:-2]
    if eviction == "turns":
        assert "partial" not in states


def test_measure_counts_held_positions_per_span():
    held = [0, 1, 2, 3, 10, 11, 12, 13, 14]
    assert measure(MessageSpan(0, 4), held, 15) == {"tokens": 4, "held": 4, "state": "full"}
    assert measure(MessageSpan(4, 12), held, 15) == {"tokens": 8, "held": 2, "state": "partial"}
    assert measure(MessageSpan(4, 10), held, 15) == {"tokens": 6, "held": 0, "state": "gone"}
    assert measure(MessageSpan(12), held, 15) == {"tokens": 3, "held": 3, "state": "full"}
    assert measure(MessageSpan(12, 15, missing=5), held, 15)["state"] == "partial"
    assert measure(None, held, 15)["state"] == "gone"
    assert measure(MessageSpan(5, 5), held, 15)["state"] == "gone"
    assert measure(MessageSpan(15, 15), held, 15)["state"] == "full"
    entries = [{"role": r, "state": s} for r, s in [("system", "full"), ("user", "gone"), ("assistant", "gone"),
                                                       ("user", "partial"), ("assistant", "full"),
                                                       ("user", "full"), ("assistant", "full"), ("user", "full")]]
    assert turns_in_memory(entries) == 2


def test_the_chat_marks_exactly_the_messages_the_model_no_longer_holds():
    from webui.render import FORGOTTEN_MARK, mark_memory

    memory = [{"role": "system", "tokens": 9, "held": 9, "state": "full"},
              {"role": "user", "tokens": 5, "held": 0, "state": "gone"},
              {"role": "assistant", "tokens": 8, "held": 3, "state": "partial"},
              {"role": "user", "tokens": 4, "held": 4, "state": "full"},
              {"role": "assistant", "tokens": None, "held": 0, "state": "pending"}]
    shown = [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": "b"}]},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
             {"role": "user", "content": "streaming now"}]
    marked = mark_memory(shown, memory)
    assert marked[0]["content"] == FORGOTTEN_MARK + "a"
    assert "3 of 8 tokens held" in marked[1]["content"][0]["text"] and marked[1]["content"][0]["text"].endswith("b")
    assert [m["content"] for m in marked[2:]] == ["c", "d", "streaming now"]  # held, pending, not in the map yet
    # Repainting with a newer map replaces the markers instead of stacking them.
    later = [dict(e, state="gone", held=0) for e in memory[:3]] + memory[3:]
    again = mark_memory(marked, later)
    assert again[0]["content"] == FORGOTTEN_MARK + "a" and again[1]["content"][0]["text"] == FORGOTTEN_MARK + "b"
