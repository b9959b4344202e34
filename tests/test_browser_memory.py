"""The Chat tab shows what the model still remembers: in Chromium, against the app on the default model, messages
that left the cache are faded with a marker, the gauges count the turns still whole in memory, and the pinned
system prompt's tokens are shown. Skipped (with the reason) only when Chromium or Playwright is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_util import LAUNCH_ARGS, find_chromium, gauge, open_page, served, wait_idle

from streaming_engine import EngineConfig, StreamingEngine

pytestmark = [pytest.mark.browser, pytest.mark.model]

CHROMIUM = find_chromium()
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
START, RECENT, MAX_NEW = 4, 96, 24
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def page():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    from playwright.sync_api import sync_playwright

    import streaming_engine

    model, tokenizer = streaming_engine.load()
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=START, recent_size=RECENT,
                                                            prefill_chunk_size=48, max_new_tokens=MAX_NEW))
    ARTIFACTS.mkdir(exist_ok=True)
    with served(engine, "SmolLM2-135M-Instruct") as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield open_page(browser, url, timeout_ms=TIMEOUT_MS)
        browser.close()


def test_after_enough_turns_the_first_message_is_shown_as_forgotten(page):
    page.click("text=Settings")
    page.fill("#system textarea", "You are Captain Lumen, a lighthouse keeper.")
    prompts = ["Hello, who are you?", "Tell me a story about a dragon.", "Describe the ocean in detail.",
               "Explain how rain forms, step by step."]
    for turn, prompt in enumerate(prompts, 1):
        page.fill("#msg textarea", prompt)
        page.click("#send")
        wait_idle(page, "#gauges", turn)
    first_user = page.locator("#chatbot .user").first
    assert first_user.locator(".memory-gone").count() == 1
    assert "no longer in the model's memory" in first_user.inner_text()
    assert float(first_user.evaluate("e => getComputedStyle(e).opacity")) < 0.9  # faded
    last_user = page.locator("#chatbot .user").last
    assert last_user.locator(".memory-gone, .memory-partial").count() == 0
    assert 0 < gauge(page, "turns_in_memory") < len(prompts)
    assert gauge(page, "pinned_tokens") > START  # the system prompt stays, next to the sinks
    page.screenshot(path=str(ARTIFACTS / "chat-memory.png"), full_page=True)
