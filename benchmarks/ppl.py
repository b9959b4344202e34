"""Perplexity over streams far longer than the model's positions: `python -m benchmarks.ppl`.

The job: feed `--rows` streams of `--tokens` tokens each (slices of one long text, spread evenly over it) through
every method (`methods.py`: `streaming:4+1020`, `window:1024`, `dense`, ...) and record the negative
log-likelihood of every token. The boundary: what a method means is `methods.py`'s business, drawing is
`plots.py`'s; this module runs, logs, resumes and summarizes.

* **Batched rows, lockstep.** Every forward pass feeds the next block of `--block` tokens of every row, so all
  rows hold the same number of tokens and one cache with a batch axis evicts the same positions of every row:
  each row gets exactly its batch-1 result. `--block 1` is the paper's protocol (one token per forward pass);
  a larger block makes up to `block - 1` fewer window tokens visible to a prediction, and is many times faster
  on a CPU (measured in docs/benchmarks.md). Dense attention is exact with any block and stops at the model's positions.
* **A log you can follow.** Every block appends a line to `OUTPUT.jsonl` (the NLL of each row's tokens, its
  wall time), and every `--memory-every` tokens a line with KV bytes and process RSS (`tail -f` works).
* **Stop and resume.** Ctrl-C (or SIGTERM) finishes the block in hand, saves the cache to
  `OUTPUT.ckpt.safetensors` and exits; a checkpoint is also written every `--checkpoint-every` seconds, so even
  a killed run loses little. `--resume` truncates the log to the checkpoint and continues with the saved cache:
  the log then equals that of an uninterrupted run, bar the wall-clock fields (`TIMING_FIELDS`).
* **Summary.** `OUTPUT.json`: per run the PPL overall, inside and past the model's positions, per
  `--segment` tokens, per row, a log-binned and a linear-binned NLL curve, the memory samples and per-segment
  latency; small enough to commit. Plots `OUTPUT.png` and `OUTPUT_memory.png` go beside it; `--report` redraws
  them from the log of a run that is still going, and `--report --merge A.json B.json` combines the logs of
  processes that ran different methods over the same streams (to use more cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from streaming_engine.loading import DEFAULT_MODEL_NAME
from . import cli
from .methods import MethodSpec, make_block_runner, parse_specs
from .plots import plot_ppl
from .runinfo import PROVENANCE_KEY, run_metadata
from .texts import DATASETS, load_texts

DEFAULT_METHODS = "streaming:4+1020,streaming-noshift:4+1020,dense,window:1024,streaming:4+252"
#: Fields of the JSONL log that depend on the machine's mood, not on the numbers: left out when logs are compared.
TIMING_FIELDS = ("seconds", "rss_bytes", "cuda_bytes")
#: Log line type of a process's provenance (`runinfo.run_metadata`): one per process that appended to the log.
INVOCATION = "invocation"
#: Decimals kept of every NLL in the log (1e-5 nats: far below any difference the tables show).
NLL_DECIMALS = 5
#: Points of the log-binned NLL curve in the summary (the log-x plot), and the fewest tokens per row in a bin
#: (single early tokens would make the curve's start pure noise).
LOG_BINS = 80
MIN_BIN_TOKENS = 64


@dataclass(frozen=True)
class Plan:
    """How a run is sized. `blocks` is one block size per pass over the methods (several compare blocks)."""

    rows: int = 2
    tokens: int = 100_000
    blocks: tuple[int, ...] = (32,)
    segment: int = 10_000
    memory_every: int = 1_000
    checkpoint_every_s: float = 120.0

    def __post_init__(self):
        for name, low in (("rows", 1), ("tokens", 2), ("segment", 1), ("memory_every", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if not self.blocks or min(self.blocks) < 1:
            raise ValueError(f"--block takes positive integers, got {self.blocks}")
        if self.checkpoint_every_s < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every_s}")


@dataclass(frozen=True)
class Run:
    """One method at one block size: a line of the table, a curve of the plot."""

    spec: MethodSpec
    block: int
    label: str

    def describe(self) -> dict:
        return {"label": self.label, "method": self.spec.name, "start_size": self.spec.start_size,
                "recent_size": self.spec.recent_size, "cache_size": self.spec.cache_size, "block": self.block}


def plan_runs(specs: list[MethodSpec], blocks: tuple[int, ...]) -> list[Run]:
    """Every method at every block, grouped by method; labels name the block only when there are several."""
    runs = []
    for spec in specs:
        for block in blocks:
            if spec.name == "recompute" and block != 1:
                raise ValueError("recompute re-encodes its window for every token: run it with --block 1")
            label = spec.label if len(blocks) == 1 else f"{spec.label}, block {block}"
            runs.append(Run(spec, block, label))
    return runs


def make_rows(ids: list[int], rows: int, tokens: int) -> torch.Tensor:
    """`[rows, tokens]` slices of `ids`, starting at evenly spread offsets (row `r` at `r * (len(ids) // rows)`)."""
    stride = len(ids) // rows
    if tokens > stride:
        raise ValueError(f"the text has {len(ids):,} tokens: {rows} rows of {tokens:,} tokens do not fit "
                         f"(at most {len(ids) // tokens} rows of that length, or --tokens {stride})")
    return torch.tensor([ids[r * stride : r * stride + tokens] for r in range(rows)], dtype=torch.long)


def fingerprint(data: torch.Tensor) -> str:
    return hashlib.sha256(data.numpy().astype("int64").tobytes()).hexdigest()[:16]


class Checkpoint:
    """A runner's cache and where the run stood, in one safetensors file (written to a temp file, then renamed)."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, run: Run, next_index: int, lines: int, seconds: float, runner) -> None:
        tensors, counters = runner.state()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {"run": run.label, "next": str(next_index), "lines": str(lines), "seconds": repr(seconds),
                "counters": json.dumps(counters)}
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self.path)

    def load(self) -> tuple[dict, dict] | None:
        if not self.path.exists():
            return None
        with safe_open(str(self.path), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return {"run": meta["run"], "next": int(meta["next"]), "lines": int(meta["lines"]),
                "seconds": float(meta["seconds"]), "counters": json.loads(meta["counters"])}, tensors

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def read_log(path: Path) -> list[dict]:
    """Every complete line of the JSONL log (a line cut short by a kill is dropped)."""
    records = []
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def nll_rows(records: list[dict], label: str) -> list[list[float]]:
    """The logged NLL of run `label`, one list per row: `[row][i]` is the NLL of token `i + 1`."""
    rows: list[list[float]] = []
    for rec in records:
        if rec.get("type") == "block" and rec["run"] == label:
            if not rows:
                rows = [[] for _ in rec["nll"]]
            for row, values in zip(rows, rec["nll"]):
                row.extend(values)
    return rows


def comparable(records: list[dict]) -> list[dict]:
    """The log without its wall-clock fields and provenance lines: equal for an interrupted-and-resumed and an
    uninterrupted run."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records if r.get("type") != INVOCATION]


class Log:
    """The JSONL log, appended and flushed line by line."""

    def __init__(self, path: Path, keep: list[dict]):
        self.path = path
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in keep:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
        self.lines = len(keep)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.lines += 1

    def close(self) -> None:
        self.file.close()


def resume_point(records: list[dict], saved, config: dict) -> tuple[int, dict | None, dict | None]:
    """(log lines to keep, checkpoint meta, tensors) for `--resume`: up to the checkpoint of the run in hand, or
    up to the last finished run when the checkpoint is older than that."""
    if not records:
        raise ValueError("nothing to resume: the log is missing or empty (leave out --resume)")
    if records[0].get("type") != "config":
        raise ValueError("the log has no config line: start afresh with --overwrite")
    old = {k: v for k, v in records[0].items() if k != "torch_threads"}
    new = {k: v for k, v in config.items() if k != "torch_threads"}
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(f"the log was written with other settings ({', '.join(diff)}): resume with the same "
                         "options, or start afresh with --overwrite")
    done = {r["run"] for r in records if r.get("type") == "done"}
    keep = 1 + max((i for i, r in enumerate(records) if r.get("type") == "done"), default=0)
    if saved is not None:
        meta, tensors = saved
        if meta["run"] not in done and keep <= meta["lines"] <= len(records):
            return meta["lines"], meta, tensors
    return keep, None, None


class MemoryProbe:
    """Process RSS, plus the CUDA allocator's bytes when the model is on a GPU."""

    def __init__(self, device: torch.device):
        self.device, self.process = device, psutil.Process()

    def sample(self) -> dict:
        out = {"rss_bytes": self.process.memory_info().rss}
        if self.device.type == "cuda":
            out["cuda_bytes"] = int(torch.cuda.memory_allocated(self.device))
        return out


def evaluate_run(model, data: torch.Tensor, run: Run, plan: Plan, log: Log, checkpoint: Checkpoint, *,
                 resume: tuple[dict, dict] | None, should_stop: Callable[[], bool], progress: bool) -> bool:
    """Feed every row through `run`'s method block by block, logging as it goes. False when stopped early."""
    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows_on_device = data.to(device)
    runner = make_block_runner(run.spec, model)
    room = runner.room()
    predictions = data.shape[1] - 1 if room is None else min(data.shape[1] - 1, room)
    t, seconds = 0, 0.0
    if resume is not None:
        meta, tensors = resume
        runner.load_state(tensors, meta["counters"])
        t, seconds = meta["next"], meta["seconds"]
    probe = MemoryProbe(device)
    bar = tqdm(total=predictions, initial=t, desc=f"{run.label:>26}", unit="tok", disable=not progress,
               dynamic_ncols=True)
    nll_sum, nll_count = 0.0, 0
    last_checkpoint = time.monotonic()
    if resume is None:
        checkpoint.save(run, t, log.lines, seconds, runner)
    while t < predictions:
        n = min(run.block, predictions - t)
        targets = rows_on_device[:, t + 1 : t + n + 1]  # [rows, n]: token i+1 is predicted from tokens 0..i
        sync()
        began = time.perf_counter()
        logits = runner.step(rows_on_device[:, t : t + n])  # [rows, n, vocab]
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(-1, n)
        values = nll.tolist()
        sync()
        elapsed = time.perf_counter() - began
        seconds += elapsed
        log.write({"type": "block", "run": run.label, "start": t, "held": runner.held(), "seconds": round(elapsed, 6),
                   "nll": [[round(x, NLL_DECIMALS) for x in row] for row in values]})
        if (t + n) // plan.memory_every > t // plan.memory_every:
            log.write({"type": "memory", "run": run.label, "tokens": t + n, "held": runner.held(),
                       "kv_bytes": runner.kv_bytes(), **probe.sample()})
        t += n
        nll_sum += float(nll.sum())
        nll_count += nll.numel()
        bar.update(n)
        bar.set_postfix(ppl=f"{math.exp(nll_sum / nll_count):.2f}", held=runner.held(), refresh=False)
        stop = should_stop()
        if t < predictions and (stop or time.monotonic() - last_checkpoint >= plan.checkpoint_every_s):
            checkpoint.save(run, t, log.lines, seconds, runner)
            last_checkpoint = time.monotonic()
            if stop:
                bar.close()
                return False
    bar.close()
    stopped = "position limit" if predictions < data.shape[1] - 1 else None
    log.write({"type": "done", "run": run.label, "predictions": predictions, "stopped_at": stopped,
               "seconds": round(seconds, 3)})
    return True


def run(model, data: torch.Tensor, specs: list[MethodSpec], plan: Plan, output: str | Path, *,
        config: dict | None = None, resume: bool = False, overwrite: bool = False,
        should_stop: Callable[[], bool] = lambda: False, progress: bool = True, plot: bool = True,
        provenance: dict | None = None) -> dict:
    """Evaluate `data` (`[rows, tokens]` token ids) with every method, logging to `OUTPUT.jsonl`; returns the
    summary (also written to `output` with its plots). The summary's `complete` is False when stopped early.

    `provenance` (`runinfo.run_metadata` of this process) is logged before any block, so the summary names the
    command, settings and machine of every process whose numbers it holds."""
    if data.dim() != 2 or data.shape[1] < 2:
        raise ValueError("data must be [rows, tokens] with at least 2 tokens per row")
    runs = plan_runs(specs, plan.blocks)
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    for spec in specs:
        if limit and spec.cache_size and spec.cache_size > limit:
            raise ValueError(f"{spec.label}: a cache of {spec.cache_size} exceeds the model's {limit} positions")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    log_path, checkpoint = output.with_suffix(".jsonl"), Checkpoint(output.with_suffix(".ckpt.safetensors"))
    record = {
        "type": "config", **(config or {}), "rows": data.shape[0], "tokens": data.shape[1],
        "tokens_sha256": fingerprint(data), "runs": [r.describe() for r in runs], "position_limit": limit,
        "segment": plan.segment, "memory_every": plan.memory_every, "device": model.device.type,
        "dtype": str(model.dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
    }
    record = json.loads(json.dumps(record))  # the form it takes in the log, so a resume compares like with like
    if resume:
        records = read_log(log_path)
        keep, meta, tensors = resume_point(records, checkpoint.load(), record)
        kept = records[:keep]
    else:
        if log_path.exists() and not overwrite:
            raise ValueError(f"{log_path} exists: continue it with --resume, or start afresh with --overwrite")
        checkpoint.remove()
        kept, meta, tensors = [record], None, None
    done = {r["run"] for r in kept if r.get("type") == "done"}
    log = Log(log_path, kept)
    if provenance is not None:
        log.write({"type": INVOCATION, **provenance})
    complete = True
    try:
        for r in runs:
            if r.label in done:
                continue
            resumed = (meta, tensors) if meta is not None and meta["run"] == r.label else None
            if not evaluate_run(model, data, r, plan, log, checkpoint, resume=resumed, should_stop=should_stop,
                                progress=progress):
                complete = False
                break
    finally:
        log.close()
    if complete:
        checkpoint.remove()
    summary = summarize(read_log(log_path))
    write_summary(summary, output, plot)
    return summary


# --- summary ---------------------------------------------------------------------------------------------------


def _mean(values) -> float:
    return sum(values) / len(values)


def _ppl(nll_sum: float, count: int) -> float | None:
    return round(math.exp(nll_sum / count), 4) if count else None


def log_bin_edges(count: int) -> list[int]:
    """Bin edges over predictions `0..count`: geometric (`LOG_BINS` over the whole range), at least
    `MIN_BIN_TOKENS` wide."""
    ratio = max(count, 2) ** (1 / LOG_BINS)
    edges = [0]
    while edges[-1] < count:
        edges.append(min(count, max(edges[-1] + MIN_BIN_TOKENS, round(edges[-1] * ratio))))
    return edges


def summarize(records: list[dict]) -> dict:
    """The committed summary from a (possibly unfinished) log: no per-token arrays, only binned curves."""
    if not records or records[0].get("type") != "config":
        raise ValueError("not a perplexity log: the first line is not a config line")
    config = records[0]
    limit, segment = config.get("position_limit"), config["segment"]
    rows = config["rows"]
    per_run = {r["label"]: {"blocks": [], "memory": [], "done": None} for r in config["runs"]}
    for rec in records[1:]:
        slot = per_run.get(rec.get("run"))
        if slot is None:
            continue
        if rec["type"] == "block":
            slot["blocks"].append(rec)
        elif rec["type"] == "memory":
            slot["memory"].append({k: rec[k] for k in ("tokens", "held", "kv_bytes", "rss_bytes", "cuda_bytes")
                                   if k in rec})
        elif rec["type"] == "done":
            slot["done"] = rec
    out = {"config": {k: v for k, v in config.items() if k != "type"}, "runs": {}}
    for described in config["runs"]:
        label = described["label"]
        slot = per_run[label]
        if not slot["blocks"]:
            continue
        # nll[i] is a list over rows of the NLL of token i+1 (index i = tokens seen before the prediction - 1).
        nll: list[list[float]] = []
        seconds_at: list[tuple[int, int, float]] = []
        for b in slot["blocks"]:
            n = len(b["nll"][0])
            for j in range(n):
                nll.append([row[j] for row in b["nll"]])
            seconds_at.append((b["start"], n, b["seconds"]))
        count = len(nll)
        flat_sum = sum(sum(x) for x in nll)
        inside = min(count, limit) if limit else count
        within_sum = sum(sum(x) for x in nll[:inside])
        # Predictions made once the cache has evicted (token index > cache size): where block sizes can differ.
        filled = min(count, described["cache_size"] or count)
        after_fill = nll[filled:]
        segments = []
        for begin in range(0, count, segment):
            end = min(begin + segment, count)
            part = nll[begin:end]
            secs = sum(s for start, n, s in seconds_at if begin <= start < end)
            toks = sum(n for start, n, s in seconds_at if begin <= start < end)
            segments.append({
                "start": begin + 1, "end": end, "ppl": _ppl(sum(sum(x) for x in part), len(part) * rows),
                "ms_per_token": round(1000 * secs / (toks * rows), 4) if toks else None,
                "tokens_per_s": round(toks * rows / secs, 2) if secs else None,
            })
        edges = log_bin_edges(count)
        curve_log = {"index": [], "nll": []}
        for lo, hi in zip(edges, edges[1:]):
            curve_log["index"].append(round(math.sqrt(max(lo, 1) * hi), 2))  # geometric middle of tokens lo+1..hi
            curve_log["nll"].append(round(_mean([_mean(x) for x in nll[lo:hi]]), 5))
        step = max(1, segment // 10)
        curve_linear = {"index": [], "nll": []}
        for lo in range(0, count, step):
            part = nll[lo:lo + step]
            curve_linear["index"].append(lo + len(part))
            curve_linear["nll"].append(round(_mean([_mean(x) for x in part]), 5))
        seconds = sum(s for _, _, s in seconds_at)
        memory = slot["memory"]
        done = slot["done"]
        out["runs"][label] = {
            **{k: v for k, v in described.items() if k != "label"},
            "predictions": count,
            "complete": done is not None,
            "stopped_at": done["stopped_at"] if done else None,
            "ppl": _ppl(flat_sum, count * rows),
            "ppl_within_limit": _ppl(within_sum, inside * rows),
            "ppl_past_limit": _ppl(flat_sum - within_sum, (count - inside) * rows),
            "ppl_after_fill": _ppl(sum(sum(x) for x in after_fill), len(after_fill) * rows),
            "ppl_per_row": [_ppl(sum(x[r] for x in nll), count) for r in range(rows)],
            "segments": segments,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(count * rows / seconds, 2) if seconds else None,
            "ms_per_token": round(1000 * seconds / (count * rows), 4) if seconds else None,
            "kv_bytes_first": memory[0]["kv_bytes"] if memory else None,
            "kv_bytes_last": memory[-1]["kv_bytes"] if memory else None,
            "peak_kv_bytes": max((m["kv_bytes"] for m in memory), default=None),
            "peak_rss_bytes": max((m["rss_bytes"] for m in memory), default=None),
            "memory": memory,
            "curve_log": curve_log,
            "curve_linear": curve_linear,
        }
    out["complete"] = all(r["complete"] for r in out["runs"].values()) and len(out["runs"]) == len(config["runs"])
    invocations = [{k: v for k, v in r.items() if k != "type"} for r in records if r.get("type") == INVOCATION]
    if invocations:
        # The process that started the log; a resumed run also names the processes that continued it.
        out[PROVENANCE_KEY] = {**invocations[0], **({"continued_by": invocations[1:]} if invocations[1:] else {})}
    return out


#: Config keys that must agree for logs to be merged into one summary (the same streams through the same model).
SAME_STREAM_KEYS = ("model", "source", "rows", "tokens", "tokens_sha256", "position_limit", "segment", "device",
                    "dtype")


def merge_summaries(summaries: list[dict], provenance: dict | None = None) -> dict:
    """One summary from the logs of several processes that ran different methods over the same streams.

    With `provenance` (of the merging command) the merged summary records it, plus each source's own under
    `merged_from`."""
    first = summaries[0]
    merged = {"config": {**first["config"], "runs": []}, "runs": {}}
    for s in summaries:
        diff = [k for k in SAME_STREAM_KEYS if s["config"].get(k) != first["config"].get(k)]
        if diff:
            raise ValueError(f"these logs evaluate different streams or models ({', '.join(diff)} differ)")
        for described in s["config"]["runs"]:
            label = described["label"]
            if label not in s["runs"]:
                continue
            if label not in merged["runs"]:
                merged["config"]["runs"].append(described)
            # A run two processes both started: keep the one that got furthest (a finished one if any).
            held = merged["runs"].get(label)
            if held is None or (s["runs"][label]["complete"], s["runs"][label]["predictions"]) > (
                    held["complete"], held["predictions"]):
                merged["runs"][label] = s["runs"][label]
    # Complete when every run it holds finished (a process stopped early may have left its later runs to another).
    merged["complete"] = bool(merged["runs"]) and all(r["complete"] for r in merged["runs"].values())
    if provenance is not None:
        merged[PROVENANCE_KEY] = {**provenance, "merged_from": [s.get(PROVENANCE_KEY) for s in summaries]}
    return merged


def write_summary(summary: dict, output: Path, plot: bool = True) -> list[str]:
    """The summary JSON at `output`, and (with `plot`) its PNGs beside it; returns the paths written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return [str(output), *(plot_ppl(summary, output) if plot else [])]


def _fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def format_block_table(summary: dict) -> str:
    """Methods against block sizes: PPL over the tokens predicted after the cache filled (its change against the
    smallest block) and tokens/s."""
    runs = summary["runs"]
    blocks = sorted({r["block"] for r in runs.values()})
    lines = ["| method | " + " | ".join(f"block {b}" for b in blocks) + " |", "|---|" + "---:|" * len(blocks)]
    methods = list(dict.fromkeys(label.rsplit(", block ", 1)[0] for label in runs))
    for method in methods:
        row = {r["block"]: r for label, r in runs.items() if label.rsplit(", block ", 1)[0] == method}
        base = row.get(blocks[0])
        cells = []
        for b in blocks:
            r = row.get(b)
            key = "ppl_after_fill" if r and r["cache_size"] else "ppl"  # dense evicts nothing: all its tokens
            if r is None or r[key] is None:
                cells.append("-")
                continue
            ppl = r[key]
            change = f" ({(ppl / base[key] - 1) * 100:+.2f}%)" if base and base[key] and b != blocks[0] else ""
            cells.append(f"{ppl:.3f}{change}, {_fmt(r['tokens_per_s'], 1)} tok/s")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(summary: dict) -> str:
    """Two markdown tables: PPL per segment (one column per run), then totals, memory and speed per run; with
    several block sizes, a third table sets them side by side."""
    runs = summary["runs"]
    limit = summary["config"].get("position_limit")
    labels = list(runs)
    lines = ["| tokens | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    longest = max((len(r["segments"]) for r in runs.values()), default=0)
    for k in range(longest):
        seg = next(r["segments"][k] for r in runs.values() if len(r["segments"]) > k)
        cells = []
        for r in runs.values():
            if len(r["segments"]) > k:
                s = r["segments"][k]
                partial = s["end"] - s["start"] + 1 < seg["end"] - seg["start"] + 1 or s["end"] < seg["end"]
                cells.append(_fmt(s["ppl"]) + (f" (to {s['end']:,})" if partial else ""))
            else:
                cells.append("-")
        lines.append(f"| {seg['start']:,}–{seg['end']:,} | " + " | ".join(cells) + " |")
    lines += ["", f"| run | tokens per row | PPL | PPL to {limit or 'end':,} | PPL past {limit or 'end':,} | "
              "KV MiB first → last | peak RSS MiB | ms/token first → last segment | tokens/s | run time |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in runs.items():
        segs = r["segments"]
        mib = lambda b: "-" if b is None else f"{b / 2**20:,.1f}"  # noqa: E731
        ms = (f"{_fmt(segs[0]['ms_per_token'])} → {_fmt(segs[-1]['ms_per_token'])}" if segs else "-")
        stop = " (stops: positions)" if r["stopped_at"] else ("" if r["complete"] else " (unfinished)")
        lines.append(f"| {label} | {r['predictions'] + 1:,}{stop} | {_fmt(r['ppl'])} | {_fmt(r['ppl_within_limit'])} | "
                     f"{_fmt(r['ppl_past_limit'])} | {mib(r['kv_bytes_first'])} → {mib(r['kv_bytes_last'])} | "
                     f"{mib(r['peak_rss_bytes'])} | {ms} | {_fmt(r['tokens_per_s'], 1)} | "
                     f"{r['seconds'] / 60:,.1f} min |")
    if len({r["block"] for r in runs.values()}) > 1:
        lines += ["", format_block_table(summary)]
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("benchmarks.ppl", __doc__)
    cli.add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", nargs="+", default=None, metavar="FILE", help="UTF-8 text file(s), concatenated")
    src.add_argument("--dataset", default=None, choices=sorted(DATASETS), help="built-in text (default austen)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list of dense, window:SIZE, recompute:SIZE, streaming:SINKS+RECENT, "
                        "streaming-noshift:SINKS+RECENT (a bare name takes --start-size + --recent-size)")
    p.add_argument("--start-size", type=int, default=4, help="sinks for a bare streaming method name")
    p.add_argument("--recent-size", type=int, default=1020, help="recent tokens for a bare method name")
    p.add_argument("--rows", type=int, default=2, help="streams evaluated side by side (one batch)")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens per stream")
    p.add_argument("--block", default="32", help="tokens fed per forward pass (1: the paper's per-token protocol); "
                   "a comma list runs every method at each")
    p.add_argument("--segment", type=int, default=10_000, help="tokens per row of the PPL table")
    p.add_argument("--memory-every", type=int, default=1_000, help="tokens between KV/RSS samples")
    p.add_argument("--checkpoint-every", type=float, default=120.0, help="seconds between cache checkpoints")
    p.add_argument("--output", default="runs/ppl.json", help="summary JSON; the .jsonl log, the checkpoint and "
                   "the PNG plots go beside it")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run logged at --output")
    mode.add_argument("--overwrite", action="store_true", help="start afresh even if a log exists")
    mode.add_argument("--report", action="store_true", help="only summarize and plot the log (no model)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="with --report: summarize these runs' logs (their --output paths) together into --output")
    return p


def model_label(model: str | None) -> str:
    """How the model is named in the summary: a local folder by its name (machines differ in paths)."""
    if model is None:
        return DEFAULT_MODEL_NAME
    return Path(model).name if Path(model).is_dir() else model


def parse_blocks(text: str) -> tuple[int, ...]:
    try:
        blocks = tuple(dict.fromkeys(int(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise ValueError(f"--block takes a comma list of positive integers (got {text!r})") from None
    return blocks


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    output = Path(args.output)
    if args.merge and not args.report:
        parser.exit(2, "error: --merge goes with --report\n")
    if args.report:
        try:
            sources = [Path(m) for m in args.merge] if args.merge else [output]
            summaries = [summarize(read_log(path.with_suffix(".jsonl"))) for path in sources]
            summary = (merge_summaries(summaries, run_metadata(args, argv, parser.prog)) if len(summaries) > 1
                       else summaries[0])  # one log: its own provenance (a --report reruns no numbers)
        except (ValueError, KeyError) as exc:
            parser.exit(2, f"error: {exc}\n")
        written = write_summary(summary, output)
        print(format_table(summary))
        print("wrote", *written)
        return 0
    stop = {"asked": False}

    def ask_to_stop(signum, frame):
        if stop["asked"]:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        stop["asked"] = True
        tqdm.write("stopping after this block (Ctrl-C again to abort without a checkpoint)")

    try:
        specs = parse_specs(args.methods, args.start_size, args.recent_size)
        plan = Plan(rows=args.rows, tokens=args.tokens, blocks=parse_blocks(args.block), segment=args.segment,
                    memory_every=args.memory_every, checkpoint_every_s=args.checkpoint_every)
        plan_runs(specs, plan.blocks)  # refuse impossible combinations before loading anything
        text, source = load_texts(args.text, None if args.text else (args.dataset or "austen"))
        model, tokenizer = cli.load_model(args)
        data = make_rows(tokenizer(text, add_special_tokens=False)["input_ids"], plan.rows, plan.tokens)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, ask_to_stop)
        started = time.monotonic()
        summary = run(model, data, specs, plan, output, resume=args.resume, overwrite=args.overwrite,
                      should_stop=lambda: stop["asked"],
                      config={"model": model_label(args.model), "source": source},
                      provenance=run_metadata(args, argv, parser.prog))
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(format_table(summary))
    print(f"wrote {output} (+ .jsonl log and plots) in {(time.monotonic() - started) / 60:.1f} min")
    if not summary["complete"]:
        print("stopped: continue with the same command plus --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
