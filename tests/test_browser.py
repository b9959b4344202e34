"""The app in a real browser: Playwright driving the system Chromium against the app on the default model (and,
where speed matters more than words, on a tiny random model).

Skipped (with the reason) only when Chromium or Playwright is missing. Screenshots land in `test-artifacts/`.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest
from browser_util import (
    LAUNCH_ARGS,
    PHONE_VIEWPORT,
    find_chromium,
    free_port,
    gauge,
    open_page,
    reload_page,
    save_model,
    set_max_new_tokens,
    served,
    start_app,
    stop_app,
    wait_idle,
)

from streaming_engine import MODES, EngineConfig, StreamingEngine
from streaming_engine.conversations import Conversations
from streaming_engine.store import ChatStore
from webui import browser_key, compare_tab, sessions
from webui.browser_key import BROWSER_KEY_COOKIE
from webui.render import GAUGE_HELP, TRUNCATED_NOTE

pytestmark = [pytest.mark.browser, pytest.mark.model]

CHROMIUM = find_chromium()
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
START, RECENT, MAX_NEW = 4, 96, 24
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    """The app on the default model, its conversations stored in a fresh database (as the app runs by default)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    model, tokenizer = default_model
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=START, recent_size=RECENT,
                                                            prefill_chunk_size=48, max_new_tokens=MAX_NEW))
    store = ChatStore.open(tmp_path_factory.mktemp("chats"))
    with served(engine, "SmolLM2-135M-Instruct", Conversations(engine, store)) as (url, _):
        yield url, engine
    store.close()


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


