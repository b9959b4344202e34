"""Block eviction (`evict_block`): one rule in `eviction.py` for the transformers cache, batch rows and llama.cpp;
a reply decoded past a full cache evicts once per block; what is held stays exact (a dense forward over exactly the
held tokens at in-cache positions predicts the same, token for token)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from streaming_engine import EngineConfig, StartRecentKVCache, enable_streaming_llm
from streaming_engine.batch_cache import BatchedSinkCache, ConversationCache
from streaming_engine.chat import build_parser
from streaming_engine.eviction import DEFAULT_EVICT_BLOCK, block_for, tokens_needed
from streaming_engine.families import find_rotary_embedding
from streaming_engine.generation import forward, forward_batch
from streaming_engine.llamacpp import llamacpp_available

TOL = 1e-4
BLOCKS = (1, 4, 16)
#: Two families whose keys rotate differently (full rotary; partial rotary on a quarter of each head).
FAMILIES = ("llama", "gpt_neox")
START, RECENT = 4, 28


def prompt_ids(n: int, seed: int = 1) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=generator).tolist()


@torch.no_grad()
def dense_oracle(model, ids: list[int], kept: list[int]) -> torch.Tensor:
    """Last logits of a fresh, dense forward over exactly the held tokens, at positions 0..len(kept)-1."""
    return model(torch.tensor([[ids[i] for i in kept]])).logits[0, -1]


# --- the rule ----------------------------------------------------------------------------------------------------


def test_an_eviction_makes_room_for_at_least_a_block_never_takes_the_head_and_nothing_when_tokens_fit():
    assert tokens_needed(held=20, protected=4, cache_size=32, num_coming=1, block=16) == 0  # fits: no eviction
    assert tokens_needed(held=32, protected=4, cache_size=32, num_coming=1, block=1) == 1  # the paper's rule
    assert tokens_needed(held=32, protected=4, cache_size=32, num_coming=1, block=16) == 16
    assert tokens_needed(held=32, protected=4, cache_size=32, num_coming=20, block=16) == 20  # more than a block
    assert tokens_needed(held=30, protected=4, cache_size=32, num_coming=3, block=16) == 14  # room for a block
    assert tokens_needed(held=30, protected=4, cache_size=32, num_coming=20, block=16) == 18  # a reserve: exact
    assert tokens_needed(held=33, protected=4, cache_size=32, num_coming=0, block=1) == 1  # trim: down to the size
    assert tokens_needed(held=33, protected=4, cache_size=32, num_coming=0, block=16) == 16  # room for 15 more
    assert tokens_needed(held=10, protected=4, cache_size=10, num_coming=1, block=16) == 6  # at most what follows
    assert tokens_needed(held=32, protected=30, cache_size=32, num_coming=1, block=16) == 2  # the head stays
    with pytest.raises(ValueError, match="block"):
        tokens_needed(held=32, protected=4, cache_size=32, num_coming=1, block=0)


@pytest.mark.parametrize("block", BLOCKS)
def test_decoding_past_a_full_cache_holds_between_cache_size_minus_block_and_cache_size(block):
    model = tiny_model("llama")
    cache = enable_streaming_llm(model, START, RECENT, evict_block=block)
    evictions = []
    for token in prompt_ids(120):
        evictions.append(cache.evict_for_space(1))
        forward(model, cache, [token])
        if cache.seen_tokens > START + RECENT:
            assert START + RECENT - block < cache.get_seq_length() <= START + RECENT
    assert set(evictions) == ({0, block} if block > 1 else {0, 1})
    assert sum(evictions) == cache.evicted_tokens == 120 - cache.get_seq_length()
    assert cache.stream_positions[:START] == list(range(START))


# --- exactness, transformers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_with_block_eviction_equals_a_dense_forward_over_the_held_tokens(family, block):
    model = tiny_model(family, layers=1)  # one layer: the held keys are exactly a re-encoding of the held tokens
    cache = enable_streaming_llm(model, START, RECENT, evict_block=block)
    ids = prompt_ids(20)
    cache.evict_for_space(len(ids))
    logits = forward(model, cache, ids)
    worst, mismatches = 0.0, 0
    for _ in range(80):  # a reply much longer than the free window
        token = int(logits.argmax())
        ids.append(token)
        cache.evict_for_space(1)
        logits = forward(model, cache, [token])
        want = dense_oracle(model, ids, cache.stream_positions)
        worst = max(worst, (logits - want).abs().max().item())
        mismatches += int(logits.argmax() != want.argmax())
    assert cache.evicted_tokens > 2 * block  # it really evicted, several blocks
    assert mismatches == 0 and worst <= TOL


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_rows_evict_in_the_same_blocks_and_stay_exact(family, block):
    model = tiny_model(family, layers=1)  # one layer: the held keys are exactly a re-encoding of the held tokens
    rotary = find_rotary_embedding(model)
    sizes = [(4, 20, 0), (2, 30, 9), (0, 24, 0)]  # (start, recent, pinned head): rows that evict at different steps
    rows = [ConversationCache(StartRecentKVCache(s, r, rotary_emb=rotary, pin=pin, evict_block=min(block, r - pin)))
            for s, r, pin in sizes]
    alone = [ConversationCache(StartRecentKVCache(s, r, rotary_emb=rotary, pin=pin, evict_block=min(block, r - pin)))
             for s, r, pin in sizes]
    streams = [prompt_ids(10 + 3 * i, seed=i) for i in range(len(rows))]
    batch = BatchedSinkCache(max_batch=len(rows))
    logits = []
    for row, solo, ids in zip(rows, alone, streams):
        forward(model, solo.solo, ids)
        logits.append(forward(model, row.solo, ids))
        batch.join(row)
    worst = 0.0
    for _ in range(60):
        tokens = [int(logits[row.row].argmax()) for row in rows]
        for row, solo, ids, token in zip(rows, alone, streams, tokens):
            ids.append(token)
            assert row.evict_for_space(1) == solo.evict_for_space(1)
            forward(model, solo.solo, [token])
        out = forward_batch(model, batch, [tokens[rows.index(row)] for row in batch.rows])
        logits = [out[row.row] for row in rows]
        for row, solo, ids in zip(rows, alone, streams):
            assert row.stream_positions == solo.stream_positions
            want = dense_oracle(model, ids, row.stream_positions)
            assert int(out[row.row].argmax()) == int(want.argmax())
            worst = max(worst, (out[row.row] - want).abs().max().item())
    assert worst <= TOL
    assert all(row.evicted_tokens > row.evict_block for row in rows)


def test_a_batch_row_asks_its_own_caches_policy():
    class EveryOtherToken(StartRecentKVCache):
        """A custom policy: evict twice what the rule says."""

        def eviction_count(self, num_coming, held, after_head, seen):
            return min(2 * super().eviction_count(num_coming, held, after_head, seen), held - self.protected)

    model = tiny_model("llama")
    rotary = find_rotary_embedding(model)
    row = ConversationCache(EveryOtherToken(4, 12, rotary_emb=rotary, evict_block=3))
    forward(model, row.solo, prompt_ids(16))
    batch = BatchedSinkCache(max_batch=1)
    batch.join(row)
    assert row.evict_for_space(1) == 6
    assert row.get_seq_length() == 10 and row.evicted_tokens == 6


# --- where the setting enters ------------------------------------------------------------------------------------


def test_evict_block_is_checked_once_where_it_enters_and_defaults_from_the_window():
    assert EngineConfig(recent_size=2000).evict_block == DEFAULT_EVICT_BLOCK
    assert EngineConfig(recent_size=20, prefill_chunk_size=8).evict_block == block_for(20) == 20
    assert EngineConfig(recent_size=256, evict_block=1).evict_block == 1
    for bad in (0, 257, 2.0, True, "8"):
        with pytest.raises(ValueError, match="evict_block"):
            EngineConfig(recent_size=256, evict_block=bad)
    with pytest.raises(ValueError, match="evict_block"):
        StartRecentKVCache(4, 8, pos_shift=False, evict_block=9)
    assert build_parser().parse_args(["--evict-block", "8"]).evict_block == 8
    assert build_parser().parse_args([]).evict_block is None  # EngineConfig picks the default


def test_the_engine_gives_every_streaming_session_its_block():
    from streaming_engine import StreamingEngine
    from streaming_engine.backends.hf import TransformersBackend

    model = tiny_model("llama", layers=1)
    engine = StreamingEngine.__new__(StreamingEngine)  # only `_new_cache` is exercised: no worker, no tokenizer
    engine.config = EngineConfig(recent_size=64, evict_block=16)
    engine.backend = TransformersBackend(model)
    assert engine._new_cache(4, 64).evict_block == 16
    assert engine._new_cache(4, 10).evict_block == 10  # a smaller session window: at most its window


# --- llama.cpp ---------------------------------------------------------------------------------------------------


needs_llamacpp = pytest.mark.skipif(
    not llamacpp_available(), reason="llama-cpp-python is not installed (pip install -r requirements-cpu.txt)")


@pytest.fixture(scope="module")
def llama():
    if not llamacpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install -r requirements-cpu.txt)")
    from streaming_engine import load

    return load(backend="llama.cpp", n_threads=1)


@needs_llamacpp
@pytest.mark.model
@pytest.mark.parametrize("block", BLOCKS)
def test_llamacpp_evicts_one_shift_per_block_and_keeps_what_transformers_keeps(llama, default_model, block,
                                                                               monkeypatch):
    """A dense re-encoding equals a streaming cache only for one layer (deeper keys remember evicted tokens), so
    the reference on the 30-layer default model is the transformers cache with the same block: the same tokens held
    after every step and the same greedy prediction up to the 4-bit weights (as test_llamacpp's agreement tests)."""
    model, tokenizer = llama
    hf_model, _ = default_model
    start, recent = 4, 44
    context = model.new_context(sequences=1, seq_capacity=start + recent, batch_tokens=64)
    calls = {"seq_add": 0}
    real_add = context.lc.llama_memory_seq_add

    def counting_add(*args):
        calls["seq_add"] += 1
        return real_add(*args)

    monkeypatch.setattr(context.lc, "llama_memory_seq_add", counting_add)
    try:
        cache = context.new_cache(start, recent, evict_block=block)
        hf_cache = enable_streaming_llm(hf_model, start, recent, evict_block=block)
        text = "The lighthouse keeper climbed the stairs every evening to light the lamp, and"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for c in (cache, hf_cache):
            c.evict_for_space(len(ids))
        logits = context.forward([(cache, ids)])[0]
        forward(hf_model, hf_cache, ids)
        evictions, agree, steps = 0, 0, 60
        for _ in range(steps):  # past the free window several times over
            token = int(logits.argmax())
            evicted = cache.evict_for_space(1)
            assert hf_cache.evict_for_space(1) == evicted
            evictions += evicted > 0
            logits = context.forward([(cache, [token])])[0]
            hf_logits = forward(hf_model, hf_cache, [token])
            assert cache.stream_positions == hf_cache.stream_positions
            agree += int(logits.argmax()) == int(hf_logits.argmax())
        assert cache.evicted_tokens >= 2 * block
        assert calls["seq_add"] == evictions  # one seq_add per eviction block, not one per token
        assert agree >= 0.9 * steps
    finally:
        context.close()
