"""Load and isolation test against a running app: `python -m benchmarks.loadtest --url ... --sessions N`.

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
#: Longest one turn may take before it counts as an error; how often a streaming turn's new output is looked at.
TURN_TIMEOUT_S = 600.0
UPDATE_POLL_S = 0.02
#: The busy probe checks the server's running turns this often, and waits this long between its tries (seconds).
BUSY_PROBE_POLL_S = 0.2
BUSY_PROBE_GAP_S = 2.0

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
    route: str | None = None  # the cookies the server set on this user's first response (session affinity)
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


def updates(job, deadline: float):
    """A streaming job's outputs as they arrive, until it is done (successfully or not) or `deadline` passes.

    Not `for update in job`: gradio_client's iterator waits for a "finished" status that never comes when the
    connection breaks (a server killed mid-reply), and would hang the whole run."""
    seen = 0
    while True:
        outputs = job.outputs()
        yield from outputs[seen:]
        seen = len(outputs)
        if job.done():
            yield from job.outputs()[seen:]
            return
        if time.monotonic() > deadline:
            job.cancel()
            raise TimeoutError(f"no complete answer within {TURN_TIMEOUT_S:.0f} s")
        time.sleep(UPDATE_POLL_S)


#: What a front in `deploy/` answers by itself when no replica answered a request: nginx 502 (every replica refused
#: or dropped the connection) and 504 (none answered within `proxy_connect_timeout`), HAProxy 503 (no server up, or
#: every retry failed). gradio_client raises `QueueError`, worded "Queue is full", for every HTTP 503 at
#: `queue/join`, so a 503 is either the app's own queue bound (`--queue-max-size`) or HAProxy with no replica; it
#: raises `httpx.HTTPStatusError` for the others. Read as a queue overflow, a replica outage looks like a
#: server-side limit (this misdirected the search behind the revert of the typed API), so each is named.
UNAVAILABLE = {
    502: "unavailable: HTTP 502 (nginx in front of the app reached no replica)",
    503: "unavailable: HTTP 503 (the app's queue is full, or HAProxy in front of it has no replica up; at "
         "queue/join gradio_client calls both 'Queue is full')",
    504: "unavailable: HTTP 504 (nginx in front of the app got no replica to answer in time)",
}


def error_text(exc: BaseException) -> str:
    """An endpoint's error as the report lists it: `code: message` for the app's own errors (`gr.Error`, whose
    title is the code: see `webui.webapi.ERROR_CODES`), an `UNAVAILABLE` text for a front's "no replica answered"
    status, else the exception's type and text."""
    import httpx
    from gradio_client.utils import QueueError

    if isinstance(exc, QueueError):
        return UNAVAILABLE[503]
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in UNAVAILABLE:
        return UNAVAILABLE[exc.response.status_code]
    title, message = getattr(exc, "title", None), getattr(exc, "message", None)
    if isinstance(title, str) and message is not None:
        return f"{title}: {message}"
    return f"{type(exc).__name__}: {exc}"


def run_user(url: str, index: int, turns: int, max_new_tokens: int, deadline: float, out: UserResult) -> None:
    from gradio_client import Client

    try:
        client = Client(url, verbose=False)
        # Behind a front with session affinity (deploy/), the cookies of the first response name this user's
        # replica.
        out.route = ";".join(f"{k}={v}" for k, v in sorted(getattr(client, "cookies", {}).items())) or None
        session = client.predict(api_name="/new_session")
    except Exception as exc:  # noqa: BLE001 - a load test reports failures, it does not raise them
        out.errors.append(f"user {index}: could not open a session: {error_text(exc)}")
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
            for text, update_stats in updates(job, min(deadline, time.monotonic() + TURN_TIMEOUT_S)):
                if first is None and text:
                    first = time.perf_counter() - started
                reply, stats = text, update_stats or stats
            reply, stats = job.result(timeout=TURN_TIMEOUT_S)  # raises the endpoint's error (code and message)
        except Exception as exc:  # noqa: BLE001
            out.errors.append(f"user {index} turn {turn}: {error_text(exc)}")
            continue
        sent.append(message)
        received.append(reply)
        out.turns_completed += 1
        out.ttft_s.append(stats.get("time_to_first_token_s") or first or 0.0)
        if stats.get("tokens_per_s"):
            out.tokens_per_s.append(stats["tokens_per_s"])
    try:
        history = client.predict(session, api_name="/history")
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
        out.errors.append(f"user {index}: could not read back its history: {error_text(exc)}")


