"""Serving benchmark: continuous batching against round-robin, and the engine against plain `generate`.
`python -m benchmarks.serve`.

Two measurements on one loaded model, in one run, interleaved so that a machine shared with other work slows
every variant alike (compare ratios within a run, not across runs):

* **Concurrency.** For every `--sessions` count N and every scheduler (`batched`: one forward pass for all decoding
  conversations; `round-robin`: one forward pass per conversation, the engine's former worker), N fresh sessions
  send a question at the same moment and stream a reply of exactly `--new-tokens` tokens (end-of-turn tokens are
  ignored, so every cell decodes the same amount; sampling as the app's defaults, seeded per session). Per cell:
  aggregate tokens/s (all tokens over the wall time from the first question to the last token), each session's
  decode tokens/s (after its first token; median over sessions) and time to first token (p50, p95).
* **Single stream.** One conversation through the engine against `model.generate` with its default
  `DynamicCache`, same model, dtype, prompt and greedy decoding, `--single-tokens` tokens each: decode tokens/s
  after the first token, and time to first token.
* **llama.cpp backend** (`--backend llama.cpp`: the GGUF on llama.cpp, see `streaming_engine/llamacpp/`). The
  same cells; in the single stream the peer `generate` is llama.cpp's own (`Llama.generate`, greedy, its own KV
  cache and sampler, same prompt ids), and the transformers engine on the same model runs in the same rounds
  (`engine_transformers`), so both ratios come from one run.
* **Detokenization.** The text-delta cost of a whole reply (`--detok-tokens` long): re-decoding the reply on every
  token, as the engine once did, against the incremental `TextStream`.

Writes `--output FILE.json` and `FILE.png` beside it, and prints Markdown tables. `--quick` shrinks everything to
a run of a couple of minutes (also on a GPU: `--device cuda --dtype bfloat16`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch
from tqdm import tqdm

from streaming_engine.engine import EngineConfig, StreamingEngine
from streaming_engine.loading import DEFAULT_MODEL_NAME, describe_cpu
from . import cli
from .bench import percentile

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a rainbow forms.",
    "Describe your ideal weekend in detail.",
    "What are the benefits of learning a second language?",
    "Tell me about the history of the bicycle.",
    "How do bees make honey?",
    "Give me advice for a first job interview.",
    "Describe a walk through a busy market.",
]
SCHEDULERS = ("batched", "round-robin")
DEFAULT_SESSIONS = "1,2,4,8,16"


def run_cell(engine: StreamingEngine, sessions: int, new_tokens: int, seed: int) -> dict:
    """N sessions ask at once; every reply runs to `new_tokens`. Returns the cell's measurements."""
    sids = [engine.new_session() for _ in range(sessions)]
    barrier = threading.Barrier(sessions + 1)
    records: list[dict] = [{} for _ in range(sessions)]

    def user(i: int) -> None:
        barrier.wait()
        record = records[i]
        record["submitted"] = time.perf_counter()
        for event in engine.chat(sids[i], QUESTIONS[i % len(QUESTIONS)], max_new_tokens=new_tokens,
                                 seed=seed * 1000 + i):
            if "first" not in record and event.stats.get("reply_tokens", 0) >= 1:
                record["first"] = time.perf_counter()
        record["last"] = time.perf_counter()
        record["tokens"] = event.stats.get("reply_tokens", 0)
        record["kind"] = event.kind

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(sessions)]
    for thread in threads:
        thread.start()
    barrier.wait()
    for thread in threads:
        thread.join()
    for sid in sids:
        engine.close(sid)
    failed = [r for r in records if r.get("kind") != "done" or r.get("tokens") != new_tokens]
    if failed:
        raise RuntimeError(f"{len(failed)} of {sessions} replies did not run to {new_tokens} tokens")
    start = min(r["submitted"] for r in records)
    wall = max(r["last"] for r in records) - start
    ttft = [r["first"] - r["submitted"] for r in records]
    per_session = [(r["tokens"] - 1) / max(r["last"] - r["first"], 1e-9) for r in records]
    return {
        "tokens": sum(r["tokens"] for r in records),
        "wall_s": wall,
        "aggregate_tok_s": sum(r["tokens"] for r in records) / wall,
        "per_session_tok_s": statistics.median(per_session),
        "ttft_s": ttft,
    }


