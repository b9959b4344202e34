"""Continue: a reply cut at its length limit, or stopped, goes on where it ended (`StreamingEngine.continue_reply`,
`Session.continue_turn`). The oracle is the reply that was never cut: a greedy reply of N tokens continued for M
is, token for token and cache counter for counter, the greedy reply of N + M tokens."""

from __future__ import annotations

import pytest
import torch

from streaming_engine import EngineConfig, StreamingEngine
from streaming_engine.history import export_history, restore_history
from streaming_engine.session import (
    CONTINUE_CONTEXT_FULL,
    NO_REPLY_TO_CONTINUE,
    REPLY_FINISHED,
    RUNNING_REFUSAL,
    SessionStatus,
)
from streaming_engine.templating import ChatTemplater

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)


def make_engine(model, tokenizer, recent_size=48, **config):
    return StreamingEngine(model, tokenizer, EngineConfig(start_size=4, recent_size=recent_size,
                                                          prefill_chunk_size=16, **config))


def reply_of(events) -> tuple[str, object]:
    """(the deltas joined, the final event) of one turn's events."""
    events = list(events)
    return "".join(e.text for e in events if e.kind == "delta"), events[-1]


def counters(engine, sid) -> dict:
    stats = engine.stats(sid)
    return {k: stats[k] for k in ("seen_tokens", "cache_tokens", "evicted_tokens", "turns")}


#: (mode, recent window, reply tokens in all). `generate_reply` makes room for a whole reply up front when it fits in
#: the window, and else token by token, so the oracle compares replies that make room the same way: with nothing to
#: evict, or with the uncut reply and every continuation longer than the window (streaming and window then evict
#: while the reply is continued).
CASES = [("dense", 300, 40), ("streaming", 300, 40), ("streaming", 48, 100), ("window", 48, 100)]


@pytest.mark.parametrize("mode, recent_size, total", CASES)
@pytest.mark.parametrize("cut", [1, 9, 30])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_a_reply_cut_and_continued_is_token_for_token_the_reply_never_cut(tiny_chat_model, default_tokenizer, mode,
                                                                             recent_size, total, cut, penalty):
    sampling = dict(temperature=0.0, repetition_penalty=penalty)
    engine = make_engine(tiny_chat_model, default_tokenizer, recent_size)
    whole, cut_sid = engine.new_session(mode=mode), engine.new_session(mode=mode)
    _, uncut = reply_of(engine.chat(whole, "Tell me a long story.", max_new_tokens=total, **sampling))
    assert uncut.finish_reason == "length", "the oracle must be a reply of `total` tokens"

    shown, first = reply_of(engine.chat(cut_sid, "Tell me a long story.", max_new_tokens=cut, **sampling))
    assert first.finish_reason == "length" and first.mark == "truncated"
    more, final = reply_of(engine.continue_reply(cut_sid, max_new_tokens=total - cut, **sampling))
    assert final.kind == "done" and final.finish_reason == "length"
    assert shown + more == final.text == uncut.text
    assert engine.history(cut_sid) == engine.history(whole)  # one reply, grown in place
    assert counters(engine, cut_sid) == counters(engine, whole)
    assert (engine.stats(whole)["evicted_tokens"] > 0) == (recent_size < total)
    assert engine.session(cut_sid).stream_text == engine.session(whole).stream_text
    # The next turn feeds only its own text (no re-encoding) and answers as after the uncut reply.
    assert engine.session(cut_sid).status is SessionStatus.READY
    after = [reply_of(engine.chat(sid, "And then?", max_new_tokens=12, **sampling))[1] for sid in (whole, cut_sid)]
    assert after[0].text == after[1].text and counters(engine, cut_sid) == counters(engine, whole)


def cut_and_continued_equals_uncut(engine, cut=9, total=100, companions=2):
    """The oracle of `test_a_reply_cut_and_continued_is_token_for_token_the_reply_never_cut` with other chats
    decoding in the same batch meanwhile: (the uncut reply, the cut one continued)."""
    whole, cut_sid = engine.new_session(), engine.new_session()
    others = [engine.new_session() for _ in range(companions)]
    prompt = "Tell me a long story."
    uncut = reply_of(engine.chat(whole, prompt, max_new_tokens=total, **GREEDY))[1]
    reply_of(engine.chat(cut_sid, prompt, max_new_tokens=cut, **GREEDY))
    streams = [engine.start_chat(sid, f"Chat {k} goes on meanwhile.", max_new_tokens=60, **GREEDY)
               for k, sid in enumerate(others)]
    continued = reply_of(engine.continue_reply(cut_sid, max_new_tokens=total - cut, **GREEDY))[1]
    for events in streams:
        assert reply_of(events)[1].kind == "done"
    assert counters(engine, cut_sid) == counters(engine, whole)
    return uncut.text, continued.text


