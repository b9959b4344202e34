"""Decode speed past a full cache: per-token eviction (`evict_block=1`), block eviction, and no eviction.

Job: a reply longer than the free window, on both backends with the default model, one thread. The prompt fills
the cache, then `--tokens` greedy tokens are decoded with `evict_for_space(1)` before each, as the engine does.
Variants: `block=1` (the paper's per-token eviction), `block=B` for each `--blocks`, and `none` (a cache large
enough that nothing is evicted, the speed to match). Variants are interleaved within each repeat and medians
reported, because the test machines are shared. Writes a JSON (machine, config, command, every timing) and a PNG.
Boundary: measures only; what a block is and how it is applied lives in `eviction.py` and the caches.

    python -m benchmarks.evict_bench --output assets/eval/evict_block.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from streaming_engine.hf_integration import enable_streaming_llm
from streaming_engine.generation import forward
from streaming_engine.loading import load
from . import cli

BACKENDS = ("transformers", "llama.cpp")


class _Transformers:
    def __init__(self):
        self.model, _ = load(backend="transformers")

    def run(self, prompt: list[int], start: int, recent: int, block: int, tokens: int) -> tuple[float, int]:
        cache = enable_streaming_llm(self.model, start, recent, evict_block=block)
        cache.evict_for_space(len(prompt))
        logits = forward(self.model, cache, prompt)
        began = time.perf_counter()
        for _ in range(tokens):
            cache.evict_for_space(1)
            logits = forward(self.model, cache, [int(logits.argmax())])
        return time.perf_counter() - began, cache.evicted_tokens


class _LlamaCpp:
    def __init__(self):
        self.model, _ = load(backend="llama.cpp", n_threads=1)

    def run(self, prompt: list[int], start: int, recent: int, block: int, tokens: int) -> tuple[float, int]:
        context = self.model.new_context(sequences=1, seq_capacity=start + recent, batch_tokens=len(prompt))
        try:
            cache = context.new_cache(start, recent, evict_block=block)
            cache.evict_for_space(len(prompt))
            logits = context.forward([(cache, prompt)])[0]
            began = time.perf_counter()
            for _ in range(tokens):
                cache.evict_for_space(1)
                logits = context.forward([(cache, [int(logits.argmax())])])[0]
            return time.perf_counter() - began, cache.evicted_tokens
        finally:
            context.close()


def measure(args) -> dict:
    torch.set_num_threads(1)
    cache_size = args.start_size + args.recent_size
    generator = torch.Generator().manual_seed(0)
    runs, dtype = [], None
    for backend in args.backends:
        runner = _Transformers() if backend == "transformers" else _LlamaCpp()
        if backend == "transformers":
            dtype = str(next(runner.model.parameters()).dtype)
        vocab = 49152  # SmolLM2's vocabulary
        prompt = torch.randint(100, vocab - 100, (cache_size,), generator=generator).tolist()
        # none: room for the prompt and the whole reply, so nothing is evicted (the speed to match)
        variants = [("none", args.recent_size + args.tokens, 1), ("block=1", args.recent_size, 1)]
        variants += [(f"block={b}", args.recent_size, b) for b in args.blocks]
        runner.run(prompt[:32], args.start_size, args.recent_size, 1, 8)  # warm-up
        times = {name: [] for name, _, _ in variants}
        evicted = {}
        for _ in range(args.repeats):
            for name, recent, block in variants:  # interleaved: each repeat sees the same machine load
                seconds, evicted[name] = runner.run(prompt, args.start_size, recent, block, args.tokens)
                times[name].append(args.tokens / seconds)
        medians = {name: statistics.median(v) for name, v in times.items()}
        for name, _, block in variants:
            runs.append({"backend": backend, "variant": name, "evict_block": None if name == "none" else block,
                         "tok_s": times[name], "median_tok_s": medians[name],
                         "ratio_to_no_eviction": medians[name] / medians["none"], "evicted_tokens": evicted[name]})
        del runner
    return {
        "config": {"model": "SmolLM2-135M-Instruct (transformers weights; llama.cpp GGUF)", "threads": 1,
                   "start_size": args.start_size, "recent_size": args.recent_size, "prompt_tokens": cache_size,
                   "decoded_tokens": args.tokens, "repeats": args.repeats, "blocks": args.blocks,
                   "dtype_transformers": dtype},
        "runs": runs,
    }


def plot(result: dict, path: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r["backend"] for r in result["runs"]})
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 3.6), squeeze=False)
    for ax, backend in zip(axes[0], backends):
        rows = [r for r in result["runs"] if r["backend"] == backend]
        ax.bar([r["variant"] for r in rows], [r["median_tok_s"] for r in rows], color="#4c78a8")
        for i, r in enumerate(rows):
            ax.text(i, r["median_tok_s"], f"{r['ratio_to_no_eviction']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{backend}: decode past a full cache")
        ax.set_ylabel("tok/s (median)")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [str(out)]


def table(result: dict) -> str:
    return "\n".join(f"{r['backend']:12s} {r['variant']:9s} {r['median_tok_s']:7.1f} tok/s  "
                     f"x{r['ratio_to_no_eviction']:.2f}" for r in result["runs"])


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("benchmarks.evict_bench", __doc__)
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--start-size", type=int, default=4)
    p.add_argument("--recent-size", type=int, default=252)
    p.add_argument("--tokens", type=int, default=128, help="tokens decoded past the full cache")
    p.add_argument("--blocks", type=int, nargs="+", default=[8, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default="assets/eval/evict_block.json")
    return p


def main(argv: list[str] | None = None) -> int:
    # The machine, the command and the options go into the JSON's provenance (`runinfo`), as for every benchmark.
    return cli.run_cli(build_parser(), argv, measure, plot, table)


if __name__ == "__main__":
    raise SystemExit(main())
