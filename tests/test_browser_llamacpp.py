"""The app in Chromium on the llama.cpp backend (issue 15): the same page, gauges and memory markers as on
transformers, over the offline default's GGUF. Skipped (with the reason) only when llama-cpp-python, Chromium or
Playwright is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_util import LAUNCH_ARGS, find_chromium, gauge, open_page, served, wait_idle

from streaming_engine import EngineConfig, StreamingEngine
from streaming_engine.llamacpp import llamacpp_available

pytestmark = [pytest.mark.browser, pytest.mark.model]

CHROMIUM = find_chromium()
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
START, RECENT, MAX_NEW = 4, 124, 32
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def served_llamacpp():
    if not llamacpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install -r requirements-cpu.txt)")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    from playwright.sync_api import sync_playwright

    import streaming_engine

    model, tokenizer = streaming_engine.load(backend="llama.cpp", n_threads=1)
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=START, recent_size=RECENT, max_active_turns=2,
                                                            max_batch=2, prefill_chunk_size=48, max_new_tokens=MAX_NEW))
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with served(engine, "SmolLM2-135M-Instruct") as (url, _), sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            yield engine, open_page(browser, url, timeout_ms=TIMEOUT_MS)
            browser.close()
    finally:
        for sid in engine.session_ids():
            engine.close(sid)
        engine.backend.close()


def send(page, text: str, turn: int) -> None:
    """Type and send; again if the box was cleared under us. At llama.cpp's speed the previous turn's last update
    (which empties the box) can land after its gauges already read idle, wiping a message typed in between."""
    for _ in range(3):
        page.fill("#msg textarea", text)
        page.click("#send")
        try:
            page.wait_for_function(f"() => document.querySelectorAll('#chatbot .user').length >= {turn}",
                                   timeout=10_000)
            return
        except Exception:
            continue
    raise AssertionError(f"message {turn} was never taken: {text!r}")


def held(page) -> int:
    return int(page.get_attribute("#gauges [data-key=fill]", "data-held"))


def test_a_long_chat_on_llamacpp_evicts_keeps_its_sinks_and_shows_what_was_forgotten(served_llamacpp):
    engine, page = served_llamacpp
    assert "llama.cpp" in page.inner_text("#status")  # the footer names the backend
    page.click("text=Settings")
    page.fill("#system textarea", "You are Captain Lumen, a lighthouse keeper.")
    prompts = ["Hello, who are you?", "Tell me a story about a dragon.", "Describe the ocean in detail.",
               "Explain how rain forms, step by step.", "What did I ask first?"]
    for turn, prompt in enumerate(prompts, 1):
        send(page, prompt, turn)
        wait_idle(page, "#gauges", turn)
        assert held(page) <= START + RECENT  # never more than the cache holds
    assert gauge(page, "evicted_tokens") > 0
    assert gauge(page, "seen_tokens") == held(page) + gauge(page, "evicted_tokens")
    assert gauge(page, "pinned_tokens") > START  # the system prompt stays next to the sinks
    first_user = page.locator("#chatbot .user").first
    assert first_user.locator(".memory-gone").count() == 1
    assert len(page.locator("#chatbot .bot").all()) == len(prompts)
    page.screenshot(path=str(ARTIFACTS / "chat-llamacpp.png"), full_page=True)
