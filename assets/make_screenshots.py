"""Take the README screenshots with the real default model in headless Chromium.

Run `python assets/make_screenshots.py` (after `make install-test`). It serves the app on a free loopback port
with a 4 + 252 cache, then, as a visitor would:

* `assets/screenshot.png`: chats on the Chat tab until tokens have been evicted (at least three turns), so the
  evicted count has climbed while the fill stays near capacity;
* `assets/screenshot-compare.png`: sends the autopilot's prompts (`assets/autopilot.json`) one by one on the Dense
  vs Streaming tab until dense reports *context full*, then one more, which streaming and window still answer.

It needs Chromium (`apt-get install chromium`) and Python playwright; nothing is downloaded. A few minutes on CPU.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from streaming_engine import EngineConfig, StreamingEngine, load  # noqa: E402
from streaming_engine.loading import DEFAULT_MODEL_NAME  # noqa: E402

START, RECENT = 4, 252
CHAT_PROMPTS = ("What is the capital of France?", "Explain attention sinks in one paragraph.",
                "Write a short poem about the sea.", "Tell me a story about a lighthouse keeper and a storm.",
                "Describe the water cycle step by step.", "Write a letter from a cat to its owner.")
MIN_CHAT_TURNS = 3
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync"]
#: Longest wait for one reply.
REPLY_TIMEOUT_MS = 300_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_idle(page, root: str, turns: int) -> None:
    """Until the gauges under `root` show `turns` finished turns and nothing generating."""
    page.wait_for_function(
        f"""() => {{ const g = document.querySelector('{root} .gauges');
                     return g && g.dataset.phase === 'idle' &&
                            g.querySelector('[data-key=turns]').dataset.value === '{turns}'; }}""",
        timeout=REPLY_TIMEOUT_MS)


def chat_tab(page, path: Path) -> None:
    for turn, prompt in enumerate(CHAT_PROMPTS, 1):
        page.fill("#msg textarea", prompt)
        page.click("#send")
        wait_idle(page, "#gauges", turn)
        evicted = float(page.get_attribute("#gauges [data-key=evicted_tokens]", "data-value"))
        if turn >= MIN_CHAT_TURNS and evicted > 0:
            break
    page.screenshot(path=str(path))


def compare_tab(page, path: Path) -> None:
    page.get_by_role("tab", name="Dense vs Streaming").click()
    prompts = json.loads((ROOT / "assets" / "autopilot.json").read_text(encoding="utf-8"))
    dense_was_full = False
    for turn, prompt in enumerate(prompts, 1):
        page.fill("#compare-msg textarea", prompt)
        page.click("#compare-send")
        for mode in ("streaming", "dense", "window"):
            wait_idle(page, f"#gauges-{mode}", turn)
        if dense_was_full:
            break
        dense_was_full = page.get_attribute("#gauges-dense .gauges", "data-context-full") == "true"
    else:
        raise RuntimeError("dense never reported context full; is COMPARE_DENSE_CONTEXT larger than the script?")
    page.wait_for_selector("#plot-memory img, #plot-memory svg, #plot-memory canvas")
    time.sleep(1.0)  # let the plots finish drawing
    page.screenshot(path=str(path), full_page=True)


def main() -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    model, tokenizer = load()
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=START, recent_size=RECENT,
                                                            prefill_chunk_size=128))
    settings = app.AppSettings(start_size=START, recent_size=RECENT, port=free_port())
    demo = app.build_ui(engine, settings, DEFAULT_MODEL_NAME)
    app.launch(demo, settings, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{settings.port}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
            for name, drive, height in (("screenshot.png", chat_tab, 900), ("screenshot-compare.png", compare_tab, 980)):
                page = browser.new_context(viewport={"width": 1360, "height": height}).new_page()
                page.goto(url)
                page.wait_for_selector("#msg textarea")
                drive(page, ROOT / "assets" / name)
                print("wrote", ROOT / "assets" / name)
                page.context.close()
            browser.close()
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
