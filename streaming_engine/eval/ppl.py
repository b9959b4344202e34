"""Per-token perplexity over a long text: `python -m streaming_engine.eval.ppl`.

One token per forward pass, as the paper's `eval_long_ppl.py`: every method sees the same tokens and predicts
the next one from its own cache. Writes JSON (`config`, and per method `ppl`, `ppl_last` over the last quarter,
per-token `nll`, `tokens_per_s`, `peak_memory_bytes`) and a PNG of rolling log-PPL beside it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from tqdm import tqdm

from ..loading import DEFAULT_MODEL_NAME
from ..placement import input_device
from .methods import PPL_METHODS, make_runner, parse_methods
from . import cli
from .plots import plot_ppl
from .texts import load_text


def peak_memory(device: torch.device, kv_peak: int) -> int:
    """CUDA: the allocator's peak (weights and activations included). CPU: the peak KV-cache bytes, since the
    process RSS mixes in everything else the process ever held (and earlier methods' garbage)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return kv_peak


def evaluate(model, ids: list[int], method: str, start_size: int, recent_size: int, progress: bool = True) -> dict:
    """NLL of every token after the first, predicted by `method`."""
    device = input_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner = make_runner(method, model, start_size, recent_size)
    nll, kv_peak = [], 0
    bar = tqdm(range(len(ids) - 1), desc=f"{method:>17}", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    for t in bar:
        logits = runner.step(ids[t])
        nll.append(float(-torch.log_softmax(logits.float(), dim=-1)[ids[t + 1]]))
        kv_peak = max(kv_peak, runner.kv_bytes())
        if t % 50 == 0:
            bar.set_postfix(ppl=f"{math.exp(sum(nll) / len(nll)):.2f}")
    elapsed = time.perf_counter() - started
    last = nll[-max(1, len(nll) // 4):]
    return {
        "ppl": round(math.exp(sum(nll) / len(nll)), 4),
        "ppl_last": round(math.exp(sum(last) / len(last)), 4),
        "nll": [round(x, 4) for x in nll],
        "tokens_per_s": round(len(nll) / elapsed, 2),
        "peak_memory_bytes": peak_memory(device, kv_peak),
        "peak_kv_bytes": kv_peak,
    }


def run(model, ids: list[int], *, methods: list[str], start_size: int, recent_size: int,
        progress: bool = True, config: dict | None = None) -> dict:
    """Every method over the same token ids; returns the JSON-ready result."""
    if len(ids) < 2:
        raise ValueError("the text is too short: it needs at least 2 tokens")
    limit = getattr(model.config, "max_position_embeddings", None)
    if "dense" in methods and limit and len(ids) > limit:
        raise ValueError(f"dense attention cannot go past the model's {limit} positions: use --max-tokens {limit}")
    if limit and start_size + recent_size > limit:
        raise ValueError(f"start_size + recent_size = {start_size + recent_size} exceeds the model's {limit} positions")
    result = {
        "config": {
            **(config or {}), "tokens": len(ids), "start_size": start_size,
            "recent_size": recent_size, "cache_size": start_size + recent_size, "methods": methods,
            "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "torch_threads": torch.get_num_threads(),
        },
        "methods": {},
    }
    for method in methods:
        result["methods"][method] = evaluate(model, ids, method, start_size, recent_size, progress)
    return result


def format_table(result: dict) -> str:
    """Markdown table, one row per method."""
    dense = result["methods"].get("dense")
    rows = ["| method | PPL | PPL, last 25% | vs dense | tokens/s | peak KV MiB |", "|---|---:|---:|---:|---:|---:|"]
    for method, data in result["methods"].items():
        rel = f"{(data['ppl'] / dense['ppl'] - 1) * 100:+.1f}%" if dense else "n/a"
        rows.append(f"| {method} | {data['ppl']:.2f} | {data['ppl_last']:.2f} | {rel} | {data['tokens_per_s']:.1f} | "
                    f"{data['peak_memory_bytes'] / 2**20:.1f} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("streaming_engine.eval.ppl", __doc__)
    cli.add_model_args(p)
    cli.add_text_args(p, "a UTF-8 text file", "built-in long text (default gutenberg-milton)")
    p.add_argument("--start-size", type=int, default=4, help="attention sinks (window: none)")
    p.add_argument("--recent-size", type=int, default=252, help="recent tokens; window and recompute keep "
                   "start + recent recent tokens")
    p.add_argument("--max-tokens", type=int, default=2000, help="evaluate the first N tokens of the text")
    p.add_argument("--methods", default=",".join(PPL_METHODS), help=f"comma list of {', '.join(PPL_METHODS)}")
    p.add_argument("--output", default="runs/ppl.json", help="JSON path; the PNG plot goes beside it")
    return p


def measure(args: argparse.Namespace) -> dict:
    """The run the parsed options ask for (raises `ValueError` naming a bad option)."""
    methods = parse_methods(args.methods, PPL_METHODS)
    cli.check_min(start_size=(args.start_size, 0), recent_size=(args.recent_size, 1), max_tokens=(args.max_tokens, 2))
    text, source = load_text(args.text, None if args.text else (args.dataset or "gutenberg-milton"))
    model, tokenizer = cli.load_model(args)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.max_tokens]
    return run(model, ids, methods=methods, start_size=args.start_size, recent_size=args.recent_size,
               config={"model": args.model or DEFAULT_MODEL_NAME, "source": source})


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser(), argv, measure, plot_ppl, format_table)


if __name__ == "__main__":
    sys.exit(main())
