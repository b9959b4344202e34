"""Serving the app on a free loopback port and driving it in Chromium: shared by the browser tests, the app tests
and `tools/make_screenshots.py`.

Imports nothing from pytest or the test fixtures (the screenshot script is not a test), and the app only when a
server is started in this process (`served`); `app_process` runs it as a separate process, to be killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

#: Chromium flags for a headless run on a machine with no GPU, no network and no sandbox (CI containers).
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync"]
VIEWPORT_WIDTH = 1360
ROOT = Path(__file__).resolve().parent.parent
#: How long a started app process may take to answer (model load included, on a busy shared CPU).
APP_START_TIMEOUT_S = 300.0
#: A phone (iPhone 12-15 class) in CSS pixels.
PHONE_VIEWPORT = {"width": 390, "height": 844}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_chromium() -> str | None:
    """The system Chromium, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def served(engine, model_label: str, conversations=None, **settings) -> Iterator[tuple[str, object]]:
    """The whole app over `engine`, launched in this process; yields `(url, demo)` and closes it afterwards.
    `conversations`: the chat tab's (default: in memory only); `settings`: other `AppSettings` fields."""
    import app

    settings = app.AppSettings(port=free_port(), **settings)
    demo = app.build_ui(engine, model_label, conversations, settings=settings)
    app.launch(demo, settings, engine, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{settings.port}", demo
    finally:
        demo.close()


#: What playwright says when our reload met a navigation the page was already making: the frontend's own
#: reload aborted ours (`net::ERR_ABORTED`), or Chromium was swapping the tab's document to another renderer
#: process at that moment, so the protocol session had no page to reload.
RELOAD_RACES = ("ERR_ABORTED", "Not attached to an active page")


def reload_page(page, attempts: int = 3) -> None:
    """`page.reload()` that survives a navigation the page started itself: after its server was restarted,
    Gradio's frontend may navigate on its own when it reconnects, and our reload then loses the race
    (`RELOAD_RACES`). Wait for that navigation to land and try again, as a new navigation to the address the page
    had (what a user's Enter in the address bar does): a reload asks the current document to reload itself, and in
    a CI run the tab stayed "not attached" to one for all three tries. Any other error is raised."""
    address = page.url  # before any try: a failed one may leave the tab on Chromium's error page
    for attempt in range(1, attempts + 1):
        try:
            if attempt == 1:
                page.reload()
            else:
                page.goto(address)
            return
        except Exception as error:  # noqa: BLE001 - playwright's Error; this module does not import playwright
            if not any(race in str(error) for race in RELOAD_RACES) or attempt == attempts:
                raise
            page.wait_for_load_state("load")


def wait_until_serving(url: str, process: subprocess.Popen | None = None,
                       timeout_s: float = APP_START_TIMEOUT_S) -> None:
    """Until `url` answers HTTP 200 (raises if `process` exits first or the time runs out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the app exited with code {process.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.2)


def start_app(args: list[str], port: int, log: Path, module: str | None = None) -> subprocess.Popen:
    """`python app.py --port PORT ARGS...` (or `python -m MODULE ...`) from the repository root, output to `log`,
    returned once it serves. One thread for torch: the test machine's cores are shared."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, *(["-m", module] if module else ["app.py"]), "--port", str(port), *args]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/", process)
    except BaseException:
        stop_app(process)
        raise
    return process


def stop_app(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Send `sig` (SIGKILL: a crash) and wait for the process to be gone."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(60)


def save_model(model, tokenizer, folder: Path) -> Path:
    """A model and its tokenizer written where `app.py --model FOLDER` loads them (safetensors, no code)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def open_page(browser, url: str, height: int = 980, timeout_ms: float | None = None, viewport: dict | None = None,
              dark: bool = False):
    """A fresh browser context on `url` (desktop width unless `viewport`; gradio's dark theme with `dark`),
    returned once the chat input is on the page."""
    viewport = viewport or {"width": VIEWPORT_WIDTH, "height": height}
    phone = viewport["width"] < VIEWPORT_WIDTH / 2
    context = browser.new_context(viewport=viewport, color_scheme="dark" if dark else "light", is_mobile=phone,
                                  has_touch=phone)
    page = context.new_page()
    if timeout_ms is not None:
        page.set_default_timeout(timeout_ms)
    page.goto(url + ("?__theme=dark" if dark else ""))
    page.wait_for_selector("#msg textarea")
    return page


def wait_idle(page, root: str, turns: int, timeout_ms: float | None = None) -> None:
    """Until the gauges under `root` show `turns` finished turns and nothing generating."""
    page.wait_for_function(
        f"""() => {{ const g = document.querySelector('{root} .gauges');
                     return g && g.dataset.phase === 'idle' &&
                            g.querySelector('[data-key=turns]').dataset.value === '{turns}'; }}""",
        timeout=timeout_ms)


def gauge(page, key: str, root: str = "#gauges") -> float:
    """The number a gauge row shows (its `data-value`)."""
    return float(page.get_attribute(f"{root} [data-key={key}]", "data-value"))


def set_max_new_tokens(page, value: int, attempts: int = 3) -> None:
    """Set the Settings accordion's "Max new tokens" field and wait until the page holds the value. Typed again
    when it did not take (on a busy machine the accordion may still be opening, or a late update may reset it)."""
    field = page.locator("#max-new-tokens input[type=number]")
    script = f"() => document.querySelector('#max-new-tokens input[type=number]').value === '{value}'"
    for attempt in range(attempts):
        if not field.is_visible():  # inside the closed Settings accordion
            page.get_by_text("Settings", exact=True).click()
            field.wait_for(state="visible")
        field.fill(str(value))
        field.press("Enter")
        try:
            page.wait_for_function(script, timeout=20_000)
            return
        except Exception:
            if attempt == attempts - 1:
                raise
