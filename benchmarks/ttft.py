"""Time to first token when several prompts arrive at once, with the padded prefill and without it (issue 24 item 5).

Job: for each arrival count (`--arrivals`, default 1, 4, 16), open that many fresh chats and submit one prompt
to each at the same instant, then time, per chat, from that instant to the first event that carries a reply
token. Two ways, interleaved within each repeat:

* `padded`: the engine as it ships: fresh conversations' first prompt chunks handed to the runner together share
  one right-padded forward pass (`generation.padded_prefill_rows` / `forward_padded`);
* `alone`: the same engine with `TransformersBackend.padded_prefill` off, so every prompt gets a pass of its own.

"At once" is exact: the prompts are submitted while the benchmark holds the scheduler's condition lock, so the
worker takes every one of them in the same iteration (the scheduler then decides, as for any arrivals, how many
prompt tokens go in per iteration: `prefill_budget`). The median and p95 over every chat of every repeat are
reported, with each repeat's median. Boundary: measures only; the prefill rule lives in `generation.py`, the
policy in `scheduler.py`.

    python -m benchmarks.ttft --device cpu --threads 1 --output assets/eval/ttft_prefill.json
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from . import cli

MODES = ("padded", "alone")
#: Prompt text repeated to the asked length (distinct per chat: a number leads each).
FILLER = ("The harbour master logs every ship that enters, its cargo, its crew and the weather at the time. ")


def prompt_for(tokenizer, index: int, tokens: int) -> str:
    """A user message of about `tokens` tokens, different for every `index`."""
    text = f"Chat {index}: summarise this log. "
    while len(tokenizer.encode(text)) < tokens:
        text += FILLER
    return text


def first_token_times(engine, messages: list[str], max_new_tokens: int) -> list[float]:
    """Submit `messages` to fresh sessions at the same instant; seconds from then to each one's first token."""
    sids = [engine.new_session() for _ in messages]
    firsts: list[float | None] = [None] * len(messages)
    errors: list[str] = []
    streams = []
    with engine.scheduler._cv:  # the worker cannot take any arrival until all of them are in
        for sid, message in zip(sids, messages):
            streams.append(engine.start_chat(sid, message, max_new_tokens=max_new_tokens, temperature=0.0))
        began = time.perf_counter()

    def read(i: int) -> None:
        for event in streams[i]:
            if firsts[i] is None and (event.stats or {}).get("reply_tokens", 0) >= 1:
                firsts[i] = time.perf_counter() - began
            if event.kind == "error":
                errors.append(f"chat {i} failed: {event.text}")

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(messages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    for sid in sids:
        engine.close(sid)
    if errors or any(t is None for t in firsts):
        raise RuntimeError("; ".join(errors) or "a chat produced no reply token")
    return firsts


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def measure(args: argparse.Namespace) -> dict:
    from streaming_engine.engine import EngineConfig, StreamingEngine

    arrivals = cli.parse_int_list(args.arrivals, "--arrivals")
    cli.check_min(prompt_tokens=(args.prompt_tokens, 1), tokens=(args.tokens, 1), repeats=(args.repeats, 1))
    model, tokenizer = cli.load_model(args)
    engines = {}
    for mode in MODES:
        engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=args.start_size,
                                                                recent_size=args.recent_size,
                                                                max_batch=max(arrivals), **cli.decode_kwargs(args)))
        engine.backend.padded_prefill = mode == "padded"
        engines[mode] = engine
    messages = [prompt_for(tokenizer, i, args.prompt_tokens) for i in range(max(arrivals))]
    first_token_times(engines[MODES[0]], messages[:1], args.tokens)  # warm-up: lazy initialisation, not timed
    times = {(n, mode): [] for n in arrivals for mode in MODES}
    for _ in range(args.repeats):
        for n in arrivals:
            for mode in MODES:  # interleaved: a shared machine slows both alike
                times[n, mode].append(first_token_times(engines[mode], messages[:n], args.tokens))
    runs = []
    for (n, mode), repeats in times.items():
        flat = [t for rep in repeats for t in rep]
        runs.append({"arrivals": n, "mode": mode, "median_ttft_s": statistics.median(flat), "p95_ttft_s": p95(flat),
                     "repeat_medians_s": [statistics.median(rep) for rep in repeats], "ttft_s": repeats})
    single = {r["mode"]: r["median_ttft_s"] for r in runs if r["arrivals"] == min(arrivals)}
    for r in runs:
        r["ratio_to_one_arrival"] = r["median_ttft_s"] / single[r["mode"]]
    return {"prompt_tokens": len(tokenizer.encode(messages[0])), "max_new_tokens": args.tokens,
            "machine_note": args.note, "decode_path": engines[MODES[0]].decode_path, "runs": runs}


def table(result: dict) -> str:
    lines = [f"{'arrivals':>8s} {'mode':7s} {'median s':>9s} {'p95 s':>7s} {'x one':>6s}"]
    for r in result["runs"]:
        lines.append(f"{r['arrivals']:8d} {r['mode']:7s} {r['median_ttft_s']:9.3f} {r['p95_ttft_s']:7.3f} "
                     f"{r['ratio_to_one_arrival']:6.2f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> list[str]:
    from .plots import bar_with_repeats, plt, save_png  # matplotlib only when a figure is drawn

    arrivals = sorted({r["arrivals"] for r in result["runs"]})
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colors = {"padded": "#4c78a8", "alone": "#b0b0b0"}
    for r in result["runs"]:
        x = arrivals.index(r["arrivals"]) + (-0.2 if r["mode"] == "padded" else 0.2)
        bar_with_repeats(ax, x, r["repeat_medians_s"], width=0.4, color=colors[r["mode"]],
                         label=r["mode"] if r["arrivals"] == arrivals[0] else None)
    ax.set_xticks(range(len(arrivals)), [f"{n} at once" for n in arrivals])
    ax.set_ylabel("time to first token, s (median)")
    ax.set_title(f"Simultaneous arrivals, {result['prompt_tokens']}-token prompts (dots: repeats)")
    ax.legend(loc="upper left", frameon=False)
    return save_png(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("benchmarks.ttft", __doc__)
    cli.add_model_args(p)
    p.add_argument("--start-size", type=int, default=4, help="attention sinks of every session")
    p.add_argument("--recent-size", type=int, default=1020, help="recent window of every session")
    cli.add_decode_args(p)
    p.add_argument("--arrivals", default="1,4,16", help="comma list of prompts submitted at the same instant")
    p.add_argument("--prompt-tokens", type=int, default=64, help="about how many tokens each message has")
    p.add_argument("--tokens", type=int, default=1, help="most tokens of each reply (the first is what is timed)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every arrival count and mode")
    p.add_argument("--note", default="", help="recorded with the result, e.g. that the machine was shared")
    p.add_argument("--output", default="runs/ttft_prefill.json", help="JSON path; the PNG goes beside it")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser(), argv, measure, plot, table)


if __name__ == "__main__":
    raise SystemExit(main())
