"""Issue 28: while replies decode, prompts get a bounded share of the worker, and a new turn's prompt goes ahead of a
long paste's remaining slices (`streaming_engine/prompt_share.py` and its call sites in `scheduler.py`).

The rule is checked as bookkeeping with given costs, and on the tiny model with a clock where every pass takes one
second: decided on pass counts and order, never on wall-clock time."""

from __future__ import annotations

import threading

import pytest

from streaming_engine import EngineConfig, StreamingEngine
from streaming_engine.prompt_share import PREFILL_SHARE, PromptShare, new_turns_first
from streaming_engine.scheduler import PREFILL_SLICE_TOKENS, PROMPT_PASS_S, prompt_pass_tokens

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
PASTE = " ".join(f"w{i % 89}" for i in range(300))


def run_policy(decode_s: float, slice_s: float, steps: int) -> tuple[int, float]:
    """The calls a scheduler makes while a long paste waits beside a decoding reply, `steps` iterations of them:
    (slices fed, seconds they took)."""
    share, slices = PromptShare(), 0
    for _ in range(steps):
        if share.may_continue():
            share.fed(slice_s)
            slices += 1
        share.decoded(decode_s, prompts_waiting=True)
    return slices, slices * slice_s


@pytest.mark.parametrize("decode_s, slice_s", [(1.0, 1.0), (1.0, 0.2), (1.0, 3.0), (0.076, 0.09), (0.02, 0.5)])
def test_prompts_never_take_more_than_their_share_of_the_worker_and_still_advance(decode_s, slice_s):
    steps = 1000
    slices, prompt_s = run_policy(decode_s, slice_s, steps)
    assert slices > 0
    assert prompt_s <= PREFILL_SHARE * (prompt_s + steps * decode_s) + slice_s  # the share, plus one pass
    # so a decoding reply's time per token is at most 1 / (1 - share) its time alone (plus one pass over all)
    assert (steps * decode_s + prompt_s) / steps <= decode_s / (1 - PREFILL_SHARE) + slice_s / steps
    # and the paste gets nearly all of its share (or a slice every step, when slices are that cheap): it is
    # rationed, not starved
    due = min(steps * slice_s, PREFILL_SHARE / (1 - PREFILL_SHARE) * steps * decode_s)
    assert prompt_s >= due - 2 * max(slice_s, decode_s)


def test_a_slice_as_dear_as_a_step_runs_on_fewer_than_half_the_steps():
    """Most of a reply's tokens then wait for no prompt at all (its median time per token is its own step's)."""
    slices, _ = run_policy(1.0, 1.0, 1000)
    assert slices < 500


def test_credit_is_not_banked_while_nothing_waits_nor_beyond_one_step():
    share = PromptShare()
    for _ in range(100):
        share.decoded(1.0, prompts_waiting=True)
    assert share.credit <= PREFILL_SHARE / (1 - PREFILL_SHARE)  # one step's earning: no burst of slices
    share.fed(5.0)
    assert not share.may_continue()
    share.decoded(1.0, prompts_waiting=False)  # nothing waited: the next paste starts from even
    assert share.credit == 0.0 and not share.may_continue()


@pytest.mark.parametrize("share", [0, 1, -0.1, 1.5, float("nan"), True, "0.3"])
def test_the_share_must_be_a_fraction_strictly_between_0_and_1(share):
    with pytest.raises(ValueError, match="share"):
        PromptShare(share)


def test_new_turns_go_first_in_arrival_order_and_the_rest_keep_their_order():
    started = {"paste": True, "a": False, "other": True, "b": False}
    assert new_turns_first(started, started.get) == (["a", "b"], ["paste", "other"])


def make_engine(model, tokenizer, **config):
    config = {"start_size": 4, "recent_size": 400, "prefill_chunk_size": 128, **config}
    return StreamingEngine(model, tokenizer, EngineConfig(**config))


