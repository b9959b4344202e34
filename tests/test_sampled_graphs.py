"""The draw recorded behind the static step (`cuda_graphs.GraphedDecodeStep.sampled`): replaying the forward pass
and the sampler's draw as one graph changes no reply.

CUDA graphs themselves need a GPU (the `cuda` tests, run by scripts/gpu_check.sh), so most of this runs on the CPU
with `EagerRecorder`, the recorder contract without CUDA: warm-up runs, then fixed output tensors that each replay
refreshes in place. That exercises everything around capture: one graph per bucket and draw mode, padded rows that
draw too, the sampler's state put back after warm-ups, the draw record an overlapped step takes back, and the
fallback when a draw cannot be recorded. What a real capture adds (no host reads, no host values frozen into the
graph) is checked op by op, on every family the static step serves."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from conftest import fast_cases, tiny_model
from packaging.version import Version
from test_batching import GREEDY, make_engine, run_together
from test_static_step import STATIC_FAMILIES
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from streaming_engine import cuda_graphs
from streaming_engine.batch_cache import ConversationCache
from streaming_engine.cache import StartRecentKVCache
from streaming_engine.cuda_graphs import GraphedDecodeStep, StaticStepConfig
from streaming_engine.device_sampling import DeviceSampler, SampledDecodeStep
from streaming_engine.families import find_rotary_embedding
from streaming_engine.generation import RowSampling, forward
from streaming_engine.sampling import SamplingParams
from streaming_engine.static_step import StaticDecodeStep, StaticSinkCache

#: aten ops a CUDA graph cannot hold: each reads a device value back to the host (a sync, refused while a stream
#: captures) or has an output shape that depends on the data.
HOST_READS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero",
                        "masked_select", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
                        "repeat_interleave"})
#: aten ops that bring a host tensor in (`torch.tensor(...)`, `x[i] = python_value`): recorded, its value is frozen
#: into the graph and a replay would not see the next step's.
HOST_VALUES = frozenset({"lift_fresh", "lift_fresh_copy"})
#: Whether this transformers release's Falcon slices its fused qkv with `[..., [-2], :]` (through 5.24).
FALCON_LIST_INDEX = Version(transformers.__version__).release < (5, 25)
#: Draw modes (penalized, random) and the settings of the rows that give them.
MODES = {(False, False): None, (True, False): SamplingParams(temperature=0.0, repetition_penalty=1.3),
         (False, True): SamplingParams(temperature=0.8, top_k=7, top_p=0.9, repetition_penalty=1.0, seed=3),
         (True, True): SamplingParams(temperature=0.7, top_k=0, top_p=0.8, repetition_penalty=1.2, seed=4)}


class EagerRecorder:
    """`cuda_graphs.CudaGraphRecorder`'s contract on any device: `warmup` runs of the body, then its outputs as
    fixed tensors that every `replay()` refreshes in place (the body runs again, its results copied in)."""

    def __init__(self):
        self.recorded, self.replays = [], 0

    def __call__(self, body, warmup):
        for _ in range(warmup):
            body()
        outputs = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, body())
        self.recorded.append(outputs)

        def replay():
            self.replays += 1
            for fixed, fresh in zip(tree_leaves(outputs), tree_leaves(body())):
                if isinstance(fixed, torch.Tensor):
                    fixed.copy_(fresh)

        return replay, outputs


class OpNames(TorchDispatchMode):
    """The aten ops run inside the mode, by name."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def graphs_on_the_cpu(monkeypatch) -> list[EagerRecorder]:
    """Every GraphedDecodeStep made from here on with graphs "auto" "captures" on the CPU, through an
    EagerRecorder (returned)."""
    recorders = []

    def recorder():
        recorders.append(EagerRecorder())
        return recorders[-1]

    monkeypatch.setattr(StaticStepConfig, "captures_on", lambda self, device: self.cuda_graphs != "off")
    monkeypatch.setattr(cuda_graphs, "CudaGraphRecorder", recorder)
    return recorders


