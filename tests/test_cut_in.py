"""A new turn cuts into a paste's prompt pass between decoder layers (issue 28: a newcomer's first token behind a
paste). The runner pauses a pass between layers (`Backend.forward_with_breaks`), the scheduler feeds turns that
arrived meanwhile (`Scheduler._cut_in`), and the paused pass goes on: every answer and every cache is that of
unbroken passes."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_CASES, fast_cases, tiny_model
from test_batched_prefill import assert_same_cache
from test_batching import ROW_TOLERANCE
from test_prompt_share import GREEDY, PASTE, make_engine

from streaming_engine.backends import hf
from streaming_engine.backends.hf import TransformersBackend

LAYERS = 3


def conversation(backend, ids: list[int]):
    """A conversation whose cache already slid (more tokens than its window): positions are shifted."""
    cache = backend.new_cache(4, 24)
    for begin in range(0, len(ids), 10):
        chunk = ids[begin:begin + 10]
        cache.evict_for_space(len(chunk))
        backend.forward([(cache, chunk)])
    return cache


@pytest.mark.parametrize("family", fast_cases(FAMILY_CASES))
@pytest.mark.parametrize("pause_at", [1, LAYERS - 1])
def test_a_pass_paused_between_layers_for_another_conversation_equals_unbroken_passes(family, pause_at):
    """Before layer `pause_at`, the callback runs a whole pass of another conversation (itself unbroken: no
    nesting); both logits and both caches equal the passes run one after the other, and the callback is called
    before every layer but the first."""
    check_paused_pass(tiny_model(family, layers=LAYERS), pause_at)


@pytest.mark.cuda
def test_on_cuda_a_paused_pass_equals_unbroken_passes():
    """The same on the GPU, where the paused pass's earlier layers may still be running when the other pass is
    launched: both go on one stream, in order."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (scripts/gpu_check.sh runs it on one)")
    check_paused_pass(tiny_model("llama", layers=LAYERS).to("cuda"), 1)


def check_paused_pass(model, pause_at: int) -> None:
    backend = TransformersBackend(model)
    history_a, history_b = [5 + i % 40 for i in range(33)], [50 + i % 30 for i in range(27)]
    slice_a, slice_b = [7 + i % 23 for i in range(12)], [60 + i % 17 for i in range(9)]
    plain_a, plain_b = conversation(backend, history_a), conversation(backend, history_b)
    paused_a, paused_b = conversation(backend, history_a), conversation(backend, history_b)
    for cache in (plain_a, plain_b, paused_a, paused_b):
        cache.evict_for_space(len(slice_a))
    expected_a = backend.forward([(plain_a, slice_a)])[0]
    expected_b = backend.forward([(plain_b, slice_b)])[0]
    calls, cut_in = [], {}

    def between_layers():
        calls.append(len(calls) + 1)
        if len(calls) == pause_at:
            cut_in["logits"] = backend.forward_with_breaks([(paused_b, slice_b)], between_layers)[0]

    got_a = backend.forward_with_breaks([(paused_a, slice_a)], between_layers)[0]
    assert calls == list(range(1, LAYERS))  # before layers 2..LAYERS of the paused pass only, never nested
    assert torch.allclose(got_a, expected_a, atol=ROW_TOLERANCE)
    assert torch.allclose(cut_in["logits"], expected_b, atol=ROW_TOLERANCE)
    assert_same_cache(paused_a, plain_a)
    assert_same_cache(paused_b, plain_b)
    assert hf._pass_breaks.callback is None  # idle again: later passes are not paused


def test_a_turn_that_arrives_during_an_idle_paste_pass_gets_its_first_token_before_that_pass_ends(
    tiny_chat_model, default_tokenizer
):
    """A turn submitted (from the worker) while the paste's second pass is between layers is fed at that layer
    boundary: its prefill is served, and its first token is in its queue, before the paste's pass completes; the
    rest of that pass is spent from the prompts' share. Both greedy replies are the ones they get alone."""
    solo = make_engine(tiny_chat_model, default_tokenizer)
    expected = list(solo.chat(solo.new_session(), PASTE, max_new_tokens=2, **GREEDY))[-1]
    expected_late = list(solo.chat(solo.new_session(), "Hello there", max_new_tokens=3, **GREEDY))[-1]
    engine = make_engine(tiny_chat_model, default_tokenizer)
    engine.scheduler.prompt_pass_s = None  # whole 128-token chunks: the paste takes several passes
    paster, late = engine.new_session(), engine.new_session()
    prefills, newcomer = [], {}

    def arrive(module, args):  # before the first layer: the pass pauses before the second
        if engine.scheduler.passes["prefill"] == 1 and "events" not in newcomer:
            newcomer["events"] = engine.start_chat(late, "Hello there", max_new_tokens=3, **GREEDY)
            newcomer["handle"] = engine.session(late).turn

    def on_pass(kind, handles):
        if kind == "prefill":
            queued = list(newcomer["handle"].events.queue) if "handle" in newcomer else []
            prefills.append((list(handles), any(e.stats.get("reply_tokens") for e in queued),
                             engine.scheduler.prompt_share.credit))

    hook = tiny_chat_model.model.layers[0].register_forward_pre_hook(arrive)
    try:
        engine.scheduler.on_pass = on_pass
        paste_events = engine.start_chat(paster, PASTE, max_new_tokens=2, **GREEDY)
        paste = engine.session(paster).turn
        final = list(paste_events)[-1]
    finally:
        hook.remove()
    late_final = list(newcomer["events"])[-1]
    assert (final.text, final.stats["seen_tokens"]) == (expected.text, expected.stats["seen_tokens"])
    assert late_final.text == expected_late.text
    assert [handles for handles, _, _ in prefills[:3]] == [[paste], [newcomer["handle"]], [paste]]
    assert prefills[2][1]  # when the paused paste pass ended, the newcomer's first token was already out
    assert prefills[2][2] < 0  # and the rest of that pass, run beside its decoding reply, was spent like a slice
    assert engine.scheduler.passes["prefill"] > 3  # the paste went on after it


def test_round_robin_never_cuts_into_a_pass(tiny_chat_model, default_tokenizer):
    """The round-robin baseline feeds one turn's chunk per iteration, whole and alone: nothing cuts in."""
    engine = make_engine(tiny_chat_model, default_tokenizer, scheduler="round-robin")
    calls = []
    engine.scheduler._cut_in = lambda: calls.append(1)
    list(engine.chat(engine.new_session(), PASTE, max_new_tokens=2, **GREEDY))
    assert calls == []
