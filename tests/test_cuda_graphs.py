"""CUDA graphs over the static step (streaming_engine/cuda_graphs.py): the setting is validated where it enters,
"on" without CUDA is a typed error, and (on a GPU, `cuda` mark) a replayed graph equals the eager static step."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_model
from test_sampled_graphs import FALCON_LIST_INDEX
from test_static_step import STATIC_FAMILIES

from streaming_engine.batch_cache import ConversationCache
from streaming_engine.cache import StartRecentKVCache
from streaming_engine.cuda_graphs import (
    CUDA_GRAPHS_UNAVAILABLE,
    CudaGraphsUnavailable,
    GraphedDecodeStep,
    StaticStepConfig,
)
from streaming_engine.families import find_rotary_embedding
from streaming_engine.generation import forward
from streaming_engine.static_step import StaticDecodeStep, StaticSinkCache

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (scripts/gpu_check.sh runs it on one)")
CAPACITY = 20


@pytest.mark.parametrize("bad", ["yes", "", None, "ON"])
def test_an_unknown_cuda_graphs_mode_is_refused(bad):
    with pytest.raises(ValueError, match="cuda_graphs must be one of auto, on, off"):
        StaticStepConfig(cuda_graphs=bad)


@pytest.mark.parametrize("warmup", [0, -1, True, 1.5])
def test_warmup_must_be_a_positive_integer(warmup):
    with pytest.raises(ValueError, match="warmup"):
        StaticStepConfig(warmup=warmup)


@pytest.mark.skipif(CUDA, reason="checks the refusal without CUDA")
def test_on_without_cuda_is_a_typed_error():
    with pytest.raises(CudaGraphsUnavailable) as caught:
        StaticStepConfig(cuda_graphs="on")
    assert caught.value.code == CUDA_GRAPHS_UNAVAILABLE


@pytest.mark.parametrize("mode, device, expected", [("auto", "cpu", False), ("off", "cpu", False),
                                                    ("off", "cuda", False), ("auto", "cuda", True)])
def test_auto_captures_only_on_cuda(mode, device, expected):
    assert StaticStepConfig(cuda_graphs=mode).captures_on(torch.device(device)) is expected


def build(device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", layers=2), attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype).eval()


def twin_runs(model, graphed_config: StaticStepConfig, steps: int, rows: int = 3):
    """The same conversations decoded by a plain static step and by a graphed one (greedy, tokens chosen by the
    plain run); returns (worst logit difference, tokens plain, tokens graphed, the graphed step)."""
    rotary = find_rotary_embedding(model)

    def conversations():
        convs = [ConversationCache(StartRecentKVCache(4, 12 + 2 * i, rotary_emb=rotary, evict_block=1 + i))
                 for i in range(rows)]
        for i, c in enumerate(convs):
            forward(model, c.solo, list(range(3, 8 + 3 * i)))
        return convs

    plain_convs, graphed_convs = conversations(), conversations()
    plain_cache, graphed_cache = StaticSinkCache(4, CAPACITY), StaticSinkCache(4, CAPACITY)
    plain = StaticDecodeStep(model, plain_cache)
    graphed = GraphedDecodeStep(StaticDecodeStep(model, graphed_cache), graphed_config)
    tokens = [[5 + i] for i in range(rows)]
    graphed_tokens = [[5 + i] for i in range(rows)]
    worst = 0.0
    for step in range(steps):
        live = rows if step < steps // 2 else 1 + step % rows  # rows leave and come back: buckets change
        for convs, cache in ((plain_convs, plain_cache), (graphed_convs, graphed_cache)):
            for i, c in enumerate(convs):
                if i < live and not c.attached:
                    cache.join(c)
                if i >= live and c.attached:
                    cache.leave(c)
                if c.attached:
                    c.evict_for_space(1)
        order = [plain_convs.index(c) for c in plain_cache.rows]
        a = plain([tokens[i][-1] for i in order])
        b = graphed([graphed_tokens[graphed_convs.index(c)][-1] for c in graphed_cache.rows])
        worst = max(worst, (a.float() - b.float()).abs().max().item())
        for b_row, i in enumerate(order):
            tokens[i].append(int(a[b_row].argmax()))
        for b_row, c in enumerate(graphed_cache.rows):
            graphed_tokens[graphed_convs.index(c)].append(int(b[b_row].argmax()))
    return worst, tokens, graphed_tokens, graphed


def test_graphs_off_is_the_eager_static_step():
    worst, tokens, graphed_tokens, graphed = twin_runs(build("cpu", torch.float32), StaticStepConfig("off"), 30)
    assert worst == 0.0 and tokens == graphed_tokens and graphed.captured == []


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_graph_replay_equals_the_eager_static_step(dtype, tolerance):
    worst, _, _, graphed = twin_runs(build("cuda", dtype), StaticStepConfig("on"), 60)
    assert worst <= tolerance
    assert graphed.captured == [1, 2, 4]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("family", STATIC_FAMILIES)
def test_every_static_family_replays_as_it_runs_or_says_why_it_runs_uncaptured(family):
    """Each family the static step serves, captured on the GPU: replay equals the uncaptured step (fp32). A family
    whose forward pass cannot be recorded runs uncaptured instead, with the reason kept; only Falcon on releases
    whose Falcon indexes with a Python list is expected to (test_sampled_graphs.FALCON_LIST_INDEX)."""
    model = tiny_model(family, layers=2).to("cuda")
    worst, tokens, graphed_tokens, graphed = twin_runs(model, StaticStepConfig("on"), 12)
    assert worst <= 1e-4 and tokens == graphed_tokens
    if graphed.graphs_off is not None:
        assert family == "falcon" and FALCON_LIST_INDEX, graphed.graphs_off
    else:
        assert graphed.captured == [1, 2, 4]


@pytest.mark.cuda
@needs_cuda
def test_greedy_replies_equal_across_fifty_replays_with_evictions():
    _, tokens, graphed_tokens, graphed = twin_runs(build("cuda", torch.float32), StaticStepConfig("on"), 50)
    assert tokens == graphed_tokens
    assert graphed.enabled
