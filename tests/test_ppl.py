"""Perplexity over long streams (`benchmarks.ppl`): batched rows, blocks, the JSONL log, resume, summary.

Tiny random models with a short position limit stand in for the real one, so evictions and the dense stop happen
within a few dozen tokens. No timing is asserted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, fast_cases, tiny_model

from benchmarks import ppl, texts
from benchmarks.methods import MethodSpec, make_runner, parse_specs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LIMIT = 64  # the tiny models' positions: dense stops there, the bounded methods stream past it


def stream(rows: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=2, max_positions=LIMIT)


def flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def evaluate(model, data, methods: str, tmp_path, name: str, plot: bool = False, **plan) -> tuple[dict, list[dict]]:
    plan = ppl.Plan(**{"rows": data.shape[0], "tokens": data.shape[1], **plan})
    out = tmp_path / f"{name}.json"
    summary = ppl.run(model, data, parse_specs(methods), plan, out, progress=False, plot=plot)
    return summary, ppl.read_log(out.with_suffix(".jsonl"))


METHODS = "streaming:2+14,streaming-noshift:2+14,window:16,dense"


@pytest.mark.parametrize("family", fast_cases(["llama", "gpt_neox"]))
@pytest.mark.parametrize("block", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_batched_rows_equal_batch_one_rows_including_evictions(family, block, tmp_path):
    model = tiny_model(family, layers=2, max_positions=LIMIT, seed=2)
    data = stream(3, 90, seed=1)
    methods = METHODS + (",recompute:16" if block == 1 else "")
    _, batched = evaluate(model, data, methods, tmp_path, "batched", blocks=(block,))
    for r in range(3):
        _, alone = evaluate(model, data[r : r + 1], methods, tmp_path, f"row{r}", blocks=(block,))
        for spec in parse_specs(methods):
            together = ppl.nll_rows(batched, spec.label)[r]
            single = ppl.nll_rows(alone, spec.label)[0]
            expected = LIMIT if spec.name == "dense" else 89
            assert len(together) == len(single) == expected, spec.label
            assert together == pytest.approx(single, abs=1e-4), spec.label


def test_block_one_is_the_per_token_protocol(llama, tmp_path):
    """`--block 1` gives what the one-token-per-step runners give (the paper's evaluation loop)."""
    data = stream(1, 70, seed=3)
    _, log = evaluate(llama, data, "streaming:2+14,window:16", tmp_path, "b1", blocks=(1,))
    ids = data[0].tolist()
    for method, label in (("streaming", "streaming 2+14"), ("window", "window 16")):
        runner = make_runner(method, llama, 2, 14) if method == "streaming" else make_runner(method, llama, 0, 16)
        expected = [float(-torch.log_softmax(runner.step(ids[t]), -1)[ids[t + 1]]) for t in range(len(ids) - 1)]
        assert ppl.nll_rows(log, label)[0] == pytest.approx(expected, abs=1e-4), label


def test_a_larger_block_changes_only_evicting_methods(llama, tmp_path):
    data = stream(2, 80, seed=4)
    summary, log = evaluate(llama, data, "streaming:2+14,dense", tmp_path, "blocks", blocks=(1, 8))
    assert list(summary["runs"]) == ["streaming 2+14, block 1", "streaming 2+14, block 8", "dense, block 1",
                                     "dense, block 8"]
    one, eight = (ppl.nll_rows(log, f"dense, block {b}") for b in (1, 8))
    assert flat(eight) == pytest.approx(flat(one), abs=1e-4)  # dense attention is exact with any block
    one, eight = (ppl.nll_rows(log, f"streaming 2+14, block {b}") for b in (1, 8))
    assert eight[0][:16] == pytest.approx(one[0][:16], abs=1e-4)  # nothing evicted yet
    assert max(abs(a - b) for a, b in zip(one[0][16:], eight[0][16:])) > 1e-3  # fewer window tokens seen


@pytest.mark.parametrize("block", [1, 4])
def test_a_stopped_and_resumed_run_logs_exactly_what_an_uninterrupted_run_logs(llama, block, tmp_path):
    data = stream(2, 75, seed=5)
    specs = parse_specs("streaming:2+14,dense" + (",recompute:16" if block == 1 else ",window:16"))
    plan = ppl.Plan(rows=2, tokens=75, blocks=(block,), segment=30, memory_every=10, checkpoint_every_s=0)
    whole = tmp_path / "whole.json"
    ppl.run(llama, data, specs, plan, whole, progress=False, plot=False)
    calls = {"n": 0}

    def stop_now_and_then():
        calls["n"] += 1
        return calls["n"] % 13 == 0

    parts = tmp_path / "parts.json"
    summary = ppl.run(llama, data, specs, plan, parts, progress=False, should_stop=stop_now_and_then, plot=False)
    stops = 0
    while not summary["complete"]:
        stops += 1
        assert Path(str(parts.with_suffix(".ckpt.safetensors"))).exists()
        summary = ppl.run(llama, data, specs, plan, parts, resume=True, progress=False,
                          should_stop=stop_now_and_then, plot=False)
    assert stops >= 3
    expected = ppl.comparable(ppl.read_log(whole.with_suffix(".jsonl")))
    assert ppl.comparable(ppl.read_log(parts.with_suffix(".jsonl"))) == expected
    assert not parts.with_suffix(".ckpt.safetensors").exists()  # removed once every run is done


def test_resume_after_a_kill_drops_what_came_after_the_checkpoint(llama, tmp_path):
    """A killed process leaves log lines past its last checkpoint and maybe half a line: resume discards both."""
    data = stream(2, 60, seed=6)
    specs = parse_specs("streaming:2+14,window:16")
    plan = ppl.Plan(rows=2, tokens=60, blocks=(3,), segment=20, memory_every=10, checkpoint_every_s=3600)
    whole = tmp_path / "whole.json"
    ppl.run(llama, data, specs, plan, whole, progress=False, plot=False)
    killed = tmp_path / "killed.json"
    calls = {"n": 0}

    def stop_at_seven():
        calls["n"] += 1
        return calls["n"] == 7

    ppl.run(llama, data, specs, plan, killed, progress=False, should_stop=stop_at_seven, plot=False)
    log_path = killed.with_suffix(".jsonl")
    records = ppl.read_log(log_path)
    with open(log_path, "a", encoding="utf-8") as f:  # what the process wrote after its checkpoint, then died
        for rec in records[-3:]:
            f.write(json.dumps(rec) + "\n")
        f.write('{"type": "block", "run": "streaming 2+14", "sta')
    summary = ppl.run(llama, data, specs, plan, killed, resume=True, progress=False, plot=False)
    assert summary["complete"]
    assert ppl.comparable(ppl.read_log(log_path)) == ppl.comparable(ppl.read_log(whole.with_suffix(".jsonl")))


def test_resume_refuses_a_log_written_with_other_settings(llama, tmp_path):
    out = tmp_path / "r.json"
    specs = parse_specs("streaming:2+14")
    ppl.run(llama, stream(1, 30), specs, ppl.Plan(rows=1, tokens=30, blocks=(4,)), out, progress=False, plot=False)
    with pytest.raises(ValueError, match="other settings.*tokens"):
        ppl.run(llama, stream(1, 31), specs, ppl.Plan(rows=1, tokens=31, blocks=(4,)), out, resume=True,
                progress=False, plot=False)
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        ppl.run(llama, stream(1, 30), specs, ppl.Plan(rows=1, tokens=30, blocks=(4,)), out, progress=False, plot=False)
    summary = ppl.run(llama, stream(1, 30), specs, ppl.Plan(rows=1, tokens=30, blocks=(4,)), out, overwrite=True,
                      progress=False, plot=False)
    assert summary["complete"]


def test_summary_fields_are_finite_memory_is_flat_and_plots_are_written(llama, tmp_path, capsys):
    data = stream(2, 150, seed=7)
    summary, log = evaluate(llama, data, METHODS, tmp_path, "s", plot=True, blocks=(4,), segment=40,
                            memory_every=20)
    assert summary["complete"]
    runs = summary["runs"]
    for label, r in runs.items():
        for key in ("ppl", "ppl_within_limit", "tokens_per_s", "ms_per_token", "seconds"):
            assert math.isfinite(r[key]) and r[key] > 0, (label, key)
        assert all(math.isfinite(x) and x > 0 for x in r["ppl_per_row"]) and len(r["ppl_per_row"]) == 2
        assert all(math.isfinite(s["ppl"]) and s["ms_per_token"] > 0 for s in r["segments"])
        assert all(math.isfinite(y) for y in r["curve_log"]["nll"] + r["curve_linear"]["nll"])
        assert r["curve_log"]["index"] == sorted(r["curve_log"]["index"])
        assert [m["tokens"] // 20 for m in r["memory"]] == list(range(1, len(r["memory"]) + 1))
        assert all(m["rss_bytes"] > 0 and m["kv_bytes"] > 0 for m in r["memory"])
    for rec in log:  # every number in the log is finite
        if rec["type"] == "block":
            assert all(math.isfinite(x) for row in rec["nll"] for x in row)
    dense, streaming = runs["dense"], runs["streaming 2+14"]
    assert dense["predictions"] == LIMIT and dense["stopped_at"] == "position limit"
    assert dense["ppl_past_limit"] is None and dense["segments"][-1]["end"] == LIMIT
    assert streaming["predictions"] == 149 and streaming["stopped_at"] is None
    assert math.isfinite(streaming["ppl_past_limit"])
    # Bounded caches: the same KV bytes once full, for any length; dense grows with every token it holds.
    full = [m["kv_bytes"] for m in streaming["memory"] if m["tokens"] >= 16]
    assert len(set(full)) == 1 and max(m["held"] for m in streaming["memory"]) == 16
    assert dense["memory"][-1]["kv_bytes"] == 3 * dense["memory"][0]["kv_bytes"]  # 60 tokens held against 20
    assert ppl.summarize(log) == summary  # the summary is a function of the log alone
    for name in ("s.png", "s_memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    table = ppl.format_table(summary)
    assert "| 1–40 |" in table and "(stops: positions)" in table and "| streaming 2+14 |" in table
    assert math.isfinite(streaming["ppl_after_fill"]) and dense["ppl_after_fill"] is None
    json.dumps(summary, allow_nan=False)


def test_rows_are_spread_over_the_text_and_must_fit():
    ids = list(range(1000))
    rows = ppl.make_rows(ids, 3, 300)
    assert rows.shape == (3, 300) and rows[:, 0].tolist() == [0, 333, 666]
    with pytest.raises(ValueError, match="at most 2 rows"):
        ppl.make_rows(ids, 4, 400)


def test_method_specs_parse_and_refuse_nonsense():
    assert parse_specs("streaming:4+1020, window:1024,dense,streaming:4+1020") == [
        MethodSpec("streaming", 4, 1020), MethodSpec("window", 0, 1024), MethodSpec("dense")]
    assert parse_specs("streaming,window,recompute", 4, 252) == [
        MethodSpec("streaming", 4, 252), MethodSpec("window", 0, 256), MethodSpec("recompute", 0, 256)]
    assert MethodSpec.parse("streaming-noshift:8+120").label == "streaming-noshift 8+120"
    for bad, message in [("streaming:4+x", "bad method"), ("paged:4+4", "unknown method"),
                         ("window:4+12", "keeps no attention sinks"), ("dense:12", "takes no cache size"),
                         ("streaming:4+0", "recent_size >= 1"), (" , ", "comma list")]:
        with pytest.raises(ValueError, match=message):
            parse_specs(bad)


def test_caches_larger_than_the_model_and_blocked_recompute_are_refused(llama, tmp_path):
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        ppl.run(llama, stream(1, 20), parse_specs("streaming:4+124"), ppl.Plan(rows=1, tokens=20),
                tmp_path / "x.json", progress=False)
    with pytest.raises(ValueError, match="--block 1"):
        ppl.plan_runs(parse_specs("recompute:16"), (1, 8))


@pytest.mark.parametrize("argv,message", [
    (["--methods", "dense,nope"], "unknown method"),
    (["--block", "0"], "--block takes positive integers"),
    (["--block", "8,x"], "--block takes a comma list"),
    (["--rows", "0"], "--rows must be >= 1"),
    (["--tokens", "1"], "--tokens must be >= 2"),
    (["--methods", "recompute:256", "--block", "32"], "--block 1"),
    (["--text", "/no/such/file.txt"], "does not exist"),
])
def test_ppl_cli_rejects_bad_arguments_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ppl.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_report_needs_a_log(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ppl.main(["--report", "--output", str(tmp_path / "none.json")])
    assert exit_info.value.code == 2 and "not a perplexity log" in capsys.readouterr().err


def test_several_text_files_are_concatenated_and_austen_is_all_six_novels(tmp_path, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first", encoding="utf-8")
    b.write_text("second", encoding="utf-8")
    assert texts.load_texts([str(a), str(b)]) == ("first\n\nsecond", f"{a}, {b}")
    folder = tmp_path / "austen"
    folder.mkdir()
    for key in texts.AUSTEN_BOOKS:
        (folder / f"{key}.txt").write_text(key, encoding="utf-8")
    monkeypatch.setattr(texts, "fetch_austen", lambda: folder)
    text, source = texts.load_texts(None, "austen")
    assert text.split("\n\n") == list(texts.AUSTEN_BOOKS) and "six novels" in source


@pytest.mark.model
def test_ppl_cli_runs_resumes_and_reports_on_the_default_model(default_model, tmp_path, capsys):
    text_file = tmp_path / "text.txt"
    text_file.write_text(" ".join(f"Sentence number {i} of a long and patient stream." for i in range(60)),
                         encoding="utf-8")
    out = tmp_path / "out" / "ppl.json"
    argv = ["--text", str(text_file), "--rows", "2", "--tokens", "48", "--block", "8", "--segment", "16",
            "--memory-every", "8", "--methods", "streaming:4+12,window:16,dense", "--dtype", "float32",
            "--output", str(out)]
    assert ppl.main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["complete"] and summary["config"]["rows"] == 2 and summary["config"]["dtype"] == "float32"
    assert list(summary["runs"]) == ["streaming 4+12", "window 16", "dense"]
    assert all(math.isfinite(r["ppl"]) for r in summary["runs"].values())
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert "| streaming 4+12 |" in capsys.readouterr().out
    assert ppl.main(argv + ["--resume"]) == 0  # nothing left to do: the same summary again
    assert json.loads(out.read_text())["runs"]["dense"]["ppl"] == summary["runs"]["dense"]["ppl"]
    assert ppl.main(["--report", "--output", str(out)]) == 0


def test_recompute_equals_dense_while_the_text_fits_in_the_window(llama, tmp_path):
    _, log = evaluate(llama, stream(2, 30, seed=8), "dense,recompute:32", tmp_path, "fits", blocks=(1,))
    assert flat(ppl.nll_rows(log, "recompute 32")) == pytest.approx(flat(ppl.nll_rows(log, "dense")), abs=2e-4)


def test_streaming_equals_dense_until_the_first_eviction_then_departs(llama, tmp_path):
    _, log = evaluate(llama, stream(2, 44, seed=9), "dense,streaming:4+16,window:20", tmp_path, "departs",
                      blocks=(1,))
    dense, streaming, window = (ppl.nll_rows(log, label) for label in ("dense", "streaming 4+16", "window 20"))
    for r in range(2):
        # Predictions 0..19 are made with at most 20 tokens held: nothing evicted yet.
        assert streaming[r][:20] == pytest.approx(dense[r][:20], abs=2e-4)
        assert window[r][:20] == pytest.approx(dense[r][:20], abs=2e-4)
        # Afterwards the bounded cache sees less than dense does, so predictions differ.
        assert max(abs(a - b) for a, b in zip(streaming[r][20:], dense[r][20:])) > 1e-3


def test_logs_of_different_methods_over_the_same_streams_merge(llama, tmp_path, capsys):
    data = stream(2, 40, seed=10)
    plan = ppl.Plan(rows=2, tokens=40, blocks=(4,), segment=20)
    calls = {"n": 0}

    def stop_during_the_second_run():
        calls["n"] += 1
        return calls["n"] == 12

    # a: streaming, then stopped early into window (which b runs in full); b: window and dense.
    ppl.run(llama, data, parse_specs("streaming:2+14,window:16"), plan, tmp_path / "a.json", progress=False,
            plot=False, should_stop=stop_during_the_second_run)
    ppl.run(llama, data, parse_specs("window:16,dense"), plan, tmp_path / "b.json", progress=False, plot=False)
    partial = json.loads((tmp_path / "a.json").read_text())["runs"]["window 16"]
    assert not partial["complete"] and partial["predictions"] == 8  # two blocks of window
    out = tmp_path / "merged.json"
    assert ppl.main(["--report", "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                     "--output", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert list(merged["runs"]) == ["streaming 2+14", "window 16", "dense"] and merged["complete"]
    assert [r["label"] for r in merged["config"]["runs"]] == list(merged["runs"])
    assert merged["runs"]["window 16"] == json.loads((tmp_path / "b.json").read_text())["runs"]["window 16"]
    assert (tmp_path / "merged.png").exists()
    ppl.run(llama, stream(2, 40, seed=11), parse_specs("dense"), plan, tmp_path / "other.json", progress=False,
            plot=False)
    with pytest.raises(SystemExit):
        ppl.main(["--report", "--merge", str(tmp_path / "a.json"), str(tmp_path / "other.json"),
                  "--output", str(out)])
    assert "different streams or models (tokens_sha256 differ)" in capsys.readouterr().err


def test_block_table_compares_each_method_across_blocks(llama, tmp_path):
    summary, _ = evaluate(llama, stream(2, 60, seed=12), "streaming:2+14,dense", tmp_path, "bt", blocks=(1, 4))
    table = ppl.format_block_table(summary)
    assert table.splitlines()[0] == "| method | block 1 | block 4 |"
    streaming = next(line for line in table.splitlines() if line.startswith("| streaming 2+14 |"))
    change = (summary["runs"]["streaming 2+14, block 4"]["ppl_after_fill"]
              / summary["runs"]["streaming 2+14, block 1"]["ppl_after_fill"] - 1) * 100
    assert f"({change:+.2f}%)" in streaming
    dense = next(line for line in table.splitlines() if line.startswith("| dense |"))
    assert "(+0.00%)" in dense or "(-0.00%)" in dense  # dense is exact with any block (up to rounding)