@pytest.mark.parametrize("decode", [dict(decode_step="eager"), dict(decode_step="static"),
                                    dict(decode_step="static", overlap="on")], ids=["eager", "static", "overlap"])
def test_a_continued_reply_is_the_uncut_one_on_every_decode_path_among_other_chats(tiny_chat_model,
                                                                                   default_tokenizer, decode):
    engine = make_engine(tiny_chat_model, default_tokenizer, **decode)
    uncut, continued = cut_and_continued_equals_uncut(engine)
    assert continued == uncut


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it on one)")
def test_on_cuda_a_continued_reply_is_the_uncut_one_with_graphs_and_overlap(cuda_chat_model):
    model, tokenizer = cuda_chat_model
    engine = make_engine(model, tokenizer)  # "auto": the static step, graphed and overlapped on CUDA
    assert engine.decode_path == "static+graphs+overlap"
    uncut, continued = cut_and_continued_equals_uncut(engine)
    assert continued == uncut


@pytest.mark.parametrize("system_prompt", [None, "You are terse."])
@pytest.mark.parametrize("mode", ["streaming", "dense"])
def test_a_reopened_cut_reply_continues_as_generate_continues_the_template_left_open(tiny_chat_model,
                                                                                  default_tokenizer, system_prompt,
                                                                                  mode):
    """After a restart the cache is rebuilt from the history, whose template closes every reply. A reply marked
    cut is rebuilt left open instead: the oracle is transformers' own `continue_final_message` rendering, greedily
    continued by `model.generate` without any cache of ours."""
    import torch

    engine = make_engine(tiny_chat_model, default_tokenizer, recent_size=300)
    live = engine.new_session(mode=mode, system_prompt=system_prompt)
    reply_of(engine.chat(live, "Tell me a story.", max_new_tokens=12, **GREEDY))
    history = [m for m in engine.history(live) if m["role"] != "system"]
    reopened = engine.open_history(history, system_prompt, mode=mode, last_reply_open=True)
    more, final = reply_of(engine.continue_reply(reopened, max_new_tokens=10, **GREEDY))
    assert final.kind == "done" and final.finish_reason == "length"

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    text = default_tokenizer.apply_chat_template(system + history, tokenize=False, continue_final_message=True)
    ids = default_tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = tiny_chat_model.generate(ids, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids))
    assert more == default_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert final.text == history[-1]["content"] + more == engine.history(reopened)[-1]["content"]
    # Then the chat goes on from the cache: the next turn feeds only its own text.
    assert engine.session(reopened).status is SessionStatus.READY
    reply_of(engine.chat(reopened, "And then?", max_new_tokens=4, **GREEDY))
    session = engine.session(reopened)
    rendered = ChatTemplater(default_tokenizer).render(list(session.fed), add_generation_prompt=False)
    assert rendered.startswith(session.stream_text)


@pytest.mark.parametrize("eviction", ["tokens", "turns"])
def test_a_reopened_reply_longer_than_the_cache_continues_from_the_part_that_fits(tiny_chat_model, default_tokenizer,
                                                                                    eviction):
    engine = make_engine(tiny_chat_model, default_tokenizer, recent_size=48, eviction=eviction)
    reply = " ".join(f"word{i}" for i in range(80))  # far more tokens than the rebuilt cache keeps
    sid = engine.open_history([{"role": "user", "content": "Count"}, {"role": "assistant", "content": reply}],
                              last_reply_open=True)
    more, final = reply_of(engine.continue_reply(sid, max_new_tokens=6, **GREEDY))
    assert final.kind == "done" and final.text == reply + more and engine.stats(sid)["reply_tokens"] == 6
    stats = engine.stats(sid)
    assert stats["cache_tokens"] <= 52 and stats["seen_tokens"] == stats["cache_tokens"] + stats["evicted_tokens"]
    memory = engine.memory_map(sid)
    assert memory[-1]["state"] == "partial"  # the reply's head left out, its tail (and the continuation) held


def test_a_reply_can_be_continued_again_and_again_until_it_ends(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, recent_size=200)
    whole, sid = engine.new_session(), engine.new_session()
    _, uncut = reply_of(engine.chat(whole, "Count with me.", max_new_tokens=24, **GREEDY))
    reply_of(engine.chat(sid, "Count with me.", max_new_tokens=4, **GREEDY))
    for _ in range(5):
        _, final = reply_of(engine.continue_reply(sid, max_new_tokens=4, **GREEDY))
    assert final.text == uncut.text and engine.history(sid) == engine.history(whole)
    stats = engine.stats(sid)
    assert stats["turns"] == 1 and stats["seen_tokens"] == stats["cache_tokens"] + stats["evicted_tokens"]


