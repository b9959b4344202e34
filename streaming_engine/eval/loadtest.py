"""Load and isolation test against a running app: `python -m streaming_engine.eval.loadtest --url ... --sessions N`.

An HTTP client of the app that imports nothing of the engine. It drives N concurrent conversations of T turns
each through the app's HTTP API (`/new_session`, `/chat`, `/history`, `/close_session`, `/health`, see
`webui/webapi.py`) with `gradio_client`, and reports completed turns, errors, cross-talk, time-to-first-token
percentiles, decode speed and the server's peak memory as JSON.

Cross-talk is checked from both ends: every user message carries a random tag, and after its turns each virtual
user reads its conversation back from the server. The history must hold exactly its own messages in order, and
every reply it streamed must be the reply stored there. Any foreign tag or mismatch counts.

Safety: the run is bounded (sessions, turns and a wall-clock deadline; it stops by itself) and only talks to
loopback addresses unless `--allow-remote` is given.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import secrets
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from .stats import percentile

#: Bounds of one run: virtual users and turns per user.
MAX_SESSIONS = 64
MAX_TURNS = 100
DEFAULT_DEADLINE_S = 1800.0
HEALTH_POLL_S = 1.0

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "What do bees make?",
    "How many days are in a week?",
    "What is water made of?",
    "Give me a synonym for happy.",
    "What is the opposite of cold?",
    "Which animal says moo?",
    "What shape has three sides?",
    "What season comes after winter?",
]


@dataclass
class UserResult:
    turns_completed: int = 0
    errors: list[str] = field(default_factory=list)
    cross_talk: int = 0
    ttft_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_user(url: str, index: int, turns: int, max_new_tokens: int, deadline: float, out: UserResult) -> None:
    from gradio_client import Client

    try:
        client = Client(url, verbose=False)
        session = client.predict(api_name="/new_session")
    except Exception as exc:  # noqa: BLE001 - a load test reports failures, it does not raise them
        out.errors.append(f"user {index}: could not open a session: {exc}")
        return
    sent, received = [], []
    for turn in range(turns):
        if time.monotonic() > deadline:
            out.errors.append(f"user {index}: deadline reached before turn {turn}")
            break
        tag = f"[u{index}-t{turn}-{secrets.token_hex(3)}]"
        message = f"{tag} {QUESTIONS[(index + turn) % len(QUESTIONS)]}"
        started = time.perf_counter()
        first = None
        reply, stats = "", {}
        try:
            job = client.submit(session, message, max_new_tokens, api_name="/chat")
            for update in job:
                text, stats_json = update
                if first is None and text:
                    first = time.perf_counter() - started
                reply = text
                stats = json.loads(stats_json) if stats_json else stats
            result = job.result()
            reply, stats = result[0], json.loads(result[1]) if result[1] else stats
        except Exception as exc:  # noqa: BLE001
            out.errors.append(f"user {index} turn {turn}: {exc}")
            continue
        if stats.get("error"):
            out.errors.append(f"user {index} turn {turn}: {stats['error']}")
            continue
        sent.append(message)
        received.append(reply)
        out.turns_completed += 1
        out.ttft_s.append(stats.get("time_to_first_token_s") or first or 0.0)
        if stats.get("tokens_per_s"):
            out.tokens_per_s.append(stats["tokens_per_s"])
    try:
        history = client.predict(session, api_name="/history")
        history = json.loads(history) if isinstance(history, str) else history
        pairs, pending_user = {}, None
        for m in history:
            if m["role"] == "user":
                pending_user = m["content"]
                out.cross_talk += not pending_user.startswith(f"[u{index}-")  # another user's message
            elif m["role"] == "assistant" and pending_user is not None:
                pairs[pending_user] = m["content"]
                pending_user = None
        for message, reply in zip(sent, received):
            if pairs.get(message) != reply:  # what this user streamed is not what its history holds
                out.cross_talk += 1
        client.predict(session, api_name="/close_session")
    except Exception as exc:  # noqa: BLE001
        out.errors.append(f"user {index}: could not read back its history: {exc}")


def run_load(url: str, sessions: int, turns: int, max_new_tokens: int = 48,
             deadline_s: float = DEFAULT_DEADLINE_S) -> dict:
    """Run the load and return the report (see module docstring)."""
    from gradio_client import Client

    monitor = Client(url, verbose=False)
    health = {"peak": 0, "samples": []}  # samples: (seconds since start, resident bytes)
    done = threading.Event()
    started = time.monotonic()

    def poll():
        while not done.is_set():
            try:
                h = monitor.predict(api_name="/health")
                h = json.loads(h) if isinstance(h, str) else h
                health["peak"] = max(health["peak"], int(h["peak_rss_bytes"]))
                health["samples"].append((round(time.monotonic() - started, 1), int(h["rss_bytes"])))
            except Exception:  # noqa: BLE001 - monitoring is best effort; the main report still comes out
                pass
            done.wait(HEALTH_POLL_S)

    deadline = started + deadline_s
    results = [UserResult() for _ in range(sessions)]
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    users = [
        threading.Thread(target=run_user, args=(url, i, turns, max_new_tokens, deadline, results[i]), daemon=True)
        for i in range(sessions)
    ]
    for user in users:
        user.start()
    for user in users:
        user.join(timeout=max(1.0, deadline - time.monotonic() + 60))
    done.set()
    poller.join(timeout=10)
    ttft = [t for r in results for t in r.ttft_s]
    rates = [t for r in results for t in r.tokens_per_s]
    errors = [e for r in results for e in r.errors]
    samples = health["samples"]
    # The first turns allocate buffers once (warm-up); what must stay flat is memory after that.
    warm = samples[len(samples) // 4][1] if samples else None
    return {
        "url": url,
        "sessions": sessions,
        "turns_per_session": turns,
        "max_new_tokens": max_new_tokens,
        "turns_completed": sum(r.turns_completed for r in results),
        "errors": len(errors),
        "error_messages": errors[:20],
        "cross_talk": sum(r.cross_talk for r in results),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "tokens_per_s": statistics.median(rates) if rates else None,
        "peak_rss_bytes": health["peak"],
        "rss_first_bytes": samples[0][1] if samples else None,
        "rss_after_warmup_bytes": warm,
        "rss_last_bytes": samples[-1][1] if samples else None,
        "rss_growth_after_warmup_bytes": samples[-1][1] - warm if samples else None,
        "rss_timeline": samples,
        "duration_s": round(time.monotonic() - started, 2),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streaming_engine.eval.loadtest", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:7860", help="the running app (loopback only by default)")
    p.add_argument("--sessions", type=int, default=8, help=f"concurrent conversations (1..{MAX_SESSIONS})")
    p.add_argument("--turns", type=int, default=10, help=f"turns per conversation (1..{MAX_TURNS})")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest reply per turn")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, help="stop after this many seconds")
    p.add_argument("--output", default=None, help="write the JSON report here too, and a PNG of server memory beside it")
    p.add_argument("--allow-remote", action="store_true", help="permit a non-loopback URL (your own server only)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= MAX_SESSIONS:
        parser.error(f"--sessions must be in [1, {MAX_SESSIONS}]")
    if not 1 <= args.turns <= MAX_TURNS:
        parser.error(f"--turns must be in [1, {MAX_TURNS}]")
    if not 0 < args.deadline <= 4 * 3600:
        parser.error("--deadline must be in (0, 14400] seconds")
    if not is_loopback(args.url) and not args.allow_remote:
        parser.error(f"{args.url} is not a loopback address; pass --allow-remote to load-test your own server")
    report = run_load(args.url, args.sessions, args.turns, args.max_new_tokens, args.deadline)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        from .plots import plot_load  # matplotlib only when a file is asked for

        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        print("wrote", args.output, *plot_load(report, args.output), file=sys.stderr)
    return 0 if report["errors"] == 0 and report["cross_talk"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
