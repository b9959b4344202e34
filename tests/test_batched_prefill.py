"""Prompts that arrive together are prefilled together: fresh conversations' first chunks share one padded pass
(`generation.padded_prefill_rows`, `forward_padded`), and every answer and cache equals a pass of its own."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import fast_cases, tiny_model
from test_batching import BATCHED_FAMILIES, GREEDY, HYBRID_FAMILIES, ROW_TOLERANCE, make_engine

from streaming_engine.backends.hf import TransformersBackend
from streaming_engine.generation import forward, padded_prefill_rows

# (start_size, recent_size, pos_shift, pinned head, prompt length): rows of different lengths, one filling its
# cache exactly, one pinned, one dense (no position shift), one without sinks.
FRESH_ROWS = [(4, 20, True, 0, 5), (4, 20, True, 0, 24), (2, 30, True, 9, 13), (0, 40, False, 0, 17),
              (0, 16, True, 0, 1), (4, 28, True, 0, 9)]


def new_caches(backend, rows):
    caches = []
    for start, recent, pos_shift, pin, _ in rows:
        cache = backend.new_cache(start, recent, pos_shift=pos_shift)
        cache.pin(pin)
        caches.append(cache)
    return caches


def prompts_for(rows, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (row[-1],), generator=generator).tolist() for row in rows]


def assert_same_cache(mine, theirs):
    a, b = mine.solo, theirs.solo
    assert (a.get_seq_length(), a.seen_tokens, a.evicted_tokens, a.pinned) == (
        b.get_seq_length(), b.seen_tokens, b.evicted_tokens, b.pinned)
    assert a.stream_positions == b.stream_positions
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert x.keys.shape == y.keys.shape and x.values.shape == y.values.shape
        assert torch.allclose(x.keys, y.keys, atol=ROW_TOLERANCE) and torch.allclose(x.values, y.values,
                                                                                     atol=ROW_TOLERANCE)


def decode_both(model, mine, theirs, steps, seed=2):
    """Feed the same tokens on both caches, evicting as the engine does; every step's logits agree."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        token = int(torch.randint(3, 90, (1,), generator=generator))
        for cache in (mine, theirs):
            cache.evict_for_space(1)
        a, b = forward(model, mine.solo, [token]), forward(model, theirs.solo, [token])
        assert torch.allclose(a, b, atol=ROW_TOLERANCE), (a - b).abs().max()


def count_padded_passes(model):
    """A forward pre-hook counting passes with more than one row (the padded prefill is the only such pass
    here); returns (counts, hook handle)."""
    counts = {"padded": 0}

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[0] > 1:
            counts["padded"] += 1

    return counts, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", fast_cases(BATCHED_FAMILIES))
def test_fresh_prompts_prefilled_in_one_padded_pass_equal_each_alone_and_decode_on_the_same(family):
    model = tiny_model(family, layers=3)  # 3: SmolLM3 then mixes RoPE and NoPE layers
    backend = TransformersBackend(model)
    prompts = prompts_for(FRESH_ROWS)
    together, alone = new_caches(backend, FRESH_ROWS), new_caches(backend, FRESH_ROWS)
    rows = list(zip(together, prompts))
    assert padded_prefill_rows(rows, backend.batchable) == list(range(len(rows)))
    counts, hook = count_padded_passes(model)
    try:
        answers = backend.forward(rows)
    finally:
        hook.remove()
    assert counts["padded"] == 1  # one pass for all of them
    for cache, prompt, answer, reference in zip(together, prompts, answers, alone):
        expected = forward(model, reference.solo, prompt)
        assert answer.shape == expected.shape
        assert torch.allclose(answer, expected, atol=ROW_TOLERANCE), (answer - expected).abs().max()
        assert_same_cache(cache, reference)
    for mine, theirs in zip(together, alone):
        decode_both(model, mine, theirs, steps=12)  # the small windows evict and re-rotate on the way
        assert_same_cache(mine, theirs)
    assert any(cache.evicted_tokens for cache in together)


