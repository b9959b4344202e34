"""Several app processes behind one address (issue 18, deliverable 2): two replicas on loopback, each with its own
SQLite store, behind the affinity router (`webui/router.py`) or nginx with `deploy/nginx.conf`. A load test and
two browser pages run through the front; one replica is killed with SIGKILL mid-run. Conversations on the other
replica carry on untouched, and after the killed one restarts its conversation is back and continues.

A tiny random model keeps it fast; what is checked is routing, storage and the cache, not the words.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from browser_util import (
    LAUNCH_ARGS,
    ROOT,
    find_chromium,
    free_port,
    gauge,
    reload_page,
    save_model,
    set_max_new_tokens,
    start_app,
    stop_app,
    wait_idle,
    wait_until_serving,
)

from streaming_engine.eval import loadtest
from webui.router import AFFINITY_COOKIE

pytestmark = [pytest.mark.browser]

CHROMIUM = find_chromium()
TIMEOUT_MS = 120_000
USERS, TURNS = 4, 6


class Replicas:
    """Two app processes on loopback, each with its own data folder; `kill` and `restart` one of them."""

    def __init__(self, model_dir: Path, folder: Path):
        self.folder = folder
        self.ports = [free_port(), free_port()]
        self.args = [["--model", str(model_dir), "--data-dir", str(folder / f"data-{i}"), "--recent-size", "1020",
                      "--max-sessions-per-client", "32"] for i in range(2)]
        self.processes = [self.start(i) for i in range(2)]

    def start(self, i: int) -> subprocess.Popen:
        return start_app(self.args[i], self.ports[i], self.folder / f"replica-{i}.log")

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
def replicas(tiny_chat_model, default_tokenizer, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    folder = tmp_path_factory.mktemp("replicas")
    running = Replicas(save_model(tiny_chat_model, default_tokenizer, folder / "tiny-model"), folder)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser(replicas):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield instance
        instance.close()


def router_front(replicas, folder):
    """`python -m webui.router` in front of the replicas, named r0 and r1 (the names its cookie carries)."""
    port = free_port()
    specs = [arg for i in range(2) for arg in ("--replica", f"r{i}={replicas.url(i)}")]
    process = subprocess.Popen([*_python(), "-m", "webui.router", "--port", str(port), *specs], cwd=ROOT,
                               stdout=open(folder / "router.log", "ab"), stderr=subprocess.STDOUT)
    wait_until_serving(f"http://127.0.0.1:{port}/", process)
    return process, port, {f"r{i}": i for i in range(2)}


def nginx_front(replicas, folder):
    """nginx with `deploy/nginx.conf`, its addresses replaced by the test's; its cookie carries the address."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    port = free_port()
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    for i, default_port in enumerate((7861, 7862)):
        site = site.replace(f"127.0.0.1:{default_port}", f"127.0.0.1:{replicas.ports[i]}")
    site = site.replace("listen 7860;", f"listen 127.0.0.1:{port};")
    prefix = folder / "nginx"
    prefix.mkdir(exist_ok=True)
    (prefix / "site.conf").write_text(site)
    temp = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                        "scgi"))
    (prefix / "nginx.conf").write_text(
        ("user root;\n" if _is_root() else "")  # workers must reach the test's private temporary folder
        + f"worker_processes 1; pid {prefix}/nginx.pid; error_log {prefix}/error.log;\n"
        f"events {{ worker_connections 512; }}\n"
        f"http {{ access_log off; {temp} include {prefix}/site.conf; }}\n")
    process = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                               stdout=open(folder / "nginx.log", "ab"), stderr=subprocess.STDOUT)
    wait_until_serving(f"http://127.0.0.1:{port}/", process)
    return process, port, {f"127.0.0.1:{replicas.ports[i]}": i for i in range(2)}


def _python() -> list[str]:
    import sys

    return [sys.executable]


def _is_root() -> bool:
    import os

    return hasattr(os, "geteuid") and os.geteuid() == 0


