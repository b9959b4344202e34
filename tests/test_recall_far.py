"""The far-recall benchmark (`benchmarks/recall_far.py`): its plan of where facts go, what dense is spared, and one whole
run on a tiny random model (its answers are noise; the distances, skips, costs and provenance are not)."""

from __future__ import annotations

import json
import random

import pytest
from browser_util import save_model

from benchmarks import recall_far
from benchmarks.runinfo import PROVENANCE_KEY


def test_far_plan_plants_the_farthest_fact_first_and_asks_the_nearest_first():
    distances = [1000, 2000, 4000, 8000, 10000]
    plan = recall_far.far_plan(distances)
    assert sorted(d for d, _ in plan) == distances
    assert plan[0] == (10000, 0) and [d for d, _ in plan] == sorted(distances, reverse=True)
    offsets = [offset for _, offset in plan]
    assert offsets == sorted(offsets) and offsets[0] == 0
    # Where each question is meant to start: questions nearest first, one question turn apart, after every fact.
    asks = {d: offset + recall_far.FACT_TURN_TOKENS + d for d, offset in plan[1:]}
    asks[10000] = 10000
    order = [asks[d] for d in sorted(distances)]
    assert order == sorted(order) and min(order) > max(offsets)
    assert all(b - a == recall_far.ASK_TURN_TOKENS for a, b in zip(order, order[1:]))


def test_a_sessions_codes_never_repeat_so_a_copied_answer_cannot_score():
    rng, used = random.Random(0), set()
    codes = [recall_far.new_code(rng, used) for _ in range(3000)]
    assert len(set(codes)) == 3000 and all(len(c) == 4 for c in codes)


def test_dense_keeps_only_the_sessions_that_fit_its_context():
    system = 20
    kept, skipped = recall_far.dense_fits([1000, 2000, 8000, 10000], True, system, 8192)
    assert kept == [1000, 2000, 8000] and skipped == [10000]
    assert recall_far.session_tokens(kept, True, system) <= 8192
    assert recall_far.dense_fits([1000], True, system, 1000) == ([], [1000])
    # A near session holds every fact in turn, so its distances add up.
    kept, skipped = recall_far.dense_fits([16, 32, 256], False, system, 400)
    assert kept == [16, 32] and skipped == [256]


