"""The static-step benchmark (benchmarks/gpu_decode.py) runs end to end on CPU and records every path
with its provenance; option errors end the run before anything is written."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks import gpu_decode
from benchmarks.runinfo import PROVENANCE_KEY


@pytest.mark.slow
def test_a_short_cpu_run_records_every_path_and_row_count(tmp_path):
    out = tmp_path / "static.json"
    argv = ["--device", "cpu", "--threads", "1", "--shapes", "tiny", "--rows", "1,2", "--tokens", "3",
            "--warmup", "1", "--repeats", "1", "--prompt", "10", "--recent-size", "12", "--output", str(out)]
    assert gpu_decode.main(argv) == 0
    result = json.loads(out.read_text())
    assert {(r["rows"], r["path"]) for r in result["runs"]} == {(n, p) for n in (1, 2) for p in gpu_decode.DEFAULT_PATHS}
    assert all(r["median_tok_s"] > 0 for r in result["runs"])
    assert result[PROVENANCE_KEY]["config"]["threads"] == 1
    assert next(r for r in result["runs"] if r["path"] == "static")["cuda_graphs_captured"] == []  # CPU: none


def test_a_prompt_that_fills_the_cache_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        gpu_decode.main(["--device", "cpu", "--shapes", "tiny", "--prompt", "300", "--output", str(tmp_path / "x")])
    assert caught.value.code == 2 and "--prompt" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("device, asked, mode", [("cuda", "auto", "reduce-overhead"), ("cpu", "auto", "default"),
                                                 ("cpu", "reduce-overhead", "reduce-overhead")])
def test_the_compile_mode_auto_means_reduce_overhead_on_cuda_only(device, asked, mode):
    assert gpu_decode.compile_mode(argparse.Namespace(device=device, compile_mode=asked)) == mode


def test_the_static_step_traced_by_torch_compile_gives_the_plain_steps_logits():
    """What the static-compile path compiles: dynamo traces `StaticDecodeStep.run` (here with its eager backend,
    which builds nothing; inductor is the benchmark's, minutes on a CPU) and the logits are the plain step's."""
    from conftest import tiny_model

    from streaming_engine.batch_cache import ConversationCache
    from streaming_engine.generation import forward
    from streaming_engine.hf_integration import enable_streaming_llm
    from streaming_engine.static_step import StaticDecodeStep, StaticSinkCache

    model = tiny_model("llama", layers=2)
    logits = {}
    for name in ("plain", "compiled"):
        cache = StaticSinkCache(max_batch=2, capacity=16)
        for k in range(2):
            conv = ConversationCache(enable_streaming_llm(model, 4, 12))
            forward(model, conv.solo, list(range(3 + k, 9 + 2 * k)))
            cache.join(conv)
        step = (gpu_decode.compiled_step(model, cache, None, backend="eager") if name == "compiled"
                else StaticDecodeStep(model, cache))
        logits[name] = [step([5, 7]).clone() for _ in range(3)]
    for plain, compiled in zip(logits["plain"], logits["compiled"]):
        torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-5)


def test_the_overlapped_path_runs_and_counts_the_steps_it_launched_ahead(tmp_path):
    out = tmp_path / "overlap.json"
    argv = ["--device", "cpu", "--threads", "1", "--shapes", "tiny", "--rows", "2", "--paths", "static-overlap",
            "--tokens", "12", "--warmup", "1", "--repeats", "1", "--prompt", "10", "--recent-size", "12",
            "--output", str(out)]
    assert gpu_decode.main(argv) == 0
    (run,) = json.loads(out.read_text())["runs"]
    # 13 steps past a full 16-token cache: the steps where no row is full were launched ahead and used.
    assert run["path"] == "static-overlap" and run["median_tok_s"] > 0 and run["steps_taken_ahead"] >= 1


@pytest.mark.parametrize("shape, published", [("smollm2-135m", 134.5e6), ("llama-1b", 1.236e9), ("llama-8b", 8.03e9)])
def test_each_real_shape_has_its_models_published_parameter_count(shape, published):
    """The shapes stand in for real models: built on the meta device (no memory), each has that model's size."""
    model = gpu_decode.build_model(shape, "meta", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("rows", [1, 4])
def test_the_bytes_a_step_reads_are_the_weights_once_plus_the_held_keys_and_values(tied, rows):
    """The roofline's numerator, against a count made by hand from the config."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    every = sum(p.numel() for p in model.parameters()) * 2  # bf16: 2 bytes
    expected_weights = every if tied else every - 100 * 16 * 2 + rows * 16 * 2
    need = gpu_decode.step_bytes(model, rows, columns=10)
    assert need == {"weight_bytes": expected_weights, "kv_bytes": rows * 2 * 2 * 2 * 10 * 4 * 2}


def test_the_latency_summary_splits_evicting_steps_from_the_others():
    timings = [{"steps_s": [0.010, 0.010, 0.030, 0.012], "evicted": [False, False, True, False]},
               {"steps_s": [0.011, 0.034], "evicted": [False, True]}]
    out = gpu_decode.latency_summary(timings)
    assert (out["evicting_steps"], out["other_steps"]) == (2, 4)
    # Nearest rank (benchmarks.stats.percentile): others are 10, 10, 11, 12; evicting 30, 34; all six together.
    assert out["evicting_ms_p50"] == pytest.approx(30.0) and out["other_ms_p50"] == pytest.approx(10.0)
    assert out["other_ms_p95"] == pytest.approx(12.0)
    assert out["eviction_cost_of_p95"] == pytest.approx((30.0 - 10.0) / 12.0)
    assert out["itl_ms_p50"] == pytest.approx(11.0) and out["itl_ms_p95"] == pytest.approx(34.0)
    none = gpu_decode.latency_summary([{"steps_s": [0.01], "evicted": [False]}])
    assert none["evicting_steps"] == 0 and none["eviction_cost_of_p95"] is None


def test_every_timed_step_of_a_run_is_kept_and_the_engine_block_sets_how_often_rows_evict(tmp_path):
    """One row, a 4+28 cache holding the 30-token prompt, one warm-up step (31 held): the first timed step fills
    the cache, and from the second on each step must make room. With the engine's block (28 here: at most the
    window) the second step evicts 28 tokens and the 30th does again: 2 evicting steps of 40. Per-token eviction
    (block 1) evicts on the 39 steps from the second on."""
    for block, expected in ((None, 2), (1, 39)):
        out = tmp_path / f"b{block}.json"
        argv = ["--device", "cpu", "--threads", "1", "--shapes", "tiny", "--rows", "1", "--paths", "static", "eager",
                "--tokens", "40", "--warmup", "1", "--repeats", "1", "--prompt", "30", "--recent-size", "28",
                "--output", str(out)] + ([] if block is None else ["--evict-block", str(block)])
        assert gpu_decode.main(argv) == 0
        result = json.loads(out.read_text())
        assert result["complete"] is True and result["evict_block"] == (block or 28)
        for run in result["runs"]:
            assert run["evicting_steps"] + run["other_steps"] == 40
            assert run["evicting_steps"] == expected, (block, run["path"])
            assert 0 < run["roofline_share"] and run["itl_ms_p95"] >= run["itl_ms_p50"] > 0


def test_transformers_static_cache_path_runs_and_says_whether_it_was_compiled(tmp_path):
    """hf-static is transformers' own static cache; on CPU transformers leaves it uncompiled (and says so), and
    forced to compile (dynamo's eager backend: tracing, no kernels) it still decodes every timed step."""
    from transformers import CompileConfig

    out = tmp_path / "hf.json"
    argv = ["--device", "cpu", "--threads", "1", "--shapes", "tiny", "--rows", "2", "--paths", "static", "hf-static",
            "--tokens", "4", "--warmup", "1", "--repeats", "1", "--prompt", "10", "--recent-size", "12",
            "--output", str(out)]
    assert gpu_decode.main(argv) == 0
    runs = {r["path"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["hf-static"]["hf_compiled"] is False and runs["hf-static"]["compile_s"] is None
    assert runs["static"]["ratio_to_hf_static"] > 0 and runs["hf-static"]["other_steps"] == 4

    model = gpu_decode.build_model("tiny", "cpu", torch.float32)
    forced = CompileConfig(backend="eager")
    forced._compile_all_devices = True  # transformers' own switch for compiling off CUDA, meant for tests
    args = argparse.Namespace(device="cpu", prompt=10, warmup=2, tokens=4)
    state: dict = {}
    timing = gpu_decode.run_hf_static(model, args, 1, torch.Generator().manual_seed(0), state, compile_config=forced)
    assert state["hf_compiled"] is True and state["compile_s"] > 0 and len(timing["steps_s"]) == 4


def test_a_run_stopped_after_a_shape_keeps_what_it_measured(tmp_path, monkeypatch):
    """The GPU check runs each part under a timeout: the JSON is written after every shape, marked incomplete."""
    out = tmp_path / "partial.json"
    built = gpu_decode.build_model

    def build(shape, device, dtype):
        if shape == "smollm2-135m":
            raise RuntimeError("stopped here")  # as a timeout would stop the second shape
        return built(shape, device, dtype)

    monkeypatch.setattr(gpu_decode, "build_model", build)
    argv = ["--device", "cpu", "--threads", "1", "--shapes", "tiny", "smollm2-135m", "--rows", "1", "--paths",
            "static", "--tokens", "2", "--warmup", "1", "--repeats", "1", "--prompt", "10", "--recent-size", "12",
            "--output", str(out)]
    with pytest.raises(SystemExit):
        gpu_decode.main(argv)
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and [r["shape"] for r in partial["runs"]] == ["tiny"]
    assert PROVENANCE_KEY in partial
