"""What a replica pays to serve a conversation it does not hold: the re-prime of a full cache from the stored
transcript, against the same turn on the replica whose cache already holds it (issue 25's "cost of a miss").

Job: one engine over one loaded model stands for a replica. Each conversation is stored first (SQLite in a
temporary folder, or PostgreSQL at `--database-url`), then per repeat:

* **miss** (another replica served it last): read the transcript from the store, open it on the engine
  (`StreamingEngine.open_history`) and send the next user message. Its time to first token covers the store
  read, the re-prime (the sinks, the pinned system prompt and the recent tail that fits: at most
  `start_size + recent_size` tokens, whatever the conversation's length) and the new message's prefill.
* **hit** (affinity kept the user here): the next message on that same session, whose cache is now warm, so only
  the new message is prefilled.

The cost of a miss is `miss - hit` time to first token. Conversations of several lengths (`--history-tokens`) show
that it does not grow with the transcript, which is StreamingLLM's promise for failover. Replies are greedy and
short (`--tokens`); the end-of-turn token may end one early.

Boundary: measures only; the re-prime itself is `session.Session._prime`, the store's reads are `store.py` /
`store_pg.py`.

    python -m benchmarks.reprime --threads 1 --output assets/eval/reprime.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from . import cli

SYSTEM_PROMPT = "You are a patient assistant who keeps track of a long conversation."
GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
NEXT_MESSAGES = ("What did we agree on about the garden?", "Summarise the last point in one sentence.")


def exchange(i: int) -> list[dict]:
    """The i-th user/assistant exchange of a synthetic but varied conversation (about 60 tokens)."""
    topic = ("the garden", "the budget", "the trip", "the book club", "the kitchen", "the schedule")[i % 6]
    return [
        {"role": "user", "content": f"Point {i}: about {topic}, note that item {i * 7 % 101} moves to week {i % 9 + 1} "
                                    f"and that the cost stays below {i * 13 % 500 + 20} euros."},
        {"role": "assistant", "content": f"Noted for {topic}: item {i * 7 % 101} is now in week {i % 9 + 1}, "
                                         f"with a ceiling of {i * 13 % 500 + 20} euros. Anything else on {topic}?"},
    ]


def conversation(tokenizer, tokens: int) -> list[dict]:
    """Exchanges until their rendered text holds at least `tokens` tokens (counted on the messages' contents)."""
    messages, count, i = [], 0, 0
    while count < tokens:
        pair = exchange(i)
        messages += pair
        count += sum(len(tokenizer.encode(m["content"], add_special_tokens=False)) for m in pair)
        i += 1
    return messages


def first_token_s(engine, session_id: str, text: str, tokens: int, started: float) -> tuple[float, dict]:
    """Seconds from `started` to the turn's first reply token, and the session's stats after the turn."""
    first = None
    for event in engine.chat(session_id, text, max_new_tokens=tokens, **GREEDY):
        if event.kind == "error":
            raise RuntimeError(f"a measured turn failed: {event.text}")
        if first is None and event.stats.get("reply_tokens"):
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("a measured turn produced no token")
    return first, engine.stats(session_id)


def one_repeat(engine, store, token: str, repeat: int, tokens: int) -> dict:
    started = time.perf_counter()
    stored = store.load(token)
    read_s = time.perf_counter() - started
    session_id = engine.open_history(stored.messages, stored.system_prompt)
    try:
        miss_s, primed = first_token_s(engine, session_id, NEXT_MESSAGES[repeat % 2], tokens, started)
        hit_s, _ = first_token_s(engine, session_id, NEXT_MESSAGES[(repeat + 1) % 2], tokens, time.perf_counter())
    finally:
        engine.close(session_id)
    return {"store_read_s": read_s, "miss_ttft_s": miss_s, "hit_ttft_s": hit_s, "miss_cost_s": miss_s - hit_s,
            "cache_tokens_after_miss": primed["cache_tokens"], "cache_capacity": primed["cache_capacity"],
            "pinned_tokens": primed["pinned_tokens"]}


def measure(args) -> dict:
    from streaming_engine.engine import EngineConfig, StreamingEngine
    from streaming_engine.stores import open_store

    cli.check_min(repeats=(args.repeats, 1), tokens=(args.tokens, 1), start_size=(args.start_size, 1),
                  recent_size=(args.recent_size, 16))
    lengths = cli.parse_int_list(args.history_tokens, "--history-tokens", minimum=1)
    model, tokenizer = cli.load_model(args)
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=args.start_size, recent_size=args.recent_size))
    with tempfile.TemporaryDirectory() as folder:
        store = open_store(folder, database_url=args.database_url)
        try:
            stored = {n: conversation(tokenizer, n) for n in lengths}
            tokens = {n: store.create(title=f"{n} tokens", system_prompt=SYSTEM_PROMPT, messages=m)
                      for n, m in stored.items()}
            # Warm-up (not recorded): the first forward passes of a process pay one-time costs.
            one_repeat(engine, store, tokens[lengths[0]], 0, args.tokens)
            runs = {n: [] for n in lengths}
            for repeat in range(args.repeats):  # lengths interleaved within a repeat: the machine may be shared
                for n in lengths:
                    runs[n].append(one_repeat(engine, store, tokens[n], repeat, args.tokens))
        finally:
            store.close()
    summary = {}
    for n in lengths:
        rows = runs[n]
        summary[str(n)] = {
            "messages": len(stored[n]),
            "cache_tokens_after_miss": rows[0]["cache_tokens_after_miss"],
            **{f"median_{key}": statistics.median(r[key] for r in rows)
               for key in ("store_read_s", "miss_ttft_s", "hit_ttft_s", "miss_cost_s")},
            "miss_cost_range_s": [min(r["miss_cost_s"] for r in rows), max(r["miss_cost_s"] for r in rows)],
        }
    return {"cache": f"{args.start_size}+{args.recent_size}", "store": "postgresql" if args.database_url else "sqlite",
            "threads": args.threads, "summary": summary, "runs": {str(n): r for n, r in runs.items()}}


