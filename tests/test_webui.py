"""The tabs' handlers called directly, without a browser or a server: what each returns for the page.

Handlers are plain functions over the engine or the `Conversations` (`webui/chat_tab.py`, `webui/compare_tab.py`).
Outside a gradio request, `gr.Warning` is a Python `UserWarning`, which is how these tests see what the user would
be told. A handler's `request` is a stand-in with the three fields the app reads (client address, login user,
page id).
"""

from __future__ import annotations

import inspect
import json
import re
import sqlite3
from types import SimpleNamespace

import pandas as pd
import pytest
from chat_page import GREEDY_INPUTS, SKIP, Page

from streaming_engine import MODES, EngineBusy, EngineConfig, StreamingEngine
from streaming_engine.conversations import ConversationUnavailable, Conversations
from streaming_engine.history import MAX_HISTORY_BYTES
from streaming_engine.store import UNREACHABLE, ChatStore, StoreError
from webui import chat_tab, compare_tab, render
from webui.conversation_list import empty_record
from webui.handlers import bind
from webui.sessions import TABS, TabRegistry, owner_of


@pytest.fixture
def engine(tiny_chat_model, default_tokenizer):
    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=96, max_new_tokens=16))
    yield engine
    for sid in engine.session_ids():
        engine.close(sid)


@pytest.fixture
def conv(engine, tmp_path):
    """The chat tab's conversations, stored in a fresh database."""
    store = ChatStore.open(tmp_path / "data")
    yield Conversations(engine, store, partial_save_interval_s=0.0)
    store.close()


def request(host="10.0.0.1", tab="page-1", user=None):
    return SimpleNamespace(client=SimpleNamespace(host=host), username=user, session_hash=tab)


def gauge_value(html: str, key: str) -> float:
    return float(re.search(rf'data-key="{key}" data-value="([^"]*)"', html).group(1))


def phase(html: str) -> str:
    return re.search(r'data-phase="(\w+)"', html).group(1)


#: Long enough that a reply is still streaming when the test acts (the tiny model never ends a turn early).
MAX_NEW = 200


def last(outputs):
    return list(outputs)[-1]


# --- chat tab -------------------------------------------------------------------------------------------------


def test_send_streams_a_reply_then_settles_with_idle_gauges_and_a_stored_conversation(conv):
    page = Page(conv)
    outputs = page.send("Hello <b>there</b>")
    chat, box, gauges, state, record, listing = outputs[-1]
    assert outputs[0][1] == ""  # the box empties at once
    # and is never written again: the user may be typing the next message while the reply streams
    assert all(later[1] == SKIP for later in outputs[1:])
    assert chat[0] == {"role": "user", "content": "Hello &lt;b>there&lt;/b>"}
    assert chat[1]["role"] == "assistant" and chat[1]["content"]
    assert phase(gauges) == "idle" and gauge_value(gauges, "turns") == 1
    assert page.record == {"tokens": [page.token], "current": page.token}  # all the browser keeps
    stored = conv.store.load(page.token)
    assert stored.messages[0]["content"] == "Hello <b>there</b>" and len(stored.messages) == 2
    assert page.titles() == ["Hello <b>there</b> · 2 messages"] and listing["value"] == page.token
    page.send("Again")
    assert len(page.chat) == 4 and len(conv.store.load(page.token).messages) == 4  # the same conversation goes on


def test_every_turn_ends_by_writing_the_browser_record_so_a_lost_write_is_repaired(conv):
    """Gradio's BrowserState can drop an update that reaches a page before the component mounts; the record then
    stays empty in local storage, and a reload would open an empty chat. Each turn's last update carries it."""
    page = Page(conv)
    first = page.send("Hello")
    wanted = {"tokens": [page.token], "current": page.token}
    assert first[0][4] == wanted and first[-1][4] == wanted  # at the start (a new chat) and once more at the end
    page.record = empty_record()  # the page lost it
    again = page.send("Again")
    assert again[-1][4] == wanted and page.record == wanted and len(conv.store.load(page.token).messages) == 4


def test_a_reply_that_recalled_an_evicted_message_is_marked_and_the_switch_turns_recall_off(conv, engine):
    from test_recall import FACT, QUESTION, TOPICS

    page = Page(conv)
    for message in [FACT, *TOPICS]:
        page.send(message)
    assert "memory-partial" in page.chat[0]["content"]  # the fact left the cache (all but the sinks)
    gauges = last(page.send(QUESTION))[2]
    stats = engine.stats(conv._live[page.token])
    assert gauge_value(gauges, "recalled_tokens") == stats["recalled_tokens"] > 0
    reply = page.chat[-1]["content"]
    assert 'class="memory-recalled"' in reply and 'href="#recalled-1"' in reply  # links to the fact (message 1)
    assert 'id="recalled-1"' in page.chat[0]["content"]
    assert page.texts("user")[-1] == QUESTION  # the page shows what was typed, not the quoted block
    assert chat_tab.recall_shown(conv, page.state) is True
    page.state = chat_tab.set_recall(conv, False, page.state)
    assert chat_tab.recall_shown(conv, page.state) is False
    gauges = last(page.send("Remind me of the locker code please."))[2]
    assert gauge_value(gauges, "recalled_tokens") == 0 and "memory-recalled" not in page.chat[-1]["content"]
    assert 'class="memory-recalled"' in page.chat[-3]["content"]  # the earlier reply keeps its marker
    # Off before a chat exists: the chat the next message starts has recall off.
    fresh = Page(conv)
    fresh.state = chat_tab.set_recall(conv, False, fresh.state)
    fresh.send("Hello")
    assert engine.stats(conv._live[fresh.token])["recall_budget"] == 0 and not conv.recall_enabled(fresh.token)
    assert conv.recall_enabled(page.token) is False and conv.recall_enabled(Page(conv).token) is True


