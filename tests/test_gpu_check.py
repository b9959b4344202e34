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
