"""Capacity planning: the KV formula matches real caches of every family, and the CLI's table and measurement."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, tiny_model
from streaming_engine import SUPPORTED_FAMILIES, enable_streaming_llm
from benchmarks import capacity


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_kv_bytes_per_token_formula_equals_a_real_cache_of_every_family(family):
    model = tiny_model(family, layers=3)
    cache = enable_streaming_llm(model, 2, 20)
    with torch.no_grad():
        model(torch.arange(3, 20).unsqueeze(0), past_key_values=cache, use_cache=True)
    assert cache.kv_bytes() == 17 * capacity.kv_bytes_per_token(model.config, torch.float32)


@pytest.mark.parametrize(
    "preset, per_token_bf16, params",
    [
        ("7b", 2 * 32 * 32 * 128 * 2, 6_738_415_616),  # Llama-2-7B: 0.5 MiB per token, 6.74B parameters
        ("7b-gqa", 2 * 32 * 8 * 128 * 2, 7_241_732_096),  # Mistral-7B
        ("1b", 2 * 16 * 8 * 64 * 2, 1_235_814_400),  # Llama-3.2-1B, tied embeddings counted once
    ],
)
def test_presets_give_the_published_kv_size_and_parameter_count(preset, per_token_bf16, params):
    label, config = capacity.resolve_config(preset)
    assert capacity.kv_bytes_per_token(config, torch.bfloat16) == per_token_bf16
    assert capacity.weights_bytes(config, torch.bfloat16) == 2 * params


def test_conversations_fit_what_memory_leaves_beside_weights_and_overhead():
    assert capacity.conversations_fit(memory=100, weights=30, per_conversation=7) == 10
    assert capacity.conversations_fit(memory=100, weights=30, per_conversation=7, overhead=10) == 8
    assert capacity.conversations_fit(memory=100, weights=130, per_conversation=7) == 0


def test_table_rows_scale_with_cache_size_and_memory(tmp_path, capsys):
    output = tmp_path / "cap.json"
    argv = ["--model", "7b", "--model", "1b", "--sizes", "4+1020,4+2044", "--memory", "24GiB,80GiB",
            "--output", str(output)]
    assert capacity.main(argv) == 0
    printed = capsys.readouterr().out
    assert "7B MHA (Llama-2-7B shape) | 32 | 32 | 128 | bfloat16 | 12.55 | 512 | 512 | 1024 |" in printed
    rows = {r["model"]: r for r in json.loads(output.read_text())["rows"]}
    seven = rows["7B MHA (Llama-2-7B shape)"]
    free = 80 * 2**30 - seven["weights_bytes"]
    assert seven["conversations_fit"]["80GiB"] == {"4+1020": free // 2**29, "4+2044": free // 2**30}


def test_n_replicas_keep_n_times_the_warm_conversations_and_share_a_failed_ones_reprimes(tmp_path, capsys):
    reprime = tmp_path / "reprime.json"
    reprime.write_text(json.dumps({"cache": "4+1020", "summary": {"2048": {"median_miss_cost_s": 9.0},
                                                                  "8192": {"median_miss_cost_s": 0.5}}}))
    output = tmp_path / "cap.json"
    argv = ["--model", "1b", "--sizes", "4+1020", "--memory", "24GiB", "--replicas", "1,2,5",
            "--reprime", str(reprime), "--output", str(output)]
    assert capacity.main(argv) == 0
    result = json.loads(output.read_text())
    fit = result["rows"][0]["conversations_fit"]["24GiB"]["4+1020"]
    plan = {r["replicas"]: r for r in result["replicas"]["rows"]}
    assert result["replicas"]["miss_cost_s"] == 0.5  # the longest stored conversation's cost
    assert [plan[n]["conversations_warm"] for n in (1, 2, 5)] == [fit, 2 * fit, 5 * fit]
    assert plan[1]["reprimes_when_one_fails"] == 0 and plan[1]["reprime_s_per_survivor"] is None
    assert plan[5]["reprimes_when_one_fails"] == fit
    assert plan[5]["reprime_s_per_survivor"] == pytest.approx(fit * 0.5 / 4)
    assert "| 5 | " in capsys.readouterr().out
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"cache": "4+200", "summary": {"900": {"median_miss_cost_s": 0.1}}}))
    assert capacity.main(["--model", "1b", "--sizes", "4+1020", "--replicas", "2", "--reprime", str(other)]) == 2
    assert "measured cache 4+200, not 4+1020" in capsys.readouterr().err


def test_measure_fills_real_caches_and_agrees_with_the_formula(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("qwen2", layers=2).save_pretrained(folder)
    from benchmarks.devicemap_check import placeholder_tokenizer

    placeholder_tokenizer().save_pretrained(folder)
    output = tmp_path / "cap.json"
    argv = ["--model", str(folder), "--measure", "--conversations", "2", "--sizes", "4+60", "--memory", "1GiB",
            "--dtype", "float32", "--device", "cpu", "--output", str(output)]
    assert capacity.main(argv) == 0
    measured = json.loads(output.read_text())["measured"]
    config = tiny_config("qwen2", layers=2)
    assert measured["cache_tokens"] == 64 and measured["conversations"] == 2
    assert measured["kv_bytes_per_token_per_layer"] == measured["kv_bytes_per_token_per_layer_formula"]
    assert measured["kv_bytes_per_conversation"] == 64 * capacity.kv_bytes_per_token(config, torch.float32)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--sizes", "4x2044"], "bad cache size"),
        (["--sizes", "4+0"], "bad cache size"),
        (["--memory", "lots"], "bad memory size"),
        (["--model", "/no/such/model"], "cannot read a config"),
        (["--conversations", "1", "--model", "1b"], "--conversations must be >= 2"),
        (["--model", "1b", "--replicas", "0"], "--replicas needs integers >= 1"),
        (["--model", "1b", "--reprime", "x.json"], "give --replicas too"),
        (["--model", "1b", "--replicas", "2", "--reprime", "/no/such.json"], "not a JSON written by"),
    ],
)
def test_bad_options_are_reported(argv, match, capsys):
    assert capacity.main(argv) == 2
    assert match in capsys.readouterr().err