def test_with_recall_off_on_the_server_no_switch_turns_it_on(conv, engine, monkeypatch):
    monkeypatch.setattr(engine.config, "recall_budget", 0)
    page = Page(conv)
    assert not conv.recall_available() and chat_tab.recall_shown(conv, page.state) is False
    page.state = chat_tab.set_recall(conv, True, page.state)  # a stale page that still shows it on
    page.send("Hello")
    assert engine.stats(conv._live[page.token])["recall_budget"] == 0
    chat_tab.set_recall(conv, True, page.state)
    assert engine.stats(conv._live[page.token])["recall_budget"] == 0 and not conv.recall_enabled(page.token)
    assert chat_tab.recall_shown(conv, page.state) is False


@pytest.mark.parametrize("inputs,match", [
    (("", 0.0, 1.0, 0, 0, 1.0), "max_new_tokens"),
    (("", 0.0, 0.0, 0, 8, 1.0), "top_p"),
])
def test_a_refused_message_goes_back_to_the_box_and_the_chat_is_unchanged(conv, inputs, match):
    earlier = [{"role": "user", "content": "before"}, {"role": "assistant", "content": "reply"}]
    with pytest.warns(UserWarning, match=match):
        chat, box, _, state, record, listing = last(chat_tab.respond(conv, "Keep this text", earlier, {},
                                                                     empty_record(), *inputs))
    assert chat == earlier and box == "Keep this text" and listing == SKIP
    assert conv.messages(state["token"]) == [] and not conv.store.exists(state["token"])  # never taken


def _cannot_reopen(conv, monkeypatch):
    """The live session was released and the store cannot hand the conversation back now."""
    def unavailable(*args, **kwargs):
        raise ConversationUnavailable("this conversation cannot be loaded now: the database is restarting")
    monkeypatch.setattr(conv, "_session", unavailable)
    return "cannot be loaded now"


def _engine_full(conv, monkeypatch):
    """Re-opening the conversation needs a session the engine has no room for."""
    def full(*args, **kwargs):
        raise EngineBusy("too many chats are open right now")
    monkeypatch.setattr(conv, "_session", full)
    return "too many chats"


def _busy_turns(conv, monkeypatch):
    """Every reply slot is taken."""
    monkeypatch.setattr(conv.engine, "_take_slot", lambda: None)
    return "Server busy"


@pytest.mark.parametrize("refuse", [_cannot_reopen, _engine_full, _busy_turns])
def test_a_message_not_taken_is_never_shown_as_sent_and_stays_in_the_box(conv, monkeypatch, refuse):
    """A page must show a message only once the conversation holds it (stored): a reload then shows it too. One
    that was not taken, whatever the reason, never appears in the chat, not even for one update (a browser test
    that waits for the message to show took a flash of it for acceptance), and the text is given back."""
    page = Page(conv)
    page.send("First message")
    earlier, revision = list(page.chat), conv.store.load(page.token).revision
    why = refuse(conv, monkeypatch)
    with pytest.warns(UserWarning, match=why):
        outputs = list(chat_tab.respond(conv, "Keep this text", earlier, page.state, page.record, *GREEDY_INPUTS))
    assert outputs, "the page is told something"
    for chat, box, *_ in outputs:
        assert chat is SKIP or all("Keep this text" not in m["content"] for m in chat)
        assert box in (SKIP, "Keep this text")
    assert outputs[-1][1] == "Keep this text"
    stored = conv.store.load(page.token)
    assert stored.revision == revision and [m["content"] for m in stored.messages][0] == "First message"


def test_a_failure_mid_reply_keeps_the_message_and_says_what_went_wrong(conv, monkeypatch):
    from streaming_engine.backends.hf import TransformersBackend

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    # The worker runs every forward pass through the engine's backend: a prompt chunk (`forward`) and the batched
    # decode step (`forward_batch`).
    monkeypatch.setattr(TransformersBackend, "forward", broken)
    monkeypatch.setattr(TransformersBackend, "forward_batch", broken)
    page = Page(conv)
    with pytest.warns(UserWarning, match="simulated device failure"):
        page.send("Will this work?")
    assert page.chat[0]["content"] == "Will this work?"
    assert page.chat[1]["content"].startswith("⚠️") and "simulated device failure" in page.chat[1]["content"]
    assert conv.store.load(page.token).messages[0]["content"] == "Will this work?"  # accepted: kept for the reload


def test_a_message_sent_while_the_reply_streams_stays_in_the_box_and_says_why(conv):
    """Issue 27 item 5: Enter pressed again mid-reply. Nothing on the page changes (so the box keeps the text, and
    whatever was typed since); the user is told why; once the reply ends the same text goes through."""
    page = Page(conv)
    page.send("First")
    streaming = chat_tab.respond(conv, "Tell me a story", page.chat, page.state, page.record, "", 0.0, 1.0, 0,
                                 MAX_NEW, 1.0)
    page._take_turn([next(streaming), next(streaming)])  # the turn shown, then its first token: it is running now
    assert conv.replying(page.token)
    with pytest.warns(UserWarning, match=re.escape(chat_tab.WAIT_FOR_REPLY)):
        outputs = list(chat_tab.respond(conv, "Second", page.chat, page.state, page.record, *GREEDY_INPUTS))
    assert outputs == [(SKIP,) * 6]
    page._take_turn(list(streaming))  # the first reply ends
    assert not conv.replying(page.token)
    page.send("Second")
    assert page.texts("user") == ["First", "Tell me a story", "Second"]


def test_retry_leaves_the_message_box_alone(conv):
    page = Page(conv)
    page.send("First")
    assert all(box == SKIP for _, box, *_ in page.retry())


