"""The engine's opt-in static decode step (EngineConfig.decode_step="static"): replies are the eager path's,
token for token, under greedy sampling; a model the static step cannot serve decodes eagerly, saying why."""

from __future__ import annotations

import logging

import pytest
from conftest import tiny_model
from test_batching import GREEDY, make_engine, record_passes, run_together

from streaming_engine import EngineConfig
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
    with caplog.at_level(logging.INFO, logger="streaming_engine.scheduler"):
        scheduler = BatchedScheduler(model, max_batch=2, decode_step="static")
    assert scheduler.decode_step == "eager" and not isinstance(scheduler.batch, StaticSinkCache)
    assert STATIC_DEVICE_MAP in caplog.text


@pytest.mark.parametrize("bad", ["fast", "", None, "Static"])
def test_an_unknown_decode_step_is_refused_where_it_enters(bad):
    with pytest.raises(ValueError, match="decode_step must be one of eager, static"):
        EngineConfig(decode_step=bad)
    with pytest.raises(ValueError, match="decode_step must be one of eager, static"):
        BatchedScheduler(tiny_model("llama"), decode_step=bad)
