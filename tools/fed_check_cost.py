"""How long `history.parse_history` takes on history files built to make its `fed` check slow.

Each file quotes the largest messages it can hold from many recall records, each quoted line found only near the
end of the last message searched. Writes a JSON (default `assets/eval/fed_check_cost.json`): per file its shape,
its size, the parse time, how many records the check's budget (`history.MAX_FED_CHECK_CHARS`) kept and the parse
time with the budget lifted, with the machine and the command. Run from the repository root:

    python tools/fed_check_cost.py [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import streaming_engine.history as history_module  # noqa: E402
from streaming_engine.history import MAX_FED_CHECK_CHARS, MAX_HISTORY_BYTES, parse_history  # noqa: E402
from streaming_engine.recall import BLOCK_HEAD, BLOCK_TAIL, QUOTE  # noqa: E402

#: (large messages, characters each, quoted lines per record, records): few huge texts and many lines, many
#: huge texts, many mid-sized ones.
SHAPES = [(6, 240_000, 1, 3000), (6, 240_000, 50, 500), (28, 250_000, 2, 400), (200, 30_000, 5, 3000)]


def slow_file(large: int, chars: int, lines: int, records: int) -> str:
    """A valid history whose every record quotes up to 6 of the `large` messages, with `lines` quoted lines taken
    from the end of the last one (so each search scans the others whole first)."""
    rng = random.Random(0)
    messages = []
    for _ in range(large):
        words = " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 8)))
                         for _ in range(chars // 5))
        messages += [{"role": "user", "content": words[:chars]}, {"role": "assistant", "content": "ok"}]
    quoted = list(range(0, 2 * large, 2))[:6]
    last = messages[quoted[-1]]["content"]
    body = "".join(f"{QUOTE}{last[len(last) - (j + 1) * 9:len(last) - j * 9].strip()}\n" for j in range(lines))
    for r in range(records):
        messages += [{"role": "user", "content": f"q{r}", "recalled": quoted,
                      "fed": f"{BLOCK_HEAD}\n{body}{BLOCK_TAIL}\n\nq{r}"},
                     {"role": "assistant", "content": "a"}]
    return json.dumps({"format": "streaming-llm-chat", "messages": messages})


@contextlib.contextmanager
def unbounded():
    """`history.MAX_FED_CHECK_CHARS` lifted for the duration (the module reads it at each parse)."""
    kept = history_module.MAX_FED_CHECK_CHARS
    history_module.MAX_FED_CHECK_CHARS = sys.maxsize
    try:
        yield
    finally:
        history_module.MAX_FED_CHECK_CHARS = kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="assets/eval/fed_check_cost.json")
    args = parser.parse_args(argv)
    files = []
    for shape in SHAPES:
        text = slow_file(*shape)
        size = len(text.encode("utf-8"))
        assert size <= MAX_HISTORY_BYTES, size
        start = time.perf_counter()
        history = parse_history(text)
        elapsed = time.perf_counter() - start
        # The same file with the budget lifted: what the check would cost without it.
        with unbounded():
            start = time.perf_counter()
            parse_history(text)
            without = time.perf_counter() - start
        files.append({"large_messages": shape[0], "chars_each": shape[1], "lines_per_record": shape[2],
                      "records": shape[3], "file_mib": round(size / 2**20, 2), "parse_s": round(elapsed, 3),
                      "records_kept": sum(1 for r in history.records or [] if r),
                      "parse_s_without_budget": round(without, 3)})
        print(json.dumps(files[-1]), flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    report = {"command": " ".join(["python tools/fed_check_cost.py", *(argv if argv is not None else sys.argv[1:])]),
              "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version()},
              "budget_chars": MAX_FED_CHECK_CHARS, "files": files,
              "slowest_parse_s": max(f["parse_s"] for f in files),
              "slowest_parse_s_without_budget": max(f["parse_s_without_budget"] for f in files)}
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump(report, out, indent=2)
        out.write("\n")


if __name__ == "__main__":
    main()