def test_a_turn_shows_the_conversation_as_stored_not_the_pages_stale_copy(conv):
    """A send queued behind a streaming reply was handed the chat as it was then (the reply half written)."""
    page = Page(conv)
    page.send("First")
    stale = [page.chat[0], {"role": "assistant", "content": "half a rep"}]
    chat, *_ = last(chat_tab.respond(conv, "Second", stale, page.state, page.record, *GREEDY_INPUTS))
    assert chat[1] == page.chat[1] and len(chat) == 4


def test_an_empty_message_changes_nothing(conv, engine):
    with pytest.warns(UserWarning, match="empty"):
        outputs = list(chat_tab.respond(conv, "   ", [], {}, empty_record(), *GREEDY_INPUTS))
    assert outputs == [([], "   ", SKIP, {}, SKIP, SKIP)]
    assert engine.session_ids() == []


def test_retry_replaces_the_last_exchange_instead_of_adding_one(conv):
    page = Page(conv)
    page.send("First")
    page.send("Second")
    outputs = page.retry()
    assert [m["content"] for m in page.chat if m["role"] == "user"] == ["First", "Second"]
    assert gauge_value(outputs[-1][2], "turns") == 2
    assert [m["content"] for m in conv.store.load(page.token).messages if m["role"] == "user"] == ["First", "Second"]
    with pytest.warns(UserWarning, match="no message to retry"):
        assert last(chat_tab.retry_last(conv, [], {}, empty_record(), *GREEDY_INPUTS))[1] == SKIP


def test_continue_grows_the_cut_reply_in_its_bubble_into_the_reply_never_cut_and_stores_it(conv):
    page, whole = Page(conv), Page(conv)
    page.send("Tell me a story")
    assert page.chat[1]["content"].endswith(render.TRUNCATED_NOTE)
    outputs = page.continue_()
    assert all(out[1] == SKIP for out in outputs)  # the message box is left alone: the user may be typing
    assert len(page.chat) == 2 and page.chat[1]["content"].endswith(render.TRUNCATED_NOTE)  # cut again, at 8 more
    whole.send("Tell me a story", ("", 0.0, 1.0, 0, 16, 1.0))
    assert page.texts("assistant") == whole.texts("assistant")  # 8 + 8 greedy tokens are the 16-token reply
    stored = conv.store.load(page.token).messages
    assert len(stored) == 2 and stored[1]["content"] == conv.messages(page.token)[1]["content"]
    assert stored[1].get("truncated") and not stored[1].get("interrupted")
    assert gauge_value(outputs[-1][2], "turns") == 1


def test_a_continue_stopped_half_way_keeps_the_stopped_mark_instead_of_the_cut_one(conv):
    page = Page(conv)
    page.send("Tell me a story")
    events = conv.continue_reply(page.token, temperature=0.0, max_new_tokens=MAX_NEW)
    for event in events:
        if event.kind == "delta" and event.text:
            conv.stop(page.token)
    assert event.finish_reason == "stopped"
    reply = conv.messages(page.token)[1]
    assert reply.get("stopped") and not reply.get("truncated")
    assert conv.store.load(page.token).messages[1] == {"role": "assistant", "content": reply["content"],
                                                       "stopped": True}


def test_continue_says_why_not_when_there_is_no_reply_to_continue(conv):
    with pytest.warns(UserWarning, match="no reply to continue yet"):
        assert last(Page(conv).continue_())[0] == []


def test_a_cut_reply_continues_after_a_restart_from_the_store(conv, engine):
    page = Page(conv)
    page.send("Tell me a story")
    cut = conv.store.load(page.token).messages[1]["content"]
    restarted = Conversations(engine, conv.store)  # a server restart: the chat comes back from the store
    again = Page(restarted, record=page.record)
    again.load()
    outputs = again.continue_()
    grown = conv.store.load(again.token).messages[1]
    assert grown["content"].startswith(cut) and len(grown["content"]) > len(cut) and grown["truncated"]
    assert len(again.chat) == 2 and again.chat == chat_tab.shown_messages(restarted.messages(again.token))
    assert gauge_value(outputs[-1][2], "turns") == 1
    again.continue_()  # and again, now from the cache as the last continuation left it
    assert conv.store.load(again.token).messages[1]["content"].startswith(grown["content"])


def test_a_downloaded_history_uploads_into_a_new_conversation_that_continues(conv):
    page = Page(conv)
    page.send("Remember: pineapple")
    first = page.token
    download = chat_tab.export_history(conv, page.state, page.record)
    assert download["visible"] is True
    data = open(download["value"], "rb").read()
    page.show(chat_tab.upload_history(conv, data, page.state, page.record))
    # The tiny model's reply ran to its length limit: its note comes back with it (the marks travel in the file).
    assert page.token != first and page.chat == chat_tab.shown_messages(conv.messages(page.token))
    assert page.chat[1]["content"].endswith(render.TRUNCATED_NOTE)
    assert gauge_value(page.gauges, "turns") == 1 and conv.store.exists(page.token)  # stored at once
    assert page.record["tokens"] == [first, page.token] and len(page.listing["choices"]) == 2
    page.send("What was the word?")
    assert len(page.chat) == 4


def test_a_download_too_large_to_upload_back_is_still_whole_and_says_so(conv, monkeypatch):
    from streaming_engine import history

    page = Page(conv)
    page.send("Remember: pineapple")
    monkeypatch.setattr(history, "MAX_HISTORY_BYTES", 100)
    with pytest.warns(UserWarning, match="cannot be uploaded back whole"):
        download = chat_tab.export_history(conv, page.state, page.record)
    messages = json.loads(open(download["value"], "rb").read())["messages"]
    assert [m["content"] for m in messages] == [m["content"] for m in conv.messages(page.token)]


