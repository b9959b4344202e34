"""The engine's static decode step (EngineConfig.decode_step: "auto", the default, takes it on CUDA; "static"
anywhere it can serve the model): replies are the eager path's, token for token, under greedy sampling with and
without a repetition penalty, every row sampled on the device; a seeded sampled reply is the same whatever it
shares the batch with; "auto" means eager on the CPU and under ZeroGPU; a model the static step cannot serve
decodes eagerly, saying why in one log line."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_model
from test_batching import GREEDY, make_engine, record_passes, reply, run_together

from streaming_engine import EngineConfig
from streaming_engine.backends.hf import TransformersBackend
from streaming_engine.cuda_graphs import CudaGraphsUnavailable
from streaming_engine.defaults import DECODE_STEPS
from streaming_engine.remote import RemoteTurnsEngine
from streaming_engine.scheduler import DECODE_PATHS, Scheduler
from streaming_engine.static_step import STATIC_DEVICE_MAP, StaticSinkCache, resolve_decode_step


def count_device_draws(engine, rows_of: list | None = None) -> list[int]:
    """Wrap the static step's `decode`: the list gets, per pass, how many rows it drew on the device (and
    `rows_of`, if given, each pass's settings, row by row)."""
    step, drawn = engine.scheduler.batch.static_step, []
    decode = step.decode

    def counted(tokens, samplings):
        logits, ids = decode(tokens, samplings)
        drawn.append(0 if ids is None else sum(s is not None for s in samplings))
        if rows_of is not None:
            rows_of.append([s.params for s in samplings])
        return logits, ids

    step.decode = counted
    return drawn


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_static_replies_equal_eager_replies_under_greedy_sampling(tiny_chat_model, default_tokenizer, caplog,
                                                                    penalty):
    static = make_engine(tiny_chat_model, default_tokenizer, recent_size=60, decode_step="static")
    eager = make_engine(tiny_chat_model, default_tokenizer, recent_size=60, decode_step="eager")
    assert static.scheduler.batch.decode_step == "static" and isinstance(static.scheduler.batch.cache, StaticSinkCache)
    assert (static.decode_path, eager.decode_path) == ("static", "eager")  # no graphs on the CPU
    greedy = dict(GREEDY, repetition_penalty=penalty)
    plans = {f"user{u}": [(f"User {u} asks question {t} " + "and more words " * (u * 3),
                           dict(max_new_tokens=8 + 5 * u, **greedy)) for t in range(3)] for u in range(4)}
    results = {}
    passes = record_passes(static)
    drawn = count_device_draws(static)
    for name, engine in (("static", static), ("eager", eager)):
        sids = {user: engine.new_session() for user in plans}
        results[name] = run_together(engine, {user: (sids[user], turns) for user, turns in plans.items()})
    for user in plans:
        assert [e.text for e in results["static"][user]] == [e.text for e in results["eager"][user]], user
        assert ([e.stats["evicted_tokens"] for e in results["static"][user]]
                == [e.stats["evicted_tokens"] for e in results["eager"][user]])
    assert any(e.stats["evicted_tokens"] for e in results["static"]["user3"])  # long prompts evicted
    # Every decode pass went through the static step (none fell back to the per-row eager retry), batched, and
    # drew every row's token on the device.
    decodes = [handles for kind, handles in passes if kind == "decode"]
    assert "batched decode failed" not in caplog.text
    assert drawn == [len(handles) for handles in decodes] and max(drawn) >= 2


