"""Serving the app on a free loopback port and driving it in Chromium: shared by the browser tests, the app tests
and `assets/make_screenshots.py`.

Imports nothing from pytest or the test fixtures (the screenshot script is not a test), and the app only when a
server is started.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from typing import Iterator

#: Chromium flags for a headless run on a machine with no GPU, no network and no sandbox (CI containers).
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync"]
VIEWPORT_WIDTH = 1360
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
def served(engine, model_label: str, **settings) -> Iterator[tuple[str, object]]:
    """The whole app over `engine`, launched in this process (`settings`: `AppSettings` fields); yields
    `(url, demo)` and closes it afterwards."""
    import app

    settings = app.AppSettings(port=free_port(), **settings)
    demo = app.build_ui(engine, model_label, settings)
    app.launch(demo, settings, engine, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{settings.port}", demo
    finally:
        demo.close()


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
