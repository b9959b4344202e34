"""scripts/gpu_check.sh runs once on a lent GPU, with no second try: its rehearsal (the same parts on the CPU at
toy sizes, `GPU_CHECK_REHEARSE=1`) runs here, so a broken option, part or summary shows up in `make test` first.
The real runs' options are checked too: argparse validates every occurrence of an option, the GPU sizes included,
before the toy sizes appended after them take over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.runinfo import PROVENANCE_KEY

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"single": "static_single.json", "rows": "static_rows.json", "peers": "static_peers.json",
         "compile": "static_compile.json", "ttft": "ttft_prefill.json"}


@pytest.mark.slow
@pytest.mark.model  # the ttft part loads the default model
def test_the_gpu_check_rehearsal_runs_every_part_and_summarizes_them(tmp_path):
    env = {**os.environ, "GPU_CHECK_REHEARSE": "1", "GPU_CHECK_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["rehearsal"] is True and summary["cuda_tests"]["exit_status"] == 0
    assert {name: p["result"] for name, p in summary["parts"].items()} == PARTS
    assert all(p["exit_status"] == 0 for p in summary["parts"].values())
    for name, file in PARTS.items():
        result = json.loads((tmp_path / file).read_text())
        assert "rehearsal" in result.get("machine_note", result.get("note", "")), name
        assert PROVENANCE_KEY in result
        if name != "ttft":
            assert result["complete"] is True and result["runs"], name
    peers = {r["path"] for r in json.loads((tmp_path / "static_peers.json").read_text())["runs"]}
    assert peers == {"static", "generate", "hf-static"}
    assert (tmp_path / "gpu_check_tests.xml").exists()
    from benchmarks.gpu_targets import TARGETS

    # Toy sizes hold no real shape, so the targets are listed, each unmeasured; the GPU run fills them in.
    assert [t["name"] for t in summary["targets"]] == [t.name for t in TARGETS]
    assert "not measured" in done.stdout


def test_without_cuda_and_without_rehearsal_the_check_runs_nothing(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the real check would run")
    env = {**os.environ, "GPU_CHECK_DIR": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("GPU_CHECK_REHEARSE", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3 and "no CUDA device" in done.stderr
    assert list(tmp_path.iterdir()) == []


def _part(folder: Path, name: str, runs: list[dict]) -> None:
    (folder / name).write_text(json.dumps({"runs": runs}))


def _run(shape, rows, path, **figures):
    return {"shape": shape, "rows": rows, "path": path, **figures}


def test_each_target_of_the_issue_is_read_off_the_parts_results(tmp_path):
    from benchmarks.gpu_targets import TARGETS, check

    _part(tmp_path, "static_single.json", [
        _run("smollm2-135m", 1, "static", median_tok_s=550.0, eviction_cost_of_p95=0.05),
        _run("smollm2-135m", 1, "static-overlap", median_tok_s=640.0, eviction_cost_of_p95=0.25),  # the best counts
        _run("smollm2-135m", 1, "generate", median_tok_s=900.0),  # not the static step: never counted
        _run("llama-8b", 1, "static", roofline_share=0.55, eviction_cost_of_p95=None),
    ])
    _part(tmp_path, "static_rows.json", [_run("smollm2-135m", 64, "static", median_tok_s=8100.0),
                                         _run("smollm2-135m", 64, "eager", median_tok_s=9000.0)])
    # static_peers.json missing: a part that wrote nothing
    lines = check(tmp_path)
    assert [line["name"] for line in lines] == [t.name for t in TARGETS]
    assert [line["measured"] for line in lines] == [640.0, 8100.0, 0.55, None, 0.25]
    assert [line["met"] for line in lines] == [True, True, False, None, False]


def test_the_targets_of_an_empty_folder_are_all_unmeasured(tmp_path):
    from benchmarks import gpu_targets

    checked = gpu_targets.check(tmp_path)
    assert all(line["measured"] is None and line["met"] is None for line in checked)
    assert gpu_targets.report(checked).count("not measured") == len(gpu_targets.TARGETS)
