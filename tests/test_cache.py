"""Invariants of the attention-sink cache and its position shift, on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import Cache, DynamicLayer

from conftest import FAMILY_CASES, VOCAB, fast_cases, tiny_config, tiny_model
from streaming_engine import SUPPORTED_FAMILIES, StartRecentKVCache, enable_streaming_llm, next_position_ids
from streaming_engine.families import find_rotary_embedding, layer_rope_kinds
from streaming_engine.positions import rotate_half

TOL = 1e-4


def stream_ids(n: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=generator)


@torch.no_grad()
def stream_logits(model, cache, ids: torch.Tensor) -> list[torch.Tensor]:
    """Feed `ids` one token at a time, making room first; return each step's last logits."""
    out = []
    for t in range(ids.shape[1]):
        if cache is not None and hasattr(cache, "evict_for_space"):
            cache.evict_for_space(1)
        logits = model(
            ids[:, t : t + 1], past_key_values=cache, position_ids=next_position_ids(cache, 1), use_cache=True
        ).logits[0, -1]
        out.append(logits)
    return out


def test_every_supported_family_has_a_test_case():
    assert set(SUPPORTED_FAMILIES) <= set(FAMILY_CASES)


#: Pinned heads the exactness tests run with: none (the sinks alone) and one longer than the 4 sinks.
PINS = (0, 11)


@pytest.mark.parametrize("pin", PINS)
@pytest.mark.parametrize("family", fast_cases(FAMILY_CASES))
def test_one_layer_streaming_logits_equal_reencoding_the_kept_tokens(family, pin):
    model = tiny_model(family, layers=1)
    if family == "gemma2":  # one local layer alone: enable_streaming_llm refuses it (no layer would see the sinks),
        # but that layer's exactness against a re-encoding is what is checked here
        rotary = find_rotary_embedding(model)
        cache = StartRecentKVCache(4, 28, rotary_emb=rotary, layer_rope=layer_rope_kinds(model, rotary), pin=pin)
    else:
        cache = enable_streaming_llm(model, start_size=4, recent_size=28, pin=pin)
    ids = stream_ids(200)
    worst = 0.0
    with torch.no_grad():
        for t in range(200):
            cache.evict_for_space(1)
            got = model(ids[:, t : t + 1], past_key_values=cache, position_ids=next_position_ids(cache, 1)).logits[0, -1]
            kept = cache.stream_positions  # stream index of every held token, this one included
            assert len(kept) <= 32
            assert kept[: max(4, pin)] == list(range(min(t + 1, max(4, pin))))  # the protected head stays
            want = model(ids[:, kept]).logits[0, -1]  # fresh encoding at positions 0..n-1
            worst = max(worst, (got - want).abs().max().item())
    assert cache.evicted_tokens == 200 - 32
    assert worst <= TOL


def reference_rope(model, layer_idx: int):
    """`positions -> (cos, sin)` of layer `layer_idx`, read from the config on its own (not from the library's
    family tables): None for SmolLM3's NoPE layers, Gemma 3's per-layer-type frequencies, the shared rotary else."""
    config, rotary = model.config, find_rotary_embedding(model)
    no_rope = getattr(config, "no_rope_layers", None)
    if no_rope is not None and not no_rope[layer_idx]:
        return None
    if config.model_type == "gemma3_text":
        return lambda positions: rotary(torch.empty(0), positions, config.layer_types[layer_idx])
    return lambda positions: rotary(torch.empty(0), positions)


class PerStepRopeCache(Cache):
    """The paper's method, written plainly: store keys *without* RoPE and rotate the whole cache at in-cache
    positions 0..n-1 on every step. Eviction just drops tokens; nothing is ever re-rotated. Local layers see the
    model's window of the held tokens through the model's own masks, as in a re-encoding."""

    def __init__(self, model, start_size, recent_size, pin=0):
        super().__init__(layer_class_to_replicate=DynamicLayer)
        self.model, self.start_size, self.cache_size = model, max(start_size, pin), start_size + recent_size

    def _rope(self, x, positions, sign, layer_idx):
        rope = reference_rope(self.model, layer_idx)
        if rope is None:
            return x
        cos, sin = rope(positions.unsqueeze(0))  # [1, n, rot]
        cos, sin = cos[:, None], sign * sin[:, None]
        rot = cos.shape[-1]
        head, tail = x[..., :rot], x[..., rot:]
        return torch.cat((head * cos + rotate_half(head) * sin, tail), dim=-1)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        held = self.get_seq_length(layer_idx) if layer_idx < len(self.layers) else 0
        new = key_states.shape[-2]
        raw = self._rope(key_states, torch.arange(held, held + new), -1.0, layer_idx)  # undo the model's rotation
        keys, values = super().update(raw, value_states, layer_idx)
        return self._rope(keys, torch.arange(keys.shape[-2]), 1.0, layer_idx), values

    def evict_for_space(self, num_coming):
        held = self.get_seq_length()
        count = min(held + num_coming - self.cache_size, held - self.start_size)
        if count > 0:
            for layer in self.layers:
                s, e = self.start_size, self.start_size + count
                layer.keys = torch.cat((layer.keys[:, :, :s], layer.keys[:, :, e:]), dim=-2)
                layer.values = torch.cat((layer.values[:, :, :s], layer.values[:, :, e:]), dim=-2)