#: Records every gauge the page shows (state label, held, capacity, evicted, phase), so a test can check states
#: that last only a moment while a reply streams.
RECORD_GAUGES = """() => {
    window.gaugeSnapshots = [];
    const root = document.querySelector('#gauges');
    const take = () => { const g = root.querySelector('.gauges'); if (!g) return;
        const bar = g.querySelector('[data-key=fill]');
        window.gaugeSnapshots.push({state: g.dataset.state, phase: g.dataset.phase,
            label: g.querySelector('[data-key=state]').innerText.trim(),
            held: Number(bar.dataset.held), capacity: Number(bar.dataset.capacity),
            evicted: Number(g.querySelector('[data-key=evicted_tokens]').dataset.value)}); };
    take();
    new MutationObserver(take).observe(root, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def test_on_a_tiny_cache_evictions_climb_while_the_fill_stays_at_capacity(browser, server):
    url, _ = server
    page = new_page(browser, url)
    page.wait_for_selector("#gauges .gauges")  # the recorder observes the gauges' root, which renders after the box
    page.evaluate(RECORD_GAUGES)
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
    # The gauges never contradict themselves: "Evicting" only at capacity; below it after evictions, the page says
    # room was reserved for the reply (the engine evicts for the prompt and the whole reply before the prompt).
    snapshots = page.evaluate("() => window.gaugeSnapshots")
    states = {snap["state"] for snap in snapshots}
    assert {"empty", "filling", "reserved", "evicting"} <= states, states
    for snap in snapshots:
        assert snap["capacity"] == START + RECENT
        assert (snap["label"] == "Evicting") == (snap["state"] == "evicting")
        if snap["state"] == "evicting":  # at capacity: the next token evicts (even before the first eviction)
            assert snap["held"] == snap["capacity"]
        if snap["state"] == "filling":  # never "Filling" with no room left
            assert snap["held"] < snap["capacity"] and snap["evicted"] == 0
        if snap["state"] == "reserved":
            assert snap["held"] < snap["capacity"] and snap["evicted"] > 0
    page.screenshot(path=str(ARTIFACTS / "chat-tiny-cache.png"), full_page=True)
    page.context.close()


def test_an_empty_chat_shows_the_cache_capacity_and_every_gauge_explains_itself(browser, server):
    url, _ = server
    page = new_page(browser, url)
    assert page.get_attribute("#gauges .gauges", "data-state") == "empty"
    assert page.get_attribute("#gauges [data-key=fill]", "data-capacity") == str(START + RECENT)
    assert f"0 / {START + RECENT} tokens" in page.inner_text("#gauges")
    # A tooltip on every number: one row per gauge the help explains, besides the fill bar.
    assert page.locator("#gauges .gauge-row[title]").count() == page.locator("#gauges .gauge-row").count() \
        == len(GAUGE_HELP) - 1
    page.click("#gauges .gauge-help summary")  # and the same lines for touch screens, folded
    assert page.locator("#gauges .gauge-help li").first.is_visible()
    page.locator("#settings").get_by_text("Settings").click()
    page.wait_for_selector("#recent-size input")
    sizes = page.locator("#start-size input, #recent-size input")  # shown, read-only for visitors
    assert sizes.count() >= 2 and all(sizes.nth(i).is_disabled() for i in range(sizes.count()))
    assert f"{START} attention sinks + the {RECENT} most recent tokens" in page.inner_text("#cache-sizes-note")
    page.context.close()


def test_two_pages_at_once_get_independent_conversations(browser, server):
    url, engine = server
    before = set(engine.session_ids())
    first, second = new_page(browser, url), new_page(browser, url)
    first.fill("#msg textarea", "My favourite color is green. What is 2+2?")
    second.fill("#msg textarea", "Name a large animal.")
    first.click("#send")
    second.click("#send")
    for page in (first, second):
        wait_idle(page, "#gauges", 1)
    # Each page shows only its own message (a sampled reply may well mention green, so replies are not compared).
    user_texts = [[t.strip() for t in page.locator("#chatbot .user").all_inner_texts() if t.strip()]
                  for page in (first, second)]
    assert user_texts == [["My favourite color is green. What is 2+2?"], ["Name a large animal."]]
    assert len(set(engine.session_ids()) - before) == 2  # (earlier tests' pages may still be releasing theirs)
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


def wait_for(condition, timeout_s: float = TIMEOUT_MS / 1000, what: str = "condition"):
    """Poll `condition()` until it is true (returns its value) or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def test_a_reload_reattaches_to_its_own_session_and_creates_none(browser, server, monkeypatch):
    url, engine = server
    # However slow the reloads on a busy machine, the old page's release must not come before the new page shows
    # the conversation (that the release is then skipped is `test_webui.py`'s; that it happens, the next test's).
    monkeypatch.setattr(sessions.TABS, "grace_s", 600.0)
    read = browser_key.browser_key  # every key the handlers read from gradio's requests
    keys_seen = []
    monkeypatch.setattr(browser_key, "browser_key", lambda request: keys_seen.append(read(request)) or keys_seen[-1])
    before = set(engine.session_ids())
    page = new_page(browser, url)
    send_and_wait(page, "Remember the word pineapple.", 1)
    (mine,) = set(engine.session_ids()) - before
    (key,) = [c for c in page.context.cookies() if c["name"] == BROWSER_KEY_COOKIE]  # the page's state is bound
    assert key["httpOnly"] and key["sameSite"] == "Lax"  # to it (browser_key.py): no script reads it
    assert set(keys_seen) == {key["value"]}  # and gradio hands every event's cookie to the handlers
    for _ in range(3):
        reload_page(page)
        page.wait_for_selector("#msg textarea")
        page.wait_for_function("document.querySelector('#chatbot').innerText.includes('pineapple')")
        assert gauge(page, "turns") == 1
    assert set(engine.session_ids()) - before == {mine}  # the same live session; no reload made a new one
    assert [c["value"] for c in page.context.cookies() if c["name"] == BROWSER_KEY_COOKIE] == [key["value"]]
    send_and_wait(page, "What word did I ask you to remember?", 2)
    assert set(engine.session_ids()) - before == {mine}
    page.context.close()


def test_a_closed_tab_frees_its_session_within_seconds(browser, server):
    url, engine = server
    before = set(engine.session_ids())
    page = new_page(browser, url)
    send_and_wait(page, "Hello there!", 1)
    (mine,) = set(engine.session_ids()) - before
    page.context.close()
    # The app's own grace period (UNLOAD_GRACE_S, 5 s), not gradio's one-hour state lifetime.
    wait_for(lambda: mine not in engine.session_ids(), timeout_s=60, what="the closed tab's session to be freed")


