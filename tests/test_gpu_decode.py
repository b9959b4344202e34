"""The static-step benchmark (benchmarks/gpu_decode.py) runs end to end on CPU and records every path
with its provenance; option errors end the run before anything is written."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_decode
from benchmarks.runinfo import PROVENANCE_KEY


@pytest.mark.slow
def test_a_short_cpu_run_records_every_path_and_row_count(tmp_path):
    out = tmp_path / "static.json"
    argv = ["--device", "cpu", "--threads", "1", "--shapes", "tiny", "--rows", "1,2", "--tokens", "3",
            "--warmup", "1", "--repeats", "1", "--prompt", "10", "--recent-size", "12", "--output", str(out)]
    assert gpu_decode.main(argv) == 0
    result = json.loads(out.read_text())
    assert {(r["rows"], r["path"]) for r in result["runs"]} == {(n, p) for n in (1, 2) for p in gpu_decode.PATHS}
    assert all(r["median_tok_s"] > 0 for r in result["runs"])
    assert result[PROVENANCE_KEY]["config"]["threads"] == 1
    assert next(r for r in result["runs"] if r["path"] == "static")["cuda_graphs_captured"] == []  # CPU: none


def test_a_prompt_that_fills_the_cache_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        gpu_decode.main(["--device", "cpu", "--shapes", "tiny", "--prompt", "300", "--output", str(tmp_path / "x")])
    assert caught.value.code == 2 and "--prompt" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