class TokenClock:
    """A `generate` streamer that only timestamps: the prompt arrives first, then one call per new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def single_engine(engine: StreamingEngine, prompt: str, tokens: int) -> dict:
    sid = engine.new_session()
    started = time.perf_counter()
    times = []
    for event in engine.chat(sid, prompt, max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0):
        if event.kind == "delta" and event.stats.get("reply_tokens", 0) > len(times):
            times.append(time.perf_counter())
    engine.close(sid)
    if len(times) != tokens:
        raise RuntimeError(f"the engine produced {len(times)} of {tokens} tokens")
    return {"ttft_s": times[0] - started, "decode_tok_s": (tokens - 1) / (times[-1] - times[0])}


def single_generate(model, tokenizer, prompt: str, tokens: int) -> dict:
    from transformers import GenerationConfig

    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to(model.device)
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    clock = TokenClock()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config, streamer=clock)
    produced = out.shape[1] - inputs["input_ids"].shape[1]
    if produced != tokens:
        raise RuntimeError(f"generate produced {produced} of {tokens} tokens")
    times = clock.times[1:]  # the first call hands over the prompt
    return {"ttft_s": times[0] - started, "decode_tok_s": (tokens - 1) / (times[-1] - times[0])}


def single_llamacpp_generate(llm, tokenizer, prompt: str, tokens: int) -> dict:
    """llama-cpp-python's own generation (greedy, end-of-turn ignored) timed like `single_generate`."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    llm.reset()  # no prompt prefix reused from the previous round: every round prefills, as the engine does
    times = []
    started = time.perf_counter()
    for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        times.append(time.perf_counter())
        if len(times) == tokens:
            break
    return {"ttft_s": times[0] - started, "decode_tok_s": (tokens - 1) / (times[-1] - times[0])}