def test_the_conversation_list_switches_renames_and_deletes(browser, server):
    url, _ = server
    page = new_page(browser, url)
    send_and_wait(page, "Tell me about apples.", 1)
    page.click("#new-chat")
    page.wait_for_function("() => !document.querySelector('#chatbot').innerText.includes('apples')")
    send_and_wait(page, "Tell me about pears.", 1)
    items = page.locator("#conversations label")
    page.wait_for_function("() => document.querySelectorAll('#conversations label').length === 2")
    assert "pears" in items.nth(0).inner_text() and "apples" in items.nth(1).inner_text()
    items.nth(1).click()
    # Waits name the user messages, not a fruit: the sampled reply about pears may well mention apples.
    page.wait_for_function("() => { const t = document.querySelector('#chatbot').innerText; "
                           "return t.includes('Tell me about apples.') && !t.includes('Tell me about pears.'); }")
    assert gauge(page, "turns") == 1
    page.fill("#conversation-title textarea, #conversation-title input", "Fruit talk")
    page.click("#rename-conversation")
    page.wait_for_function("() => document.querySelector('#conversations').innerText.includes('Fruit talk')")
    page.click("#delete-conversation")
    page.wait_for_function("() => document.querySelectorAll('#conversations label').length === 1")
    assert "Fruit talk" not in page.inner_text("#conversations")
    assert "Tell me about apples." not in page.inner_text("#chatbot")
    page.click("#undo-delete")  # issue 27 item 6: the delete can be taken back
    page.wait_for_function("() => document.querySelector('#conversations').innerText.includes('Fruit talk')")
    page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('Tell me about apples.')")
    page.wait_for_selector("#undo-delete", state="hidden")
    page.context.close()


def test_settings_survive_a_reload(browser, server):
    """Issue 27 item 9: the Settings are kept in the browser and come back on a reload."""
    from webui.chat_tab import SETTINGS_STORAGE_KEY

    url, _ = server
    page = new_page(browser, url)
    page.click("#settings button")
    # Every change saves all the settings (its own event): wait for each save to land in localStorage before the
    # next step, so the reload cannot cut a save short (it then would have nothing to restore).
    kept = f"() => window.localStorage.getItem({SETTINGS_STORAGE_KEY!r})"
    before = page.evaluate(kept)
    page.fill("#system textarea", "Answer like a pirate.")
    page.wait_for_function(f"(before) => ({kept})() !== before", arg=before)
    before = page.evaluate(kept)
    page.fill("#max-new-tokens input[type=number]", "77")
    page.press("#max-new-tokens input[type=number]", "Enter")
    page.wait_for_function("() => document.querySelector('#max-new-tokens input[type=range]').value === '77'")
    page.wait_for_function(f"(before) => ({kept})() !== before", arg=before)
    reload_page(page)
    page.click("#settings button")
    page.wait_for_function("() => document.querySelector('#max-new-tokens input[type=number]').value === '77'")
    assert page.input_value("#system textarea") == "Answer like a pirate."
    page.context.close()


def test_the_dense_vs_streaming_tab_answers_on_every_side_and_its_plots_show_every_label(browser, server):
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
    page.wait_for_function(f"({PLOTTED})('#plot-memory') >= 3 && ({PLOTTED})('#plot-latency') >= 3")
    assert_plots_say_what_to_look_for_unclipped(page)
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
    page.context.close()


#: How far (px) any part of a plot - its axis titles, its caption - reaches out of the plot's own block, on any
#: side; positive: clipped (the block hides what overflows it). null until both titles and the caption are drawn.
OVERFLOW = """(root) => { const block = document.querySelector(root).getBoundingClientRect();
    const parts = [...document.querySelectorAll(root + ' .role-axis-title text, ' + root + ' p.caption')];
    return parts.length < 3 ? null : Math.max(...parts.map(e => e.getBoundingClientRect()).map(r => Math.max(
        r.bottom - block.bottom, block.top - r.top, r.right - block.right, block.left - r.left))); }"""


def assert_plot_unclipped(page, root: str, caption: str) -> None:
    """The plot at `root`, once drawn, has its caption and both axis titles inside its block (the block hides
    whatever overflows it)."""
    page.wait_for_function(f"() => ({OVERFLOW})('{root}') !== null")
    assert page.inner_text(f"{root} p.caption") == caption
    assert page.evaluate(f"({OVERFLOW})('{root}')") <= 0, root