@pytest.mark.parametrize("pin", PINS)
@pytest.mark.parametrize("family", fast_cases(FAMILY_CASES))
def test_multi_layer_streaming_logits_equal_per_step_rope_reference(family, pin):
    model = tiny_model(family, layers=3)
    ids = stream_ids(120)
    ours = stream_logits(model, enable_streaming_llm(model, 4, 28, pin=pin), ids)
    reference = stream_logits(model, PerStepRopeCache(model, 4, 28, pin), ids)
    worst = max((a - b).abs().max().item() for a, b in zip(ours, reference))
    assert worst <= TOL


@pytest.mark.parametrize("family", fast_cases(FAMILY_CASES))
def test_with_no_eviction_output_equals_a_plain_dynamic_cache(family):
    model = tiny_model(family, layers=3)
    ids = stream_ids(40)
    ours = stream_logits(model, enable_streaming_llm(model, 4, 36), ids)  # 40 tokens: full, nothing evicted
    plain = stream_logits(model, DynamicCache(config=model.config), ids)  # transformers' own sliding layers
    assert max((a - b).abs().max().item() for a, b in zip(ours, plain)) <= TOL


@pytest.mark.parametrize("start_size,recent_size", [(0, 8), (1, 7), (4, 12), (4, 28), (8, 3)])
def test_cache_never_exceeds_start_plus_recent_and_sinks_survive(start_size, recent_size):
    model = tiny_model("llama", layers=2)
    cache = enable_streaming_llm(model, start_size, recent_size)
    assert cache.cache_size == start_size + recent_size
    ids = stream_ids(70)
    with torch.no_grad():
        for t in range(70):
            cache.evict_for_space(1)
            assert cache.get_seq_length() + 1 <= cache.cache_size
            model(ids[:, t : t + 1], past_key_values=cache, position_ids=next_position_ids(cache, 1))
            held = cache.get_seq_length()
            assert held <= cache.cache_size
            assert all(layer.keys.shape[-2] == held for layer in cache.layers)
            assert cache.seen_tokens == held + cache.evicted_tokens == t + 1
            kept = cache.stream_positions
            assert kept[: min(start_size, t + 1)] == list(range(min(start_size, t + 1)))  # first tokens survive
            assert kept[min(start_size, held):] == list(range(t + 1 - (held - min(start_size, held)), t + 1))


def test_evict_for_space_in_one_block_equals_trimming_token_by_token():
    model = tiny_model("llama", layers=2)
    ids = stream_ids(60)
    one_block, stepwise = enable_streaming_llm(model, 4, 20), enable_streaming_llm(model, 4, 20)
    with torch.no_grad():
        model(ids[:, :24], past_key_values=one_block, position_ids=next_position_ids(one_block, 24))
        model(ids[:, :24], past_key_values=stepwise, position_ids=next_position_ids(stepwise, 24))
    assert one_block.evict_for_space(10) == 10
    for _ in range(10):  # the same 10 tokens, one at a time: make the cache smaller by one and trim
        stepwise.recent_size -= 1
        stepwise.cache_size -= 1
        assert stepwise.trim() == 1
    assert one_block.stream_positions == stepwise.stream_positions
    for a, b in zip(one_block.layers, stepwise.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5)
        assert torch.equal(a.values, b.values)


def test_evict_for_space_is_a_no_op_when_tokens_fit_and_trim_reaches_cache_size():
    model = tiny_model("qwen2", layers=1)
    cache = enable_streaming_llm(model, 2, 10)
    ids = stream_ids(20)
    with torch.no_grad():
        model(ids[:, :8], past_key_values=cache, position_ids=next_position_ids(cache, 8))
    assert cache.evict_for_space(4) == 0 and cache.get_seq_length() == 8
    with torch.no_grad():
        model(ids[:, 8:20], past_key_values=cache, position_ids=next_position_ids(cache, 12))
    assert cache.get_seq_length() == 20
    assert cache.trim() == 8 and cache.get_seq_length() == 12
    assert cache(None) is cache and cache.get_seq_length() == 12  # reference-style `past = kv_cache(past)`
    with pytest.raises(ValueError):
        cache.evict_for_space(-1)


