"""The issue's GPU targets (issue 24) read off the GPU check's results: one line per target with what was measured.

Job: `scripts/gpu_check.sh` writes one JSON per part (`benchmarks.gpu_decode`); `check(folder)` reads them and
gives each target of the issue's benchmark its measured value and whether it was met, so the GPU run's summary
(`gpu_check.json`) says at once where the engine stands, and `report` prints it at the end of the run. The
targets were stated for an H200; the summary records the GPU that ran. Boundary: reads results only; it measures
nothing and never fails a run (a missing part or cell is `measured: None`, `met: None`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

#: The static step's paths: the engine on CUDA runs one of them (graphs, with overlap by default).
STATIC_PATHS = ("static", "static-overlap")


@dataclass(frozen=True)
class Target:
    """One target: `at_least` or `at_most` `bound` on a figure read from part `source`."""

    name: str
    source: str  # a part's JSON file name
    bound: float
    at_least: bool = True


#: The issue's targets ("Targets on an H200"), in its order.
TARGETS = (
    Target("SmolLM2-135M, one conversation, tok/s", "static_single.json", 600),
    Target("SmolLM2-135M, 64 conversations, aggregate tok/s", "static_rows.json", 8000),
    Target("Llama-3.1-8B shape, one conversation, share of roofline", "static_single.json", 0.60),
    Target("Llama-3.1-8B shape, one conversation, x transformers' static cache + compile", "static_peers.json", 1.0),
    Target("evicting, extra step time as a share of p95 (worst static cell)", "static_single.json", 0.20,
           at_least=False),
)


def _runs(folder: Path, name: str) -> list[dict]:
    try:
        return json.loads((folder / name).read_text(encoding="utf-8")).get("runs", [])
    except (OSError, ValueError):
        return []


def _best(runs: list[dict], shape: str, rows: int, key: str) -> float | None:
    values = [r[key] for r in runs if r["shape"] == shape and r["rows"] == rows and r["path"] in STATIC_PATHS
              and r.get(key) is not None]
    return max(values) if values else None


def measured(folder: Path) -> list[float | None]:
    """Each target's figure, in `TARGETS` order (None where its part or cell is missing)."""
    single, rows, peers = (_runs(folder, t) for t in ("static_single.json", "static_rows.json", "static_peers.json"))
    costs = [r["eviction_cost_of_p95"] for r in single + rows
             if r["path"] in STATIC_PATHS and r.get("eviction_cost_of_p95") is not None]
    return [
        _best(single, "smollm2-135m", 1, "median_tok_s"),
        _best(rows, "smollm2-135m", 64, "median_tok_s"),
        _best(single, "llama-8b", 1, "roofline_share"),
        _best(peers, "llama-8b", 1, "ratio_to_hf_static"),
        max(costs) if costs else None,
    ]


def check(folder: str | Path) -> list[dict]:
    """One dict per target: its fields, `measured` and `met` (None when nothing was measured)."""
    out = []
    for target, value in zip(TARGETS, measured(Path(folder))):
        met = None if value is None else (value >= target.bound if target.at_least else value <= target.bound)
        out.append({**asdict(target), "measured": value, "met": met})
    return out


def report(checked: list[dict]) -> str:
    """`check`'s lines for people: verdict, target, figure."""
    out = []
    for line in checked:
        sign = ">=" if line["at_least"] else "<="
        value = "not measured" if line["measured"] is None else f"{line['measured']:.3g}"
        verdict = {True: "met", False: "MISSED", None: "-"}[line["met"]]
        out.append(f"{verdict:7s} {line['name']}: {value} (target {sign} {line['bound']:g})")
    return "\n".join(out)
