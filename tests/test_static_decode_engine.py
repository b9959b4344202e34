"""The engine's opt-in static decode step (EngineConfig.decode_step="static"): replies are the eager path's,
token for token, under greedy sampling; a model the static step cannot serve decodes eagerly, saying why."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import tiny_model
from test_batching import GREEDY, make_engine, record_passes, run_together

from streaming_engine import EngineConfig
from streaming_engine.backends.hf import TransformersBackend
from streaming_engine.cuda_graphs import CudaGraphsUnavailable
from streaming_engine.scheduler import BatchedScheduler
from streaming_engine.static_step import STATIC_DEVICE_MAP, StaticSinkCache


def test_static_replies_equal_eager_replies_under_greedy_sampling(tiny_chat_model, default_tokenizer, caplog):
    static = make_engine(tiny_chat_model, default_tokenizer, recent_size=60, decode_step="static")
    eager = make_engine(tiny_chat_model, default_tokenizer, recent_size=60)
    assert static.scheduler.decode_step == "static" and isinstance(static.scheduler.batch, StaticSinkCache)
    plans = {f"user{u}": [(f"User {u} asks question {t} " + "and more words " * (u * 3),
                           dict(max_new_tokens=8 + 5 * u, **GREEDY)) for t in range(3)] for u in range(4)}
    results = {}
    passes = record_passes(static)
    step, rows_fed = static.scheduler.static_step, []
    static.scheduler.static_step = lambda tokens: rows_fed.append(len(tokens)) or step(tokens)
    for name, engine in (("static", static), ("eager", eager)):
        sids = {user: engine.new_session() for user in plans}
        results[name] = run_together(engine, {user: (sids[user], turns) for user, turns in plans.items()})
    for user in plans:
        assert [e.text for e in results["static"][user]] == [e.text for e in results["eager"][user]], user
        assert ([e.stats["evicted_tokens"] for e in results["static"][user]]
                == [e.stats["evicted_tokens"] for e in results["eager"][user]])
    assert any(e.stats["evicted_tokens"] for e in results["static"]["user3"])  # long prompts evicted
    # Every decode pass went through the static step (none fell back to the per-row eager retry), batched.
    assert "batched decode failed" not in caplog.text
    assert len(rows_fed) == sum(kind == "decode" for kind, _ in passes) and max(rows_fed) >= 2


def test_a_model_the_static_step_cannot_serve_decodes_eagerly_and_says_why(caplog):
    model = tiny_model("llama", layers=2)
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": "cpu"}
    with caplog.at_level(logging.INFO, logger="streaming_engine.backends.hf"):
        scheduler = BatchedScheduler(TransformersBackend(model), max_batch=2, decode_step="static")
    assert scheduler.decode_step == "eager" and not isinstance(scheduler.batch, StaticSinkCache)
    assert STATIC_DEVICE_MAP in caplog.text


@pytest.mark.parametrize("bad", ["fast", "", None, "Static"])
def test_an_unknown_decode_step_is_refused_where_it_enters(bad):
    with pytest.raises(ValueError, match="decode_step must be one of eager, static"):
        EngineConfig(decode_step=bad)
    with pytest.raises(ValueError, match="decode_step must be one of eager, static"):
        BatchedScheduler(TransformersBackend(tiny_model("llama")), decode_step=bad)


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
def test_on_cuda_the_engine_replays_graphs_and_replies_as_the_eager_engine(request):
    try:  # the GPU machine may lack the offline default model's files the tokenizer comes from
        tiny_chat_model, default_tokenizer = (request.getfixturevalue(name)
                                              for name in ("tiny_chat_model", "default_tokenizer"))
    except Exception as exc:  # noqa: BLE001 - any failure to find the tokenizer means: cannot run here
        pytest.skip(f"the default tokenizer is not available here: {exc}")
    model = copy.deepcopy(tiny_chat_model).to("cuda")
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
    assert static.scheduler.static_step.enabled and static.scheduler.static_step.captured