@pytest.mark.parametrize("family", fast_cases(BATCHED_FAMILIES))
def test_a_call_mixing_fresh_and_other_rows_shares_only_the_fresh_ones_and_stays_exact(family):
    model = tiny_model(family, layers=2)
    backend = TransformersBackend(model)
    # fresh, already fed (a later chunk), fresh, a chunk longer than its cache, fresh dense, the first fresh
    # cache named again (its second chunk, which must go in after the first)
    shapes = [(4, 20, True, 0, 7), (4, 20, True, 0, 6), (2, 30, True, 0, 11), (4, 12, True, 0, 20),
              (0, 40, False, 0, 3)]
    prompts = prompts_for(shapes) + prompts_for([(0, 0, True, 0, 5)], seed=3)
    together, alone = new_caches(backend, shapes), new_caches(backend, shapes)
    earlier = prompts_for([(0, 0, True, 0, 8)], seed=4)[0]
    for cache in (together[1], alone[1]):
        forward(model, cache.solo, earlier)
    rows = list(zip(together, prompts)) + [(together[0], prompts[-1])]
    assert padded_prefill_rows(rows, backend.batchable) == [0, 2, 4]
    counts, hook = count_padded_passes(model)
    try:
        answers = backend.forward(rows)
    finally:
        hook.remove()
    assert counts["padded"] == 1
    expected = [forward(model, cache.solo, prompt) for cache, prompt in zip(alone, prompts)]
    expected.append(forward(model, alone[0].solo, prompts[-1]))
    for answer, reference in zip(answers, expected):
        assert torch.allclose(answer, reference, atol=ROW_TOLERANCE), (answer - reference).abs().max()
    for mine, theirs in zip(together, alone):
        assert_same_cache(mine, theirs)
        decode_both(model, mine, theirs, steps=4)


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_a_model_without_batched_passes_shares_no_prefill_pass(family):
    backend = TransformersBackend(tiny_model(family, layers=2))
    caches = new_caches(backend, FRESH_ROWS[:3])
    assert padded_prefill_rows(list(zip(caches, prompts_for(FRESH_ROWS[:3]))), backend.batchable) == []


def test_a_failed_padded_pass_feeds_its_rows_one_by_one_and_each_once():
    model = tiny_model("llama", layers=2)
    backend = TransformersBackend(model)
    prompts = prompts_for(FRESH_ROWS)
    together, alone = new_caches(backend, FRESH_ROWS), new_caches(backend, FRESH_ROWS)

    def refuse_padded(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > 1:
            raise RuntimeError("out of memory (simulated)")

    hook = model.register_forward_pre_hook(refuse_padded, with_kwargs=True)
    try:
        answers = backend.forward(list(zip(together, prompts)))
    finally:
        hook.remove()
    for cache, prompt, answer, reference in zip(together, prompts, answers, alone):
        assert torch.allclose(answer, forward(model, reference.solo, prompt), atol=ROW_TOLERANCE)
        assert_same_cache(cache, reference)


def test_conversations_started_at_once_share_a_prefill_pass_and_reply_as_alone(tiny_chat_model, default_tokenizer):
    users = 6
    questions = [f"Question {u}: " + "tell me more " * u for u in range(users)]
    sampling = dict(max_new_tokens=10, **GREEDY)
    # The chunk (and so each iteration's prompt budget) holds every first chunk: they can all go in one call.
    window = dict(recent_size=1020, prefill_chunk_size=510)
    reference = make_engine(tiny_chat_model, default_tokenizer, "round-robin", **window)
    alone = [list(reference.chat(reference.new_session(), q, **sampling))[-1].text for q in questions]

    engine = make_engine(tiny_chat_model, default_tokenizer, **window)
    runner = engine.scheduler.runner
    original, calls = runner.forward, []
    holding, gate = threading.Event(), threading.Event()

    def forward_rows(rows):
        # A one-token turn's prefill holds the worker until the six turns are all submitted: they then wait
        # together for the next round, in which nobody decodes (that turn ends with its prefill's token).
        if not calls:
            holding.set()
            assert gate.wait(120), "the turns were never all submitted"
        calls.append(len(rows))
        return original(rows)

    runner.forward = forward_rows
    prefill_rows = []  # rows of every model pass that fed more than one token per row (prefill, not decode)

    def watch(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            prefill_rows.append(ids.shape[0])

    hook = tiny_chat_model.register_forward_pre_hook(watch, with_kwargs=True)
    try:
        first = engine.start_chat(engine.new_session(), "Hello", max_new_tokens=1, **GREEDY)
        assert holding.wait(120), "the worker never started the first turn"
        sids = [engine.new_session() for _ in questions]
        streams = [engine.start_chat(sid, q, **sampling) for sid, q in zip(sids, questions)]
        gate.set()
        assert list(first)[-1].kind == "done"
        finals = [list(stream)[-1] for stream in streams]
    finally:
        hook.remove()
    assert [f.kind for f in finals] == ["done"] * users, [f.text for f in finals]
    assert [f.text for f in finals] == alone
    assert calls[0] == 1 and max(calls) == users  # the six waiting prompts went to the runner in one call
    assert max(prefill_rows) == users  # and their first chunks through the model in one pass
