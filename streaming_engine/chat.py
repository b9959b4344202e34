"""Command-line streaming chat: `python -m streaming_engine.chat` (the reference `run_streaming_llama.py`).

A user-facing chat in the terminal (the MT-Bench *benchmark* of the same idea is `benchmarks.mtbench`).

Reads prompts from a file (a `.jsonl` of MT-Bench style `{"turns": [...]}` records, a `.json` list, or plain text
with one prompt per line) or from standard input, feeds them one after another into ONE streaming session, prints
each answer as it streams and the cache statistics after it. A prompt `/continue` goes on with the last reply where
it ended (`StreamingEngine.continue_reply`). Interactive when stdin is a terminal. `--history`
continues a conversation downloaded from the web app, and `--save` writes one the app can upload (`history.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Only torch-free modules here: `--help` must answer at once. The engine, the loader and torch are imported by
# `main` once the flags are read.
from .backends import BACKENDS, backend_line, choose_backend
from .cli_options import add_decode_args, add_placement_args, add_recall_arg, decode_kwargs, placement_kwargs
from .defaults import (
    DEFAULT_EVICTION,
    DEFAULT_MODEL_NAME,
    DEFAULT_PIN_LIMIT,
    DEFAULT_RECENT_SIZE,
    DEFAULT_START_SIZE,
    MODES,
)
from .eviction import DEFAULT_EVICT_BLOCK, EVICTION_POLICIES
from .history import export_history, parse_history, restore_history, upload_limit_note
from .prompts import jsonl_records
from .validate import MARK_KEYS

#: A prompt line that continues the last reply (cut at --max-new-tokens, or stopped) instead of sending a message.
CONTINUE_COMMAND = "/continue"


def read_prompts(path: str | None) -> list[str]:
    """Prompts from `path` (jsonl / json / text) or, with no path, from stdin (one per line)."""
    if path is None:
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"error: prompt file {path!r} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        prompts = []
        try:
            for _, record in jsonl_records(text, path):
                turns = record.get("turns") if isinstance(record, dict) else None
                prompt = record.get("prompt", record) if isinstance(record, dict) else record
                prompts.extend(turns if isinstance(turns, list) else [str(prompt)])
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from exc
        return prompts
    if file.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise SystemExit(f"error: {path} must hold a JSON list of strings")
        return data
    return [line for line in text.splitlines() if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streaming_engine.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("prompts", nargs="?", help=f"prompt file (.jsonl, .json or text); default: stdin. A prompt "
                                              f"{CONTINUE_COMMAND} goes on with the last reply where it was cut")
    p.add_argument("--model", default=None, help=f"Hugging Face id or local path (default: offline {DEFAULT_MODEL_NAME})")
    p.add_argument("--start-size", type=int, default=DEFAULT_START_SIZE,
                   help=f"attention sinks kept (default {DEFAULT_START_SIZE})")
    p.add_argument("--recent-size", type=int, default=DEFAULT_RECENT_SIZE,
                   help=f"recent tokens kept (default {DEFAULT_RECENT_SIZE})")
    p.add_argument("--mode", choices=MODES, default="streaming")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--history", default=None, metavar="FILE",
                   help="continue the conversation of a history file (the web app's \"Download history\"): its "
                        "messages, system prompt and recall switch; the cache is rebuilt from them on the first turn")
    p.add_argument("--save", default=None, metavar="FILE",
                   help="write the conversation as a history file after every turn (the web app can upload it; "
                        "may be the --history file)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default): transformers; llama.cpp only when asked for (a GGUF on the CPU)")
    p.add_argument("--pin-system", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the system prompt in the cache for good, next to the sinks (default: on)")
    p.add_argument("--pin-limit", type=int, default=DEFAULT_PIN_LIMIT,
                   help=f"most tokens a pinned system prompt may take; a longer one is refused "
                        f"(default {DEFAULT_PIN_LIMIT})")
    p.add_argument("--eviction", choices=EVICTION_POLICIES, default=DEFAULT_EVICTION,
                   help=f"what leaves a full cache: the oldest tokens, or whole oldest messages "
                        f"(default {DEFAULT_EVICTION})")
    add_recall_arg(p)
    p.add_argument("--evict-block", type=int, default=None,
                   help=f"fewest tokens one eviction takes, 1..recent size; 1 = token by token "
                        f"(default {DEFAULT_EVICT_BLOCK}, or the recent size if smaller)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    add_placement_args(p)
    add_decode_args(p)
    return p


def read_history(path: str, system: str | None):
    """The history file at `path` (`history.parse_history`), or `SystemExit` with why not. `--system` beside it is
    refused: the conversation goes on under the system prompt it was held under."""
    if system is not None:
        raise SystemExit("error: --system and --history both give a system prompt; the history file's applies")
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"error: history file {path!r} does not exist")
    try:
        return parse_history(file.read_bytes())
    except ValueError as exc:
        raise SystemExit(f"error: history file {path!r}: {exc}") from exc


def save_history(path: str, engine, session: str, recall: bool | None, marks: dict[str, set[int]]) -> None:
    """Write the conversation to `path` as a history file (with its recall switch and its replies' marks), whole
    or not at all (a temporary file beside it, renamed over it), so an interrupted write never leaves half a file
    where the last good one was."""
    text = export_history(engine, session, recall=recall, marks=marks)
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    note = upload_limit_note(text)
    if note:
        print(f"[{note}]", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interactive = args.prompts is None and sys.stdin.isatty()
    prompts = [] if interactive else read_prompts(args.prompts)
    history = read_history(args.history, args.system) if args.history is not None else None
    from .engine import EngineConfig, StreamingEngine, refusal
    from .loading import load
    from .placement import describe_placement

    try:
        config = EngineConfig(start_size=args.start_size, recent_size=args.recent_size, pin_system=args.pin_system,
                              pin_limit=args.pin_limit, eviction=args.eviction,
                              evict_block=args.evict_block, recall_budget=args.recall_budget,
                              **decode_kwargs(args))
        print(backend_line(*choose_backend(args.backend, args.model, args.device, args.device_map, args.dtype)),
              file=sys.stderr, flush=True)
        model, tokenizer = load(args.model, args.device, args.dtype, backend=args.backend, **placement_kwargs(args))
        if args.device_map is not None:
            print(f"[weights: {describe_placement(model)}]", file=sys.stderr, flush=True)
        engine = StreamingEngine(model, tokenizer, config)
        session = engine.new_session(args.mode, args.system) if history is None else restore_history(
            engine, history, args.mode)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if history is not None:
        print(f"[continuing {len(history.messages)} messages from {args.history}]", file=sys.stderr, flush=True)
    sampling = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
    )

    # The file's switch and marks travel on to --save's; this chat adds the replies it stops or loses.
    recall = history.recall if history is not None else None
    marks = {key: set(history.marks[key]) if history is not None else set() for key in MARK_KEYS}

    def save() -> None:
        if args.save is not None:
            save_history(args.save, engine, session, recall, marks)

    def last_reply() -> int | None:
        """The index (as `marks` counts, the system prompt left out) of the last message when it is a reply."""
        visible = [m for m in engine.history(session) if m["role"] != "system"]
        return len(visible) - 1 if visible and visible[-1]["role"] == "assistant" else None

    def mark_last_reply(key: str) -> None:
        """Mark the conversation's last message with `key` (`MARK_KEYS`) when it is a reply."""
        reply = last_reply()
        if reply is not None:
            marks[key].add(reply)

    def ask(prompt: str) -> bool:
        if prompt.strip() == CONTINUE_COMMAND:
            events = engine.continue_reply(session, **sampling)
            if refusal(events) is None:  # taken: the reply's mark is the one its new end gives it
                print("\n[continuing the last reply] ", end="", flush=True)
                reply = last_reply()  # a reply: the engine took the continuation
                for kept in marks.values():
                    kept.discard(reply)
        else:
            print(f"\nUSER: {prompt}\n\nASSISTANT: ", end="", flush=True)
            events = engine.chat(session, prompt, **sampling)
        go_on = answer(events)
        save()  # after every turn, a failed one too
        return go_on

    def answer(events) -> bool:
        for event in events:
            if event.mark is not None:  # as the app marks it: a failure part-way, a cut at --max-new-tokens
                mark_last_reply(event.mark)
            if event.kind == "delta":
                print(event.text, end="", flush=True)
            elif event.kind == "error":
                print(f"\n[error] {event.text}", file=sys.stderr)
                return True
            else:
                s = event.stats
                rate = f"{s['tokens_per_s']:.1f} tok/s" if s.get("tokens_per_s") else "-"
                print(
                    f"\n[cache {s['cache_tokens']}/{s['cache_capacity']} tokens | evicted {s['evicted_tokens']} | "
                    f"seen {s['seen_tokens']} | pinned {s['pinned_tokens']} | turns in memory "
                    f"{s['turns_in_memory']}/{s['turns']} | {rate} | finish: {event.finish_reason}]",
                    flush=True,
                )
                return event.finish_reason != "context_full"
        return True

    try:
        if interactive:
            print(f"Type a message ({CONTINUE_COMMAND} goes on with a cut reply; Ctrl-D to quit).")
            for line in sys.stdin:
                if line.strip() and not ask(line.rstrip("\n")):
                    break
        else:
            for prompt in prompts:
                if not ask(prompt):
                    break
    except KeyboardInterrupt:
        replying = engine.replying(session)  # Ctrl-C at the prompt stops no reply
        engine.stop(session)
        engine.settle(session)  # the partial reply lands in the history, and so in the saved file
        if replying:
            mark_last_reply("stopped")  # Ctrl-C is the user stopping it, as the app's Stop button
        save()
        print("\n[interrupted]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
