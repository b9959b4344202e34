"""Decode benchmark: per-token latency and memory against tokens processed. `python -m benchmarks.bench`.

Every method is fed the same tokens one forward pass at a time (no sampling: the speed of a step does not depend
on which token it is). Per window of `--window` tokens the JSON keeps the median and p95 step latency, the KV bytes
held, the process RSS and (on CUDA) the allocated GPU memory. Methods (see `methods.py`):

* `dense` (once, up to the model's positions), and for every `--cache-sizes` entry:
* `streaming` (evicts one token per step, re-rotating the keys behind the gap each step, as the paper's eval loop),
* `streaming-block` (evicts `--evict-block` tokens at once: one re-rotation per block, as the chat engine does),
* `perstep-rope` (the reference code: un-rotated keys, the whole cache re-rotated on every step),
* `recompute` (the window re-encoded every step). Its step cost depends only on how full the window is, so the
  window is filled without running the model and only the next two latency windows are timed (`--recompute-tokens`
  times more): at 1024 tokens a step takes seconds on a CPU, and timing the fill would cost an hour.

Writes `--output FILE.json` and PNGs beside it: `FILE_latency.png`, `FILE_memory.png`, `FILE_steady.png`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import psutil
import torch
from tqdm import tqdm

from streaming_engine.loading import DEFAULT_MODEL_NAME
from streaming_engine.placement import input_device
from .methods import BENCH_METHODS, BENCH_EVICT_BLOCK, make_runner, parse_methods
from . import cli
from .plots import plot_bench
from .stats import percentile
from .texts import load_text

DEFAULT_CACHE_SIZES = "256,512,1024"
#: Tokens the synthetic stream draws from: skip the lowest ids, which are special tokens in most vocabularies.
FIRST_PLAIN_TOKEN = 3


def synthetic_ids(vocab_size: int, count: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_PLAIN_TOKEN, vocab_size, (count,), generator=generator).tolist()


class MemoryProbe:
    """Process RSS, and CUDA allocator memory when the model is on a GPU (peaks since `reset`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.process = psutil.Process()
        self.peak_rss = 0

    def reset(self) -> None:
        self.peak_rss = self.process.memory_info().rss
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self) -> dict:
        rss = self.process.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        out = {"rss_bytes": rss}
        if self.device.type == "cuda":
            out["cuda_bytes"] = int(torch.cuda.memory_allocated(self.device))
        return out

    def peaks(self) -> dict:
        out = {"peak_rss_bytes": self.peak_rss}
        if self.device.type == "cuda":
            out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out


