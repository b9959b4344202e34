"""How much one client slows another: a victim's per-token delay alone, beside a pasting client and beside a
client running its cap of long replies, on the real default model (issue 28's bar: at most 2x).

Job: one engine per run over one loaded model; the victim chats `--turns` short turns while the attacker does its
thing on other sessions of the same engine, until the victim is done. A victim's *gap* is the time between two of
its token counts, divided by the tokens between them (the first token, which waits for admission and prefill,
is left out: that is the TTFT, reported apart). Scenarios, interleaved within each repeat because the machine is
shared: `alone`; `paste` (the attacker sends a `--paste-chars` paste again and again, one-token replies);
`paste-no-cut-in` (the same, but a victim's turn that arrives during one of the paste's passes waits for it to end
instead of cutting in between layers, `Scheduler.cut_in`: the behaviour before that); `paste-whole-chunks` (no
cut-in either, and while nothing else decodes the paste goes in whole chunks rather than passes of about
`scheduler.PROMPT_PASS_S`: the behaviour before that bound); `paste-unsliced` (the same, with the
scheduler's prefill slicing off altogether: the behaviour before issue 28); `flood` (the
attacker keeps `--flood-turns` long replies decoding, the API's per-client cap). The slowdown of a scenario is
its median gap over `alone`'s in the same repeat; the report takes the median over repeats. The mean slowdown
(mean gap over `alone`'s mean gap: total time per token) is reported beside it, since a policy that delays only
some tokens moves the median less than the total; so is the slowdown of the victim's whole turns, first tokens
included (`turn_slowdown`: what a reader waits in all).

Boundary: measures only; the policy it measures lives in `scheduler.py` (`prefill_slice`, `prompt_pass_tokens`,
`_cut_in`), `prompt_share.py` (the prompts' share of the worker, new turns first) and `admission.py`.

    python -m benchmarks.fairness --output assets/eval/fairness.json
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from streaming_engine.admission import MAX_TURNS_PER_CLIENT
from . import cli

SCENARIOS = ("alone", "paste", "paste-no-cut-in", "paste-whole-chunks", "paste-unsliced", "flood")
#: The bar of issue 28: no client may slow another by more than this factor.
SLOWDOWN_BAR = 2.0
GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
VICTIM_PROMPTS = ("List ten animals, one per line.", "Name the planets of the solar system in order.",
                  "Give three tips for sleeping well.", "Write a short poem about rain.")
FLOOD_PROMPT = "Write a very long story about a lighthouse keeper, chapter by chapter."


def paste_text(chars: int) -> str:
    words = [f"item{i % 211} is noted" for i in range(chars // 14 + 1)]
    return "Summarise this log: " + " ".join(words)[:chars]


def victim_run(engine, turns: int, tokens: int) -> dict:
    """The victim's turns: every gap (seconds per token after the first) and every time to first token."""
    sid = engine.new_session()
    gaps, ttfts = [], []
    for turn in range(turns):
        started, last = time.perf_counter(), None
        for event in engine.chat(sid, VICTIM_PROMPTS[turn % len(VICTIM_PROMPTS)], max_new_tokens=tokens, **GREEDY):
            count = event.stats.get("reply_tokens", 0)
            now = time.perf_counter()
            if event.kind == "error":
                raise RuntimeError(f"the victim's turn failed: {event.text}")
            if count and last is None:
                ttfts.append(now - started)
                last = (now, count)
            elif last is not None and count > last[1]:
                gaps.extend([(now - last[0]) / (count - last[1])] * (count - last[1]))
                last = (now, count)
        engine.reset(sid)  # every turn from the same empty cache: the scenarios differ only in the attacker
    engine.close(sid)
    return {"gaps_s": gaps, "ttft_s": ttfts}


def attacker(engine, scenario: str, args, done: threading.Event, busy: threading.Event) -> list[threading.Thread]:
    """Threads that keep the attacker busy until `done`; `busy` is set once it has work in the engine."""
    def keep_sending(text: str, max_new_tokens: int):
        sid = engine.new_session()
        while not done.is_set():
            for event in engine.chat(sid, text, max_new_tokens=max_new_tokens, **GREEDY):
                if max_new_tokens == 1 or event.stats.get("reply_tokens"):  # a paste is busy from its first event
                    busy.set()
                if done.is_set():
                    engine.stop(sid)
            engine.reset(sid)
        engine.close(sid)

    if scenario == "alone":
        busy.set()
        return []
    if scenario.startswith("paste"):
        jobs = [(paste_text(args.paste_chars), 1)]
    else:
        jobs = [(FLOOD_PROMPT, args.flood_tokens)] * args.flood_turns
    return [threading.Thread(target=keep_sending, args=job, daemon=True) for job in jobs]


def one_run(model, tokenizer, scenario: str, args) -> dict:
    from streaming_engine.engine import EngineConfig, StreamingEngine

    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=args.start_size, recent_size=args.recent_size,
                                                            **cli.decode_kwargs(args)))
    if scenario == "paste-unsliced":
        engine.scheduler.slice_prefill = False
    if scenario in ("paste-no-cut-in", "paste-whole-chunks", "paste-unsliced"):
        engine.scheduler.cut_in = False
    if scenario == "paste-whole-chunks":
        engine.scheduler.prompt_pass_s = None
    done, busy = threading.Event(), threading.Event()
    threads = attacker(engine, scenario, args, done, busy)
    for thread in threads:
        thread.start()
    if not busy.wait(600):
        raise RuntimeError(f"the {scenario} attacker never got going")
    try:
        measured = victim_run(engine, args.turns, args.tokens)
    finally:
        done.set()
        for thread in threads:
            thread.join(600)
    gaps = measured["gaps_s"]
    if not gaps:
        raise RuntimeError(f"the victim produced no second token under {scenario}")
    return {"scenario": scenario, "median_gap_s": statistics.median(gaps), "mean_gap_s": statistics.fmean(gaps),
            "p95_gap_s": statistics.quantiles(gaps, n=20)[-1] if len(gaps) > 1 else gaps[0],
            "median_ttft_s": statistics.median(measured["ttft_s"]), "tokens": len(gaps),
            "turns_s": sum(measured["ttft_s"]) + sum(gaps), **measured}