def static_rows(model, rows: int = 3, capacity: int = 16):
    rotary = find_rotary_embedding(model)
    convs = [ConversationCache(StartRecentKVCache(4, 10 + i, rotary_emb=rotary, evict_block=1 + i))
             for i in range(rows)]
    for i, conv in enumerate(convs):
        forward(model, conv.solo, list(range(3, 7 + 2 * i)))
    batch = StaticSinkCache(max_batch=4, capacity=capacity)
    for conv in convs:
        batch.join(conv)
    return batch, convs


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("family", fast_cases(STATIC_FAMILIES))
def test_the_recorded_body_never_reads_back_to_the_host_nor_freezes_a_host_value(family, attention, request):
    """The forward pass and each draw mode, as `GraphedDecodeStep` records them, 3 live rows in a bucket of 4."""
    if family == "falcon" and FALCON_LIST_INDEX:
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "transformers < 5.25 indexes Falcon's fused qkv with a Python list (a host tensor copied in each step):"
            " its capture fails on CUDA and the step runs uncaptured (test_a_forward_pass_that_cannot_be_recorded"
            "_turns_graphs_off_in_one_logged_line)")))
    model = tiny_model(family)
    model.config._attn_implementation = attention
    batch, _ = static_rows(model)
    step = StaticDecodeStep(model, batch)
    sampler = DeviceSampler(batch.rows_allocated)
    for (penalized, random), params in MODES.items():
        for row in range(3):
            sampler.set_row(row, params, history=[5, 6, 7])
        assert sampler.mode(3) == (penalized, random)
        with torch.inference_mode():
            bucket = step.prepare([8, 9, 10])
            sampler.ready(step.vocab, penalized)
            ops = OpNames()
            with ops:
                logits = step.run(bucket)
                ids, _ = sampler.draw(logits, penalized, random)
            step.finish()
        assert ids.shape == (bucket,) and len(ops.names) > 20
        bad = sorted(set(ops.names) & (HOST_READS | HOST_VALUES))
        assert not bad, f"{family}/{attention}, mode {(penalized, random)}: {bad}"


def test_the_op_check_sees_a_host_read_and_a_host_value():
    """The check above can fail: `.item()` and `x[i] = value` are caught."""
    ops = OpNames()
    x = torch.zeros(3)
    with ops:
        x[1] = 2.0
        x.sum().item()
    assert {"lift_fresh", "_local_scalar_dense"} <= set(ops.names)


def mixed_plans(sampled: bool) -> dict:
    """Four chats of different lengths (joins, leaves, a bucket of 4 holding 3 rows) whose replies outgrow the
    window (evictions); sampled: every draw mode among them, seeded."""
    plans = {}
    for u in range(4):
        settings = dict(GREEDY, max_new_tokens=6 + 9 * u)
        if sampled:
            settings.update(temperature=0.5 + 0.2 * u * (u % 2), top_p=0.9, top_k=10 * u,
                            repetition_penalty=1.0 + 0.2 * (u < 2), seed=50 + u)
        plans[f"user{u}"] = [(f"User {u} asks question {t} " + "and more words " * (u * 2), settings)
                             for t in range(2)]
    return plans


def replies(engine, plans) -> dict:
    sids = {user: engine.new_session() for user in plans}
    results = run_together(engine, {user: (sids[user], turns) for user, turns in plans.items()})
    return {user: [(e.text, e.finish_reason, e.stats["evicted_tokens"]) for e in events]
            for user, events in results.items()}