def table(result: dict) -> str:
    lines = [f"cache {result['cache']}, store {result['store']}",
             f"{'history tokens':>14s} {'cache after':>11s} {'read ms':>8s} {'hit TTFT s':>10s} {'miss TTFT s':>11s} "
             f"{'miss cost s':>11s}"]
    for n, row in result["summary"].items():
        lines.append(f"{n:>14s} {row['cache_tokens_after_miss']:>11d} {row['median_store_read_s'] * 1000:8.1f} "
                     f"{row['median_hit_ttft_s']:10.3f} {row['median_miss_ttft_s']:11.3f} {row['median_miss_cost_s']:11.3f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> list[str]:
    from .plots import bar_with_repeats, plt, save_png  # matplotlib only when a figure is drawn

    lengths = list(result["summary"])
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.38
    for offset, key, label, color in ((-width / 2, "hit_ttft_s", "hit (cache held)", "#4c78a8"),
                                      (width / 2, "miss_ttft_s", "miss (re-primed from the store)", "#f58518")):
        for i, n in enumerate(lengths):
            bar_with_repeats(ax, i + offset, [r[key] for r in result["runs"][n]], width, color=color,
                             label=label if i == 0 else None)
    ax.set_xticks(range(len(lengths)), [f"{int(n):,} tokens" for n in lengths])
    ax.set_xlabel("stored conversation")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"Serving a conversation another replica held (cache {result['cache']})")
    top = max(r[key] for rows in result["runs"].values() for r in rows for key in ("hit_ttft_s", "miss_ttft_s"))
    ax.set_ylim(0, top * 1.3)  # room for the legend above the highest dot
    ax.legend(loc="upper center", ncol=2, frameon=False)
    return save_png(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("benchmarks.reprime", __doc__)
    cli.add_model_args(p)
    p.add_argument("--start-size", type=int, default=4, help="attention sinks of every session")
    p.add_argument("--recent-size", type=int, default=1020, help="recent window of every session")
    p.add_argument("--history-tokens", default="2048,8192",
                   help="comma list: tokens of each stored conversation (all longer than the cache shows the "
                        "miss cost does not grow with the transcript)")
    p.add_argument("--tokens", type=int, default=8, help="most tokens of each measured reply")
    p.add_argument("--repeats", type=int, default=5, help="measured miss/hit pairs per conversation")
    p.add_argument("--database-url", default=None,
                   help="postgresql://... to read the transcripts from PostgreSQL (default: SQLite in a temp folder)")
    p.add_argument("--output", default="runs/reprime.json", help="JSON path; the PNG goes beside it")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser(), argv, measure, plot, table)


if __name__ == "__main__":
    raise SystemExit(main())