def test_after_a_failed_static_step_the_rows_go_on_with_the_tokens_their_turns_drew(tiny_chat_model,
                                                                                   default_tokenizer, caplog):
    """The third static pass fails: the scheduler retries each row eagerly (its turn samples that token itself),
    then the static step goes on, the device sampler taking every row again from its turn's history: greedy
    replies with a repetition penalty are still the eager engine's (that the retried token enters the window is
    `test_device_sampling.py`'s check)."""
    static = make_engine(tiny_chat_model, default_tokenizer, recent_size=60, decode_step="static")
    eager = make_engine(tiny_chat_model, default_tokenizer, recent_size=60, decode_step="eager")
    graphed, calls = static.scheduler.batch.static_step.step, []
    sampled = graphed.sampled

    def failing_once(tokens, sampler):
        calls.append(len(tokens))
        if len(calls) == 3:
            raise RuntimeError("injected failure of one static pass")
        return sampled(tokens, sampler)

    graphed.sampled = failing_once
    greedy = dict(GREEDY, repetition_penalty=1.3, max_new_tokens=20)
    plans = {f"u{u}": [(f"Question {u}: what do ships carry?", greedy)] for u in range(3)}
    results = {}
    for name, engine in (("static", static), ("eager", eager)):
        results[name] = run_together(engine, {u: (engine.new_session(), turns) for u, turns in plans.items()})
    for user in plans:
        assert results["static"][user][0].text == results["eager"][user][0].text, user
        assert results["static"][user][0].finish_reason == results["eager"][user][0].finish_reason
    assert len(calls) > 3 and "batched decode failed" in caplog.text  # the retry happened, and the step went on


def test_a_seeded_sampled_reply_is_the_same_alone_and_among_companions(tiny_chat_model, default_tokenizer):
    """Under the static step, one seeded turn (temperature, top-k, top-p, repetition penalty) alone, and submitted
    after three other chats with other seeds and settings: it decodes in the last row, and moves to row 0 when the
    shorter companions leave. The same reply, drawn on the device."""
    seeded = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=40, repetition_penalty=1.2, seed=1234)
    message = "Tell me a story about a lighthouse."
    alone_engine = make_engine(tiny_chat_model, default_tokenizer, recent_size=60, decode_step="static")
    alone_drawn = count_device_draws(alone_engine)
    alone = reply(alone_engine, alone_engine.new_session(), message, **seeded).text
    assert alone_drawn and set(alone_drawn) == {1}
    engine = make_engine(tiny_chat_model, default_tokenizer, recent_size=60, decode_step="static")
    rows_of = []
    count_device_draws(engine, rows_of)
    streams = []
    for k in range(3):
        other = dict(max_new_tokens=8 + 4 * k, temperature=0.5 + 0.3 * k, top_p=0.9, top_k=0,
                     repetition_penalty=1.0 + 0.2 * k, seed=k)
        streams.append(engine.start_chat(engine.new_session(), f"Companion {k} wants a poem about the sea.", **other))
    for stream in streams:  # the companions decode before it arrives (else it could cut into their prompt passes)
        for event in stream:
            if event.kind != "delta" or event.stats.get("reply_tokens"):
                break
    streams.append(engine.start_chat(engine.new_session(), message, **seeded))
    finals = [list(stream)[-1] for stream in streams]
    assert finals[-1].text == alone
    rows = [[p.seed for p in params].index(seeded["seed"]) for params in rows_of if any(
        p.seed == seeded["seed"] for p in params)]
    assert rows[0] >= 2 and rows[-1] == 0  # it joined behind companions and moved to row 0 when they left
    unseeded = reply(alone_engine, alone_engine.new_session(), message, **dict(seeded, seed=None)).text
    again = reply(alone_engine, alone_engine.new_session(), message, **dict(seeded, seed=None)).text
    assert len({alone, unseeded, again}) > 1  # the draws follow the seed: without one, replies differ


@pytest.mark.parametrize("device, expected", [("cuda", "static"), ("cuda:1", "static"), ("cpu", "eager"),
                                              ("mps", "eager")])
def test_auto_takes_the_static_step_on_cuda_only(device, expected):
    assert resolve_decode_step("auto", device) == expected
    for chosen in ("eager", "static"):
        assert resolve_decode_step(chosen, device) == chosen


def test_auto_is_the_default_and_decodes_eagerly_on_the_cpu(tiny_chat_model, default_tokenizer):
    assert EngineConfig().decode_step == "auto" and EngineConfig().cuda_graphs == "auto"
    engine = make_engine(tiny_chat_model, default_tokenizer)
    assert engine.config.decode_step == "auto" and engine.scheduler.batch.static_step is None
    assert engine.decode_path == "eager" and engine.decode_path in DECODE_PATHS