def test_a_renamed_chat_is_exported_with_its_title_and_uploads_under_it(conv):
    """Issue 27 item 9: the downloaded file carries the chat's (renamed) title, and an upload is listed under it."""
    page = Page(conv)
    page.send("Remember: pineapple")
    chat_tab.rename_conversation(conv, "Fruit   quiz", page.state, page.record)
    download = chat_tab.export_history(conv, page.state, page.record)
    data = open(download["value"], "rb").read()
    assert json.loads(data)["title"] == "Fruit quiz"
    page.show(chat_tab.upload_history(conv, data, page.state, page.record))
    assert page.title == "Fruit quiz" and conv.store.load(page.token).title == "Fruit quiz"
    assert page.titles()[0] == "Fruit quiz · 2 messages"
    untitled = json.loads(data)
    del untitled["title"]  # a file from before titles were exported: named after its first message, as before
    page.show(chat_tab.upload_history(conv, json.dumps(untitled).encode(), page.state, page.record))
    assert page.title == "Remember: pineapple"


def test_an_uploaded_download_shows_its_replies_marks_and_what_a_turn_recalled(conv):
    from test_config import STORED as messages

    data = json.dumps({"format": "streaming-llm-chat", "messages": messages}).encode()
    page = Page(conv)
    page.show(chat_tab.upload_history(conv, data, page.state, page.record))
    shown = [m["content"] for m in page.chat]
    assert shown[1].endswith(f"Noted\n\n{render.STOPPED_NOTE}")
    assert shown[3].endswith(f"It is 44\n\n{render.INTERRUPTED_NOTE}")
    assert 'class="memory-recalled"' in shown[3] and 'href="#recalled-1"' in shown[3]
    assert shown[5] == f"Once upon a time\n\n{render.TRUNCATED_NOTE}"
    assert page.titles() == ["My code is 4471. · 6 messages"]


@pytest.mark.parametrize("data,match", [
    (b"{not json", "not valid JSON"),
    (b"[" * 200_000, "nested too deep"),
    (b"x" * (MAX_HISTORY_BYTES + 1), "too large"),
    (None, "no file"),
    (json.dumps({"format": "streaming-llm-chat", "messages": [
        {"role": "user", "content": "hi", "fed": "hi", "recalled": [1]},
        {"role": "assistant", "content": "yo"}]}).encode(),
     "recall record 0 must belong to a user message and list earlier messages"),
])
def test_a_bad_upload_is_refused_and_the_chat_stays(conv, data, match):
    with pytest.warns(UserWarning, match=match):
        outputs = chat_tab.upload_history(conv, data, {"token": "mine"}, empty_record())
    assert outputs == [SKIP] * 7


def test_an_uploaded_dense_history_becomes_a_bounded_streaming_conversation(conv, engine):
    """Defect 2 of issue 12: the file's mode and sizes are ignored; the chat tab's cache stays bounded."""
    history = {"format": "streaming-llm-chat", "version": 1, "mode": "dense", "start_size": 0,
               "recent_size": 100_000, "messages": [{"role": "user", "content": "word " * 600},
                                                    {"role": "assistant", "content": "ok " * 600}]}
    page = Page(conv)
    page.show(chat_tab.upload_history(conv, json.dumps(history).encode(), page.state, page.record))
    page.send("And now?" + " more" * 200)
    stats = engine.stats(conv.open(page.token).session_id)
    assert stats["mode"] == "streaming" and stats["cache_capacity"] == engine.config.cache_size
    assert stats["cache_tokens"] <= engine.config.cache_size < stats["seen_tokens"]


def test_a_reload_reattaches_to_the_same_session_and_creates_none(conv, engine):
    page = Page(conv, req=request(tab="first-load"))
    page.send("Remember me")
    sid, chat = conv.open(page.token).session_id, page.chat
    for reload in range(3):
        again = Page(conv, record=page.record, req=request(tab=f"reload-{reload}"))
        again.load()
        assert again.chat == chat and again.token == page.token and gauge_value(again.gauges, "turns") == 1
        assert engine.session_ids() == [sid]
    assert again.load() == [SKIP] * 7  # this page already shows its chat


def test_a_page_left_open_across_a_restart_continues_its_conversation(conv, engine):
    page = Page(conv)
    page.send("Remember the word tangerine.")
    token = page.token
    conv.release(token)  # what a restart does to the live session; the store keeps the conversation
    page.state = {}  # and gradio's per-page state is gone too; the page still has its browser record
    page.send("What was the word?")
    assert page.token == token
    assert [m["content"] for m in conv.messages(token) if m["role"] == "user"] == [
        "Remember the word tangerine.", "What was the word?"]


def test_stale_or_forged_browser_records_are_ignored(conv, engine):
    page = Page(conv, record={"tokens": ["A" * 32, "../etc", 7], "current": "A" * 32})
    page.load()
    assert page.chat == [] and page.record == empty_record() and page.listing["choices"] == []
    assert engine.session_ids() == []


def test_a_reload_while_the_store_is_unreachable_forgets_no_conversation_of_the_browser(conv, monkeypatch):
    """A replica whose database server is away cannot tell a missing conversation from one it cannot read: the page
    load must then leave the browser's record alone (written back, it would lose the user's list for good) and show
    everything once the store answers again."""
    page = Page(conv)
    page.send("The first chat.")
    page.show(chat_tab.start_new_chat(conv, page.state, page.record))
    page.send("The second chat.")
    record = page.record
    assert len(record["tokens"]) == 2
    for token in record["tokens"]:
        conv.release(token)  # a replica that holds neither: both must come from the store

    def unreachable(*args, **kwargs):
        raise StoreError("connection refused", code=UNREACHABLE)

    with monkeypatch.context() as patch:
        patch.setattr(conv.store, "list", unreachable)
        patch.setattr(conv.store, "load", unreachable)
        away = Page(conv, record=record)
        outputs = away.load()
        assert outputs[3] == SKIP and away.record == record  # the browser keeps its whole record
    back = Page(conv, record=record)
    back.load()
    assert back.token == record["current"] and back.texts("user") == ["The second chat."]
    assert sorted(token for _, token in back.listing["choices"]) == sorted(record["tokens"])