def test_evict_range_removes_exactly_that_span_and_shifts_the_rest():
    model = tiny_model("gpt_neox", layers=1)
    cache = enable_streaming_llm(model, 4, 100)
    ids = stream_ids(30)
    with torch.no_grad():
        model(ids, past_key_values=cache, position_ids=next_position_ids(cache, 30))
        assert cache.evict_range(10, 18) == 8
        assert cache.stream_positions == list(range(10)) + list(range(18, 30))
        assert cache.evicted_tokens == 8 and cache.seen_tokens == 30
        # The shifted keys are exactly those of encoding the kept tokens afresh at positions 0..21.
        fresh = DynamicCache()
        model(ids[:, cache.stream_positions], past_key_values=fresh)
    assert torch.allclose(cache.layers[0].keys, fresh.layers[0].keys, atol=1e-5)
    assert cache.evict_range(0, 2) == 2  # sinks go when named explicitly
    assert cache.stream_positions[:2] == [2, 3]
    assert cache.evict_range(5, 5) == 0
    with pytest.raises(ValueError):
        cache.evict_range(3, 999)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_pos_shift_false_keeps_original_positions_and_differs_after_eviction(family):
    model = tiny_model(family, layers=2)
    ids = stream_ids(80)
    shifted = stream_logits(model, enable_streaming_llm(model, 4, 20), ids)
    unshifted_cache = enable_streaming_llm(model, 4, 20, pos_shift=False)
    unshifted = stream_logits(model, unshifted_cache, ids)
    before = max((a - b).abs().max().item() for a, b in zip(shifted[:24], unshifted[:24]))
    after = max((a - b).abs().max().item() for a, b in zip(shifted[30:], unshifted[30:]))
    assert before <= TOL  # identical until the first eviction
    assert after > 1e-2
    assert next_position_ids(unshifted_cache, 1).item() == 80  # stream position, not in-cache position


def test_counters_kv_bytes_reset_and_new():
    model = tiny_model("mistral", layers=2)
    cache = enable_streaming_llm(model, 4, 12)
    ids = stream_ids(40)
    stream_logits(model, cache, ids)
    layer = cache.layers[0]
    per_layer = 2 * layer.keys.numel() * layer.keys.element_size()
    assert cache.kv_bytes() == per_layer * len(cache.layers)
    assert (cache.seen_tokens, cache.evicted_tokens, cache.get_seq_length()) == (40, 24, 16)
    fresh = cache.new()
    assert (fresh.start_size, fresh.recent_size, fresh.get_seq_length(), fresh.seen_tokens) == (4, 12, 0, 0)
    cache.reset()
    assert (cache.get_seq_length(), cache.seen_tokens, cache.evicted_tokens, cache.kv_bytes()) == (0, 0, 0, 0)


@pytest.mark.parametrize("start_size,pin,recent_size", [(4, 9, 12), (0, 5, 8), (4, 2, 10), (1, 30, 40)])
def test_a_pinned_head_survives_any_number_of_evictions(start_size, pin, recent_size):
    model = tiny_model("llama", layers=2)
    cache = enable_streaming_llm(model, start_size, recent_size, pin=pin)
    head = max(start_size, pin)
    assert (cache.protected, cache.window) == (head, start_size + recent_size - head)
    ids = stream_ids(150)
    with torch.no_grad():
        for t in range(0, 150, 3):  # blocks of 3 and single tokens: evictions of every size
            block = 3 if t % 2 else 1
            cache.evict_for_space(block)
            model(ids[:, t : t + block], past_key_values=cache, position_ids=next_position_ids(cache, block))
            held = cache.stream_positions
            assert len(held) <= cache.cache_size
            assert held[:head] == list(range(min(head, len(held))))
    assert cache.evicted_tokens == cache.seen_tokens - cache.get_seq_length() >= 100 - cache.cache_size
    with pytest.raises(ValueError, match="pinned"):
        cache.evict_range(pin - 1, pin + 1)
    assert cache.evict_range(pin, pin + 1) == 1  # past the pinned tokens an explicit range may go (sinks too)
    assert cache.new().pinned == pin
    with pytest.raises(ValueError, match="pin must be an integer"):
        cache.pin(cache.cache_size)


