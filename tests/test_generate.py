"""`model.generate()` with the attention-sink cache: it evicts as it goes with exact position shift (the text equals
the engine's greedy reply), never grows silently, and refuses what it cannot do with an error naming the way."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import VOCAB, fast_cases, tiny_model
from streaming_engine import (
    EngineConfig,
    StartRecentKVCache,
    StreamingEngine,
    enable_streaming_llm,
    stream_forward,
)
from streaming_engine.families import find_rotary_embedding


def random_ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, cache, new_tokens, **kwargs):
    with warnings.catch_warnings():  # the literal call uses `past_key_values=`, deprecated in 5.24
        warnings.simplefilter("ignore", FutureWarning)
        return model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0, **kwargs)


def greedy_loop(model, cache, ids: torch.Tensor, new_tokens: int, chunk: int | None = None) -> list[int]:
    """The library's hand-written loop: `stream_forward` makes room and places every pass."""
    chunk = chunk or ids.shape[1]
    for begin in range(0, ids.shape[1], chunk):
        logits = stream_forward(model, cache, ids[:, begin : begin + chunk]).logits[0, -1]
    out = []
    for _ in range(new_tokens):
        out.append(int(logits.argmax()))
        if len(out) < new_tokens:
            logits = stream_forward(model, cache, torch.tensor([[out[-1]]])).logits[0, -1]
    return out


@pytest.mark.parametrize("family", fast_cases(["llama", "gpt_neox", "gemma3_text", "smollm3"]))
@pytest.mark.parametrize("prompt_len,new_tokens", [(10, 70), pytest.param(30, 120, marks=pytest.mark.slow)])
def test_generate_longer_than_the_cache_evicts_as_it_goes_and_equals_the_hand_loop(family, prompt_len, new_tokens):
    model = tiny_model(family, layers=3)
    ids = random_ids(prompt_len)
    cache = enable_streaming_llm(model, 4, 28)
    out = generate(model, ids, cache, new_tokens)
    assert out.shape[1] == prompt_len + new_tokens
    assert cache.get_seq_length() == cache.cache_size  # full, never more
    assert cache.seen_tokens == prompt_len + new_tokens - 1  # generate does not feed its last token
    assert cache.evicted_tokens == cache.seen_tokens - cache.cache_size
    assert out[0, prompt_len:].tolist() == greedy_loop(model, enable_streaming_llm(model, 4, 28), ids, new_tokens)


def test_generate_text_equals_the_engines_greedy_reply(tiny_chat_model, default_tokenizer):
    model, tokenizer = tiny_chat_model, default_tokenizer
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=4, recent_size=60, prefill_chunk_size=16))
    sid = engine.new_session("streaming")
    events = list(engine.chat(sid, "Tell me a long story.", temperature=0, repetition_penalty=1.0,
                              max_new_tokens=150))
    assert events[-1].kind == "done" and engine.stats(sid)["evicted_tokens"] > 0
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a long story."}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    cache = enable_streaming_llm(model, 4, 60, evict_block=engine.config.evict_block)  # the engine's block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=150, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text == events[-1].text
    assert cache.get_seq_length() <= 64 and cache.evicted_tokens > 0
    engine.close(sid)


@pytest.mark.model
def test_default_model_generate_equals_the_engines_greedy_reply(default_model):
    model, tokenizer = default_model
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=4, recent_size=60, prefill_chunk_size=32))
    sid = engine.new_session("streaming")
    message = "Write a long poem about the sea, the wind and the stars."
    events = list(engine.chat(sid, message, temperature=0, repetition_penalty=1.0, max_new_tokens=110))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    cache = enable_streaming_llm(model, 4, 60, evict_block=engine.config.evict_block)  # the engine's block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=110, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == events[-1].text
    assert cache.evicted_tokens > 0 and cache.get_seq_length() <= 64
    engine.close(sid)


def test_generate_continues_a_cache_from_the_full_sequence():
    model = tiny_model("qwen3", layers=2)
    first, second = random_ids(12, seed=2), random_ids(9, seed=3)
    cache = enable_streaming_llm(model, 4, 28)
    out1 = generate(model, first, cache, 50)
    assert cache.evicted_tokens > 0
    out2 = generate(model, torch.cat((out1, second), dim=1), cache, 30)  # transformers' convention: the full sequence
    reference = enable_streaming_llm(model, 4, 28)
    want1 = greedy_loop(model, reference, first, 50)
    want2 = greedy_loop(model, reference, torch.cat((torch.tensor([want1[-1:]]), second), dim=1), 30)
    assert out1[0, 12:].tolist() == want1
    assert out2[0, out1.shape[1] + 9:].tolist() == want2
    assert cache.get_seq_length() == 32


def test_a_prompt_longer_than_the_window_needs_prefill_chunks_and_then_matches_the_chunked_loop():
    model = tiny_model("llama", layers=2)
    ids = random_ids(50)
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        generate(model, ids, enable_streaming_llm(model, 4, 28), 10)
    cache = enable_streaming_llm(model, 4, 28)
    out = generate(model, ids, cache, 20, prefill_chunk_size=14)
    assert out[0, 50:].tolist() == greedy_loop(model, enable_streaming_llm(model, 4, 28), ids, 20, chunk=14)
    assert cache.get_seq_length() == 32


def test_padding_and_rollback_are_refused_with_the_supported_way():
    model = tiny_model("llama", layers=1)
    ids = random_ids(8).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="one unpadded prompt at a time"):
        generate(model, ids, enable_streaming_llm(model, 4, 28), 5, attention_mask=mask)
    with pytest.raises(NotImplementedError, match="plain greedy or sampled generate"):
        enable_streaming_llm(model, 4, 28).crop(-1)


def test_a_cache_the_model_was_not_prepared_for_refuses_instead_of_growing():
    model = tiny_model("llama", layers=1)  # no enable_streaming_llm: no hook on this model
    cache = StartRecentKVCache(4, 28, rotary_emb=find_rotary_embedding(model))
    with pytest.raises(RuntimeError, match="enable_streaming_llm"):
        generate(model, random_ids(10), cache, 40)
    assert cache.get_seq_length() == 0


def test_unpadded_batches_and_sampling_work_and_stay_bounded():
    model = tiny_model("phi3", layers=2)
    cache = enable_streaming_llm(model, 4, 20)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(random_ids(6).repeat(3, 1), past_key_values=cache, max_new_tokens=40, do_sample=True,
                             top_k=0, eos_token_id=None, pad_token_id=0)
    assert out.shape == (3, 46)
    assert all(layer.keys.shape[0] == 3 and layer.keys.shape[-2] == 24 for layer in cache.layers)


def test_the_library_loop_raises_no_deprecation_warning():
    model = tiny_model("llama", layers=1)
    cache = enable_streaming_llm(model, 4, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy_loop(model, cache, random_ids(10), 20)
    assert cache.get_seq_length() == 16 and cache.evicted_tokens == 10 + 19 - 16