def pinned_page(browser, url: str, pins: dict, wanted: int):
    """A fresh browser (own cookies) on the front, pinned to replica `wanted`; new visitors are spread over the
    replicas, so a few tries find one."""
    for _ in range(8):
        context = browser.new_context(viewport={"width": 1360, "height": 980})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#msg textarea")
        cookie = next((c["value"] for c in context.cookies() if c["name"] == AFFINITY_COOKIE), None)
        if pins.get(cookie) == wanted:
            return page
        context.close()
    raise AssertionError(f"no new visitor was pinned to replica {wanted}")


def chat(page, text: str, turn: int) -> None:
    page.fill("#msg textarea", text)
    page.click("#send")
    wait_idle(page, "#gauges", turn, TIMEOUT_MS)


def replica_metrics(url: str) -> dict[str, float]:
    """The replica's Prometheus counters and gauges, without the `streaming_llm_` prefix (one plain GET: fast
    enough to poll, unlike a gradio client that fetches the app's config first)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as response:
        page = response.read().decode()
    return {name: float(value) for name, value in re.findall(r"^streaming_llm_(\w+) (\S+)$", page, flags=re.M)}


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


@pytest.mark.parametrize("make_front", [router_front, nginx_front], ids=["router", "nginx"])
def test_a_replica_killed_mid_load_loses_nothing_and_the_other_is_untouched(replicas, browser, make_front,
                                                                             tmp_path):
    front, port, pins = make_front(replicas, tmp_path)
    url = f"http://127.0.0.1:{port}"
    survivor, victim = 0, 1
    try:
        pages = {i: pinned_page(browser, url, pins, i) for i in (survivor, victim)}
        seen = {}
        for i, page in pages.items():
            set_max_new_tokens(page, 8)
            chat(page, f"Hello replica {i}, my name is Ada.", 1)
            chat(page, "I live in Paris.", 2)
            seen[i] = gauge(page, "seen_tokens")

        report = {}
        finished_before = replica_metrics(replicas.url(victim))["turns_total"]
        load = threading.Thread(target=lambda: report.update(
            loadtest.run_load(url, sessions=USERS, turns=TURNS, max_new_tokens=24, deadline_s=600)), daemon=True)
        load.start()
        # Kill the victim while one of the load's replies is being written on it, and while at most TURNS - 2 of
        # the load's turns have finished there: every user on the victim then still has at least two turns to go
        # (the one being written may still end before the kill lands; the next cannot), so the kill costs its users
        # turns by count, not by how fast this machine happens to be.
        wait_for(lambda: (lambda m: m["turns_active"] >= 1 and m["turns_total"] - finished_before <= TURNS - 2)(
            replica_metrics(replicas.url(victim))), "a reply on the victim early in the load")
        replicas.kill(victim)

        chat(pages[survivor], "What is my name?", 3)  # the other replica's browser chat goes on
        load.join(900)
        assert not load.is_alive(), "the load test did not finish"
        routes = {pins[key.split("=", 1)[1]]: entry for key, entry in report["by_route"].items() if key}
        assert set(routes) == {survivor, victim}, report["by_route"]  # new clients were spread over both
        assert report["cross_talk"] == 0
        kept = routes[survivor]
        assert kept["errors"] == 0 and kept["turns_completed"] == kept["users"] * TURNS, report["error_messages"]
        assert routes[victim]["errors"] > 0  # its users did lose their (unsaved, API) sessions mid-run

        replicas.restart(victim)
        page = pages[victim]
        reload_page(page)
        page.wait_for_selector("#msg textarea")
        page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('I live in Paris.')")
        assert f"Hello replica {victim}" in page.inner_text("#chatbot") and gauge(page, "turns") == 2
        set_max_new_tokens(page, 8)
        chat(page, "What is my name?", 3)
        assert gauge(page, "seen_tokens") > seen[victim]  # the cache was re-primed with the stored turns
        assert gauge(pages[survivor], "turns") == 3
        for page in pages.values():
            page.context.close()
    finally:
        stop_app(front)
        if replicas.processes[victim].poll() is not None:
            replicas.restart(victim)


def test_the_sample_nginx_config_names_the_same_cookie_as_the_router():
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    assert f"$cookie_{AFFINITY_COOKIE}" in site and f'"{AFFINITY_COOKIE}=$upstream_addr' in site
    assert "proxy_buffering off" in site and "proxy_next_upstream off" in site
