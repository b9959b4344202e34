"""The time-to-first-token benchmark (benchmarks/ttft.py): every simultaneous arrival is timed in both
modes and recorded with its provenance; `padded_prefill` off gives every fresh prompt a pass of its own, with the
same logits as the shared padded pass."""

from __future__ import annotations

import json

import torch

from streaming_engine.backends import hf
from benchmarks import ttft
from benchmarks.runinfo import PROVENANCE_KEY


def test_a_short_run_times_every_arrival_in_both_modes(tmp_path, monkeypatch, tiny_chat_model, default_tokenizer):
    monkeypatch.setattr(ttft.cli, "load_model", lambda args: (tiny_chat_model, default_tokenizer))
    out = tmp_path / "ttft.json"
    assert ttft.main(["--device", "cpu", "--threads", "1", "--arrivals", "1,3", "--repeats", "2",
                      "--prompt-tokens", "12", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = {(r["arrivals"], r["mode"]): r for r in result["runs"]}
    assert set(runs) == {(n, mode) for n in (1, 3) for mode in ttft.MODES}
    for (n, _), run in runs.items():
        assert [len(rep) for rep in run["ttft_s"]] == [n, n]  # every chat of every repeat got its first token
        assert 0 < run["median_ttft_s"] <= run["p95_ttft_s"]
    assert result["prompt_tokens"] >= 12 and result[PROVENANCE_KEY]["config"]["arrivals"] == "1,3"
    assert out.with_suffix(".png").exists()


def test_without_the_padded_prefill_fresh_prompts_go_alone_with_the_same_logits(tiny_chat_model, monkeypatch):
    calls = []
    padded = hf.forward_padded
    monkeypatch.setattr(hf, "forward_padded", lambda model, rows: calls.append(len(rows)) or padded(model, rows))
    logits = {}
    for shared in (True, False):
        backend = hf.TransformersBackend(tiny_chat_model)
        backend.padded_prefill = shared
        rows = [(backend.new_cache(4, 60), list(range(10, 10 + n))) for n in (5, 9)]
        logits[shared] = backend.forward(rows)
        assert calls == [2]  # one shared pass of both rows, and none once it is off
    for with_padding, alone in zip(logits[True], logits[False]):
        torch.testing.assert_close(with_padding, alone, rtol=1e-4, atol=1e-4)