def test_an_interrupted_reply_is_marked_on_the_page(conv):
    token = conv.store.create(title="cut", messages=[{"role": "user", "content": "Tell me a story"},
                                                     {"role": "assistant", "content": "Once upon",
                                                      "interrupted": True}])
    page = Page(conv, record={"tokens": [token], "current": token})
    page.load()
    assert page.chat[1]["content"] == f"Once upon\n\n{render.INTERRUPTED_NOTE}"
    assert page.titles() == ["cut · 2 messages · interrupted"]


def test_new_chat_leaves_the_conversation_in_the_list_with_its_session_parked(conv, engine):
    page = Page(conv)
    page.send("Hi")
    first = page.token
    outputs = page.show(chat_tab.start_new_chat(conv, page.state, page.record))
    assert page.chat == [] and page.state == {} and outputs[6]["visible"] is False
    assert gauge_value(page.gauges, "turns") == 0 and conv.parked() == [first] and len(engine.session_ids()) == 1
    assert page.record == {"tokens": [first], "current": None} and page.listing["value"] is None
    with pytest.warns(UserWarning, match="Nothing to download"):
        assert chat_tab.export_history(conv, page.state, page.record)["visible"] is False
    chat_tab.stop_reply(conv, page.state)  # stopping with no conversation is harmless
    page.send("Second chat")
    assert page.token != first and len(page.listing["choices"]) == 2


def test_the_trash_icon_leaves_the_conversation_in_the_list_and_a_reload_shows_the_empty_chat(conv, engine,
                                                                                             monkeypatch):
    """Issue 27 item 6: clearing is not deleting, and it is not only a repaint the next reload undoes."""
    told = []
    monkeypatch.setattr(chat_tab.gr, "Info", told.append)  # outside a request gr.Info says nothing
    page = Page(conv, req=request(tab="cleared"))
    page.send("Keep me")
    kept = page.token
    page.show(chat_tab.clear_chat(conv, page.state, page.record))
    assert told == [chat_tab.CLEARED_NOTE]
    assert page.chat == [] and page.record == {"tokens": [kept], "current": None} and conv.store.exists(kept)
    assert page.titles() == ["Keep me · 2 messages"]
    again = Page(conv, record=page.record, req=request(tab="reloaded"))
    again.load()
    assert again.chat == [] and again.token is None


def test_the_list_switches_renames_and_deletes_conversations(conv, engine, tmp_path):
    page = Page(conv)
    page.send("About apples")
    apples = page.token
    page.show(chat_tab.start_new_chat(conv, page.state, page.record))
    page.send("About pears")
    pears = page.token
    assert page.titles() == ["About pears · 2 messages", "About apples · 2 messages"]
    page.show(chat_tab.switch_conversation(conv, apples, page.state, page.record))
    assert page.token == apples and page.chat[0]["content"] == "About apples" and page.title == "About apples"
    assert len(engine.session_ids()) == 2  # the one switched away from keeps its cache (parked, KEEP_RECENT)
    listing, _ = chat_tab.rename_conversation(conv, "  Fruit   talk ", page.state, page.record)
    assert "Fruit talk · 2 messages" in [label for label, _ in listing["choices"]]
    page.show(chat_tab.delete_conversation(conv, page.state, page.record))
    assert page.chat == [] and page.record == {"tokens": [pears], "current": None}
    assert not conv.store.exists(apples) and len(engine.session_ids()) == 1 and conv.parked() == [pears]
    with sqlite3.connect(tmp_path / "data" / "chats.sqlite") as db:
        assert db.execute("SELECT count(*) FROM messages WHERE token = ?", (apples,)).fetchone()[0] == 0
    with pytest.warns(UserWarning, match="no longer available"):
        outputs = chat_tab.switch_conversation(conv, apples, page.state, {"tokens": [apples, pears], "current": None})
    assert outputs[3] == {"tokens": [pears], "current": None}


def test_a_deleted_chat_can_be_undone_within_the_window_with_its_messages_and_title(conv, engine, monkeypatch):
    """Issue 27 item 6: delete offers an undo; undo brings back the same conversation (token, messages, title),
    stored again and listed; after the window the delete is final."""
    told = []
    monkeypatch.setattr(chat_tab.gr, "Info", told.append)
    page = Page(conv, req=request(tab="undo"))
    page.send("About plums")
    page.send("And cherries")
    plums, before = page.token, conv.store.load(page.token).messages
    chat_tab.rename_conversation(conv, "Stone fruit", page.state, page.record)
    page.show(chat_tab.delete_conversation(conv, page.state, page.record, request=request(tab="undo")))
    assert told == [chat_tab.DELETED_NOTE] and page.chat == [] and page.titles() == []
    assert not conv.store.exists(plums) and engine.session_ids() == []  # gone from disk and memory at once
    assert page.state == {"deleted": plums} and chat_tab.undo_button(page.state)["visible"] is True
    page.show(chat_tab.undo_delete(conv, page.state, page.record, request=request(tab="undo")))
    assert page.token == plums and page.record == {"tokens": [plums], "current": plums}
    assert page.chat == chat_tab.shown_messages(before)
    assert conv.store.load(plums).messages == before and page.title == "Stone fruit"
    assert page.titles() == ["Stone fruit · 4 messages"] and chat_tab.undo_button(page.state)["visible"] is False
    page.send("Still here?")  # the restored conversation goes on
    assert len(conv.store.load(plums).messages) == 6

    monkeypatch.setattr("streaming_engine.conversations.UNDO_DELETE_S", 0.0)
    page.show(chat_tab.delete_conversation(conv, page.state, page.record))
    with pytest.warns(UserWarning, match="Too late to undo"):
        outputs = chat_tab.undo_delete(conv, page.state, page.record)
    assert outputs[2] == {} and not conv.store.exists(plums)