def start_talking(engine, out: dict) -> tuple[str, threading.Thread]:
    """A chat that keeps decoding until stopped; returns once it has decoded a few tokens."""
    chatter, decoding = engine.new_session(), threading.Event()

    def chat():
        for event in engine.chat(chatter, "Keep talking", max_new_tokens=3000, **GREEDY):
            if event.stats.get("reply_tokens") == 3:
                decoding.set()
        out["chat"] = event

    talker = threading.Thread(target=chat, daemon=True)
    talker.start()
    assert decoding.wait(120), "the chat never decoded"
    return chatter, talker


def one_second_per_pass(engine) -> None:
    """Every measured pass reads the clock twice, one tick apart: each takes one second."""
    ticks = iter(range(10**9))
    engine.scheduler.clock = lambda: float(next(ticks))


def test_beside_a_decoding_chat_a_paste_gets_its_share_of_passes_and_the_same_reply(
    tiny_chat_model, default_tokenizer
):
    """On a clock where every pass takes a second, a decode step earns 0.3/0.7 s and a slice spends 1 s: the
    paste gets one slice per two or three of the chat's steps, and its greedy reply is the one it gets alone."""
    solo = make_engine(tiny_chat_model, default_tokenizer)
    expected = list(solo.chat(solo.new_session(), PASTE, max_new_tokens=4, **GREEDY))[-1]
    engine = make_engine(tiny_chat_model, default_tokenizer)
    one_second_per_pass(engine)
    passes, out = [], {}
    chatter, talker = start_talking(engine, out)
    chat_handle = engine.session(chatter).turn
    engine.scheduler.on_pass = lambda kind, handles: passes.append((kind, list(handles)))
    paster = engine.new_session()
    final = list(engine.chat(paster, PASTE, max_new_tokens=4, **GREEDY))[-1]
    engine.stop(chatter)
    talker.join(120)
    assert final.kind == "done" and (final.text, final.stats["seen_tokens"]) == (expected.text,
                                                                                 expected.stats["seen_tokens"])
    slices = [i for i, (kind, _) in enumerate(passes) if kind == "prefill"]
    assert len(slices) >= 5
    between = [sum(1 for kind, served in passes[a + 1:b] if kind == "decode" and chat_handle in served)
               for a, b in zip(slices, slices[1:])]
    assert min(between) >= 2  # never a slice on two steps running: most of the chat's tokens wait for none
    span = passes[slices[0]:slices[-1] + 1]
    assert len(slices) <= PREFILL_SHARE * len(span) + 1  # one-second passes: the share of passes is the time share


def test_a_new_turn_goes_in_whole_before_a_long_paste_s_next_slice(tiny_chat_model, default_tokenizer):
    """A short prompt that arrives while a paste is sliced beside a decoding chat is fed in one pass, the next
    prompt pass after it arrives, and decodes before the paste goes on."""
    engine = make_engine(tiny_chat_model, default_tokenizer)
    out, passes, newcomer = {}, [], {}
    chatter, talker = start_talking(engine, out)
    paster, late = engine.new_session(), engine.new_session()

    def on_pass(kind, handles):
        passes.append((kind, list(handles)))
        paste_slices = [i for i, (k, served) in enumerate(passes) if k == "prefill" and paste in served]
        if len(paste_slices) == 3 and "events" not in newcomer:  # mid-paste, from the worker itself: no race
            newcomer["at"] = len(passes)
            newcomer["events"] = engine.start_chat(late, "Hello there", max_new_tokens=3, **GREEDY)
            newcomer["handle"] = engine.session(late).turn

    paste_events = engine.start_chat(paster, PASTE, max_new_tokens=2, **GREEDY)
    paste = engine.session(paster).turn
    engine.scheduler.on_pass = on_pass
    final = list(paste_events)[-1]
    late_final = list(newcomer["events"])[-1]
    engine.stop(chatter)
    talker.join(120)
    assert final.kind == "done" and late_final.kind == "done"
    late_handle = newcomer["handle"]
    after = passes[newcomer["at"]:]
    prompt_passes = [i for i, (kind, served) in enumerate(after) if kind == "prefill"]
    first = prompt_passes[0]
    assert after[first][1] == [late_handle]  # the newcomer's prompt went first, alone, whole
    assert sum(1 for kind, served in after if kind == "prefill" and late_handle in served) == 1
    assert len(default_tokenizer(PASTE)["input_ids"]) > 3 * PREFILL_SLICE_TOKENS  # the paste was still going
    next_paste = next(i for i, (kind, served) in enumerate(after) if kind == "prefill" and paste in served)
    assert any(kind == "decode" and late_handle in served for kind, served in after[first + 1:next_paste])