def assert_plots_say_what_to_look_for_unclipped(page):
    assert_plot_unclipped(page, "#plot-memory", compare_tab.MEMORY_CAPTION)
    assert_plot_unclipped(page, "#plot-latency", compare_tab.LATENCY_CAPTION)


#: The widest tick label of the plot at `root`, in digits.
WIDEST_LABEL = """(root) => Math.max(0, ...[...document.querySelectorAll(root + ' .role-axis-label text')]
    .map(t => t.textContent.replace(/[^0-9]/g, '').length))"""


def test_a_plot_whose_tick_labels_widen_lays_its_margins_out_again(browser):
    """A plot built as the tab builds it, first drawn with labels of one digit, then given data whose labels have
    six, still shows both axis titles and its caption: `plot_update` moves its axis, and only a moved axis makes
    the chart lay its margins out anew (new data alone is drawn into the margins it has, and a margin has room for
    about two more digits than it was laid out for)."""
    import gradio as gr

    from webui.render import LATENCY_COLUMN, plot_frames

    def points(latency_s):
        return [{"seen": n + 1, "kv": 2**20, "latency": latency_s} for n in range(30)]

    with gr.Blocks() as demo:
        plot = compare_tab.comparison_plot(None, LATENCY_COLUMN, "latency", compare_tab.LATENCY_CAPTION, "plot-grow")
        for name, latency_s in (("narrow", 0.004), ("wide", 300.0)):
            gr.Button(name, elem_id=name).click(
                lambda s=latency_s: compare_tab.plot_update(plot_frames({"streaming": points(s)})[1]), None, plot)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        page = browser.new_page(viewport={"width": 900, "height": 700})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"http://127.0.0.1:{port}")
        for name, digits in (("narrow", 1), ("wide", 6)):
            page.click(f"#{name}")
            page.wait_for_function(f"({WIDEST_LABEL})('#plot-grow') >= {digits}")
            assert_plot_unclipped(page, "#plot-grow", compare_tab.LATENCY_CAPTION)
        page.close()
    finally:
        demo.close()


#: How many coloured lines (one per mode) a gr.LinePlot has drawn, each through at least 5 points.
PLOTTED = """(root) => [...document.querySelectorAll(root + ' path[aria-roledescription="line mark"]')]
    .filter(p => p.getAttribute('stroke') && (p.getAttribute('d') || '').split('L').length >= 5).length"""


def test_autopilot_plots_update_while_the_first_reply_is_still_streaming(browser, server):
    url, _ = server
    page = new_page(browser, url)
    page.get_by_role("tab", name="Dense vs Streaming").click()
    page.click("#compare-autopilot")
    # Lines for every mode, drawn while the first reply is still streaming (turn 1 counts from its start): the
    # plots follow the tokens instead of waiting for the turn to end.
    page.wait_for_function(f"""() => ({PLOTTED})('#plot-memory') >= 3 && ({PLOTTED})('#plot-latency') >= 3 &&
        document.querySelector('#gauges-streaming .gauges').dataset.phase === 'generating' &&
        document.querySelector('#gauges-streaming [data-key=turns]').dataset.value === '1'""")
    page.click("#compare-stop")
    page.wait_for_function("() => document.querySelector('#compare-progress').innerText.includes('Autopilot stopped')")
    page.context.close()


def test_continue_grows_a_cut_reply_in_its_own_bubble(browser, server):
    url, _ = server
    page = new_page(browser, url)
    set_max_new_tokens(page, 8)
    send_and_wait(page, "Tell me a very long story about a dragon.", 1)
    [cut] = bot_texts(page)
    assert cut.endswith(TRUNCATED_NOTE.strip("*"))
    seen = gauge(page, "seen_tokens")
    page.click("#continue")
    # 8 more tokens fed: the waiting last token of the cut reply, then 7 of the 8 new ones (the 8th waits in turn).
    page.wait_for_function(f"""() => {{ const g = document.querySelector('#gauges .gauges');
        return g.dataset.phase === 'idle' && g.querySelector('[data-key=seen_tokens]').dataset.value === '{seen + 8:g}'; }}""")
    [grown] = bot_texts(page)  # still one reply, longer, with the note again at its new end
    assert grown.startswith(cut[: -len(TRUNCATED_NOTE.strip("*"))].rstrip()) and len(grown) > len(cut)
    assert grown.endswith(TRUNCATED_NOTE.strip("*")) and gauge(page, "turns") == 1
    page.screenshot(path=str(ARTIFACTS / "chat-continued.png"))
    page.context.close()