def probe_busy(url: str, tries: int, busy_at: int, done: threading.Event, out: list[dict]) -> None:
    """One more user beyond the load: each time `/health` shows `busy_at` replies being written, send one turn
    and record how fast the server answers and whether it said "Server busy" (at most `tries` times)."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    try:
        client = Client(url, verbose=False)
        session = client.predict(api_name="/new_session")
    except Exception as exc:  # noqa: BLE001
        out.append({"error": f"could not open a session: {exc}"})
        return
    while len(out) < tries and not done.is_set():
        try:
            active = client.predict(api_name="/health")["active_turns"]
            if active < busy_at:
                done.wait(BUSY_PROBE_POLL_S)
                continue
            started = time.perf_counter()
            try:
                client.predict(session, "Are you free?", 1, api_name="/chat")
                error = None
            except AppError as exc:  # a refusal is the endpoint's error: its code is the title
                error = str(exc.message)
            out.append({"active_turns_before": active, "answer_s": round(time.perf_counter() - started, 3),
                        "busy": bool(error) and error.startswith("Server busy"), "error": error})
        except Exception as exc:  # noqa: BLE001 - a load test reports failures, it does not raise them
            out.append({"error": str(exc)})
        done.wait(BUSY_PROBE_GAP_S)
    try:
        client.predict(session, api_name="/close_session")
    except Exception:  # noqa: BLE001
        pass


def busy_summary(probes: list[dict]) -> dict | None:
    if not probes:
        return None
    answered = [p["answer_s"] for p in probes if "answer_s" in p]
    return {"tries": len(probes), "busy": sum(bool(p.get("busy")) for p in probes),
            "answer_s_p50": percentile(answered, 50), "answer_s_max": max(answered) if answered else None,
            "samples": probes}


def run_load(url: str, sessions: int, turns: int, max_new_tokens: int = 48,
             deadline_s: float = DEFAULT_DEADLINE_S, busy_probes: int = 0) -> dict:
    """Run the load and return the report (see module docstring). `busy_probes`: how many times an extra user
    tries a turn while all `sessions` users' replies are being written (see `probe_busy`)."""
    from gradio_client import Client

    monitor = Client(url, verbose=False)
    health = {"peak": 0, "samples": []}  # samples: (seconds since start, resident bytes)
    done = threading.Event()
    started = time.monotonic()

    def poll():
        while not done.is_set():
            try:
                h = monitor.predict(api_name="/health")
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
    probes: list[dict] = []
    prober = threading.Thread(target=probe_busy, args=(url, busy_probes, sessions, done, probes), daemon=True)
    if busy_probes:
        prober.start()
    for user in users:
        user.start()
    for user in users:
        user.join(timeout=max(1.0, deadline - time.monotonic() + 60))
    done.set()
    poller.join(timeout=10)
    if busy_probes:
        prober.join(timeout=60)
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
        "by_route": by_route(results),
        "busy_probe": busy_summary(probes),
    }


def by_route(results: list[UserResult]) -> dict:
    """Users, turns, errors and cross-talk per route (the affinity cookies each user was given); one "" entry
    when the server sets none (a single app)."""
    routes: dict = {}
    for r in results:
        entry = routes.setdefault(r.route or "", {"users": 0, "turns_completed": 0, "errors": 0, "cross_talk": 0})
        entry["users"] += 1
        entry["turns_completed"] += r.turns_completed
        entry["errors"] += len(r.errors)
        entry["cross_talk"] += r.cross_talk
    return routes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadtest", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:7860", help="the running app (loopback only by default)")
    p.add_argument("--sessions", type=int, default=8, help=f"concurrent conversations (1..{MAX_SESSIONS})")
    p.add_argument("--turns", type=int, default=10, help=f"turns per conversation (1..{MAX_TURNS})")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest reply per turn")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, help="stop after this many seconds")
    p.add_argument("--output", default=None, help="write the JSON report here too, and a PNG of server memory beside it")
    p.add_argument("--allow-remote", action="store_true", help="permit a non-loopback URL (your own server only)")
    p.add_argument("--busy-probes", type=int, default=0,
                   help="times one extra user tries a turn while every load user's reply is being written, "
                        "recording how fast it is answered and whether with \"Server busy\"")
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
    if not 0 <= args.busy_probes <= MAX_TURNS:
        parser.error(f"--busy-probes must be in [0, {MAX_TURNS}]")
    report = run_load(args.url, args.sessions, args.turns, args.max_new_tokens, args.deadline, args.busy_probes)
    print(json.dumps(report, indent=2))
    if args.output:
        from .plots import plot_load  # matplotlib only when a file is asked for
        from .runinfo import run_metadata, write_result

        # The machine recorded is this client's: with the default loopback URL, also the server's.
        write_result(args.output, report, run_metadata(args, argv, parser.prog))
        print("wrote", args.output, *plot_load(report, args.output), file=sys.stderr)
    return 0 if report["errors"] == 0 and report["cross_talk"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
