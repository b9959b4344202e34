"""The overlapped static step (`overlap.OverlappedDecodeStep`, EngineConfig.overlap): launching step n+1 before the
turns are answered with step n's tokens changes no reply. Greedy (with and without a repetition penalty) and
seeded sampled replies of chats joining, leaving, evicting and stopping at different steps are the plain static
loop's token for token; a row that ended at step n never shows its step n+1 token; a step taken back leaves the
sampler exactly as before; "auto" overlaps on CUDA only, and the path says so."""

from __future__ import annotations


import pytest
import torch
from test_batching import GREEDY, make_engine, reply, run_together

from streaming_engine import EngineConfig
from streaming_engine.defaults import OVERLAP_MODES
from streaming_engine.device_sampling import DeviceSampler
from streaming_engine.overlap import OverlappedDecodeStep, resolve_overlap
from streaming_engine.sampling import SamplingParams


def engines(model, tokenizer, **config):
    """The static step overlapped and plain, otherwise alike."""
    on = make_engine(model, tokenizer, decode_step="static", overlap="on", **config)
    off = make_engine(model, tokenizer, decode_step="static", overlap="off", **config)
    assert isinstance(on.scheduler.batch.static_step, OverlappedDecodeStep)
    assert not isinstance(off.scheduler.batch.static_step, OverlappedDecodeStep)
    return on, off


def run_both(on, off, plans) -> dict:
    results = {}
    for name, engine in (("on", on), ("off", off)):
        sids = {user: engine.new_session() for user in plans}
        results[name] = run_together(engine, {user: (sids[user], turns) for user, turns in plans.items()})
    return results


def texts(results, user):
    return [(e.text, e.finish_reason, e.stats["evicted_tokens"]) for e in results[user]]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_overlapped_greedy_replies_equal_the_plain_loops_as_rows_join_leave_and_evict(tiny_chat_model,
                                                                                      default_tokenizer, penalty):
    # recent_size 24: replies of up to 40 tokens outgrow the window, so rows also evict while they decode.
    on, off = engines(tiny_chat_model, default_tokenizer, recent_size=24, prefill_chunk_size=16)
    greedy = dict(GREEDY, repetition_penalty=penalty)
    plans = {f"user{u}": [(f"User {u} asks question {t} " + "and more words " * (u * 2),
                           dict(greedy, max_new_tokens=6 + 11 * u)) for t in range(2)] for u in range(4)}
    results = run_both(on, off, plans)
    for user in plans:
        assert texts(results["on"], user) == texts(results["off"], user), user
    step = on.scheduler.batch.static_step
    assert step.taken > 0 and step.taken_back > 0  # steps ahead were used, and some taken back (ends, joins)
    assert step.launched_ahead == step.taken + step.taken_back + (step._launched is not None)


def test_overlapped_seeded_replies_equal_the_plain_loops(tiny_chat_model, default_tokenizer):
    on, off = engines(tiny_chat_model, default_tokenizer, recent_size=40)
    plans = {f"user{u}": [(f"Companion {u} wants a poem about the sea, turn {t}.", dict(
        max_new_tokens=5 + 7 * u, temperature=0.6 + 0.2 * u, top_p=0.9, top_k=20 * u,
        repetition_penalty=1.0 + 0.15 * u, seed=100 * u + t)) for t in range(2)] for u in range(4)}
    results = run_both(on, off, plans)
    for user in plans:
        assert texts(results["on"], user) == texts(results["off"], user), user
    assert on.scheduler.batch.static_step.taken > 0


