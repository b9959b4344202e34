"""The Chat tab shows what the model still remembers: in Chromium, against the app on the default model, messages
that left the cache are faded with a marker, the gauges count the turns still whole in memory, and the pinned
system prompt's tokens are shown; a reply whose turn recalled an evicted message carries a "recalled" marker
linking to it. Skipped (with the reason) only when Chromium or Playwright is missing."""

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


def send_all(page, prompts: list[str], turns_before: int = 0) -> None:
    """Send each prompt once the previous reply has finished (the page idle at that turn count)."""
    for turn, prompt in enumerate(prompts, turns_before + 1):
        page.fill("#msg textarea", prompt)
        page.click("#send")
        wait_idle(page, "#gauges", turn)


def test_after_enough_turns_the_first_message_is_shown_as_forgotten(page):
    page.click("text=Settings")
    page.fill("#system textarea", "You are Captain Lumen, a lighthouse keeper.")
    prompts = ["Hello, who are you?", "Tell me a story about a dragon.", "Describe the ocean in detail.",
               "Explain how rain forms, step by step."]
    send_all(page, prompts)
    first_user = page.locator("#chatbot .user").first
    assert first_user.locator(".memory-gone").count() == 1
    assert "no longer in the model's memory" in first_user.inner_text()
    assert float(first_user.evaluate("e => getComputedStyle(e).opacity")) < 0.9  # faded
    last_user = page.locator("#chatbot .user").last
    assert last_user.locator(".memory-gone, .memory-partial").count() == 0
    assert 0 < gauge(page, "turns_in_memory") < len(prompts)
    assert gauge(page, "pinned_tokens") > START  # the system prompt stays, next to the sinks
    page.screenshot(path=str(ARTIFACTS / "chat-memory.png"), full_page=True)


def test_a_reply_that_recalled_an_evicted_fact_shows_the_recalled_marker_linking_to_it(page):
    page.click("#new-chat")
    page.wait_for_function("() => document.querySelector('#gauges .gauges').dataset.state === 'empty'")
    prompts = ["Remember this: my locker code is 4471.", "Tell me a story about a dragon.",
               "Describe the ocean in detail.", "Explain how rain forms, step by step.",
               "What is my locker code?"]
    send_all(page, prompts)
    first_user = page.locator("#chatbot .user").first
    assert first_user.locator(".memory-gone, .memory-partial").count() == 1  # the fact left the cache
    reply = page.locator("#chatbot .bot").last
    marker = reply.locator(".memory-recalled")
    assert marker.count() == 1 and "recalled:" in marker.inner_text()
    link = marker.locator("a").first
    target = link.get_attribute("href")
    assert target == "#recalled-1"  # the fact, the chat's first message
    assert first_user.locator(target).count() == 1  # the link's anchor sits on the faded message
    assert gauge(page, "recalled_tokens") > 0
    # The switch off: the next reply recalls nothing and carries no marker.
    if not page.locator("#recall input").is_visible():  # inside the Settings accordion, closed on a fresh page
        page.get_by_text("Settings", exact=True).click()
    page.click("#recall input")
    send_all(page, ["Once more: what is my locker code?"], turns_before=len(prompts))
    assert gauge(page, "recalled_tokens") == 0
    assert page.locator("#chatbot .bot").last.locator(".memory-recalled").count() == 0
    page.screenshot(path=str(ARTIFACTS / "chat-recalled.png"), full_page=True)