def test_on_a_phone_the_gauges_come_right_under_the_chat_and_the_buttons_are_one_row_of_icons(browser, server):
    url, _ = server
    page = open_page(browser, url, timeout_ms=TIMEOUT_MS, viewport=PHONE_VIEWPORT)
    send_and_wait(page, "Hello!", 1)
    box = {name: page.locator(sel).bounding_box() for name, sel in (
        ("chat", "#chatbot"), ("gauges", "#gauges"), ("settings", "#settings"), ("examples", "#examples"),
        ("bar", "#gauges [data-key=fill]"))}
    assert box["chat"]["y"] < box["gauges"]["y"] < box["examples"]["y"] < box["settings"]["y"]
    assert box["bar"]["y"] + box["bar"]["height"] <= PHONE_VIEWPORT["height"]  # the fill bar is on the first screen
    buttons = [page.locator(sel).bounding_box() for sel in ("#stop", "#retry", "#continue", "#new-chat", "#export", "#upload")]
    assert len({round(b["y"]) for b in buttons}) == 1  # one row
    assert all(b["x"] + b["width"] <= PHONE_VIEWPORT["width"] for b in buttons)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE_VIEWPORT["width"]  # no sideways page
    assert "Retry" in page.inner_text("#retry") or page.get_attribute("#retry", "aria-label")  # named for readers
    page.screenshot(path=str(ARTIFACTS / "phone-chat.png"))

    page.get_by_role("tab", name="Dense vs Streaming").click()
    page.fill("#compare-msg textarea", "Hi!")
    page.click("#compare-send")
    for mode in MODES:
        wait_idle(page, f"#gauges-{mode}", 1)
    panes = [page.locator(f"#chat-{mode}").bounding_box() for mode in MODES]
    assert len({round(p["y"]) for p in panes}) == 1  # side by side, not stacked
    assert page.evaluate("() => { const r = document.querySelector('#compare-panes');"
                         " return r.scrollWidth > r.clientWidth + 100; }")  # a row that scrolls sideways
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE_VIEWPORT["width"]
    page.wait_for_function(f"({PLOTTED})('#plot-memory') >= 3 && ({PLOTTED})('#plot-latency') >= 3")
    assert_plots_say_what_to_look_for_unclipped(page)
    page.screenshot(path=str(ARTIFACTS / "phone-compare.png"), full_page=True)
    page.context.close()


LUMINANCE = """(sel) => { const c = getComputedStyle(document.querySelector(sel)).backgroundColor.match(/[\d.]+/g)
    .map(Number); return (0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]) / 255; }"""


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_gauge_tracks_follow_the_theme(browser, server, dark):
    url, _ = server
    page = open_page(browser, url, timeout_ms=TIMEOUT_MS, dark=dark)
    # gradio applies `?__theme=dark` from a script after the page's first render: wait until the page itself has
    # taken the theme (and the gauges have rendered), then read the gauges' track against it.
    page.wait_for_selector("#gauges .gauge-bar")
    page.wait_for_function(f"() => (({LUMINANCE})('body') < 0.5) === {'true' if dark else 'false'}")
    track = page.evaluate(f"({LUMINANCE})('#gauges .gauge-bar')")
    assert (track < 0.5) == dark
    page.screenshot(path=str(ARTIFACTS / f"chat-{'dark' if dark else 'light'}.png"))
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
        browser, tiny_server, monkeypatch):
    url, _ = tiny_server
    # The tiny model runs the 16 scripted prompts in seconds: on a busy machine the whole script could end before
    # the page gets to press Stop. Ten rounds of it outlast any page, so Stop always finds the autopilot running.
    script = compare_tab.load_json_list("autopilot.json")
    monkeypatch.setattr(compare_tab, "load_json_list", lambda name: script * 10)
    page = new_page(browser, url)
    page.get_by_role("tab", name="Dense vs Streaming").click()
    page.click("#compare-autopilot")
    page.wait_for_function("() => document.querySelector('#gauges-dense .gauges')?.dataset.contextFull === 'true'")
    turns_when_dense_full = gauge(page, "turns", "#gauges-streaming")
    # Three chats take turns on one worker, so on a loaded machine the next streaming turn can take minutes.
    page.wait_for_function(
        f"""() => {{ const g = document.querySelector('#gauges-streaming .gauges');
                     return Number(g.querySelector('[data-key=turns]').dataset.value) > {turns_when_dense_full}; }}""",
        timeout=3 * TIMEOUT_MS)
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
    page.wait_for_function(f"({PLOTTED})('#plot-memory') >= 3")
    page.screenshot(path=str(ARTIFACTS / "compare-autopilot-tiny.png"), full_page=True)
    page.context.close()