@pytest.mark.parametrize("pass_s, per_token, budget, expected", [
    (PROMPT_PASS_S, None, 512, 512),  # not measured yet: the budget
    (None, 0.01, 512, 512),  # no time bound: the budget
    (0.25, 0.25 / 100, 512, 100),  # a CPU: what takes a quarter second
    (0.25, 1e-5, 512, 512),  # a GPU: the budget decides
    (0.25, 0.1, 512, PREFILL_SLICE_TOKENS),  # so slow that the floor decides: no crawl of tiny passes
    (0.25, 0.1, 16, 16),  # never more than the budget, floor or not
])
def test_a_prompt_pass_while_nothing_decodes_takes_about_the_pass_time_within_floor_and_budget(
        pass_s, per_token, budget, expected):
    assert prompt_pass_tokens(pass_s, per_token, budget) == expected


def test_with_nothing_decoding_a_newcomer_waits_one_short_pass_of_a_paste_not_its_whole_chunk(
    tiny_chat_model, default_tokenizer
):
    """Alone, a paste's passes are sized to `PROMPT_PASS_S` at its measured cost (a clock where each pass takes a
    second: the floor, `PREFILL_SLICE_TOKENS`, after the first), so a turn that arrives mid-paste is fed, alone and
    whole, at the next prompt pass and answers before the paste's next one; both replies are the ones they get
    alone."""
    solo = make_engine(tiny_chat_model, default_tokenizer, prefill_chunk_size=256)
    expected = list(solo.chat(solo.new_session(), PASTE, max_new_tokens=2, **GREEDY))[-1]
    expected_late = list(solo.chat(solo.new_session(), "Hello there", max_new_tokens=3, **GREEDY))[-1]
    engine = make_engine(tiny_chat_model, default_tokenizer, prefill_chunk_size=256)
    one_second_per_pass(engine)
    passes, newcomer, fed = [], {}, []
    paster, late = engine.new_session(), engine.new_session()
    original = engine.scheduler._feed

    def feed(slices):
        fed.append(sum(size for _, _, size in slices))
        return original(slices)

    def on_pass(kind, handles):
        passes.append((kind, list(handles)))
        if kind == "prefill" and len(passes) == 2 and "events" not in newcomer:  # mid-paste, from the worker
            newcomer["at"] = len(passes)
            newcomer["events"] = engine.start_chat(late, "Hello there", max_new_tokens=3, **GREEDY)
            newcomer["handle"] = engine.session(late).turn

    engine.scheduler._feed = feed
    engine.scheduler.on_pass = on_pass
    paste_events = engine.start_chat(paster, PASTE, max_new_tokens=2, **GREEDY)
    paste = engine.session(paster).turn
    final = list(paste_events)[-1]
    late_final = list(newcomer["events"])[-1]
    assert (final.text, final.stats["seen_tokens"]) == (expected.text, expected.stats["seen_tokens"])
    assert late_final.text == expected_late.text
    assert fed[0] > PREFILL_SLICE_TOKENS  # unmeasured, the first pass takes the whole chunk
    paste_passes = [size for size, (kind, served) in zip(fed, [p for p in passes if p[0] == "prefill"])
                    if paste in served]
    assert max(paste_passes[1:]) == PREFILL_SLICE_TOKENS  # then about a pass time's worth: here the floor
    after = passes[newcomer["at"]:]
    first = next(i for i, (kind, _) in enumerate(after) if kind == "prefill")
    assert after[first][1] == [newcomer["handle"]]  # the newcomer went in next, alone, whole
    next_paste = next(i for i, (kind, served) in enumerate(after) if kind == "prefill" and paste in served)
    assert any(kind == "decode" and newcomer["handle"] in served for kind, served in after[first + 1:next_paste])
