"""The static decode step (streaming_engine/static_step.py): fixed shapes, and every row's logits equal to its
conversation decoded eagerly alone, across evictions, joins, leaves and bucket changes, far past the cache size."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_cases, tiny_config, tiny_model

from streaming_engine.batch_cache import ConversationCache
from streaming_engine.cache import StartRecentKVCache
from streaming_engine.families import SUPPORTED_FAMILIES, find_rotary_embedding
from streaming_engine.generation import forward
from streaming_engine.static_step import (
    STATIC_ATTENTION,
    STATIC_DEVICE_MAP,
    STATIC_HYBRID,
    StaticDecodeStep,
    StaticSinkCache,
    StaticStepUnsupported,
    bucket_for,
    row_buckets,
    unsupported_reason,
)

TOLERANCE = 1e-4
HYBRID = ("gemma2", "gemma3_text", "mistral_sliding", "qwen2_hybrid")
STATIC_FAMILIES = tuple(f for f in SUPPORTED_FAMILIES if f not in ("gemma2", "gemma3_text"))

# (start_size, recent_size, pos_shift, prompt length, pinned head, evict_block): rows evicting token by token and
# in blocks, one with a pinned head longer than its sinks, one without sinks, one without position shift (the ablation: kept keys keep their rotation).
ROWS = [(4, 12, True, 10, 0, 1), (2, 14, True, 6, 7, 3), (0, 16, True, 5, 0, 1), (4, 20, True, 3, 0, 4),
        (0, 24, False, 4, 0, 1)]
CAPACITY = 24


def conversation(rotary, start, recent, pos_shift, pin, block):
    return ConversationCache(StartRecentKVCache(start, recent, rotary_emb=rotary, pos_shift=pos_shift, pin=pin,
                                                evict_block=block))


def static_vs_alone(model, steps: int, joins: dict, leaves: dict) -> float:
    """Decode `steps` steps with rows joining/leaving a static batch; returns the worst logit difference from the
    same conversations decoded eagerly one at a time on their own caches."""
    rotary = find_rotary_embedding(model)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 90, (row[3],), generator=generator).tolist() for row in ROWS]
    alone = [conversation(rotary, s, r, p, pin, blk) for s, r, p, _, pin, blk in ROWS]
    static = [conversation(rotary, s, r, p, pin, blk) for s, r, p, _, pin, blk in ROWS]
    for cache, prompt in zip(alone + static, prompts + prompts):
        forward(model, cache.solo, prompt)
    batch = StaticSinkCache(max_batch=8, capacity=CAPACITY)
    step_fn = StaticDecodeStep(model, batch)
    worst, buckets = 0.0, set()
    for step in range(steps):
        for i in joins.get(step, []):
            batch.join(static[i])
        for i in leaves.get(step, []):
            batch.leave(static[i])
        members = [i for i, c in enumerate(static) if c.attached]
        tokens = {i: (step * 7 + i * 13) % 90 + 3 for i in members}
        expected = {}
        for i in members:
            alone[i].evict_for_space(1)
            static[i].evict_for_space(1)
            expected[i] = forward(model, alone[i].solo, [tokens[i]])
        if not members:
            continue
        logits = step_fn([tokens[static.index(c)] for c in batch.rows])
        buckets.add(step_fn.bucket)
        for i in members:
            worst = max(worst, (logits[static[i].row] - expected[i]).abs().max().item())
    for a, b in zip(alone, static):
        assert (a.get_seq_length(), a.seen_tokens, a.evicted_tokens) == (b.get_seq_length(), b.seen_tokens,
                                                                         b.evicted_tokens)
        assert a.stream_positions == b.stream_positions
    assert buckets == {1, 2, 4, 8}
    return worst


# Rows join one by one (buckets 1, 2, 4, 8), one leaves and comes back, all evict many times over.
JOINS = {0: [0], 3: [1], 6: [2, 3], 9: [4], 30: [1]}
LEAVES = {20: [1], 40: [0, 2, 3]}


@pytest.mark.parametrize("family", fast_cases(STATIC_FAMILIES))
def test_static_step_logits_equal_each_conversation_decoded_alone(family):
    model = tiny_model(family, layers=3 if family == "smollm3" else 2)
    assert static_vs_alone(model, 70, JOINS, LEAVES) <= TOLERANCE


@pytest.mark.parametrize("hidden, heads, kv_heads", [(64, 4, 1), (128, 8, 4)])
def test_static_step_is_exact_at_other_sizes_and_head_groupings(hidden, heads, kv_heads):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", layers=2)
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = hidden, heads, kv_heads
    config.head_dim = hidden // heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    assert static_vs_alone(model, 50, JOINS, LEAVES) <= TOLERANCE


def test_static_step_is_exact_under_sdpa_attention():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", layers=2), attn_implementation="sdpa").eval()
    assert static_vs_alone(model, 50, JOINS, LEAVES) <= TOLERANCE


def test_buffers_keep_their_shape_and_address_while_rows_come_and_go():
    model = tiny_model("llama")
    rotary = find_rotary_embedding(model)
    batch = StaticSinkCache(max_batch=5, capacity=CAPACITY)
    step = StaticDecodeStep(model, batch)
    convs = [conversation(rotary, 4, 12, True, 0, 1) for _ in range(3)]
    for c in convs:
        forward(model, c.solo, [5, 6, 7])
    batch.join(convs[0])
    shape, address = batch._keys[0].shape, batch._keys[0].data_ptr()
    assert shape == (8, 2, CAPACITY, 16)  # rows: the largest bucket of max_batch 5
    for c in convs[1:]:
        batch.join(c)
    step([9, 9, 9])
    for c in convs:
        batch.leave(c)
    batch.join(convs[1])
    assert batch._keys[0].shape == shape and batch._keys[0].data_ptr() == address
    assert step([4]).shape == (1, 96) and convs[1].get_seq_length() == 5


def test_a_conversation_larger_than_the_capacity_grows_the_columns_and_keeps_every_row_exact():
    model = tiny_model("llama")
    rotary = find_rotary_embedding(model)
    batch = StaticSinkCache(max_batch=2, capacity=CAPACITY)
    step = StaticDecodeStep(model, batch)
    small, big = conversation(rotary, 4, 12, True, 0, 1), conversation(rotary, 4, CAPACITY + 8, True, 0, 1)
    twins = conversation(rotary, 4, 12, True, 0, 1), conversation(rotary, 4, CAPACITY + 8, True, 0, 1)
    for c in (small, big) + twins:
        forward(model, c.solo, [5, 6, 7, 8])
    batch.join(small)
    step([9])
    forward(model, twins[0].solo, [9])
    batch.join(big)
    assert batch.capacity == CAPACITY + 12 and batch._keys[0].shape[2] == CAPACITY + 12
    for t in range(40):
        for c in (small, big) + twins:
            c.evict_for_space(1)
        logits = step([t + 3, t + 4])
        for row, (twin, token) in enumerate(zip(twins, (t + 3, t + 4))):
            assert (logits[row] - forward(model, twin.solo, [token])).abs().max() <= TOLERANCE


def test_the_rows_can_also_take_an_eager_batched_step():
    from streaming_engine.generation import forward_batch

    model = tiny_model("llama")
    rotary = find_rotary_embedding(model)
    batch = StaticSinkCache(max_batch=2, capacity=CAPACITY)
    conv, twin = conversation(rotary, 4, 12, True, 0, 1), conversation(rotary, 4, 12, True, 0, 1)
    for c in (conv, twin):
        forward(model, c.solo, [5, 6, 7])
    batch.join(conv)
    assert (forward_batch(model, batch, [9])[0] - forward(model, twin.solo, [9])).abs().max() <= TOLERANCE
    assert (StaticDecodeStep(model, batch)([4])[0] - forward(model, twin.solo, [4])).abs().max() <= TOLERANCE


def test_a_failed_step_leaves_the_rows_as_they_were():
    model = tiny_model("llama")
    batch = StaticSinkCache(max_batch=2, capacity=CAPACITY)
    step = StaticDecodeStep(model, batch)
    conv = conversation(find_rotary_embedding(model), 4, 12, True, 0, 1)
    forward(model, conv.solo, [5, 6, 7])
    batch.join(conv)
    before = batch._valid.clone()
    with pytest.raises(IndexError):
        step([10_000])  # outside the vocabulary: the embedding fails
    assert torch.equal(batch._valid, before) and conv.get_seq_length() == 3 and batch._step is None


@pytest.mark.parametrize("rows, bucket", [(1, 1), (2, 2), (3, 4), (5, 8), (16, 16)])
def test_rows_go_to_the_smallest_bucket_holding_them(rows, bucket):
    assert bucket_for(rows, 16) == bucket


def test_buckets_are_powers_of_two_up_to_max_batch():
    assert row_buckets(1) == (1,) and row_buckets(12) == (1, 2, 4, 8, 16)
    with pytest.raises(ValueError):
        bucket_for(17, 16)


@pytest.mark.parametrize("family", HYBRID)
def test_hybrid_families_fall_back_with_their_code(family):
    model = tiny_model(family, layers=2)
    assert unsupported_reason(model).code == STATIC_HYBRID
    with pytest.raises(StaticStepUnsupported) as caught:
        StaticDecodeStep(model, StaticSinkCache(1, CAPACITY))
    assert caught.value.code == STATIC_HYBRID


def test_a_model_split_over_devices_falls_back():
    model = tiny_model("llama", layers=2)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "cpu"}
    assert unsupported_reason(model).code == STATIC_DEVICE_MAP
    model.hf_device_map = {"": "cpu"}
    assert unsupported_reason(model) is None


def test_an_attention_kernel_without_additive_masks_falls_back():
    model = tiny_model("llama")
    model.config._attn_implementation_internal = "flash_attention_2"
    assert unsupported_reason(model).code == STATIC_ATTENTION


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it on one)")
def test_static_step_on_cuda_equals_each_conversation_decoded_alone():
    model = tiny_model("llama", layers=2).to("cuda")
    assert static_vs_alone(model, 50, JOINS, LEAVES) <= TOLERANCE