def measure(args) -> dict:
    cli.check_min(turns=(args.turns, 1), tokens=(args.tokens, 2), repeats=(args.repeats, 1),
                  paste_chars=(args.paste_chars, 100), flood_turns=(args.flood_turns, 1),
                  flood_tokens=(args.flood_tokens, 2))
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not scenarios or set(scenarios) - set(SCENARIOS) or "alone" not in scenarios:
        raise ValueError(f"--scenarios takes a comma list of {', '.join(SCENARIOS)}, alone included")
    model, tokenizer = cli.load_model(args)
    repeats = []
    for _ in range(args.repeats):
        runs = {scenario: one_run(model, tokenizer, scenario, args) for scenario in scenarios}
        base, mean_base = runs["alone"]["median_gap_s"], runs["alone"]["mean_gap_s"]
        for run in runs.values():
            run["slowdown"] = run["median_gap_s"] / base
            run["mean_slowdown"] = run["mean_gap_s"] / mean_base
            run["turn_slowdown"] = run["turns_s"] / runs["alone"]["turns_s"]
        repeats.append(runs)
    summary = {}
    for scenario in scenarios:
        slowdowns = [r[scenario]["slowdown"] for r in repeats]
        summary[scenario] = {"median_slowdown": statistics.median(slowdowns), "slowdowns": slowdowns,
                             "median_gap_s": statistics.median(r[scenario]["median_gap_s"] for r in repeats),
                             "median_mean_slowdown": statistics.median(r[scenario]["mean_slowdown"]
                                                                       for r in repeats),
                             "median_ttft_s": statistics.median(r[scenario]["median_ttft_s"] for r in repeats),
                             "median_turn_slowdown": statistics.median(r[scenario]["turn_slowdown"]
                                                                       for r in repeats),
                             "within_bar": max(statistics.median(slowdowns), statistics.median(
                                 r[scenario]["mean_slowdown"] for r in repeats), statistics.median(
                                 r[scenario]["turn_slowdown"] for r in repeats)) <= SLOWDOWN_BAR}
    return {"bar": SLOWDOWN_BAR, "summary": summary, "repeats": repeats}


def table(result: dict) -> str:
    lines = [f"{'scenario':18s} {'gap ms':>8s} {'slowdown':>9s} {'mean':>7s} {'turns':>7s} {'TTFT s':>7s}  "
             f"within {result['bar']}x"]
    for scenario, row in result["summary"].items():
        lines.append(f"{scenario:18s} {row['median_gap_s'] * 1000:8.1f} {row['median_slowdown']:8.2f}x "
                     f"{row['median_mean_slowdown']:6.2f}x {row['median_turn_slowdown']:6.2f}x "
                     f"{row['median_ttft_s']:7.2f}  {row['within_bar']}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> list[str]:
    from .plots import bar_with_repeats, plt, save_png  # matplotlib only when a figure is drawn

    names = list(result["summary"])
    fig, (ax, first) = plt.subplots(1, 2, figsize=(10.4, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    for i, name in enumerate(names):
        style = {"color": "#4c78a8" if name != "paste-unsliced" else "#b0b0b0"}
        bar_with_repeats(ax, i, result["summary"][name]["slowdowns"], **style)
        # The total time per token beside the median gap: a delay that hits only some tokens shows here.
        ax.plot([i], [result["summary"][name]["median_mean_slowdown"]], "D", color="#f58518", ms=6,
                label="total time per token / alone" if i == 0 else None)
        # Every first token the victim waited for, over all repeats: a paste's cost shows here, not in the gaps.
        bar_with_repeats(first, i, [t for run in result["repeats"] for t in run[name]["ttft_s"]], **style)
    ax.axhline(result["bar"], color="#d62728", ls="--", lw=1, label=f"issue 28 bar ({result['bar']:g}x)")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("victim's time per token / alone")
    ax.set_title("Time per token (bars: median gap; dots: repeats)")
    ax.legend(loc="upper left", frameon=False)
    first.set_xticks(range(len(names)), names, rotation=20, ha="right")
    first.set_ylabel("seconds")
    first.set_title("Victim's first token (dots: every turn)")
    return save_png(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("benchmarks.fairness", __doc__)
    cli.add_model_args(p)
    p.add_argument("--start-size", type=int, default=4, help="attention sinks of every session")
    p.add_argument("--recent-size", type=int, default=1020, help="recent window of every session")
    cli.add_decode_args(p)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--turns", type=int, default=3, help="victim turns per run")
    p.add_argument("--tokens", type=int, default=48, help="most tokens of each victim reply")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every scenario")
    p.add_argument("--paste-chars", type=int, default=20_000, help="characters of the attacker's paste")
    p.add_argument("--flood-turns", type=int, default=MAX_TURNS_PER_CLIENT,
                   help="long replies the flooding attacker keeps running (default: the API's per-client cap)")
    p.add_argument("--flood-tokens", type=int, default=400, help="most tokens of each flood reply")
    p.add_argument("--output", default="runs/fairness.json", help="JSON path; the PNG goes beside it")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser(), argv, measure, plot, table)


if __name__ == "__main__":
    raise SystemExit(main())