@pytest.mark.parametrize("overlap", ["off", "on"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_replayed_draws_give_the_replies_of_draws_outside_the_graphs(tiny_chat_model, default_tokenizer,
                                                                    monkeypatch, overlap, sampled):
    config = dict(decode_step="static", overlap=overlap, recent_size=24, prefill_chunk_size=16)
    plans = mixed_plans(sampled)
    plain = replies(make_engine(tiny_chat_model, default_tokenizer, cuda_graphs="off", **config), plans)
    recorders = graphs_on_the_cpu(monkeypatch)
    engine = make_engine(tiny_chat_model, default_tokenizer, cuda_graphs="auto", **config)
    graphed = engine.scheduler.batch.static_step.step
    assert replies(engine, plans) == plain
    assert graphed.sampling_outside is None
    modes = {key[1:] for key in graphed.captured_sampled}
    assert modes >= ({(True, True), (False, True)} if sampled else {(False, False)})
    assert {key[0] for key in graphed.captured_sampled} >= {1, 2, 4}  # and so padded rows drew (3 rows in 4)
    assert recorders[0].replays > 3 * len(recorders[0].recorded)  # recorded once, replayed many times


def test_a_draw_that_cannot_be_recorded_stays_outside_the_graphs_in_one_logged_line(
        tiny_chat_model, default_tokenizer, monkeypatch, caplog):
    config = dict(decode_step="static", overlap="off", recent_size=24, prefill_chunk_size=16)
    plans = mixed_plans(sampled=True)
    plain = replies(make_engine(tiny_chat_model, default_tokenizer, cuda_graphs="off", **config), plans)
    graphs_on_the_cpu(monkeypatch)
    engine = make_engine(tiny_chat_model, default_tokenizer, cuda_graphs="auto", **config)
    graphed = engine.scheduler.batch.static_step.step
    recorder = graphed.recorder

    def refuse_draws(body, warmup):
        outputs = body()
        if isinstance(outputs, tuple):  # (logits, ids, draw record): a body that draws
            raise RuntimeError("operation not permitted when stream is capturing")
        return recorder(body, warmup)

    graphed.recorder = refuse_draws
    with caplog.at_level(logging.WARNING, logger="streaming_engine.cuda_graphs"):
        assert replies(engine, plans) == plain
    assert graphed.sampling_outside == "RuntimeError: operation not permitted when stream is capturing"
    assert graphed.captured_sampled == [] and graphed.captured  # the forward pass is still replayed
    lines = [r for r in caplog.records if "sampling stays outside" in r.getMessage()]
    assert len(lines) == 1


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_a_forward_pass_that_cannot_be_recorded_turns_graphs_off_in_one_logged_line(
        tiny_chat_model, default_tokenizer, monkeypatch, caplog, overlap):
    """As with an op that syncs with the host mid-step: the step goes on uncaptured, replies unchanged, and the
    decode path (footer, /metrics) stops saying "graphs"."""
    import app

    config = dict(decode_step="static", overlap=overlap, recent_size=24, prefill_chunk_size=16)
    plans = mixed_plans(sampled=True)
    plain = replies(make_engine(tiny_chat_model, default_tokenizer, cuda_graphs="off", **config), plans)
    graphs_on_the_cpu(monkeypatch)
    engine = make_engine(tiny_chat_model, default_tokenizer, cuda_graphs="auto", **config)
    graphed = engine.scheduler.batch.static_step.step
    assert "graphs" in engine.decode_path
    refused = []

    def refuse(body, warmup):
        body()
        refused.append(warmup)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    graphed.recorder = refuse
    with caplog.at_level(logging.WARNING, logger="streaming_engine.cuda_graphs"):
        assert replies(engine, plans) == plain
    assert len(refused) == 1 and not graphed.enabled and graphed.captured == []
    assert graphed.graphs_off == "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    assert graphed.sampling_outside is None  # put down to the forward pass, not the draw
    assert engine.decode_path == ("static+overlap" if overlap == "on" else "static")
    assert f"decode {engine.decode_path}" in app.status_line(engine, "tiny").split(" · ")
    lines = [r for r in caplog.records if "without CUDA graphs" in r.getMessage()]
    assert len(lines) == 1


def sampler_state(sampler) -> dict:
    return {name: getattr(sampler, name).clone() for name in ("step", "ring", "written", "stand_in", "counts")}


def test_recording_a_draw_and_taking_back_its_replay_leave_the_sampler_as_before(monkeypatch):
    """Warm-up runs draw for real: after recording, the rows' counters, windows and counts are as before; a
    replayed draw taken back (`retract`, as an overlapped step does) restores them too."""
    graphs_on_the_cpu(monkeypatch)
    model = tiny_model("llama")
    batch, _ = static_rows(model)
    graphed = GraphedDecodeStep(StaticDecodeStep(model, batch), StaticStepConfig("auto", warmup=3))
    sampler = DeviceSampler(batch.rows_allocated, window=4)
    for row, params in enumerate([MODES[(True, True)], MODES[(True, False)], None]):
        sampler.set_row(row, params, history=[5, 6, 7, 8, 9][row:])
    sampler.ready(graphed.step.vocab, sampler.mode(3)[0])
    before = sampler_state(sampler)
    logits, ids, drawn = graphed.launch_sampled([8, 9, 10], sampler)
    graphed.step.abort()
    assert graphed.captured_sampled == [(4, True, True)] and drawn == 4
    sampler.retract()
    for name, kept in before.items():
        assert torch.equal(getattr(sampler, name), kept), name
    # The same draw again, now a replay of the recorded graph: the same tokens, and again taken back exactly.
    again, ids_again, _ = graphed.launch_sampled([8, 9, 10], sampler)
    graphed.step.abort()
    assert torch.equal(ids_again, ids) and torch.equal(again, logits)
    sampler.retract()
    for name, kept in before.items():
        assert torch.equal(getattr(sampler, name), kept), name


def padded_row_draws(monkeypatch, graphs: bool) -> list[int]:
    """A turn `S` holds row 3 of a bucket of 4, leaves (its row is padding for one step of three rows), then comes
    back into row 3 with the same `RowSampling` (as a row that stepped out for a cut-in does). Returns the draws
    of S's two steps."""
    if graphs:
        graphs_on_the_cpu(monkeypatch)
    model = tiny_model("llama")
    batch, convs = static_rows(model, rows=4)
    graphed = GraphedDecodeStep(StaticDecodeStep(model, batch), StaticStepConfig("auto" if graphs else "off"))
    step = SampledDecodeStep(graphed, rows=batch.rows_allocated, device="cpu")
    hot = SamplingParams(temperature=5.0, top_k=0, top_p=1.0, repetition_penalty=1.3)
    turns = [RowSampling(hot, [5, 6, 7, u], seed=20 + u) for u in range(4)]
    drawn_by_s = []

    def decode(rows: int) -> list[int]:
        _, ids = step.decode([11 + u for u in range(rows)], turns[:rows])
        for turn, token in zip(turns, ids):  # what generate_reply keeps up to date
            turn.recent_ids.append(token)
            turn.drawn += 1
        return ids

    drawn_by_s.append(decode(4)[3])
    batch.leave(convs[3])
    decode(3)  # graphed: the bucket of 4 replays, and row 3 draws as padding
    batch.join(convs[3])
    drawn_by_s.append(decode(4)[3])
    return drawn_by_s


def test_a_padded_row_that_drew_is_set_again_before_a_turn_uses_it(monkeypatch):
    """The turn that comes back to a row the padded draws advanced draws what it draws where no padded row ever
    drew (graphs off: a draw of three rows leaves row 3 alone)."""
    assert padded_row_draws(monkeypatch, graphs=True) == padded_row_draws(monkeypatch, graphs=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it on one)")
@pytest.mark.parametrize("overlap", ["off", "on"])
def test_on_cuda_draws_replayed_in_the_graphs_give_the_eager_draws_replies(cuda_chat_model, default_tokenizer,
                                                                          overlap):
    config = dict(decode_step="static", overlap=overlap, recent_size=24, prefill_chunk_size=16)
    plans = mixed_plans(sampled=True)
    plain = replies(make_engine(cuda_chat_model, default_tokenizer, cuda_graphs="off", **config), plans)
    engine = make_engine(cuda_chat_model, default_tokenizer, cuda_graphs="on", **config)
    assert replies(engine, plans) == plain
    graphed = engine.scheduler.batch.static_step.step
    assert graphed.sampling_outside is None and graphed.captured_sampled
