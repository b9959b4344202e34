"""Two app replicas on loopback sharing one real PostgreSQL database, for the tests that put a front before them
(`tests/test_replicas.py`: one replica killed mid-reply; `tests/test_failover.py`: repeated kill -9 cycles with
several users). Its fixtures are registered in `conftest.py`: `replica_database`, `replicas` and `replica_browser`,
each one per test module. No tests here; also the page helpers those tests share (pin, send, metrics).
"""

from __future__ import annotations

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
    save_model,
    start_app,
    stop_app,
    wait_idle,
)
from fronts import AFFINITY_COOKIE

#: The page's local storage, each key with the length of its value (gradio's BrowserState keeps the record there).
LOCAL_STORAGE = "() => Object.fromEntries(Object.entries(localStorage).map(([k, v]) => [k, v.length]))"

CHROMIUM = find_chromium()
TIMEOUT_MS = 120_000


class Replicas:
    """Two app processes on loopback sharing one PostgreSQL database; `kill` and `restart` one of them."""

    def __init__(self, model_dir: Path, folder: Path, database_url: str):
        self.folder = folder
        self.ports = [free_port(), free_port()]
        self.args = ["--model", str(model_dir), "--database-url", database_url, "--recent-size", "1020",
                     "--max-sessions-per-client", "32",
                     # A reply's partial text is saved within 0.2 s of its start, so the kill lands mid-reply even
                     # where the tiny model writes its 1,024 tokens in a few seconds (the default 2 s left a CI run
                     # a reply that had ended by the time of the kill).
                     "--partial-save-interval", "0.2"]
        self.processes = [self.start(i) for i in range(2)]

    def start(self, i: int) -> subprocess.Popen:
        return start_app(self.args, self.ports[i], self.folder / f"replica-{i}.log")

    def log(self, i: int) -> str:
        """Everything replica `i` wrote, over all its starts."""
        return (self.folder / f"replica-{i}.log").read_text(errors="replace")

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
def replica_database(postgres_server):
    """A fresh database on the session's PostgreSQL server, one per test module."""
    return postgres_server.create_database()


@pytest.fixture(scope="module")
def replicas(tiny_chat_model, default_tokenizer, replica_database, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    folder = tmp_path_factory.mktemp("replicas")
    running = Replicas(save_model(tiny_chat_model, default_tokenizer, folder / "tiny-model"), folder,
                       replica_database)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def replica_browser(replicas):
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


def browser_secrets(url: str) -> list[str]:
    """The browser-storage secrets a replica's page config carries: a page moved to another replica can read what
    it stored only if both hand out the same ones (they come from the shared database)."""
    with urllib.request.urlopen(f"{url}/config", timeout=60) as response:
        return sorted(set(re.findall(r'"secret": ?"([^"]+)"', response.read().decode())))


def diagnosis(page, console: list[str], replicas, focus: int, database: str, folder,
              what: str = "'interrupted' never shown after the reload", focus_is: str = "the survivor") -> str:
    """What a failed wait saw: the page's chat, notices, local storage and console, the stored rows, the log of
    replica `focus` (`focus_is` says which one that is: the survivor of a kill, the page's replica) and the other
    replica's lines past start-up (a screenshot is saved beside it), so that a failure on a CI machine can be
    explained from its output alone."""
    import psycopg

    page.screenshot(path=str(folder / "after-reload.png"), full_page=True)
    with psycopg.connect(database, autocommit=True) as conn:
        rows = conn.execute("SELECT token, seq, role, interrupted, length(content) FROM messages "
                            "ORDER BY token, seq").fetchall()
    logs = {i: replicas.log(i) for i in (0, 1)}
    notices = page.evaluate("() => [...document.querySelectorAll('.toast-body')].map(e => e.innerText)")
    # The other replica (killed, maybe restarted since): only its lines that are not start-up chatter, which is
    # where a refusal or a failed write it logged before it died shows.
    other = [line for line in logs[1 - focus].splitlines()
             if line.strip() and not line.startswith(STARTUP_LINES)][-30:]
    return (f"{what}; url {page.url}\n"
            f"chat: {page.inner_text('#chatbot')[-1500:]!r}\nnotices: {notices}\n"
            f"local storage (key: length): {page.evaluate(LOCAL_STORAGE)}\nconsole: {console[-30:]}\n"
            f"stored rows: {rows}\nreplica {focus}'s log ({focus_is}; tail): {logs[focus][-4000:]}\n"
            f"other replica's log (its last lines past start-up): {other}")


#: Lines every replica start writes, left out of `diagnosis`'s view of the killed replica's log.
STARTUP_LINES = ("Backend:", "Loading", "Model ready", "* Running on", "* To create a public link")

#: An init script for a test's page: each notice (gradio's toast) is logged to the console when it appears, so a
#: page's `console` list keeps the notices a later reload wiped (a refusal, a failed save), and counted in
#: `window.noticesSeen` (per page load), which a test can wait on.
RECORD_NOTICES = """
window.noticesSeen = 0;
new MutationObserver(records => {
  for (const record of records) for (const node of record.addedNodes) {
    if (!(node instanceof Element)) continue;
    for (const body of [node, ...node.querySelectorAll('.toast-body')])
      if (body.classList && body.classList.contains('toast-body')) {
        window.noticesSeen += 1;
        console.log('notice: ' + body.innerText);
      }
  }
}).observe(document, {childList: true, subtree: true});
"""


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
