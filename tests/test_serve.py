"""The serving benchmark, the dtype comparison and the per-machine dtype choice (tiny models; no timing asserted)."""

from __future__ import annotations

import json
import math

import numpy
import pytest
import torch
from conftest import tiny_model

from benchmarks import dtype as dtype_eval
from benchmarks import serve
from benchmarks.plots import plot_dtype, plot_serve
from streaming_engine.loading import DTYPE_ENV, default_cpu_dtype, pick_dtype

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_serve_measures_every_cell_both_schedulers_and_engine_against_generate(
    tiny_chat_model, default_tokenizer, tmp_path, monkeypatch
):
    eos = tiny_chat_model.generation_config.eos_token_id
    measured = {}  # (sessions, scheduler) -> every timed round's raw times to first token (warm-ups left out)
    run_cell = serve.run_cell

    def recording_run_cell(engine, sessions, new_tokens, seed):
        cell = run_cell(engine, sessions, new_tokens, seed)
        if new_tokens == 5:
            measured.setdefault((sessions, engine.config.scheduler), []).extend(cell["ttft_s"])
        return cell

    monkeypatch.setattr(serve, "run_cell", recording_run_cell)
    result = serve.run(tiny_chat_model, default_tokenizer, sessions=[1, 3], schedulers=list(serve.SCHEDULERS),
                       new_tokens=5, rounds=2, single_tokens=6, single_rounds=1, start_size=4, recent_size=60,
                       max_batch=4, prefill_chunk=32, detok_lengths=[20], progress=False, config={"model": "tiny"})
    assert tiny_chat_model.generation_config.eos_token_id == eos  # generate's settings are put back
    cells = {(c["sessions"], c["scheduler"]): c for c in result["cells"]}
    assert set(cells) == {(n, s) for n in (1, 3) for s in serve.SCHEDULERS}
    for cell in cells.values():
        assert cell["rounds"] == 2
        for key in ("aggregate_tok_s", "per_session_tok_s", "ttft_p50_s", "ttft_p95_s", "aggregate_vs_1_session"):
            assert math.isfinite(cell[key]) and cell[key] > 0, key
    for (sessions, scheduler), cell in cells.items():  # the percentiles against numpy's over the raw samples
        raw = measured[(sessions, scheduler)]
        assert len(raw) == 2 * sessions and all(t > 0 for t in raw)
        assert cell["ttft_p50_s"] == float(numpy.percentile(raw, 50, method="inverted_cdf"))
        assert cell["ttft_p95_s"] == float(numpy.percentile(raw, 95, method="inverted_cdf"))
    assert cells[(1, "batched")]["aggregate_vs_1_session"] == 1.0
    for name in ("engine", "generate"):
        assert result["single"][name]["decode_tok_s"] > 0 and result["single"][name]["ttft_s"] > 0
    assert result["single"]["engine_vs_generate"] > 0
    json.dumps(result)
    table = serve.format_table(result)
    assert "| 3 | batched |" in table and "engine ÷ generate" in table and "batched ÷ round-robin" in table
    assert result["detokenize"]["20"]["incremental_s"] > 0 and "| 20 |" in table
    out = tmp_path / "serve.json"
    assert plot_serve(result, out) == [str(out.with_suffix(".png"))]
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("cli,argv,message", [
    ("serve", ["--sessions", "0,2"], "--sessions needs integers >= 1"),
    ("serve", ["--sessions", "a"], "--sessions takes a comma list"),
    ("serve", ["--schedulers", "batched,fifo"], "--schedulers takes a comma list"),
    ("serve", ["--new-tokens", "1"], "--new-tokens must be >= 2"),
    ("serve", ["--max-batch", "0"], "--max-batch must be >= 1"),
    ("serve", ["--detok-tokens", "x"], "--detok-tokens takes a comma list"),
    ("dtype", ["--variants", "float32,int8"], "--variants takes a comma list"),
    ("dtype", ["--held", "0"], "--held needs integers >= 1"),
    ("dtype", ["--rounds", "0"], "--rounds must be >= 1"),
])
def test_serve_and_dtype_clis_reject_bad_arguments_clearly(cli, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        {"serve": serve, "dtype": dtype_eval}[cli].main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_dtype_comparison_reports_speed_and_perplexity_for_both_dtypes(tmp_path):
    models = {"float32": tiny_model("llama", layers=2)}
    models["bfloat16"] = tiny_model("llama", layers=2).to(torch.bfloat16)
    models["bfloat16-sdpa"] = tiny_model("llama", layers=2).to(torch.bfloat16)
    models["bfloat16-sdpa"].set_attn_implementation("sdpa")
    ids = [(7 * i) % 90 + 3 for i in range(80)]
    result = dtype_eval.run(models, ids, rounds=2, steps=2, held=[8, 20], prefill_tokens=16, stream_tokens=20,
                            progress=False, config={"model": "tiny"})
    for name, data in result["dtypes"].items():
        assert set(data["decode_ms"]) == {f"{b}x{h}" for b in (1, 8, 16) for h in (8, 20)}
        assert all(v > 0 for v in data["decode_ms"].values()) and data["prefill_tok_s"] > 0
        if name == "bfloat16-sdpa":  # same arithmetic as eager: speed only
            assert data["attention"] == "sdpa" and data["ppl_dense"] is None
        else:
            assert math.isfinite(data["ppl_dense"]) and math.isfinite(data["ppl_streaming"])
    rel = result["bf16_vs_fp32"]
    assert abs(rel["ppl_dense_change"]) < 0.05  # same weights, two precisions: close, not equal
    assert "| bf16 speed-up, PPL change |" in dtype_eval.format_table(result)
    out = tmp_path / "dtype.json"
    plot_dtype(result, out)
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16),
    ({"avx2", "avx512f", "avx512_vnni"}, torch.float32),
    (set(), torch.float32),  # unknown CPU: the safe choice
])
def test_cpu_default_dtype_is_bf16_only_with_native_bf16_units(flags, expected):
    assert default_cpu_dtype(frozenset(flags)) == expected


def test_an_explicit_dtype_beats_the_environment_which_beats_the_machine_default(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    assert pick_dtype(None, cpu) == default_cpu_dtype()
    monkeypatch.setenv(DTYPE_ENV, "fp32")
    assert pick_dtype(None, cpu) == torch.float32
    assert pick_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setenv(DTYPE_ENV, "float8")
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype(None, cpu)
