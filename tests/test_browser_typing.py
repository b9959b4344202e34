"""Typing while a reply streams (issue 27 item 5), in a real browser: the message is never lost. Enter pressed
mid-reply leaves the text in the box and a toast says why; once the reply ends the same text is sent.

Skipped (with the reason) only when Chromium or Playwright is missing. Screenshots land in `test-artifacts/`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_util import LAUNCH_ARGS, find_chromium, open_page, served, set_max_new_tokens, wait_idle

from streaming_engine import EngineConfig, StreamingEngine
from webui.chat_tab import WAIT_FOR_REPLY

pytestmark = [pytest.mark.browser, pytest.mark.model]

CHROMIUM = find_chromium()
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 180_000
#: The first reply's length: long enough that it is still streaming when the page types (Stop ends it).
LONG_REPLY = 400


@pytest.fixture(scope="module")
def page(default_model):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    model, tokenizer = default_model
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=4, recent_size=508, prefill_chunk_size=48))
    ARTIFACTS.mkdir(exist_ok=True)
    with served(engine, "SmolLM2-135M-Instruct") as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield open_page(browser, url, timeout_ms=TIMEOUT_MS)
        browser.close()


def test_enter_pressed_while_the_reply_streams_keeps_the_message_and_says_why(page):
    set_max_new_tokens(page, LONG_REPLY)
    page.fill("#msg textarea", "Write a very long story about a lighthouse keeper.")
    page.press("#msg textarea", "Enter")
    page.wait_for_function("() => document.querySelector('#gauges .gauges')?.dataset.phase === 'generating'")
    page.fill("#msg textarea", "And what was the keeper's name?")
    page.press("#msg textarea", "Enter")
    page.wait_for_function("(text) => document.body.innerText.includes(text)", arg=WAIT_FOR_REPLY[:40])
    assert page.input_value("#msg textarea") == "And what was the keeper's name?"
    page.screenshot(path=str(ARTIFACTS / "chat-typing-while-streaming.png"))
    page.click("#stop")
    wait_idle(page, "#gauges", 1)
    assert page.input_value("#msg textarea") == "And what was the keeper's name?"  # no repaint wiped it
    set_max_new_tokens(page, 8)
    page.press("#msg textarea", "Enter")
    wait_idle(page, "#gauges", 2)
    assert "And what was the keeper's name?" in page.inner_text("#chatbot")
    assert page.input_value("#msg textarea") == ""