def message_lengths(total: int, window: int, seed: int = 3) -> list[int]:
    """Message lengths summing to `total`: mostly shorter than `window`, one of them longer (a long paste)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(1, window // 2, (1,), generator=generator)))
        if len(lengths) == 6:
            lengths.append(window + 9)
    lengths[-1] -= sum(lengths) - total
    return lengths


@pytest.mark.parametrize("eviction", ["tokens", "turns"])
@pytest.mark.parametrize("family", fast_cases(["llama", "gpt_neox", "qwen3", "gemma3_text"]))
def test_turn_eviction_keeps_whole_messages_and_the_position_shift_exact(family, eviction):
    """Under "turns" every finished message is wholly held or wholly gone (only one longer than the window may be
    cut); under "tokens" messages are cut. Either way the logits equal a re-encoding of the kept tokens."""
    model = tiny_model(family, layers=1)
    cache = enable_streaming_llm(model, 4, 28, pin=6, eviction=eviction)
    lengths = [6] + message_lengths(194, cache.window)  # the first "message" is the pinned head
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    ids = stream_ids(200)
    worst, partial = 0.0, 0
    with torch.no_grad():
        for t in range(200):
            if t in starts:
                cache.mark_boundary()
            cache.evict_for_space(1)
            got = model(ids[:, t : t + 1], past_key_values=cache, position_ids=next_position_ids(cache, 1)).logits[0, -1]
            kept = cache.stream_positions
            want = model(ids[:, kept]).logits[0, -1]
            worst = max(worst, (got - want).abs().max().item())
            current = max(i for i, s in enumerate(starts) if s <= t)
            for i in range(current):  # finished messages
                held = sum(starts[i] <= p < starts[i] + lengths[i] for p in kept)
                if 0 < held < lengths[i]:
                    partial += 1
                    if eviction == "turns":
                        assert lengths[i] > cache.window, (i, held, lengths[i])
    assert worst <= TOL
    assert cache.stream_positions[:6] == list(range(6))
    if eviction == "tokens":
        assert partial > 0  # the paper's policy cuts messages: the assertion above can fail
    else:
        assert cache.evicted_tokens > 150


def test_unsupported_families_are_refused_with_the_supported_list():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, gpt_neox, falcon"):
        enable_streaming_llm(gpt2)
    from transformers import FalconForCausalLM

    alibi = tiny_config("falcon")
    alibi.alibi = True
    with pytest.raises(ValueError, match="ALiBi"):
        enable_streaming_llm(FalconForCausalLM(alibi))
    chunked = tiny_model("llama", layers=2)
    chunked.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match="chunked_attention"):
        enable_streaming_llm(chunked)


def test_a_cache_that_would_hide_the_sinks_from_every_local_layer_is_refused():
    model = tiny_model("mistral_sliding", layers=1)  # every layer sees its last 40 tokens only
    with pytest.raises(ValueError, match="start_size \\+ recent_size <= 40"):
        enable_streaming_llm(model, 4, 60)
    assert enable_streaming_llm(model, 4, 36).cache_size == 40
    hybrid = tiny_model("gemma2", layers=2)  # its global layers keep the sinks in view at any size
    assert enable_streaming_llm(hybrid, 4, 200).cache_size == 204


def test_a_cache_past_the_switch_of_length_dependent_rope_is_refused():
    from transformers import Phi3Config

    from streaming_engine.families import check_cache_size

    config = Phi3Config(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=8192, original_max_position_embeddings=2048, rope_parameters={
                            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                            "long_factor": [4.0] * 8, "original_max_position_embeddings": 2048})
    check_cache_size(config, 2048)
    with pytest.raises(ValueError, match="longrope RoPE changes frequencies past 2048"):
        check_cache_size(config, 2049)


@pytest.mark.parametrize("kwargs,match", [
    (dict(start_size=-1, recent_size=4), "start_size"),
    (dict(start_size=4, recent_size=0), "recent_size"),
    (dict(start_size=2.5, recent_size=4), "start_size"),
])
def test_bad_sizes_are_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        StartRecentKVCache(**kwargs, pos_shift=False)


def test_pos_shift_needs_the_model_rotary_module():
    with pytest.raises(ValueError, match="enable_streaming_llm"):
        StartRecentKVCache(4, 8)


@pytest.mark.model
def test_default_model_answers_the_capital_of_france(default_model):
    model, tokenizer = default_model
    cache = enable_streaming_llm(model, 4, 2000)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), past_key_values=cache, position_ids=next_position_ids(cache, len(ids))).logits
        for _ in range(20):
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            reply.append(token)
            cache.evict_for_space(1)
            logits = model(torch.tensor([[token]]), past_key_values=cache, position_ids=next_position_ids(cache, 1)).logits
    assert "Paris" in tokenizer.decode(reply)
