"""Any replica serves any conversation (issue 25, deliverables 2-4): two app replicas on loopback sharing one real
PostgreSQL database, behind an off-the-shelf front started from `deploy/` (nginx with `nginx.conf`, HAProxy with
`haproxy.cfg`). A browser chats on replica A; A is killed with SIGKILL while a reply streams; the browser's next
page load and message are served by replica B, which loads the transcript from the database and re-primes its cache:
the whole history is there, the cut-off reply is marked interrupted, and the conversation goes on. A stateless
OpenAI-API client continues its conversation through the same front.

A tiny random model keeps it fast; what is checked is routing, storage and the cache, not the words.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from browser_util import gauge, reload_page, set_max_new_tokens, stop_app
from fronts import AFFINITY_COOKIE, DEPLOY, FRONTS, SAMPLE_LISTEN_PORT, SAMPLE_PORTS
from replica_cluster import (
    LOCAL_STORAGE,
    browser_secrets,
    chat,
    diagnosis,
    interrupted_rows,
    pin,
    pinned_page,
    replica_metrics,
    send,
    wait_for,
)

pytestmark = [pytest.mark.browser]

def api_chat(url: str, messages: list[dict]) -> dict:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=60) as response:
        model = json.loads(response.read())["data"][0]["id"]
    body = json.dumps({"model": model, "messages": messages, "max_tokens": 4, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@FRONTS
def test_a_replica_killed_mid_reply_is_replaced_by_another_with_the_whole_conversation(
        replicas, replica_browser, replica_database, make_front, tmp_path):
    browser, database = replica_browser, replica_database
    front, port, pins = make_front(replicas.ports, tmp_path)
    url = f"http://127.0.0.1:{port}"
    victim, survivor = 0, 1
    try:
        page = pinned_page(browser, url, pins, victim)
        set_max_new_tokens(page, 8)
        chat(page, "Hello, my name is Ada.", 1)
        chat(page, "I live in Paris.", 2)
        seen_before = gauge(page, "seen_tokens")
        cut_before = interrupted_rows(database)
        set_max_new_tokens(page, 1024)
        send(page, "Tell me a very long story.")
        # Killed while the reply streams on A, once a part of it is saved (marked interrupted until it ends).
        try:
            wait_for(lambda: interrupted_rows(database) > cut_before and replica_metrics(replicas.url(victim))[
                "turns_active"] >= 1, "the partial reply on the victim to be saved")
        except AssertionError as error:  # say what the page asked for and what A wrote: a reply that ended already?
            asked = page.input_value("#max-new-tokens input[type=number]")
            raise AssertionError(diagnosis(page, [], replicas, victim, database, tmp_path,
                                           what=f"{error}; Max new tokens on the page: {asked}",
                                           focus_is="the victim")) from error
        secrets = [browser_secrets(replicas.url(i)) for i in (victim, survivor)]
        storage = page.evaluate(LOCAL_STORAGE)
        replicas.kill(victim)
        # The precondition, not the claim: the reply was still streaming when A died (its end clears the mark).
        assert interrupted_rows(database) > cut_before, "the reply had ended before the kill"
        served_before = replica_metrics(replicas.url(survivor))["turns_total"]

        console = []
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        reload_page(page)  # the cookie still names A: the front must fall back to B
        page.wait_for_selector("#msg textarea")
        try:
            page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('interrupted')")
        except Exception as error:  # noqa: BLE001 - playwright's TimeoutError: say what the page and B had
            raise AssertionError(f"browser-storage secrets of A, B: {secrets}; the page's local storage (key: length) "
                                 f"before the kill {storage}, after the reload {page.evaluate(LOCAL_STORAGE)}; "
                                 + diagnosis(page, console, replicas, survivor, database, tmp_path)) from error
        shown = page.inner_text("#chatbot")
        for text in ("Hello, my name is Ada.", "I live in Paris.", "Tell me a very long story."):
            assert text in shown, text
        assert gauge(page, "turns") == 3
        set_max_new_tokens(page, 8)
        chat(page, "What is my name?", 4)
        assert pins.get(pin(page)) == survivor  # re-pinned to the replica that answered
        assert replica_metrics(replicas.url(survivor))["turns_total"] == served_before + 1
        # B's cache was re-primed from the stored transcript: it has seen the earlier turns, not just this one.
        assert gauge(page, "seen_tokens") > seen_before

        # A stateless API client's conversation (begun anywhere) continues through the front on the survivor.
        first = api_chat(url, [{"role": "user", "content": "Hi"}])
        answer = first["choices"][0]["message"]["content"]
        again = api_chat(url, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer},
                               {"role": "user", "content": "And then?"}])
        assert again["choices"][0]["message"]["role"] == "assistant" and again["usage"]["prompt_tokens"] > 0
        page.context.close()
    finally:
        stop_app(front)
        if replicas.processes[victim].poll() is not None:
            replicas.restart(victim)


@pytest.mark.parametrize("name", ["nginx.conf", "haproxy.cfg"])
def test_each_sample_front_pins_with_the_same_cookie_and_falls_back_unbuffered(name):
    config = (DEPLOY / name).read_text()
    assert AFFINITY_COOKIE in config
    for port in SAMPLE_PORTS:
        assert f"127.0.0.1:{port}" in config
    if name == "nginx.conf":
        assert "proxy_buffering off" in config and "error_page 502 504 = @any" in config
        assert f"listen {SAMPLE_LISTEN_PORT};" in config
    else:
        assert "option redispatch" in config and "option httpchk GET /health" in config
        assert "timeout http-request 10s" in config  # slow-header clients cannot hold connections for the 1 h
        assert f"bind :{SAMPLE_LISTEN_PORT}" in config and "option http-buffer-request" not in config
