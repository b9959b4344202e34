"""Every result JSON records, written by the script itself, the command, settings and machine that produced it."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
import torch

from benchmarks import capacity, runinfo

PROG = "python -m benchmarks.bench"


def test_run_metadata_holds_command_config_machine_date_and_git():
    args = argparse.Namespace(tokens=8, output=Path("/tmp/x.json"), sizes=(1, 2), flags={"b", "a"})
    meta = runinfo.run_metadata(args, ["--tokens", "8"], PROG)
    assert set(meta) == {"command", "config", "machine", "date", "git"}
    assert meta["config"] == {"tokens": 8, "output": "/tmp/x.json", "sizes": [1, 2], "flags": ["a", "b"]}
    json.dumps(meta)  # plain JSON throughout
    machine = meta["machine"]
    for key in ("cpu", "cpu_flags", "cores", "torch_threads", "gpus", "python", "versions"):
        assert key in machine
    assert machine["versions"]["torch"] is not None and machine["cores"] >= 1


@pytest.mark.parametrize("argv", [[], ["--text", "a file with spaces.txt", "--tokens", "8"],
                                  ["--x", "it's \"quoted\"", "--empty", "", "--unicode", "é ü"]])
def test_command_round_trips_argv(argv):
    command = runinfo.run_metadata(argparse.Namespace(), argv, PROG)["command"]
    assert shlex.split(command) == shlex.split(PROG) + argv


def test_machine_detection_does_not_need_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runinfo.machine()["gpus"] == []

    def broken():
        raise RuntimeError("no driver")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    assert runinfo.machine()["gpus"] == []


def test_provenance_never_replaces_a_result_field():
    with pytest.raises(ValueError, match="provenance"):
        runinfo.with_provenance({runinfo.PROVENANCE_KEY: 1}, {})


def test_capacity_json_carries_the_provenance_the_script_wrote(tmp_path):
    output = tmp_path / "cap.json"
    argv = ["--model", "1b", "--sizes", "4+1020", "--memory", "24GiB", "--output", str(output)]
    assert capacity.main(argv) == 0
    result = json.loads(output.read_text())
    assert result["rows"]  # the numbers keep their keys
    run = result[runinfo.PROVENANCE_KEY]
    assert shlex.split(run["command"]) == ["python", "-m", "benchmarks.capacity", *argv]
    assert run["config"]["sizes"] == "4+1020" and run["config"]["output"] == str(output)
    assert run["machine"]["cores"] and run["machine"]["cpu_flags"] is not None


def test_every_benchmark_entry_point_records_its_provenance_through_runinfo():
    """A script with a `main` writes its result with `runinfo` (directly or through `cli.run_cli`), so no JSON in
    assets/eval/ can come from a script that described its machine by hand (evict_bench once did)."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    scripts = [p for p in sorted(folder.glob("*.py")) if "def main(" in p.read_text()]
    assert len(scripts) >= 10
    for path in scripts:
        source = path.read_text()
        assert any(name in source for name in ("write_result", "run_cli", "write_outputs", "run_metadata")), path.name
        assert "def machine(" not in source, f"{path.name} describes its machine itself: use runinfo.machine"