def test_deleting_a_chat_with_nothing_said_offers_no_undo(conv, monkeypatch):
    told = []
    monkeypatch.setattr(chat_tab.gr, "Info", told.append)
    opened = conv.start()
    outputs = chat_tab.delete_conversation(conv, {"token": opened.token}, empty_record())
    assert told == ["Conversation deleted."] and outputs[2] == {} and not conv.undoable(opened.token)


def test_settings_kept_in_the_browser_come_back_on_load_and_bad_ones_are_skipped(engine):
    """Issue 27 item 9: the Settings survive a reload. What the browser sends back is untrusted."""
    cfg = engine.config
    kept = chat_tab.remember_settings("Be brief.", 0.7, 0.9, 40, 100, 1.2)
    assert chat_tab.saved_settings(cfg, kept) == ["Be brief.", 0.7, 0.9, 40, 100, 1.2]
    with_sizes = chat_tab.remember_settings("", 0.0, 1.0, 0, 8, 1.0, 2, 50)
    assert chat_tab.saved_settings(cfg, with_sizes, visitor_cache_sizes=True)[6:] == [2, 50]
    assert len(chat_tab.saved_settings(cfg, with_sizes)) == 6  # read-only sizes are not restored
    bad = {"system_prompt": "x" * (chat_tab.MAX_SYSTEM_PROMPT_CHARS + 1), "temperature": 9, "top_p": "0.5",
           "top_k": 2.5, "max_new_tokens": True, "repetition_penalty": None, "start_size": cfg.start_size + 1,
           "recent_size": cfg.recent_size + 1}
    assert chat_tab.saved_settings(cfg, bad, visitor_cache_sizes=True) == [SKIP] * 8
    assert chat_tab.saved_settings(cfg, "not a dict") == [SKIP] * 6


def test_switching_back_to_a_recent_conversation_reprimes_nothing(conv, engine, monkeypatch):
    """Issue 27 item 9: a conversation switched away from keeps its live session, so going back feeds the model
    only the new message; one pushed out of the `KEEP_RECENT` most recent is re-primed from the store."""
    from streaming_engine import conversations as conversations_module

    monkeypatch.setattr(conversations_module, "KEEP_RECENT", 1)
    page = Page(conv, req=request(tab="switcher"))
    tokens = {}
    for name in ("apples", "pears", "plums"):
        page.show(chat_tab.start_new_chat(conv, page.state, page.record, request=request(tab="switcher")))
        page.send(f"Tell me about {name}, in a long and detailed way please")
        tokens[name] = page.token

    def next_turn_feeds(name):
        page.show(chat_tab.switch_conversation(conv, tokens[name], page.state, page.record,
                                               request=request(tab="switcher")))
        before = engine.counters.tokens_processed
        page.send("And?")
        return engine.counters.tokens_processed - before

    assert conv.parked() == [tokens["pears"]]  # apples was pushed out when plums' page left pears
    sid = conv._live[tokens["pears"]]
    kept = next_turn_feeds("pears")  # the page leaves plums (parked; pears is shown, no longer parked)
    assert conv._live[tokens["pears"]] == sid and conv.parked() == [tokens["plums"]]
    reprimed = next_turn_feeds("apples")  # released earlier: its history goes through the model again
    assert kept < reprimed, (kept, reprimed)
    assert conv.parked() == [tokens["pears"]] and len(engine.session_ids()) == 2  # plums gave way


def test_parked_conversations_give_way_when_a_session_cap_is_full(tiny_chat_model, default_tokenizer, tmp_path):
    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=96, max_new_tokens=4, max_sessions_per_owner=2))
    conv = Conversations(engine, ChatStore.open(tmp_path / "data"))
    owner = request(tab="capped")
    page = Page(conv, req=owner)
    for name in ("one", "two", "three"):
        page.show(chat_tab.start_new_chat(conv, page.state, page.record, request=owner))
        page.send(f"Chat {name}")
    assert len(engine.session_ids()) == 2 and len(conv.parked()) == 1  # the cap, not KEEP_RECENT, decided
    for sid in engine.session_ids():
        engine.close(sid)


def stopped_reply_page(conv) -> Page:
    """A page whose first reply the user stopped while it streamed, its "(stopped)" label checked."""
    from webui.render import STOPPED_NOTE

    page = Page(conv, req=request(tab="stopper"))
    turn = chat_tab.respond(conv, "Talk for a long time", page.chat, page.state, page.record,
                            "", 0.0, 1.0, 0, MAX_NEW, 1.0, request=request(tab="stopper"))
    outputs = []
    for out in turn:
        outputs.append(out)
        if len(outputs) == 2:  # the first streamed repaint: the reply is being written now
            chat_tab.stop_reply(conv, out[3])
    page._take_turn(outputs)
    assert page.chat[1]["content"].endswith(STOPPED_NOTE)
    return page


def test_a_stopped_reply_keeps_its_stopped_label_after_a_reload(conv):
    """Issue 27 item 9: "(stopped)" was only on the page that saw the reply end; a reload dropped it."""
    from webui.render import STOPPED_NOTE

    page = stopped_reply_page(conv)
    again = Page(conv, record=page.record, req=request(tab="reloaded-stopper"))
    again.load()
    assert again.chat[1]["content"].endswith(STOPPED_NOTE) and again.chat[1]["content"] == page.chat[1]["content"]
    again.send("Go on")  # the next reply ends on its own: no label on it
    assert not again.chat[3]["content"].endswith(STOPPED_NOTE) and again.chat[1]["content"].endswith(STOPPED_NOTE)