def detokenize_costs(tokenizer, lengths: list[int]) -> dict:
    """Seconds spent turning a reply of n tokens into text deltas, per token: re-decoding the whole reply every
    token (the former `TextStream`) against the incremental `TextStream` (`DecodeStream`)."""
    from streaming_engine.textstream import TextStream

    words = " ".join(QUESTIONS) + " 👋🏽 世界 "
    ids = tokenizer(words * (1 + max(lengths) // 40), add_special_tokens=False)["input_ids"]
    out = {}
    for n in lengths:
        reply = ids[:n]
        began = time.perf_counter()
        for i in range(1, n + 1):
            tokenizer.decode(reply[:i], skip_special_tokens=True)
        whole = time.perf_counter() - began
        stream = TextStream(tokenizer)
        began = time.perf_counter()
        for token in reply:
            stream.push(token)
        stream.finish()
        out[str(n)] = {"whole_reply_redecode_s": whole, "incremental_s": time.perf_counter() - began}
    return out


def summarize_cells(cells: list[dict]) -> dict:
    """Pool one (sessions, scheduler) cell's rounds: medians of the rates, percentiles over every session."""
    ttft = [t for c in cells for t in c["ttft_s"]]
    return {
        "rounds": len(cells),
        "aggregate_tok_s": statistics.median(c["aggregate_tok_s"] for c in cells),
        "per_session_tok_s": statistics.median(c["per_session_tok_s"] for c in cells),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "wall_s": [round(c["wall_s"], 3) for c in cells],
    }


def run(model, tokenizer, *, sessions: list[int], schedulers: list[str], new_tokens: int, rounds: int,
        single_tokens: int, single_rounds: int, start_size: int, recent_size: int, max_batch: int,
        prefill_chunk: int, detok_lengths: list[int] = (), progress: bool = True, config: dict | None = None,
        peers: dict | None = None, decode: dict | None = None) -> dict:
    """`peers`: name -> `measure(prompt, tokens)` for the single stream (default: `generate`, transformers');
    `decode`: the engines' decode-path settings (`cli.decode_kwargs`; default: the engine's)."""
    engines = {}
    for kind in schedulers:
        engines[kind] = StreamingEngine(model, tokenizer, EngineConfig(
            start_size=start_size, recent_size=recent_size, prefill_chunk_size=prefill_chunk, scheduler=kind,
            max_batch=max_batch, max_active_turns=max(max(sessions), 1), max_sessions=max(sessions) + 2,
            **(decode or {})))
        engines[kind].runtime.eos_ids = set()  # every reply runs to its token budget (see the module doc)
    device = model.device
    result = {
        "config": {
            **(config or {}), "sessions": sessions, "schedulers": schedulers, "new_tokens": new_tokens,
            "rounds": rounds, "single_tokens": single_tokens, "single_rounds": single_rounds,
            "start_size": start_size, "recent_size": recent_size, "max_batch": max_batch,
            "prefill_chunk_size": prefill_chunk, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu(),
            "dtype": str(model.dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
            "backend": "llama.cpp" if getattr(model, "is_llamacpp", False) else "transformers",
            "sampling": "engine defaults (temperature 0.7, top-p 0.9, top-k 50, repetition penalty 1.1), "
                        "seeded per session; end-of-turn tokens ignored",
            "decode_path": {kind: engine.decode_path for kind, engine in engines.items()},
        },
        "cells": [],
        "single": {},
    }
    for engine in engines.values():  # warm-up: first-call allocations are nobody's cost
        run_cell(engine, 2, 4, seed=0)
    plan = [(r, n, kind) for r in range(rounds) for n in sessions
            for kind in (schedulers if (r + n) % 2 == 0 else schedulers[::-1])]
    raw: dict[tuple[int, str], list[dict]] = {}
    for r, n, kind in tqdm(plan, desc="concurrency cells", disable=not progress, dynamic_ncols=True):
        raw.setdefault((n, kind), []).append(run_cell(engines[kind], n, new_tokens, seed=r + 1))
    for (n, kind), cells in sorted(raw.items(), key=lambda item: (item[0][0], schedulers.index(item[0][1]))):
        result["cells"].append({"sessions": n, "scheduler": kind, **summarize_cells(cells)})
    for kind in schedulers:
        base = next((c for c in result["cells"] if c["scheduler"] == kind and c["sessions"] == 1), None)
        for cell in result["cells"]:
            if cell["scheduler"] == kind and base:
                cell["aggregate_vs_1_session"] = cell["aggregate_tok_s"] / base["aggregate_tok_s"]
    if single_rounds:
        prompt = QUESTIONS[0]
        engine = engines.get("batched") or next(iter(engines.values()))
        saved_eos = model.generation_config.eos_token_id
        model.generation_config.eos_token_id = None  # generate too runs to its token budget
        peers = peers or {"generate": lambda text, n: single_generate(model, tokenizer, text, n)}
        measures = {"engine": lambda text, n: single_engine(engine, text, n), **peers}
        try:
            runs = {name: [] for name in measures}
            for measure in measures.values():  # warm-up
                measure(prompt, 4)
            for r in tqdm(range(single_rounds), desc="single stream", disable=not progress, dynamic_ncols=True):
                names = list(measures)
                shift = r % len(names)  # each variant goes first in turn
                for name in names[shift:] + names[:shift]:
                    runs[name].append(measures[name](prompt, single_tokens))
        finally:
            model.generation_config.eos_token_id = saved_eos
        for name, measures in runs.items():
            result["single"][name] = {
                "decode_tok_s": statistics.median(m["decode_tok_s"] for m in measures),
                "ttft_s": statistics.median(m["ttft_s"] for m in measures),
                "rounds": [{k: round(v, 4) for k, v in m.items()} for m in measures],
            }
        for name in peers:
            result["single"][f"engine_vs_{name}"] = (result["single"]["engine"]["decode_tok_s"]
                                                    / result["single"][name]["decode_tok_s"])
    if detok_lengths:
        result["detokenize"] = detokenize_costs(tokenizer, list(detok_lengths))
    return result


def format_table(result: dict) -> str:
    cfg = result["config"]
    rows = [f"| sessions | scheduler | aggregate tok/s | × 1 session | per-session tok/s | TTFT p50 s | TTFT p95 s |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for c in result["cells"]:
        rows.append(f"| {c['sessions']} | {c['scheduler']} | {c['aggregate_tok_s']:.1f} | "
                    f"{c.get('aggregate_vs_1_session', float('nan')):.2f} | {c['per_session_tok_s']:.1f} | "
                    f"{c['ttft_p50_s']:.2f} | {c['ttft_p95_s']:.2f} |")
    by = {(c["sessions"], c["scheduler"]): c for c in result["cells"]}
    if set(cfg["schedulers"]) == set(SCHEDULERS):
        rows += ["", "| sessions | batched ÷ round-robin (aggregate tok/s) |", "|---:|---:|"]
        for n in cfg["sessions"]:
            rows.append(f"| {n} | {by[(n, 'batched')]['aggregate_tok_s'] / by[(n, 'round-robin')]['aggregate_tok_s']:.2f} |")
    single = result.get("single")
    if single:
        rows += ["", "| single stream | decode tok/s | TTFT s |", "|---|---:|---:|"]
        names = [name for name in single if not name.startswith("engine_vs_")]
        for name in names:
            rows.append(f"| {name} | {single[name]['decode_tok_s']:.1f} | {single[name]['ttft_s']:.3f} |")
        for name in names[1:]:
            rows.append(f"| engine ÷ {name} | {single[f'engine_vs_{name}']:.3f} | |")
    detok = result.get("detokenize")
    if detok:
        rows += ["", "| reply tokens | re-decode the whole reply every token | incremental (`DecodeStream`) |",
                 "|---:|---:|---:|"]
        for n, d in detok.items():
            rows.append(f"| {n} | {d['whole_reply_redecode_s'] * 1000:,.1f} ms | {d['incremental_s'] * 1000:,.1f} ms |")
    return "\n".join(rows)


def parse_counts(text: str, option: str = "--sessions") -> list[int]:
    """`"1,2,4"` -> `[1, 2, 4]` (sorted, duplicates dropped); a clear error naming `option` otherwise."""
    return cli.parse_int_list(text, option, 1)


def llamacpp_setup(args):
    """The llama.cpp model (as many threads as torch gets), and the single-stream peers: llama.cpp's own generate
    on the same file, and the transformers engine on the same model with the same engine settings."""
    from streaming_engine.llamacpp.model import plain_llama
    from streaming_engine.loading import load

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, backend="llama.cpp", n_threads=torch.get_num_threads())
    llm = plain_llama(model.path, n_ctx=args.start_size + args.recent_size, n_threads=model.n_threads)
    hf_model, hf_tokenizer = load(args.model, args.device, args.dtype, backend="transformers")
    hf_engine = StreamingEngine(hf_model, hf_tokenizer, EngineConfig(
        start_size=args.start_size, recent_size=args.recent_size,
        prefill_chunk_size=min(args.prefill_chunk, max(1, args.recent_size // 2)), **cli.decode_kwargs(args)))
    hf_engine.runtime.eos_ids = set()
    peers = {"generate": lambda text, n: single_llamacpp_generate(llm, tokenizer, text, n),
             "engine_transformers": lambda text, n: single_engine(hf_engine, text, n)}
    return model, tokenizer, peers


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("benchmarks.serve", __doc__)
    cli.add_model_args(p)
    p.add_argument("--backend", choices=("transformers", "llama.cpp"), default="transformers",
                   help="the engine's backend; llama.cpp also measures llama.cpp's own generate and the transformers "
                        "engine in the single stream")
    p.add_argument("--sessions", default=DEFAULT_SESSIONS, help="comma list of concurrent session counts")
    p.add_argument("--schedulers", default=",".join(SCHEDULERS), help=f"comma list of {', '.join(SCHEDULERS)}")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens every reply runs to")
    p.add_argument("--rounds", type=int, default=2, help="repetitions of every concurrency cell (interleaved)")
    p.add_argument("--single-tokens", type=int, default=128, help="tokens of the single-stream comparison")
    p.add_argument("--single-rounds", type=int, default=5, help="repetitions of engine and generate (0: skip)")
    p.add_argument("--start-size", type=int, default=4, help="attention sinks")
    p.add_argument("--recent-size", type=int, default=1020, help="recent window")
    p.add_argument("--max-batch", type=int, default=16, help="rows of the batched scheduler")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward pass")
    cli.add_decode_args(p)
    p.add_argument("--detok-tokens", default="1024,4096",
                   help="reply lengths for the detokenization comparison (comma list; empty: skip)")
    p.add_argument("--quick", action="store_true",
                   help="a couple of minutes in all: 32 new tokens, one round, 64 single-stream tokens, 2 rounds, "
                        "detokenization at 1024 tokens")
    p.add_argument("--output", default="runs/serve.json", help="JSON path; the PNG goes beside it")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.rounds, args.single_tokens, args.single_rounds = 32, 1, 64, 2
        args.detok_tokens = "1024"
    try:
        sessions = parse_counts(args.sessions)
        detok = parse_counts(args.detok_tokens, "--detok-tokens") if args.detok_tokens.strip() else []
        schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
        unknown = set(schedulers) - set(SCHEDULERS)
        if unknown or not schedulers:
            raise ValueError(f"--schedulers takes a comma list of {', '.join(SCHEDULERS)} (got {args.schedulers!r})")
        cli.check_min(new_tokens=(args.new_tokens, 2), rounds=(args.rounds, 1), single_tokens=(args.single_tokens, 2),
                      single_rounds=(args.single_rounds, 0), start_size=(args.start_size, 0),
                      recent_size=(args.recent_size, 2), max_batch=(args.max_batch, 1), prefill_chunk=(args.prefill_chunk, 1))
        if args.threads is None and (args.device or "cpu").startswith("cpu") and not torch.cuda.is_available():
            args.threads = 1  # one thread per process: machines running this are shared (docs/benchmarks.md measures with 1 thread throughout)
        peers = None
        if args.backend == "llama.cpp":
            model, tokenizer, peers = llamacpp_setup(args)
        else:
            model, tokenizer = cli.load_model(args)
        config = {"model": args.model or DEFAULT_MODEL_NAME, "quick": args.quick}
        result = run(model, tokenizer, sessions=sessions, schedulers=schedulers, new_tokens=args.new_tokens,
                     rounds=args.rounds, single_tokens=args.single_tokens, single_rounds=args.single_rounds,
                     start_size=args.start_size, recent_size=args.recent_size, max_batch=args.max_batch,
                     prefill_chunk=min(args.prefill_chunk, max(1, args.recent_size // 2)), detok_lengths=detok,
                     config=config, peers=peers, decode=cli.decode_kwargs(args))
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"error: {exc}\n")
    from .plots import plot_serve

    cli.write_outputs(args.output, result, plot_serve, format_table(result), cli.run_metadata(args, argv, parser.prog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
