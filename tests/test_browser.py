"""The app in a real browser: Playwright driving the system Chromium against the app on the default model.

Skipped (with the reason) only when Chromium or Playwright is missing. Screenshots land in `test-artifacts/`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_util import LAUNCH_ARGS, find_chromium, gauge, open_page, served, wait_idle

from streaming_engine import MODES, EngineConfig, StreamingEngine
from webui import compare_tab

pytestmark = [pytest.mark.browser, pytest.mark.model]

CHROMIUM = find_chromium()
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
START, RECENT, MAX_NEW = 4, 96, 24
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def server(default_model):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    model, tokenizer = default_model
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=START, recent_size=RECENT,
                                                            prefill_chunk_size=48, max_new_tokens=MAX_NEW))
    with served(engine, "SmolLM2-135M-Instruct") as (url, _):
        yield url, engine


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield instance
        instance.close()


def new_page(browser, url):
    return open_page(browser, url, timeout_ms=TIMEOUT_MS)


def send_and_wait(page, text, turn):
    page.fill("#msg textarea", text)
    page.click("#send")
    wait_idle(page, "#gauges", turn)


def bot_texts(page, root="#chatbot"):
    return [t.strip() for t in page.locator(f"{root} .bot").all_inner_texts() if t.strip()]


def test_a_reply_streams_in_and_the_gauges_move(browser, server):
    url, _ = server
    page = new_page(browser, url)
    assert gauge(page, "seen_tokens") == 0
    # The page itself records every length the reply shows (polling from here could miss a fast reply's steps).
    page.evaluate("""() => {
        window.replyLengths = new Set();
        const chat = document.querySelector('#chatbot');
        new MutationObserver(() => {
            const bots = chat.querySelectorAll('.bot');
            if (bots.length) window.replyLengths.add(bots[bots.length - 1].innerText.trim().length);
        }).observe(chat, {subtree: true, childList: true, characterData: true});
    }""")
    send_and_wait(page, "Write a short poem about the sea.", 1)
    lengths = [n for n in page.evaluate("() => [...window.replyLengths]") if n > 0]
    assert len(lengths) >= 2, f"the reply should appear piece by piece, saw lengths {lengths}"
    assert gauge(page, "seen_tokens") > 20 and gauge(page, "kv_bytes") > 0 and gauge(page, "tokens_per_s") > 0
    page.screenshot(path=str(ARTIFACTS / "chat-first-reply.png"), full_page=True)
    page.context.close()


def test_on_a_tiny_cache_evictions_climb_while_the_fill_stays_at_capacity(browser, server):
    url, _ = server
    page = new_page(browser, url)
    prompts = ["What is the capital of France?", "Tell me a story about a dragon.",
               "Describe the ocean in detail.", "Explain how rain forms, step by step.",
               "Write a long poem about autumn leaves."]
    bar = page.locator("#gauges [data-key=fill]")
    evicted, held = [], []
    for turn, prompt in enumerate(prompts, 1):
        send_and_wait(page, prompt, turn)
        evicted.append(gauge(page, "evicted_tokens"))
        held.append(int(bar.get_attribute("data-held")))
    assert evicted[-1] > 0 and evicted == sorted(evicted)
    assert bar.get_attribute("data-capacity") == str(START + RECENT)
    # Room for the whole reply is made before the prompt goes in, so a reply that runs to max_new_tokens ends
    # with the cache exactly full; one that stops early (end of turn) leaves it a little below, never above.
    assert max(held) == START + RECENT and all(h <= START + RECENT for h in held)
    assert gauge(page, "sink_tokens") == START
    page.screenshot(path=str(ARTIFACTS / "chat-tiny-cache.png"), full_page=True)
    page.context.close()


def test_two_pages_at_once_get_independent_conversations(browser, server):
    url, engine = server
    before = len(engine.session_ids())
    first, second = new_page(browser, url), new_page(browser, url)
    first.fill("#msg textarea", "My favourite color is green. What is 2+2?")
    second.fill("#msg textarea", "Name a large animal.")
    first.click("#send")
    second.click("#send")
    for page in (first, second):
        wait_idle(page, "#gauges", 1)
    assert "green" in first.inner_text("#chatbot") and "green" not in second.inner_text("#chatbot")
    assert "large animal" in second.inner_text("#chatbot") and "large animal" not in first.inner_text("#chatbot")
    assert len(engine.session_ids()) == before + 2
    for page in (first, second):
        page.context.close()


def test_html_in_a_message_is_shown_as_text_and_never_runs(browser, server):
    url, _ = server
    page = new_page(browser, url)
    payload = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2"> hello'
    send_and_wait(page, payload, 1)
    assert page.evaluate("window.__xss") is None
    assert "<script>window.__xss=1</script>" in page.inner_text("#chatbot")
    assert page.locator("#chatbot img[src='x']").count() == 0
    page.context.close()


def test_a_reload_brings_the_conversation_back(browser, server):
    url, _ = server
    page = new_page(browser, url)
    send_and_wait(page, "Remember the word pineapple.", 1)
    page.reload()
    page.wait_for_selector("#msg textarea")
    page.wait_for_function("document.querySelector('#chatbot').innerText.includes('pineapple')")
    assert gauge(page, "turns") == 1
    send_and_wait(page, "What word did I ask you to remember?", 2)
    page.context.close()


def test_the_dense_vs_streaming_tab_answers_on_every_side(browser, server):
    url, _ = server
    page = new_page(browser, url)
    page.get_by_role("tab", name="Dense vs Streaming").click()
    page.fill("#compare-msg textarea", "What is the capital of Italy?")
    page.click("#compare-send")
    for mode in MODES:
        wait_idle(page, f"#gauges-{mode}", 1)
    for mode in MODES:
        assert bot_texts(page, f"#chat-{mode}"), mode
    assert int(page.get_attribute("#gauges-dense [data-key=fill]", "data-held")) > 0
    page.wait_for_selector("#plot-memory img, #plot-memory svg, #plot-memory canvas")
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
    page.context.close()


@pytest.fixture(scope="module")
def tiny_server(browser, tiny_chat_model, default_tokenizer):
    """The app on a 2-layer random model: decoding is instant, so the autopilot can run dense out of context
    in seconds. (The comparison tab's sizes are the app's own: 4 + 252 streaming, 512 dense, 256 window.)"""
    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=START, recent_size=RECENT, prefill_chunk_size=48))
    with served(engine, "tiny random model") as (url, _):
        yield url, engine


def test_autopilot_runs_dense_out_of_context_while_streaming_keeps_answering_within_its_flat_cache(
        browser, tiny_server):
    url, _ = tiny_server
    page = new_page(browser, url)
    page.get_by_role("tab", name="Dense vs Streaming").click()
    page.click("#compare-autopilot")
    page.wait_for_function("() => document.querySelector('#gauges-dense .gauges')?.dataset.contextFull === 'true'")
    turns_when_dense_full = gauge(page, "turns", "#gauges-streaming")
    page.wait_for_function(
        f"""() => {{ const g = document.querySelector('#gauges-streaming .gauges');
                     return Number(g.querySelector('[data-key=turns]').dataset.value) > {turns_when_dense_full}; }}""")
    page.click("#compare-stop")
    page.wait_for_function("() => document.querySelector('#compare-progress').innerText.includes('Autopilot stopped')")
    assert "Dense ran out of context" in page.inner_text("#compare-progress")
    capacity = compare_tab.COMPARE_START_SIZE + compare_tab.COMPARE_RECENT_SIZE
    streaming_bar = page.locator("#gauges-streaming [data-key=fill]")
    assert streaming_bar.get_attribute("data-capacity") == str(capacity)
    # Stop cuts the current reply short, so the cache may sit a little below capacity, never above it.
    assert compare_tab.COMPARE_START_SIZE < int(streaming_bar.get_attribute("data-held")) <= capacity
    assert gauge(page, "evicted_tokens", "#gauges-streaming") > 0
    assert gauge(page, "sink_tokens", "#gauges-streaming") == compare_tab.COMPARE_START_SIZE
    assert gauge(page, "sink_tokens", "#gauges-window") == 0
    assert int(page.get_attribute("#gauges-dense [data-key=fill]", "data-held")) <= compare_tab.COMPARE_DENSE_CONTEXT
    assert "Context full" in page.inner_text("#chat-dense")
    page.wait_for_selector("#plot-memory img, #plot-memory svg, #plot-memory canvas")
    page.screenshot(path=str(ARTIFACTS / "compare-autopilot-tiny.png"), full_page=True)
    page.context.close()