def test_a_stopped_reply_continues_in_place_and_the_stream_still_matches_the_template(tiny_chat_model,
                                                                                      default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, recent_size=300)
    sid = engine.new_session(system_prompt="You are terse.")
    events = []
    for event in engine.chat(sid, "Write a very long story.", max_new_tokens=200, **GREEDY):
        events.append(event)
        if event.kind == "delta" and event.stats.get("reply_tokens", 0) >= 3:
            engine.stop(sid)
    assert events[-1].finish_reason == "stopped"
    before = engine.history(sid)[-1]["content"]
    more, final = reply_of(engine.continue_reply(sid, max_new_tokens=6, **GREEDY))
    history = engine.history(sid)
    assert final.text == before + more == history[-1]["content"] and len(history) == 3  # system, user, reply
    assert engine.stats(sid)["reply_tokens"] == 6
    session = engine.session(sid)
    rendered = ChatTemplater(default_tokenizer).render(list(session.fed), add_generation_prompt=False)
    assert rendered.startswith(session.stream_text)


def test_a_reply_cut_off_by_a_failure_continues_once_the_cache_is_rebuilt(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, recent_size=300)
    sid = engine.new_session()
    calls = {"n": 0}

    def flaky(module, args):
        calls["n"] += 1
        if calls["n"] >= 4:  # the prompt's pass, then two decode steps, then a lasting fault (one pass is retried)
            raise RuntimeError("CUDA out of memory (simulated)")

    hook = tiny_chat_model.register_forward_pre_hook(flaky)
    try:
        _, failed = reply_of(engine.chat(sid, "Tell me a story.", max_new_tokens=20, **GREEDY))
    finally:
        hook.remove()
    assert failed.kind == "error" and failed.mark == "interrupted"
    partial = engine.history(sid)[-1]["content"]
    assert partial and engine.session(sid).status is SessionStatus.UNPRIMED
    more, final = reply_of(engine.continue_reply(sid, max_new_tokens=5, **GREEDY))
    assert final.kind == "done" and more and final.text == partial + more == engine.history(sid)[-1]["content"]
    assert engine.session(sid).status is SessionStatus.READY


def refusal(engine, sid, **sampling):
    events = engine.continue_reply(sid, **sampling)
    event = next(iter(events))
    assert event.kind == "error" and not event.accepted and event.code in ("invalid", "running")
    return event.text


def test_continue_is_refused_with_what_to_do_instead_and_changes_nothing(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, recent_size=200)
    sid = engine.new_session()
    assert refusal(engine, sid) == NO_REPLY_TO_CONTINUE

    probe = engine.new_session()  # learn a stretch of the greedy reply, to end the real one on a stop string
    text = reply_of(engine.chat(probe, "Hello", max_new_tokens=12, **GREEDY))[1].text
    _, final = reply_of(engine.chat(sid, "Hello", max_new_tokens=12, stop=[text[3:6]], **GREEDY))
    assert final.finish_reason == "stop"
    kept = (engine.history(sid), counters(engine, sid))
    assert refusal(engine, sid) == REPLY_FINISHED
    assert (engine.history(sid), counters(engine, sid)) == kept

    cut = engine.new_session()
    reply_of(engine.chat(cut, "Hello", max_new_tokens=3, **GREEDY))
    assert refusal(engine, cut, max_new_tokens=0).startswith("max_new_tokens")  # the settings are checked as for chat
    # The same history in a new session, its cache rebuilt from it: the engine keeps no marks, so only a caller
    # that says the last reply was cut (`last_reply_open`, from a stored or downloaded mark) may continue it.
    assert refusal(engine, restore_history(engine, export_history(engine, cut))) == REPLY_FINISHED
    marked = restore_history(engine, export_history(engine, cut, marks={"truncated": {1}}))  # a downloaded file's
    assert reply_of(engine.continue_reply(marked, max_new_tokens=3, **GREEDY))[1].finish_reason == "length"

    full = engine.new_session("dense", max_context=60)
    assert reply_of(engine.chat(full, "Hello", max_new_tokens=100, **GREEDY))[1].finish_reason == "context_full"
    assert refusal(engine, full) == CONTINUE_CONTEXT_FULL


def test_continue_while_the_reply_is_still_written_is_refused(tiny_chat_model, default_tokenizer):
    engine = make_engine(tiny_chat_model, default_tokenizer, recent_size=200)
    sid = engine.new_session()
    reply_of(engine.chat(sid, "Hello", max_new_tokens=2, **GREEDY))
    running = engine.continue_reply(sid, max_new_tokens=150, **GREEDY)
    events = iter(running)
    next(events)  # the continuation is running: its first event has come
    assert refusal(engine, sid) == RUNNING_REFUSAL
    engine.stop(sid)
    assert list(events)[-1].finish_reason == "stopped"