def test_a_stopped_reply_keeps_its_stopped_label_after_a_restart(conv, engine, tmp_path):
    """The mark is stored with the reply (schema 3): a server started afresh on the same database shows it too."""
    page = stopped_reply_page(conv)
    with ChatStore.open(tmp_path / "data") as store:
        restarted = Conversations(engine, store)  # knows no live session: it re-opens the chat from the store
        again = Page(restarted, record=page.record, req=request(tab="after-restart"))
        again.load()
        assert again.chat[1]["content"] == page.chat[1]["content"]
        for sid in list(engine.session_ids()):
            engine.close(sid)


def test_without_persistence_the_list_shows_live_conversations_and_nothing_is_written(engine, tmp_path):
    conv = Conversations(engine, ChatStore.open(tmp_path / "data", persist=False))
    page = Page(conv)
    page.send("Only in memory")
    assert page.titles() == ["Only in memory · 2 messages"]
    with pytest.warns(UserWarning, match="keeps no conversations"):
        chat_tab.rename_conversation(conv, "x", page.state, page.record)
    assert not (tmp_path / "data").exists()


def test_every_session_counts_against_its_client_and_one_client_cannot_take_the_server(
        tiny_chat_model, default_tokenizer, tmp_path):
    """Defect 1 of issue 12, in the chat tab: a client at its cap is told so; other clients still get a chat."""
    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=96, max_new_tokens=4, max_sessions=6,
                                          max_sessions_per_owner=2))
    conv = Conversations(engine, ChatStore(None))
    pages = [Page(conv, req=request(host="10.0.0.9", tab=f"tab-{i}")) for i in range(3)]
    pages[0].send("one"), pages[1].send("two")
    with pytest.warns(UserWarning, match="limit 2 per user"):
        pages[2].send("three")
    assert pages[2].chat == [] and engine.open_sessions("addr:10.0.0.9") == 2
    other = Page(conv, req=request(host="10.0.0.10", tab="elsewhere"))
    other.send("I still get a chat")
    assert len(other.chat) == 2
    user = Page(conv, req=request(host="10.0.0.9", user="ann", tab="login"))
    user.send("logged in users count by name and address")
    assert engine.open_sessions("user:ann@10.0.0.9") == 1


def test_owner_is_the_login_user_else_the_client_address():
    assert owner_of(None) is None
    assert owner_of(request(host="192.0.2.7")) == "addr:192.0.2.7"
    assert owner_of(request(host="192.0.2.7", user="ann")) == "user:ann@192.0.2.7"
    # One shared --auth login used from two addresses is two clients, each with its own cap (issue 28, item 3).
    assert owner_of(request(host="192.0.2.8", user="ann")) != owner_of(request(host="192.0.2.7", user="ann"))
    assert owner_of(SimpleNamespace(client=None, username=None)) is None


def test_a_closed_page_frees_its_session_after_the_grace_period_unless_a_reload_shows_it_again(conv, engine):
    scheduled = []
    tabs = TabRegistry(grace_s=5.0, schedule=lambda delay, fn: scheduled.append((delay, fn)))
    page = Page(conv)
    page.send("Hello")
    tabs.show("old-page", page.token, conv.release)
    tabs.show("reloaded-page", page.token, conv.release)  # the reload showed it before the old page's unload
    tabs.leave("old-page")
    assert [delay for delay, _ in scheduled] == [5.0]
    scheduled.pop()[1]()  # the grace period ends
    assert len(engine.session_ids()) == 1  # the reloaded page still shows it
    tabs.leave("reloaded-page")
    scheduled.pop()[1]()
    assert engine.session_ids() == [] and tabs.tabs() == 0
    assert conv.store.exists(page.token)  # only the live session went


def test_the_compare_tab_sessions_are_counted_and_closed_when_the_page_goes(engine):
    req = request(host="10.1.1.1", tab="compare-page")
    state = {}
    last(compare_tab.compare_send(engine, "Hi", [], [], [], state, True, 4, request=req))
    assert engine.open_sessions("addr:10.1.1.1") == 3
    TABS.leave("compare-page")
    assert engine.session_ids() == []


# --- Dense vs Streaming tab -----------------------------------------------------------------------------------


def compare_send(engine, message, state, include_window=True, new_tokens=8):
    """The last outputs of one Send to all: box, note, 3 chats, 3 gauges, 2 plots, state."""
    return last(compare_tab.compare_send(engine, message, [], [], [], state, include_window, new_tokens))


def test_one_message_reaches_every_side_and_the_plots_follow(engine):
    state = {}
    box, note, *rest = compare_send(engine, "What is the capital of Italy?", state)
    chats, gauges, plots, new_state = rest[:3], rest[3:6], rest[6:8], rest[8]
    assert box == "" and note == "" and new_state is state
    for mode, chat, html in zip(MODES, chats, gauges):
        assert chat[0]["content"] == "What is the capital of Italy?" and chat[1]["content"], mode
        assert gauge_value(html, "turns") == 1 and phase(html) == "idle" and f'data-mode="{mode}"' in html
    for plot in plots:  # each plot's data, with its y axis from 0 to at least its highest point
        frame, (bottom, top) = plot["value"], plot["y_lim"]
        assert isinstance(frame, pd.DataFrame) and set(frame["mode"]) == set(MODES)
        assert bottom == 0 and top >= frame[frame.columns[1]].max() > 0
    assert set(state["sids"]) == set(MODES) and all(state["series"][m] for m in MODES)
    assert gauge_value(gauges[1], "sink_tokens") == 0 and gauge_value(gauges[0], "sink_tokens") == 4