def time_run(model, ids: list[int], method: str, start_size: int, recent_size: int, *, window: int,
             evict_block: int, label: str, progress: bool = True, primed: int = 0) -> dict:
    """Feed `ids` one per step through `method`; per-window latency and memory, plus a summary.

    `primed` (recompute only): the first `primed` tokens go into the window untimed and without a forward pass."""
    device = input_device(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    probe = MemoryProbe(device)
    probe.reset()
    runner = make_runner(method, model, start_size, recent_size, evict_block=evict_block)
    if primed:
        runner.prime(ids[:primed])
    windows, latencies = [], []
    total = 0.0
    for t in tqdm(range(primed, len(ids)), desc=f"{label:>24}", disable=not progress, dynamic_ncols=True,
                  leave=False):
        sync()
        began = time.perf_counter()
        runner.step(ids[t])
        sync()
        elapsed = time.perf_counter() - began
        total += elapsed
        latencies.append(elapsed * 1000.0)
        if len(latencies) == window or t == len(ids) - 1:
            windows.append({
                "tokens": t + 1,
                "median_ms": round(statistics.median(latencies), 3),
                "p95_ms": round(percentile(latencies, 95), 3),
                "held_tokens": runner.held(),
                "kv_bytes": runner.kv_bytes(),
                **probe.sample(),
            })
            latencies = []
    last = windows[-1]
    return {
        "method": method,
        "cache_size": None if method == "dense" else start_size + recent_size,
        "tokens": len(ids),
        "untimed_tokens": primed,
        "windows": windows,
        "summary": {
            "steady_median_ms": last["median_ms"],
            "steady_p95_ms": last["p95_ms"],
            "tokens_per_s": round((len(ids) - primed) / total, 2),
            "final_kv_bytes": last["kv_bytes"],
            "max_kv_bytes": max(w["kv_bytes"] for w in windows),
            **probe.peaks(),
        },
    }


def run(model, ids: list[int], *, methods: list[str], cache_sizes: list[int], start_size: int, window: int,
        evict_block: int, recompute_tokens: int = 0, progress: bool = True, config: dict | None = None) -> dict:
    """The whole benchmark; returns the JSON-ready result."""
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    for size in cache_sizes:
        if size <= start_size:
            raise ValueError(f"cache size {size} must exceed --start-size {start_size}")
        if limit and size > limit:
            raise ValueError(f"cache size {size} exceeds the model's {limit} positions")
    if "streaming-block" in methods and evict_block > min(cache_sizes) - start_size:
        raise ValueError(f"--evict-block {evict_block} must fit in the smallest recent window "
                         f"({min(cache_sizes) - start_size} tokens)")
    result = {
        "config": {
            **(config or {}), "tokens": len(ids), "methods": methods, "cache_sizes": cache_sizes,
            "start_size": start_size, "window": window, "evict_block": evict_block,
            "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "torch_threads": torch.get_num_threads(),
        },
        "runs": [],
        "notes": [],
    }
    make_runner("dense", model, start_size, 1).step(ids[0])  # warm-up: first-call allocations are not a method's cost
    plan = []
    for method in methods:
        if method == "dense":
            steps = min(len(ids), limit) if limit else len(ids)
            if steps < len(ids):
                result["notes"].append(f"dense stops at the model's {limit} positions")
            plan.append((method, start_size, 1, steps, 0))
            continue
        for size in cache_sizes:
            steps, primed = len(ids), 0
            if method == "recompute":
                primed = min(size - 1, len(ids) - 1)  # the window is full after the first timed step
                steps = min(len(ids), primed + (recompute_tokens or 2 * window))
                result["notes"].append(f"recompute@{size}: window filled untimed, then tokens {primed + 1}-{steps} "
                                       "timed (its cost is flat once the window is full)")
            plan.append((method, start_size, size - start_size, steps, primed))
    for method, start, recent, steps, primed in plan:
        label = method if method == "dense" else f"{method}@{start + recent}"
        result["runs"].append(time_run(model, ids[:steps], method, start, recent, window=window,
                                       evict_block=evict_block, label=label, progress=progress, primed=primed))
        if progress:
            s = result["runs"][-1]["summary"]
            tqdm.write(f"{label:>24}: steady median {s['steady_median_ms']:.1f} ms, p95 {s['steady_p95_ms']:.1f} ms, "
                       f"{s['tokens_per_s']:.1f} tok/s, KV {s['final_kv_bytes'] / 2**20:.1f} MiB")
    return result


def parse_sizes(text: str) -> list[int]:
    return cli.parse_int_list(text, "--cache-sizes", 2)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("benchmarks.bench", __doc__)
    cli.add_model_args(p)
    cli.add_text_args(p, "feed this UTF-8 text file's tokens (default: random tokens)", "feed a built-in long text")
    p.add_argument("--tokens", type=int, default=2048, help="tokens fed to every method")
    p.add_argument("--cache-sizes", default=DEFAULT_CACHE_SIZES, help="comma list of start_size + recent_size")
    p.add_argument("--start-size", type=int, default=4, help="attention sinks")
    p.add_argument("--methods", default=",".join(BENCH_METHODS), help=f"comma list of {', '.join(BENCH_METHODS)}")
    p.add_argument("--window", type=int, default=64, help="tokens per latency window (median and p95)")
    p.add_argument("--evict-block", type=int, default=BENCH_EVICT_BLOCK, help="tokens evicted at once by streaming-block")
    p.add_argument("--recompute-tokens", type=int, default=0,
                   help="tokens timed for recompute once its window is full (0: two latency windows)")
    p.add_argument("--output", default="runs/bench.json", help="JSON path; PNG plots go beside it")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token stream")
    return p


def measure(args: argparse.Namespace) -> dict:
    """The run the parsed options ask for (raises `ValueError` naming a bad option)."""
    methods = parse_methods(args.methods, BENCH_METHODS)
    sizes = parse_sizes(args.cache_sizes)
    cli.check_min(tokens=(args.tokens, 2), window=(args.window, 1), start_size=(args.start_size, 0),
                  evict_block=(args.evict_block, 1), recompute_tokens=(args.recompute_tokens, 0))
    model, tokenizer = cli.load_model(args)
    if args.text or args.dataset:
        text, source = load_text(args.text, args.dataset)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]
        if len(ids) < args.tokens:
            raise ValueError(f"the text has only {len(ids)} tokens; lower --tokens")
    else:
        ids, source = synthetic_ids(len(tokenizer), args.tokens, args.seed), f"random tokens (seed {args.seed})"
    config = {"model": args.model or DEFAULT_MODEL_NAME, "source": source}
    return run(model, ids, methods=methods, cache_sizes=sizes, start_size=args.start_size,
               window=args.window, evict_block=args.evict_block, recompute_tokens=args.recompute_tokens,
               config=config)


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser(), argv, measure, plot_bench, format_table)


def format_table(result: dict) -> str:
    """Markdown table of the steady state (last window) of every run."""
    rows = ["| method | cache | tokens | median ms/token | p95 ms/token | tokens/s | KV MiB (end) | peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        s = r["summary"]
        rows.append(f"| {r['method']} | {r['cache_size'] or 'all'} | {r['tokens']} | {s['steady_median_ms']:.1f} | "
                    f"{s['steady_p95_ms']:.1f} | {s['tokens_per_s']:.1f} | {s['final_kv_bytes'] / 2**20:.1f} | "
                    f"{s['peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