def interrupted_rows(database: Path) -> int:
    """Replies the app has saved as cut off (read-only: the app is writing the same file)."""
    if not database.exists():
        return 0
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
        return db.execute("SELECT count(*) FROM messages WHERE interrupted = 1").fetchone()[0]


def test_a_conversation_survives_kill_9_mid_reply_and_continues_with_its_context(
        browser, tiny_chat_model, default_tokenizer, tmp_path):
    """Issue 12, defect 4: chat 3 turns, `kill -9` the server while the 4th reply streams, restart it, reload: the
    3 turns and the partial reply (marked interrupted) are back, and the next turn runs on a cache re-primed with
    the earlier turns. A tiny random model in its own process: the check is the cache, not the words."""
    model_dir = save_model(tiny_chat_model, default_tokenizer, tmp_path / "tiny-model")
    data_dir, port = tmp_path / "data", free_port()
    args = ["--model", str(model_dir), "--data-dir", str(data_dir), "--recent-size", "1020"]
    url, log = f"http://127.0.0.1:{port}", tmp_path / "app.log"
    server = start_app(args, port, log)
    try:
        page = new_page(browser, url)
        set_max_new_tokens(page, 8)
        for turn, text in enumerate(["My name is Ada.", "I live in Paris.", "I like tea."], 1):
            send_and_wait(page, text, turn)
        seen_before = gauge(page, "seen_tokens")
        set_max_new_tokens(page, 1024)
        page.fill("#msg textarea", "Tell me a very long story.")
        page.click("#send")
        wait_for(lambda: interrupted_rows(data_dir / "chats.sqlite"), what="the partial reply to be saved")
        stop_app(server, signal.SIGKILL)
        server = start_app(args, port, log)
        reload_page(page)
        page.wait_for_selector("#msg textarea")
        page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('interrupted')")
        shown = page.inner_text("#chatbot")
        for text in ("My name is Ada.", "I live in Paris.", "I like tea.", "Tell me a very long story."):
            assert text in shown, text
        assert len(bot_texts(page)) == 4 and "interrupted" in bot_texts(page)[-1]
        assert gauge(page, "turns") == 4
        # Turns 4 beside tokens seen 0 would contradict itself without the note: the history is back, the cache is
        # rebuilt from it with the next message.
        # The gauges repaint in their own update after the chat: wait for it, then read them.
        page.wait_for_function("() => document.querySelector('#gauges .gauges')?.dataset.state === 'restored'")
        assert gauge(page, "seen_tokens") == 0
        assert "not in the cache yet" in page.inner_text("#gauges [data-key=note]")
        set_max_new_tokens(page, 8)
        send_and_wait(page, "What is my name?", 5)
        assert page.get_attribute("#gauges .gauges", "data-state") != "restored"
        # The new turn's cache holds the earlier turns again (re-primed from the stored history): it has seen
        # more tokens than the three finished turns, though its own message and reply are a few dozen.
        assert gauge(page, "seen_tokens") > seen_before
        page.screenshot(path=str(ARTIFACTS / "chat-after-kill-9.png"), full_page=True)
        page.context.close()
    finally:
        stop_app(server)
