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