@pytest.mark.slow
def test_a_run_reports_the_planted_distances_the_dense_skips_both_costs_and_its_provenance(
    tmp_path, tiny_chat_model, default_tokenizer
):
    folder = save_model(tiny_chat_model, default_tokenizer, tmp_path / "tiny")
    out = tmp_path / "far.json"
    assert recall_far.main(["--model", str(folder), "--device", "cpu", "--dtype", "float32", "--start-size", "4",
                            "--recent-size", "100", "--dense-max-context", "1160", "--near-distances", "16",
                            "--far-distances", "1000,1200", "--rounds", "1", "--recall-budget", "80",
                            "--cost-pairs", "2", "--cost-tokens", "6", "--cost-gap", "200", "--no-progress",
                            "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["recall"]) == set(recall_far.METHODS)
    for method, data in result["recall"].items():
        trials = data["trials"]
        for t in trials:  # the measured distance reaches its target and the report says which one it was
            assert t["distance"] >= t["distance_target"]
        wanted = [16, 1000] + ([] if method == "dense" else [1200])
        assert sorted(t["distance_target"] for t in trials) == wanted, method
        assert {t["round"] for t in trials} == {0}
        far = [t for t in trials if t["distance_target"] >= 1000]
        if method != "dense":  # 1,000 tokens back, the fact has left every 104-token cache
            assert {t["fact_state"] for t in far} == {"gone"}, method
        # Only streaming-recall brings evicted messages back: the question's words match its fact's message.
        if method == "streaming-recall":
            assert any(t["recall_tokens"] > 0 for t in far) and any(t["fact_quoted"] for t in far)
        else:
            assert not any(t["recall_tokens"] or t["fact_quoted"] for t in trials), method
        assert data["skipped"] == ([{"round": 0, "distance_target": 1200, "reason": "does not fit dense"}]
                                   if method == "dense" else [])
    summary = result["summary"]
    assert summary["dense"]["skipped"] == 1 and summary["dense"]["facts"] == 2
    assert summary["streaming"]["recall_tokens_far_mean"] == 0 < summary["streaming-recall"]["recall_tokens_far_mean"]
    cost = result["cost"]
    assert [p["order"] for p in cost["pairs"]] == [["streaming", "streaming-recall"], ["streaming-recall", "streaming"]]
    for pair in cost["pairs"]:
        assert pair["streaming"]["recall_tokens"] == 0 < pair["streaming-recall"]["recall_tokens"]
        assert pair["decode_ratio"] > 0 and pair["ttft_ratio"] > 0
    assert cost["decode_ratio_median"] > 0 and cost["recall_tokens_mean"] > 0
    assert set(result["targets"]) >= {"own_recall_near", "recall_far_met", "decode_ratio_median", "decode_met"}
    run = result[PROVENANCE_KEY]
    assert run["command"].startswith("python -m benchmarks.recall_far ") and "--cost-pairs 2" in run["command"]
    assert run["config"]["recall_budget"] == 80 and run["machine"]["cores"]
    assert (tmp_path / "far.png").stat().st_size > 0


def test_bad_options_are_refused_before_a_model_is_loaded(capsys):
    for argv, words in ((["--near-distances", "16,1000"], "below 1000"), (["--far-distances", "500"], ">= 1000"),
                        (["--methods", "streaming,bogus"], "comma list"),
                        (["--near-distances", "", "--far-distances", "", "--cost-pairs", "0"], "nothing to measure")):
        with pytest.raises(SystemExit):
            recall_far.main(["--model", "/nonexistent", *argv])
        assert words in capsys.readouterr().err


def _part(tmp_path, name, recall, cost=None, **config):
    base = {"model": "m", "start_size": 4, "recent_size": 124, "dense_max_context": 8192, "recall_budget": 96,
            "device": "cpu", "dtype": "bfloat16", "cache_size": 128, "max_positions": 8192,
            "near_distances": [0], "far_distances": [1000]}
    payload = {"config": {**base, **config}, "recall": recall, PROVENANCE_KEY: {"command": name}}
    if cost:
        payload["cost"] = cost
    (tmp_path / name).write_text(json.dumps(payload))
    return str(tmp_path / name)


def _trials(*rows):
    return {"trials": [{"distance_target": t, "distance": d, "recalled": ok, "fact_quoted": q, "recall_tokens": n}
                       for t, d, ok, q, n in rows], "skipped": []}


def test_combined_runs_pool_each_method_over_its_seeds_and_keep_the_cost_probe_and_every_runs_provenance(tmp_path):
    plain = _part(tmp_path, "a.json", {"streaming": _trials((0, 9, True, False, 0), (1000, 1010, False, False, 0))})
    recalled = _part(tmp_path, "b.json", {"streaming-recall": _trials((0, 9, True, False, 0),
                                                                      (1000, 1020, True, True, 40))},
                     far_distances=[1000, 8300])
    cost = {"pairs": [], "decode_ratio_median": 0.95}
    probe = _part(tmp_path, "c.json", {"streaming": {"trials": [], "skipped": []},
                                      "streaming-recall": {"trials": [], "skipped": []}}, cost=cost)
    merged = recall_far.combine([plain, recalled, probe])
    assert list(merged["recall"]) == ["streaming", "streaming-recall"] and merged["cost"] == cost
    assert merged["config"]["far_distances"] == [1000, 8300] and list(merged["parts"]) == [plain, recalled, probe]
    assert merged["parts"][probe] == {"command": "c.json"}
    # The own recall pools the methods without recall; the far recall is streaming-recall's.
    assert merged["targets"]["own_recall_near"] == 1.0 and merged["targets"]["recall_far_with_recall"] == 1.0
    assert merged["targets"]["recall_far_met"] is True and merged["targets"]["decode_met"] is True
    with pytest.raises(ValueError, match="recent_size"):
        recall_far.combine([plain, _part(tmp_path, "d.json", {"dense": _trials()}, recent_size=252)])
    with pytest.raises(ValueError, match="more than one"):
        recall_far.combine([plain, plain])
    again = _part(tmp_path, "e.json", {"streaming": _trials((0, 8, False, False, 0))}, seed=1)
    pooled = recall_far.combine([plain, again])["recall"]["streaming"]
    assert [t["seed"] for t in pooled["trials"]] == [None, None, 1] and pooled["by_distance"] == {"0": 0.5, "1000": 0.0}
