"""Take the README screenshots with the real default model in headless Chromium.

Run `python tools/make_screenshots.py` (after `make install-test`). It serves the app on a free loopback port
with a 4 + 252 cache, then, as a visitor would:

* `assets/screenshot.png`: chats on the Chat tab until tokens have been evicted and the cache is full (at least
  three turns; at most one turn per prompt of `CHAT_PROMPTS`), so the evicted count has climbed while the fill
  stays at or next to capacity;
* `assets/screenshot-compare.png`: sends the autopilot's prompts (`assets/autopilot.json`) one by one on the Dense
  vs Streaming tab until dense reports *context full*, then one more, which streaming and window still answer;
* `assets/screenshot-phone.png`: the Chat tab on a 390 x 844 phone screen after two turns: the chat, the row of
  icon buttons and the compact gauges on one screen.

It needs Chromium (`apt-get install chromium`) and Python playwright; nothing is downloaded. A few minutes on CPU.
Name some of them to retake only those: `python tools/make_screenshots.py screenshot-phone.png`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the app, and the helpers the browser tests use too

from browser_util import (  # noqa: E402
    LAUNCH_ARGS,
    PHONE_VIEWPORT,
    find_chromium,
    gauge,
    open_page,
    served,
    wait_idle,
)

from streaming_engine import MODES, EngineConfig, StreamingEngine, load  # noqa: E402
from streaming_engine.loading import DEFAULT_MODEL_NAME  # noqa: E402

START, RECENT = 4, 252
CHAT_PROMPTS = ("What is the capital of France?", "Explain attention sinks in one paragraph.",
                "Write a short poem about the sea.", "Tell me a story about a lighthouse keeper and a storm.",
                "Describe the water cycle step by step.", "Write a letter from a cat to its owner.")
MIN_CHAT_TURNS = 3
#: Longest wait for one reply.
REPLY_TIMEOUT_MS = 300_000


def chat_tab(page, path: Path) -> None:
    for turn, prompt in enumerate(CHAT_PROMPTS, 1):
        page.fill("#msg textarea", prompt)
        page.click("#send")
        wait_idle(page, "#gauges", turn, REPLY_TIMEOUT_MS)
        full = page.get_attribute("#gauges [data-key=fill]", "data-held") == str(START + RECENT)
        if turn >= MIN_CHAT_TURNS and gauge(page, "evicted_tokens") > 0 and full:
            break
    page.screenshot(path=str(path))


def compare_tab(page, path: Path) -> None:
    page.get_by_role("tab", name="Dense vs Streaming").click()
    prompts = json.loads((ROOT / "assets" / "autopilot.json").read_text(encoding="utf-8"))
    dense_was_full = False
    for turn, prompt in enumerate(prompts, 1):
        page.fill("#compare-msg textarea", prompt)
        page.click("#compare-send")
        for mode in MODES:
            wait_idle(page, f"#gauges-{mode}", turn, REPLY_TIMEOUT_MS)
        if dense_was_full:
            break
        dense_was_full = page.get_attribute("#gauges-dense .gauges", "data-context-full") == "true"
    else:
        raise RuntimeError("dense never reported context full; is COMPARE_DENSE_CONTEXT larger than the script?")
    page.wait_for_selector("#plot-memory path[aria-roledescription='line mark'][stroke]")
    time.sleep(1.0)  # let the plots finish drawing
    page.screenshot(path=str(path), full_page=True)


def phone_chat(page, path: Path) -> None:
    for turn, prompt in enumerate(CHAT_PROMPTS[:2], 1):
        page.fill("#msg textarea", prompt)
        page.click("#send")
        wait_idle(page, "#gauges", turn, REPLY_TIMEOUT_MS)
    page.screenshot(path=str(path))


def main(argv: list[str] | None = None) -> int:
    wanted = set(sys.argv[1:] if argv is None else argv)
    chromium = find_chromium()
    if chromium is None:
        print("error: chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    model, tokenizer = load()
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=START, recent_size=RECENT,
                                                            prefill_chunk_size=128))
    with served(engine, DEFAULT_MODEL_NAME) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        for name, drive, viewport in (("screenshot.png", chat_tab, None),
                                      ("screenshot-compare.png", compare_tab, {"width": 1360, "height": 980}),
                                      ("screenshot-phone.png", phone_chat, PHONE_VIEWPORT)):
            if wanted and name not in wanted:
                continue
            page = open_page(browser, url, 900, viewport=viewport)
            drive(page, ROOT / "assets" / name)
            print("wrote", ROOT / "assets" / name)
            page.context.close()
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