def test_the_plot_ends_where_the_gauges_count_and_empty_gauges_name_their_sinks(engine, conv):
    """Issue 27 item 9: tokens seen agree between each side's gauge and its plot line; an empty gauge shows the
    sinks the session will have ("0 / 4"), as a fresh session's gauge does, not "0 / 0"."""
    state = {}
    _, _, *rest = compare_send(engine, "Hello there", state)
    for mode, html in zip(MODES, rest[3:6]):
        assert state["series"][mode][-1]["seen"] == gauge_value(html, "seen_tokens"), mode
    empty = compare_tab.compare_reset(engine, state)[4:7]
    assert [re.search(r'data-key="sink_tokens"[^>]*>([^<]*)<', h).group(1) for h in empty] == ["0 / 4", "0 / 0",
                                                                                                 "0 / 0"]
    chat_view = chat_tab.view(conv, None, empty_record())[1]
    assert re.search(r'data-key="sink_tokens"[^>]*>([^<]*)<', chat_view).group(1) == "0 / 4"


def test_without_window_only_two_sides_run(engine):
    state = {}
    _, _, streaming, dense, window, _, _, window_gauge, *_ = compare_send(engine, "Hi", state, include_window=False)
    assert streaming and dense and window == [] and window_gauge == SKIP
    assert set(state["sids"]) == {"streaming", "dense"}


def test_autopilot_runs_its_script_and_stop_ends_it_after_the_current_prompt(engine, monkeypatch):
    monkeypatch.setattr(compare_tab, "load_json_list", lambda name: ["One.", "Two.", "Three."])
    state = {}
    outputs = list(compare_tab.compare_autopilot(engine, [], [], [], state, True, 8))
    assert outputs[-1][0] == "**Autopilot finished** after 3 of 3 prompts."
    assert all(len(chat) == 6 for chat in outputs[-1][1:4])
    compare_tab.compare_reset(engine, state)
    state = {}
    running = compare_tab.compare_autopilot(engine, [], [], [], state, True, 8)
    first = next(running)
    assert first[0].startswith("**Autopilot** prompt 1/3")
    compare_tab.compare_stop(engine, first[-1])  # the same dict gradio hands the Stop button
    rest = list(running)
    assert rest[-1][0] == "**Autopilot stopped** after 1 of 3 prompts."


def test_reset_closes_every_side_and_clears_the_tab(engine):
    state = {}
    compare_send(engine, "Hello", state)
    sids = list(state["sids"].values())
    outputs = compare_tab.compare_reset(engine, state)
    assert outputs[:4] == ["", [], [], []] and outputs[-1] == {}
    assert all(gauge_value(html, "turns") == 0 for html in outputs[4:7])
    assert not set(sids) & set(engine.session_ids())


def test_an_empty_comparison_message_changes_nothing(engine):
    with pytest.warns(UserWarning, match="empty"):
        outputs = list(compare_tab.compare_send(engine, "", [], [], [], {}, True, 8))
    assert outputs == [[SKIP] * 11] and engine.session_ids() == []


def test_visitor_cache_sizes_apply_to_a_new_chat_and_can_only_shrink_the_cache(conv, engine):
    chat, _, gauges, state, *_ = last(chat_tab.respond(conv, "Hi", [], {}, empty_record(), *GREEDY_INPUTS,
                                                       start=2, recent=32))
    stats = engine.stats(conv.open(state["token"]).session_id)
    assert (stats["start_size"], stats["recent_size"], stats["cache_capacity"]) == (2, 32, 34)
    assert gauge_value(gauges, "sink_tokens") == 2
    for start, recent in ((5, 32), (2, 97)):  # the owner's engine has 4 + 96: larger is refused, nothing is sent
        with pytest.warns(UserWarning, match="must be between"):
            chat, box, *_ = last(chat_tab.respond(conv, "Hi", [], {}, empty_record(), *GREEDY_INPUTS,
                                                  start=start, recent=recent))
        assert chat == [] and box == "Hi"


@pytest.mark.parametrize("handler", [chat_tab.respond, chat_tab.retry_last])
@pytest.mark.parametrize("sizes", [(), (2, 32)])
def test_gradio_hands_the_request_and_the_optional_cache_sizes_to_their_own_parameters(conv, handler, sizes):
    """The cache-size sliders are inputs only with `--visitor-cache-sizes`; gradio inserts the request by its
    position in the signature, so the sizes must come after it whether or not they are passed."""
    from gradio.helpers import special_args

    inputs = ["message"] * (handler is chat_tab.respond) + [[], {}, empty_record(), *GREEDY_INPUTS, *sizes]
    marker = request()
    bound = bind(handler, conv)
    arguments, *_ = special_args(bound, list(inputs), marker)
    named = inspect.signature(bound).bind(*arguments).arguments
    assert named["request"] is marker
    assert (named.get("start"), named.get("recent")) == (sizes or (None, None))


@pytest.mark.parametrize("decode_step, path", [("eager", "eager"), ("static", "static")])
def test_the_footer_and_metrics_say_which_decode_path_runs(tiny_chat_model, default_tokenizer, decode_step, path):
    """The app's footer and `/metrics` (an info gauge, `streaming_llm_decode_path_info{path=...} 1`) name the path
    the scheduler runs; on the CPU the static step has no graphs (the "static+graphs" case is the GPU check's)."""
    import app
    from webui import metrics

    from streaming_engine.scheduler import DECODE_PATHS

    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=96, decode_step=decode_step))
    assert engine.decode_path == path in DECODE_PATHS
    assert f"decode {path}" in app.status_line(engine, "tiny").split(" · ")
    page = metrics.render(engine)
    assert "# TYPE streaming_llm_decode_path_info gauge" in page
    assert re.findall(r"^streaming_llm_decode_path_info\{(.*)\} (\S+)$", page, flags=re.M) == [(f'path="{path}"', "1")]
