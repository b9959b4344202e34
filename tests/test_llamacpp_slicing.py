"""Issue 28 item 5 on llama.cpp: a long prompt is prefilled in slices of at most the budget per scheduler
iteration, a decode step of every other reply between slices, and slicing changes no token.

On the real default GGUF (marker `model`); skipped with the reason where llama-cpp-python is not installed.
Decided on the scheduler's pass log (`Scheduler.on_pass`) and on token equality, never on time."""

from __future__ import annotations

import threading

import pytest

from streaming_engine import EngineConfig, StreamingEngine, load
from streaming_engine.llamacpp import llamacpp_available
from streaming_engine.scheduler import PREFILL_SLICE_TOKENS
from streaming_engine.validate import MAX_NEW_TOKENS_LIMIT

pytestmark = [pytest.mark.model, pytest.mark.skipif(
    not llamacpp_available(), reason="llama-cpp-python is not installed (pip install -r requirements-cpu.txt)")]
GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
#: A prompt of a few hundred tokens: several 62-token chunks (recent_size 124), each cut into several slices.
LONG_PROMPT = "Summarise this report. " + " ".join(
    f"Section {i}: the committee met, reviewed the budget, and agreed to revisit the open items." for i in range(14))


@pytest.fixture(scope="module")
def llama():
    return load(backend="llama.cpp", n_threads=1)


@pytest.fixture
def engines(llama):
    made = []

    def make(budget: int, **config) -> StreamingEngine:
        model, tokenizer = llama
        config = {"start_size": 4, "recent_size": 124, "max_active_turns": 2, "max_batch": 2, **config}
        engine = StreamingEngine(model, tokenizer, EngineConfig(**config))
        engine.scheduler.prefill_budget = budget  # before any turn: the worker reads it every iteration
        engine.scheduler.prompt_pass_s = None  # passes alone are the budget's, not sized by this CPU's speed
        made.append(engine)
        return engine

    yield make
    for engine in made:
        for sid in engine.session_ids():
            engine.close(sid)
        engine.backend.close()


def test_the_engine_budget_on_llamacpp_is_at_most_one_slice(llama):
    model, tokenizer = llama
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=4, recent_size=2044, max_active_turns=1,
                                                            max_batch=1))
    try:
        assert engine.config.prefill_chunk_size > PREFILL_SLICE_TOKENS
        assert engine.scheduler.prefill_budget == PREFILL_SLICE_TOKENS
    finally:
        engine.backend.close()


@pytest.mark.parametrize("budget", [7, 16])
def test_a_sliced_prefill_gives_the_same_greedy_reply_as_whole_chunks(engines, budget):
    replies = []
    for size in (10_000, budget):  # 10,000: every chunk in one pass (the pass size caps it at one chunk)
        engine = engines(size)
        passes = []
        engine.scheduler.on_pass = lambda kind, handles, passes=passes: passes.append(kind)
        events = list(engine.chat(engine.new_session(), LONG_PROMPT, max_new_tokens=24, **GREEDY))
        assert events[-1].kind == "done", events[-1].text
        replies.append((events[-1].text, events[-1].stats["seen_tokens"], passes.count("prefill")))
    (whole, seen, whole_passes), (sliced, seen_sliced, sliced_passes) = replies
    assert (sliced, seen_sliced) == (whole, seen) and len(whole) > 0
    assert sliced_passes > whole_passes  # it was sliced: more, smaller prompt passes


def test_a_decoding_reply_gets_a_token_between_every_slice_of_a_long_prompt(engines):
    engine = engines(16)
    log = []  # (kind, turns served), in pass order
    talker, paster = engine.new_session(), engine.new_session()
    started = threading.Event()
    engine.scheduler.on_pass = lambda kind, handles: (log.append((kind, {id(h) for h in handles})),
                                                      kind == "decode" and started.set())
    # The talker may write the most a reply may: how many decode steps the paste's slices are spread over depends
    # on what a slice costs against a step on this CPU, and the rule only holds while the talker still decodes.
    reader = threading.Thread(target=lambda: list(engine.chat(talker, "Write a long essay about the history of "
                                                              "Rome.", max_new_tokens=MAX_NEW_TOKENS_LIMIT,
                                                              **GREEDY)), daemon=True)
    reader.start()
    assert started.wait(120), "the talking reply never decoded"
    talking = id(engine.session(talker).turn)
    events = list(engine.chat(paster, LONG_PROMPT, max_new_tokens=1, **GREEDY))
    engine.stop(talker)
    reader.join(120)
    assert events[-1].kind == "done", events[-1].text
    pasting = id(engine.session(paster).turn)
    slices = [i for i, (kind, served) in enumerate(log) if kind == "prefill" and pasting in served]
    prompt_tokens = events[-1].stats["seen_tokens"]
    assert len(slices) >= prompt_tokens // 16  # never more than the budget per pass
    # Slices after the talker's last token (it ended on its own, at its end-of-text) have no reply to wait for.
    last_token = max(i for i, (kind, served) in enumerate(log) if kind == "decode" and talking in served)
    pairs = [(a, b) for a, b in zip(slices, slices[1:]) if b < last_token]
    assert len(pairs) >= 2, f"the talker stopped decoding before the paste was under way: {slices}, {last_token}"
    for a, b in pairs:  # between two slices of the paste, the other reply decoded a token
        assert any(kind == "decode" and talking in served for kind, served in log[a + 1:b]), (a, b)
