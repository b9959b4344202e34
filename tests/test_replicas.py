"""Any replica serves any conversation (issue 25, deliverables 2-4): two app replicas on loopback sharing one real
PostgreSQL database, behind an off-the-shelf front started from `deploy/` (nginx with `nginx.conf`, HAProxy with
`haproxy.cfg`). A browser chats on replica A; A is killed with SIGKILL while a reply streams; the browser's next
page load and message are served by replica B, which loads the transcript from the database and re-primes its cache:
the whole history is there, the cut-off reply is marked interrupted, and the conversation goes on. A stateless
OpenAI-API client continues its conversation through the same front.

A tiny random model keeps it fast; what is checked is routing, storage and the cache, not the words.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from browser_util import (
    LAUNCH_ARGS,
    find_chromium,
    free_port,
    gauge,
    reload_page,
    save_model,
    set_max_new_tokens,
    start_app,
    stop_app,
    wait_idle,
)
from fronts import AFFINITY_COOKIE, DEPLOY, FRONTS, SAMPLE_LISTEN_PORT, SAMPLE_PORTS

pytestmark = [pytest.mark.browser]

CHROMIUM = find_chromium()
TIMEOUT_MS = 120_000


class Replicas:
    """Two app processes on loopback sharing one PostgreSQL database; `kill` and `restart` one of them."""

    def __init__(self, model_dir: Path, folder: Path, database_url: str):
        self.folder = folder
        self.ports = [free_port(), free_port()]
        self.args = ["--model", str(model_dir), "--database-url", database_url, "--recent-size", "1020",
                     "--max-sessions-per-client", "32"]
        self.processes = [self.start(i) for i in range(2)]

    def start(self, i: int) -> subprocess.Popen:
        return start_app(self.args, self.ports[i], self.folder / f"replica-{i}.log")

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def kill(self, i: int) -> None:
        stop_app(self.processes[i], signal.SIGKILL)

    def restart(self, i: int) -> None:
        self.processes[i] = self.start(i)

    def stop(self) -> None:
        for process in self.processes:
            stop_app(process)


@pytest.fixture(scope="module")
def database(postgres_server):
    return postgres_server.create_database()


@pytest.fixture(scope="module")
def replicas(tiny_chat_model, default_tokenizer, database, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    folder = tmp_path_factory.mktemp("replicas")
    running = Replicas(save_model(tiny_chat_model, default_tokenizer, folder / "tiny-model"), folder, database)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser(replicas):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield instance
        instance.close()


def pinned_page(browser, url: str, pins: dict, wanted: int):
    """A fresh browser (own cookies) on the front, pinned to replica `wanted`; new visitors are spread over the
    replicas, so a few tries find one."""
    for _ in range(8):
        context = browser.new_context(viewport={"width": 1360, "height": 980})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#msg textarea")
        if pins.get(pin(page)) == wanted:
            return page
        context.close()
    raise AssertionError(f"no new visitor was pinned to replica {wanted}")


def pin(page) -> str | None:
    return next((c["value"] for c in page.context.cookies() if c["name"] == AFFINITY_COOKIE), None)


def send(page, text: str) -> None:
    page.fill("#msg textarea", text)
    page.click("#send")


def chat(page, text: str, turn: int) -> None:
    send(page, text)
    wait_idle(page, "#gauges", turn, TIMEOUT_MS)


def replica_metrics(url: str) -> dict[str, float]:
    """The replica's Prometheus counters and gauges, without the `streaming_llm_` prefix."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as response:
        page = response.read().decode()
    return {name: float(value) for name, value in re.findall(r"^streaming_llm_(\w+) (\S+)$", page, flags=re.M)}


def interrupted_rows(database_url: str) -> int:
    """Replies saved as cut off, in the shared database."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM messages WHERE interrupted = 1").fetchone()[0]


def wait_for(condition, what: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except Exception:  # noqa: BLE001 - a replica still starting answers with errors; keep waiting
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def api_chat(url: str, messages: list[dict]) -> dict:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=60) as response:
        model = json.loads(response.read())["data"][0]["id"]
    body = json.dumps({"model": model, "messages": messages, "max_tokens": 4, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@FRONTS
def test_a_replica_killed_mid_reply_is_replaced_by_another_with_the_whole_conversation(
        replicas, browser, database, make_front, tmp_path):
    front, port, pins = make_front(replicas.ports, tmp_path)
    url = f"http://127.0.0.1:{port}"
    victim, survivor = 0, 1
    try:
        page = pinned_page(browser, url, pins, victim)
        set_max_new_tokens(page, 8)
        chat(page, "Hello, my name is Ada.", 1)
        chat(page, "I live in Paris.", 2)
        seen_before = gauge(page, "seen_tokens")
        cut_before = interrupted_rows(database)
        set_max_new_tokens(page, 1024)
        send(page, "Tell me a very long story.")
        # Killed while the reply streams on A, once a part of it is saved (marked interrupted until it ends).
        wait_for(lambda: interrupted_rows(database) > cut_before and replica_metrics(replicas.url(victim))[
            "turns_active"] >= 1, "the partial reply on the victim to be saved")
        replicas.kill(victim)
        served_before = replica_metrics(replicas.url(survivor))["turns_total"]

        reload_page(page)  # the cookie still names A: the front must fall back to B
        page.wait_for_selector("#msg textarea")
        page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('interrupted')")
        shown = page.inner_text("#chatbot")
        for text in ("Hello, my name is Ada.", "I live in Paris.", "Tell me a very long story."):
            assert text in shown, text
        assert gauge(page, "turns") == 3
        set_max_new_tokens(page, 8)
        chat(page, "What is my name?", 4)
        assert pins.get(pin(page)) == survivor  # re-pinned to the replica that answered
        assert replica_metrics(replicas.url(survivor))["turns_total"] == served_before + 1
        # B's cache was re-primed from the stored transcript: it has seen the earlier turns, not just this one.
        assert gauge(page, "seen_tokens") > seen_before

        # A stateless API client's conversation (begun anywhere) continues through the front on the survivor.
        first = api_chat(url, [{"role": "user", "content": "Hi"}])
        answer = first["choices"][0]["message"]["content"]
        again = api_chat(url, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer},
                               {"role": "user", "content": "And then?"}])
        assert again["choices"][0]["message"]["role"] == "assistant" and again["usage"]["prompt_tokens"] > 0
        page.context.close()
    finally:
        stop_app(front)
        if replicas.processes[victim].poll() is not None:
            replicas.restart(victim)


@pytest.mark.parametrize("name", ["nginx.conf", "haproxy.cfg"])
def test_each_sample_front_pins_with_the_same_cookie_and_falls_back_unbuffered(name):
    config = (DEPLOY / name).read_text()
    assert AFFINITY_COOKIE in config
    for port in SAMPLE_PORTS:
        assert f"127.0.0.1:{port}" in config
    if name == "nginx.conf":
        assert "proxy_buffering off" in config and "error_page 502 504 = @any" in config
        assert f"listen {SAMPLE_LISTEN_PORT};" in config
    else:
        assert "option redispatch" in config and "option httpchk GET /health" in config
        assert "timeout http-request 10s" in config  # slow-header clients cannot hold connections for the 1 h
        assert f"bind :{SAMPLE_LISTEN_PORT}" in config and "option http-buffer-request" not in config
