"""What a long chat still remembers: fact recall against distance, and a pinned rule over 50+ turns.

`python -m benchmarks.recall` runs two probes through the chat engine, one session per method:

* **Recall** (the paper's StreamEval idea, whose code was never released, rebuilt on our engine). In one long chat
  a fact is planted in a user message ("Please remember this: the code for the blue door is 4817."), then `d`
  tokens of other conversation follow (filler notes and short replies), then the question comes ("What is the
  code for the blue door?"); it counts as recalled when the reply contains the code. The distances `d` run from
  well inside the cache to several times its size, cycling over `--distances` for `--repeats` rounds, every fact
  new. `d` is measured in stream tokens, from the end of the fact's message to the start of the question.
* **Adherence**. The system prompt gives the assistant a name ("Your name is Captain Lumen ..."); the chat then
  runs `--turns` turns of filler, and every `--probe-every` turns asks "What is your name?". The reply adheres
  when it gives that name. Probes are further apart than the cache, so an earlier answer cannot keep the name
  alive by itself. Several names (`--personas`) give several runs per method.

Methods (`--recall-methods`, `--adherence-methods`): `streaming-tokens` / `streaming-turns` (sinks + recent window, pinned system prompt, evicting the oldest
tokens or whole oldest messages), the same `-unpinned`, `window` (the same number of recent tokens, no sinks) and
`dense` (everything, until `--dense-max-context`; later probes are not run). Greedy decoding. Writes `--output`
(JSON, every trial with its reply) and a PNG beside it (recall against distance, adherence against turn), and
prints the summary table.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

from streaming_engine.engine import EngineConfig, StreamingEngine
from streaming_engine.loading import DEFAULT_MODEL_NAME
from . import cli
from .methods import parse_methods

#: Every method: (engine mode, pin the system prompt, eviction policy).
METHODS = {
    "streaming-tokens": ("streaming", True, "tokens"),
    "streaming-turns": ("streaming", True, "turns"),
    "streaming-tokens-unpinned": ("streaming", False, "tokens"),
    "streaming-turns-unpinned": ("streaming", False, "turns"),
    "window": ("window", False, "tokens"),
    "dense": ("dense", False, "tokens"),
}
#: What each probe runs by default (about 25 minutes on one busy CPU core): recall compares the eviction policies
#: and the baselines (pinning does not touch a fact in a user message); adherence compares pinned and unpinned.
DEFAULT_RECALL_METHODS = ("streaming-tokens", "streaming-turns", "window", "dense")
DEFAULT_ADHERENCE_METHODS = ("streaming-tokens", "streaming-tokens-unpinned", "streaming-turns", "window")
#: Distances (stream tokens between a fact and its question) for the default 4 + 252 token cache: three inside the
#: cache, the cache size itself, two beyond it.
DEFAULT_DISTANCES = (0, 64, 128, 256, 384, 640)
#: Longest reply to a filler message or a planted fact (they only have to go by), to a question, to a probe.
FILLER_REPLY_TOKENS = 8
ANSWER_TOKENS = 16
#: The neutral system prompt of the recall sessions (pinned in the pinned methods, like any system prompt).
RECALL_SYSTEM = "You are a helpful assistant with an excellent memory."
#: Adherence personas: (name in the system prompt, pattern a reply must match). The pattern accepts the spelling
#: slips of a small model ("Captain Lumin") but not another name.
PERSONAS = (
    ("Captain Lumen", r"captain\s+lum[ei]n"),
    ("Doctor Orla Finch", r"orla|finch"),
    ("Professor Tobias Quill", r"tobias|quill"),
)
PROBE = "What is your name?"
COLORS = ("blue", "red", "green", "yellow", "black", "white", "orange", "purple", "silver", "golden", "brown",
          "grey")
THINGS = ("door", "gate", "box", "safe", "locker", "shed", "garage", "chest", "cabinet", "vault", "drawer", "suitcase")
#: Filler: everyday sentences without digits or codes, shuffled into notes of a few sentences.
SENTENCES = (
    "The garden looked lovely after the rain this morning.", "My neighbour painted her fence a pale colour.",
    "We walked along the river and watched the ducks.", "The bakery on the corner sells warm bread at dawn.",
    "I finally finished reading the novel about the lighthouse.", "The train was quiet and the fields were green.",
    "Our cat slept on the windowsill all afternoon.", "The market was busy with people buying vegetables.",
    "I tried a new recipe for soup with leeks and potatoes.", "The wind picked up in the evening and it got cold.",
    "A friend sent me a postcard from the mountains.", "The library has moved to a bigger building downtown.",
    "We planted tomatoes and beans along the south wall.", "The concert in the park was cancelled because of rain.",
    "I spent the weekend cleaning out the attic.", "The children built a snowman with a carrot nose.",
    "Coffee tastes better when you grind the beans yourself.", "The old bridge was closed for repairs all week.",
    "I learned to knit a scarf from a video.", "The bus was late again, so I walked to work.",
    "The sunset painted the clouds pink and orange.", "My brother is learning to play the violin.",
    "We had a picnic by the lake and fed the swans.", "The museum opened a new exhibition about ships.",
)
FILLER_ASKS = ("What do you think?", "Any thoughts?", "Does that sound nice?", "How would you describe that?")


#: Sentences in a filler note (about 12 tokens each; a filler turn adds about 25 tokens of template and reply).
FILLER_SENTENCES = 5
#: Rough tokens per filler sentence and per filler turn's overhead, used only to size the last note before a
#: question so the measured distance lands near its target (the distance reported is always the measured one).
SENTENCE_TOKENS, TURN_OVERHEAD_TOKENS = 12, 25


def filler_message(rng: random.Random, sentences: int = FILLER_SENTENCES) -> str:
    """A user message of other conversation: a short note of everyday sentences and a question about it."""
    return "Here is a note from my day: " + " ".join(rng.sample(SENTENCES, sentences)) + " " + rng.choice(FILLER_ASKS)


def sentences_for(remaining: int) -> int:
    """Sentences of the next filler note when `remaining` tokens of distance are still to go."""
    return max(1, min(FILLER_SENTENCES, (remaining - TURN_OVERHEAD_TOKENS) // SENTENCE_TOKENS))


def turn(engine: StreamingEngine, sid: str, message: str, max_new_tokens: int) -> tuple[str, dict, str]:
    """One greedy turn: (reply, final stats, finish reason)."""
    final = None
    for event in engine.chat(sid, message, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                             repetition_penalty=1.0, seed=0):
        if event.kind in ("done", "error"):
            final = event
    if final is None or final.kind == "error":
        raise RuntimeError(f"the turn failed: {final.text if final else 'no final event'}")
    return final.text, final.stats, final.finish_reason


def open_session(engine: StreamingEngine, method: str, system_prompt: str, sizes: dict) -> str:
    mode, pin, eviction = METHODS[method]
    size = sizes[mode]
    return engine.new_session(mode, system_prompt, pin_system=pin, eviction=eviction, **size)


def run_recall(engine, method: str, sizes: dict, distances: list[int], repeats: int, limit: int | None,
               seed: int, progress: bool) -> dict:
    """Facts planted and asked back after each distance, `repeats` rounds, in one session."""
    rng = random.Random(seed)
    keys = [(c, t) for c in COLORS for t in THINGS]
    rng.shuffle(keys)
    schedule = [d for _ in range(repeats) for d in distances][:limit]
    sid = open_session(engine, method, RECALL_SYSTEM, sizes)
    trials = []
    try:
        for i, target in enumerate(tqdm(schedule, desc=f"recall {method:>26}", unit="fact", disable=not progress,
                                        dynamic_ncols=True)):
            color, thing = keys[i % len(keys)]
            code = f"{rng.randint(1000, 9999)}"
            fact_index = len(engine.history(sid))  # where the fact's message lands in the memory map
            _, stats, reason = turn(engine, sid, f"Please remember this: the code for the {color} {thing} is "
                                    f"{code}.", FILLER_REPLY_TOKENS)
            if reason == "context_full":
                break
            # The fact's message ends where its reply begins: seen tokens minus the reply fed so far.
            fact_end = stats["seen_tokens"] - max(stats["reply_tokens"] - 1, 0)
            seen = stats["seen_tokens"]
            while seen - fact_end < target and reason != "context_full":
                note = filler_message(rng, sentences_for(target - (seen - fact_end)))
                _, stats, reason = turn(engine, sid, note, FILLER_REPLY_TOKENS)
                seen = stats["seen_tokens"]
            if reason == "context_full":
                break
            reply, stats, reason = turn(engine, sid, f"What is the code for the {color} {thing}? Answer with the "
                                        f"number only.", ANSWER_TOKENS)
            if reason == "context_full":
                break
            # Whether the model could still see the fact when it answered (the question's own eviction included).
            fact_state = engine.memory_map(sid)[fact_index]["state"]
            trials.append({"distance_target": target, "distance": seen - fact_end, "code": code,
                           "recalled": code in reply, "reply": reply[:200], "fact_state": fact_state,
                           "turns_in_memory": stats.get("turns_in_memory")})
    finally:
        engine.close(sid)
    return {"trials": trials, "by_distance": by_key(trials, "distance_target", "recalled"),
            "mean_distance": {str(d): round(statistics.fmean(t["distance"] for t in trials
                                                             if t["distance_target"] == d), 1)
                              for d in sorted({t["distance_target"] for t in trials})}}


def run_adherence(engine, method: str, sizes: dict, turns: int, probe_every: int, personas: list[tuple[str, str]],
                  limit: int | None, seed: int, progress: bool) -> dict:
    """Per persona one session of `turns` turns; the name is asked at turn 1 and every `probe_every` turns."""
    probes = []
    total = min(turns, limit) if limit else turns
    for p, (name, pattern) in enumerate(personas):
        rng = random.Random(seed * 100 + p)
        system = (f"Your name is {name}. You keep a lighthouse by the sea. When the user asks your name, answer: "
                  f"{name}.")
        sid = open_session(engine, method, system, sizes)
        try:
            for t in tqdm(range(1, total + 1), desc=f"adhere {method:>26} {p + 1}/{len(personas)}", unit="turn",
                          disable=not progress, dynamic_ncols=True):
                if t == 1 or t % probe_every == 0:
                    reply, stats, reason = turn(engine, sid, PROBE, ANSWER_TOKENS)
                    if reason == "context_full":
                        break
                    probes.append({"persona": name, "turn": t, "adheres": bool(re.search(pattern, reply, re.I)),
                                   "reply": reply[:200], "pinned_tokens": stats["pinned_tokens"],
                                   "evicted_tokens": stats["evicted_tokens"]})
                else:
                    _, _, reason = turn(engine, sid, filler_message(rng), FILLER_REPLY_TOKENS)
                    if reason == "context_full":
                        break
        finally:
            engine.close(sid)
    return {"probes": probes, "by_turn": by_key(probes, "turn", "adheres")}


def by_key(rows: list[dict], key: str, flag: str) -> dict:
    """`{key value: share of rows with flag}` (JSON keys are strings), in key order."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row[flag])
    return {str(k): round(statistics.fmean(v), 4) for k, v in sorted(groups.items())}