def test_a_row_that_stops_never_shows_the_token_drawn_for_it_one_step_ahead(tiny_chat_model, default_tokenizer):
    """Stop strings, max_tokens and a companion that keeps decoding: the overlapped loop drew each ended row's
    next token before its turn saw the stop; that token reaches no reader (the deltas are the plain loop's)."""
    on, off = engines(tiny_chat_model, default_tokenizer, recent_size=60)
    message = "Tell me a story about a lighthouse."
    free = reply(off, off.new_session(), message, **dict(GREEDY, max_new_tokens=30)).text
    stop = free[len(free) // 2: len(free) // 2 + 3]  # a stop string met halfway
    assert stop.strip()
    plans = {"stopped": [(message, dict(GREEDY, max_new_tokens=30, stop=[stop]))],
             "short": [("Say one word.", dict(GREEDY, max_new_tokens=3))],
             "long": [("Keep going about ships and the sea.", dict(GREEDY, max_new_tokens=40))]}
    deltas = {}
    for name, engine in (("on", on), ("off", off)):
        streams = {user: engine.start_chat(engine.new_session(), turns[0][0], **turns[0][1])
                   for user, turns in plans.items()}
        deltas[name] = {user: [e.text for e in stream] for user, stream in streams.items()}
    assert deltas["on"] == deltas["off"]
    assert stop not in "".join(deltas["on"]["stopped"][:-1])  # the text stops before the stop string
    assert sum(1 for e in deltas["on"]["short"][:-1] if e) <= 3


def test_a_user_stop_mid_reply_shows_a_prefix_of_the_reply_and_its_companion_is_unchanged(tiny_chat_model,
                                                                                        default_tokenizer):
    """The user stops one overlapped reply after its third token (whenever the stop lands, the shown text is a
    prefix of the unstopped reply: the token drawn one step ahead is not shown); the chat beside it replies as
    in the plain loop."""
    on, off = engines(tiny_chat_model, default_tokenizer, recent_size=60)
    message, companion = "Tell me a story about a lighthouse.", "Keep going about ships and the sea."
    settings = dict(GREEDY, max_new_tokens=40)
    free = reply(off, off.new_session(), message, **settings).text
    plain_companion = reply(off, off.new_session(), companion, **settings).text
    sid, other = on.new_session(), on.new_session()
    beside = on.start_chat(other, companion, **settings)
    tokens, events = 0, []
    for event in on.start_chat(sid, message, **settings):
        events.append(event)
        tokens = (event.stats or {}).get("reply_tokens", tokens)
        if tokens >= 3 and event.kind == "delta":
            on.stop(sid)
    final = events[-1]
    assert final.finish_reason == "stopped" and free.startswith(final.text) and len(final.text) < len(free)
    assert list(beside)[-1].text == plain_companion


def test_a_draw_taken_back_leaves_the_sampler_as_before():
    sampler = DeviceSampler(3, window=4)
    params = [SamplingParams(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.3, seed=7),
              SamplingParams(temperature=0.0, repetition_penalty=1.2), None]
    for row, (p, history) in enumerate(zip(params, ([5, 6, 7, 8, 9], [], [1, 2]))):
        sampler.set_row(row, p, seed=row, history=history)
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    sampler.sample(logits)
    state = {name: getattr(sampler, name).clone() for name in ("step", "ring", "written", "stand_in", "counts")}
    sampler.sample(logits.flip(-1))
    sampler.retract()
    for name, before in state.items():
        assert torch.equal(getattr(sampler, name), before), name
    with pytest.raises(RuntimeError, match="nothing to retract"):
        sampler.retract()  # once per draw


@pytest.mark.parametrize("device, mode, expected", [("cuda", "auto", True), ("cpu", "auto", False),
                                                     ("mps", "auto", False), ("cpu", "on", True),
                                                     ("cuda", "off", False)])
def test_auto_overlaps_on_cuda_only(device, mode, expected):
    assert resolve_overlap(mode, device) is expected


def test_the_path_says_overlap_and_the_eager_step_never_overlaps(tiny_chat_model, default_tokenizer):
    on = make_engine(tiny_chat_model, default_tokenizer, decode_step="static", overlap="on")
    assert on.decode_path == "static+overlap"
    eager = make_engine(tiny_chat_model, default_tokenizer, decode_step="eager", overlap="on")
    assert eager.decode_path == "eager" and eager.scheduler.batch.static_step is None
    default = make_engine(tiny_chat_model, default_tokenizer, decode_step="static")  # auto: off on the CPU
    assert default.config.overlap == "auto" and default.decode_path == "static"


@pytest.mark.parametrize("bad", ["yes", "", None])
def test_an_unknown_overlap_mode_is_refused_by_the_engine_config(bad):
    assert bad not in OVERLAP_MODES
    with pytest.raises(ValueError, match="overlap"):
        EngineConfig(overlap=bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it on one)")
def test_on_cuda_the_overlapped_graphed_engine_replies_as_the_plain_one(cuda_chat_model):
    model, default_tokenizer = cuda_chat_model
    on = make_engine(model, default_tokenizer, recent_size=24, prefill_chunk_size=16, decode_step="static", cuda_graphs="on")
    off = make_engine(model, default_tokenizer, recent_size=24, prefill_chunk_size=16, decode_step="static", cuda_graphs="on",
                      overlap="off")
    assert on.decode_path == "static+graphs+overlap" and off.decode_path == "static+graphs"
    plans = {f"user{u}": [(f"User {u} asks question {t} " + "and more words " * (u * 2), dict(
        max_new_tokens=6 + 11 * u, **(GREEDY if u % 2 else dict(temperature=0.8, top_p=0.9, seed=u + t))))
        for t in range(2)] for u in range(4)}
    results = run_both(on, off, plans)
    for user in plans:
        assert texts(results["on"], user) == texts(results["off"], user), user
    assert on.scheduler.batch.static_step.taken > 0 and on.scheduler.batch.static_step.step.captured