def test_under_zerogpu_auto_decodes_eagerly_and_an_explicit_choice_is_kept(tiny_chat_model, default_tokenizer):
    remote = RemoteTurnsEngine(tiny_chat_model, default_tokenizer, EngineConfig(start_size=4, recent_size=64))
    assert remote.config.decode_step == "eager" and remote.decode_path == "eager"
    assert remote.worker_engine().decode_path == "eager"  # the worker-local engine too
    chosen = RemoteTurnsEngine(tiny_chat_model, default_tokenizer,
                               EngineConfig(start_size=4, recent_size=64, decode_step="static"))
    assert chosen.config.decode_step == "static" and chosen.decode_path == "static"


def test_auto_on_cuda_falls_back_for_a_model_it_cannot_serve_in_one_log_line(monkeypatch, caplog):
    """A model split over devices, whose inputs go to CUDA: "auto" would take the static step, cannot, and says
    why once (nothing is allocated on the device: the check comes first)."""
    model = tiny_model("llama", layers=2)
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": "cpu"}
    monkeypatch.setattr(TransformersBackend, "input_device", property(lambda self: torch.device("cuda")))
    with caplog.at_level(logging.INFO, logger="streaming_engine.backends.hf"):
        scheduler = Scheduler(TransformersBackend(model), max_batch=2)
    assert scheduler.batch.decode_step == "eager" and scheduler.decode_path == "eager"
    lines = [r.getMessage() for r in caplog.records if r.name == "streaming_engine.backends.hf"]
    assert len(lines) == 1 and STATIC_DEVICE_MAP in lines[0] and "decoding eagerly" in lines[0]


def test_a_model_the_static_step_cannot_serve_decodes_eagerly_and_says_why(caplog):
    model = tiny_model("llama", layers=2)
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": "cpu"}
    with caplog.at_level(logging.INFO, logger="streaming_engine.backends.hf"):
        scheduler = Scheduler(TransformersBackend(model), max_batch=2, decode_step="static")
    assert scheduler.batch.decode_step == "eager" and not isinstance(scheduler.batch.cache, StaticSinkCache)
    assert STATIC_DEVICE_MAP in caplog.text


@pytest.mark.parametrize("bad", ["fast", "", None, "Static"])
def test_an_unknown_decode_step_is_refused_where_it_enters(bad):
    allowed = f"decode_step must be one of {', '.join(DECODE_STEPS)}"
    assert allowed.endswith("auto, eager, static")
    with pytest.raises(ValueError, match=allowed):
        EngineConfig(decode_step=bad)
    with pytest.raises(ValueError, match=allowed):
        Scheduler(TransformersBackend(tiny_model("llama")), decode_step=bad)


@pytest.mark.parametrize("bad", ["maybe", None])
def test_an_unknown_cuda_graphs_mode_is_refused_by_the_engine_config(bad):
    with pytest.raises(ValueError, match="cuda_graphs must be one of auto, on, off"):
        EngineConfig(cuda_graphs=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_graphs_on_without_cuda_is_refused_by_the_engine_config():
    with pytest.raises(CudaGraphsUnavailable):
        EngineConfig(decode_step="static", cuda_graphs="on")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it on one)")
def test_on_cuda_the_engine_replays_graphs_and_replies_as_the_eager_engine(cuda_chat_model):
    model, default_tokenizer = cuda_chat_model
    static = make_engine(model, default_tokenizer, recent_size=60, decode_step="static", cuda_graphs="on")
    eager = make_engine(model, default_tokenizer, recent_size=60)
    plans = {f"user{u}": [(f"User {u} asks question {t} " + "and more words " * (u * 3),
                           dict(max_new_tokens=8 + 5 * u, **GREEDY)) for t in range(2)] for u in range(4)}
    results = {}
    for name, engine in (("static", static), ("eager", eager)):
        sids = {user: engine.new_session() for user in plans}
        results[name] = run_together(engine, {user: (sids[user], turns) for user, turns in plans.items()})
    for user in plans:
        assert [e.text for e in results["static"][user]] == [e.text for e in results["eager"][user]], user
    assert static.scheduler.batch.static_step.graphs and static.scheduler.batch.static_step.step.captured
    assert static.decode_path == "static+graphs+overlap"  # overlap="auto": on with CUDA (test_overlap.py)
    auto = make_engine(model, default_tokenizer, recent_size=60)  # the default on CUDA: the static step, graphed
    assert auto.config.decode_step == "auto" and auto.decode_path == "static+graphs+overlap"