def share(rows: list[dict], flag: str, keep=lambda row: True) -> float | None:
    picked = [row[flag] for row in rows if keep(row)]
    return round(statistics.fmean(picked), 4) if picked else None


def run(model, tokenizer, *, recall_methods: list[str], adherence_methods: list[str], start_size: int, recent_size: int, dense_max_context: int,
        distances: list[int], repeats: int, turns: int, probe_every: int, personas: int, limit: int | None,
        seed: int = 0, progress: bool = True, config: dict | None = None, decode: dict | None = None) -> dict:
    cache_size = start_size + recent_size
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=start_size, recent_size=recent_size,
                                                            dense_max_tokens=dense_max_context, **(decode or {})))
    sizes = {"streaming": dict(start_size=start_size, recent_size=recent_size),
             "window": dict(start_size=0, recent_size=cache_size),
             "dense": dict(max_context=dense_max_context)}
    result = {
        "config": {**(config or {}), "recall_methods": recall_methods, "adherence_methods": adherence_methods,
                   "start_size": start_size, "recent_size": recent_size,
                   "cache_size": cache_size, "dense_max_context": dense_max_context, "distances": distances,
                   "repeats": repeats, "turns": turns, "probe_every": probe_every, "personas": personas,
                   "limit": limit, "seed": seed, "decoding": "greedy", "decode_path": engine.decode_path,
                   "device": str(model.device),
                   "dtype": str(model.dtype).replace("torch.", ""),
                   "pinned_tokens": {"recall": engine.system_tokens(RECALL_SYSTEM)}},
        "recall": {}, "adherence": {},
    }
    for method in recall_methods:
        result["recall"][method] = run_recall(engine, method, sizes, distances, repeats, limit, seed, progress)
    for method in adherence_methods:
        result["adherence"][method] = run_adherence(engine, method, sizes, turns, probe_every,
                                                    list(PERSONAS[:personas]), limit, seed, progress)
    for method in dict.fromkeys(recall_methods + adherence_methods):
        trials = result["recall"].get(method, {}).get("trials", [])
        probes = result["adherence"].get(method, {}).get("probes", [])
        result.setdefault("summary", {})[method] = {
            "facts": len(trials),
            "recall_inside_cache": share(trials, "recalled", lambda r: r["distance"] < cache_size),
            "recall_beyond_cache": share(trials, "recalled", lambda r: r["distance"] >= cache_size),
            "recall_fact_held": share(trials, "recalled", lambda r: r["fact_state"] == "full"),
            "recall_fact_gone": share(trials, "recalled", lambda r: r["fact_state"] != "full"),
            "probes": len(probes),
            "adherence_first_probe": share(probes, "adheres", lambda r: r["turn"] == 1),
            "adherence_after_first": share(probes, "adheres", lambda r: r["turn"] > 1),
            "last_probed_turn": max((r["turn"] for r in probes), default=None),
        }
    return result


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_table(result: dict) -> str:
    cache = result["config"]["cache_size"]
    rows = [f"| method | facts | recall, d < {cache} | recall, d >= {cache} | recall, fact held / not held | "
            f"name probes | adherence at turn 1 | adherence after turn 1 | last probed turn |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, s in result["summary"].items():
        rows.append(f"| {method} | {s['facts']} | {_fmt(s['recall_inside_cache'])} | {_fmt(s['recall_beyond_cache'])} "
                    f"| {_fmt(s['recall_fact_held'])} / {_fmt(s['recall_fact_gone'])} "
                    f"| {s['probes']} | {_fmt(s['adherence_first_probe'])} | {_fmt(s['adherence_after_first'])} | "
                    f"{s['last_probed_turn'] or '-'} |")
    return "\n".join(rows)


def plot_recall(result: dict, output) -> list[str]:
    """One PNG beside `output`: recall against distance (the cache size marked) and adherence against turn."""
    from .plots import COLORS as MODE_COLORS, plt

    path = str(Path(output).with_suffix(".png"))
    cfg = result["config"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    streaming_colors = {"tokens": "#1f77b4", "turns": "#2ca02c"}
    for method in METHODS:
        mode, pinned, eviction = METHODS[method]
        color = streaming_colors[eviction] if mode == "streaming" else MODE_COLORS.get(mode)
        style = dict(color=color, marker="o", markersize=3, linewidth=1.3, label=method,
                     linestyle="-" if pinned or mode != "streaming" else "--")
        recall = result["recall"].get(method)
        if recall and recall["by_distance"]:  # x: the measured distance, averaged over the facts of each target
            left.plot([recall["mean_distance"][d] for d in recall["by_distance"]], list(recall["by_distance"].values()),
                      **style)
        adherence = result["adherence"].get(method)
        if adherence and adherence["by_turn"]:
            right.plot([int(t) for t in adherence["by_turn"]], list(adherence["by_turn"].values()), **style)
    left.axvline(cfg["cache_size"], color="#888", linestyle=":", linewidth=1)
    left.annotate("cache size", (cfg["cache_size"], 1.02), fontsize=8, color="#666")
    left.set_xlabel("distance from the fact to its question (tokens, measured)")
    left.set_ylabel("facts recalled (share)")
    right.set_xlabel("turn")
    right.set_ylabel("replies giving the system prompt's name (share)")
    for ax in (left, right):
        ax.set_ylim(-0.03, 1.08)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"What the chat remembers · {cfg.get('model', '')} · cache {cfg['start_size']}+{cfg['recent_size']}"
                 f", dense up to {cfg['dense_max_context']} · {cfg['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("benchmarks.recall", __doc__)
    cli.add_model_args(p)
    p.add_argument("--recall-methods", default=",".join(DEFAULT_RECALL_METHODS),
                   help=f"comma list of {', '.join(METHODS)} (empty: no recall probe)")
    p.add_argument("--adherence-methods", default=",".join(DEFAULT_ADHERENCE_METHODS),
                   help=f"comma list of {', '.join(METHODS)} (empty: no adherence probe)")
    p.add_argument("--start-size", type=int, default=4, help="attention sinks (streaming)")
    p.add_argument("--recent-size", type=int, default=252, help="recent window (streaming); window mode keeps "
                   "start + recent recent tokens")
    p.add_argument("--dense-max-context", type=int, default=2048, help="tokens dense may hold; later probes "
                   "are not run")
    p.add_argument("--distances", default=",".join(map(str, DEFAULT_DISTANCES)),
                   help="comma list of fact-to-question distances in tokens")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the distances (a new fact each time)")
    p.add_argument("--turns", type=int, default=56, help="turns of the adherence chat")
    p.add_argument("--probe-every", type=int, default=8, help="ask the name every N turns (and at turn 1)")
    p.add_argument("--personas", type=int, default=2, help=f"adherence runs per method "
                   f"(1-{len(PERSONAS)}, each its own name)")
    p.add_argument("--limit", type=int, default=None, help="a short run: at most N facts and N adherence turns "
                   "per method")
    p.add_argument("--seed", type=int, default=0, help="seeds the facts, codes and filler")
    cli.add_decode_args(p)
    p.add_argument("--output", "--out", default="runs/recall.json", help="JSON path; the PNG goes beside it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def measure(args: argparse.Namespace) -> dict:
    recall_methods, adherence_methods = (
        parse_methods(text, tuple(METHODS), option=option) if text.strip() else []  # "": skip that probe
        for text, option in ((args.recall_methods, "--recall-methods"), (args.adherence_methods, "--adherence-methods")))
    distances = cli.parse_int_list(args.distances, "--distances", minimum=0)
    cli.check_min(start_size=(args.start_size, 0), recent_size=(args.recent_size, 2),
                  dense_max_context=(args.dense_max_context, 2), repeats=(args.repeats, 1), turns=(args.turns, 1),
                  probe_every=(args.probe_every, 1), personas=(args.personas, 1))
    if args.personas > len(PERSONAS):
        raise ValueError(f"--personas must be at most {len(PERSONAS)}, got {args.personas}")
    if args.limit is not None:
        cli.check_min(limit=(args.limit, 1))
    model, tokenizer = cli.load_model(args)
    return run(model, tokenizer, recall_methods=recall_methods, adherence_methods=adherence_methods,
               start_size=args.start_size, recent_size=args.recent_size,
               dense_max_context=args.dense_max_context, distances=distances, repeats=args.repeats,
               turns=args.turns, probe_every=args.probe_every, personas=args.personas, limit=args.limit,
               seed=args.seed, progress=not args.no_progress, config={"model": args.model or DEFAULT_MODEL_NAME},
               decode=cli.decode_kwargs(args))


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser(), argv, measure, plot_recall, format_table)


if __name__ == "__main__":
    sys.exit(main())
