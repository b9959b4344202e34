"""Reloads re-attach, closed tabs free their session, and a conversation survives kill -9 with its context."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streaming_engine import EngineBusy, EngineConfig, StreamingEngine
from streaming_engine.conversations import ConversationNotFound, Conversations
from streaming_engine.store import UNREACHABLE, ChatStore, StoreError
from streaming_engine.validate import MARK_KEYS
from streaming_engine.history import restore_history

ROOT = Path(__file__).resolve().parent.parent
GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
CONFIG = dict(start_size=4, recent_size=1000, prefill_chunk_size=256)


def engine_for(model, tokenizer, **overrides):
    return StreamingEngine(model, tokenizer, EngineConfig(**{**CONFIG, **overrides}))


def say(conversations, token, message, **kwargs):
    events = list(conversations.chat(token, message, **{**GREEDY, "max_new_tokens": 4, **kwargs}))
    assert events[-1].kind == "done", events[-1].text
    return events[-1].text


@pytest.fixture
def make(tiny_chat_model, default_tokenizer, store_opener):
    """Conversations over a fresh engine and a store on one database of each engine (SQLite in tmp_path, a
    PostgreSQL database): each call is a (re)started server, or another replica."""
    made = []

    def build(persist=True, store_kwargs=None, **config):
        store = store_opener(**(store_kwargs or {})) if persist else ChatStore(None, **(store_kwargs or {}))
        made.append(store)
        return Conversations(engine_for(tiny_chat_model, default_tokenizer, **config), store,
                             partial_save_interval_s=0.0)

    yield build
    for store in made:
        store.close()


@pytest.mark.parametrize("reloads", [1, 5])
def test_a_reload_reattaches_to_its_own_session_and_creates_none(make, reloads):
    conversations = make()
    opened = conversations.start(owner="10.0.0.1")
    say(conversations, opened.token, "Hello")
    for _ in range(reloads):
        again = conversations.open(opened.token, owner="10.0.0.1")
        assert again.reattached and again.session_id == opened.session_id
        assert [m["content"] for m in again.messages][0] == "Hello"
    assert conversations.engine.open_sessions() == 1


def test_a_closed_tab_frees_its_session_at_once_and_the_conversation_comes_back(make):
    conversations = make(max_sessions_per_owner=1)
    opened = conversations.start(owner="me")
    say(conversations, opened.token, "Remember the word tangerine.")
    conversations.release(opened.token)
    assert conversations.engine.open_sessions() == 0
    other = conversations.start(owner="me")  # the freed slot is usable at once
    with pytest.raises(EngineBusy, match="limit 1 per user"):  # the cap holds for re-created sessions too
        conversations.open(opened.token, owner="me")
    conversations.release(other.token)
    back = conversations.open(opened.token, owner="me")
    assert not back.reattached and back.messages[0]["content"] == "Remember the word tangerine."


def test_after_a_restart_the_conversation_continues_with_its_earlier_content_in_context(
    make, tiny_chat_model, default_tokenizer
):
    first = make()
    token = first.start(system_prompt="You are terse.").token
    for message in ("My cat is called Zanzibar.", "She is seven."):
        say(first, token, message)
    exported = first.export(token)
    # Restart: a new engine and a new store object on the same file; nothing carried over in memory.
    second = make()
    opened = second.open(token)
    assert not opened.reattached and opened.system_prompt == "You are terse."
    assert [m["content"] for m in opened.messages] == [m["content"] for m in json.loads(exported)["messages"]]
    assert opened.title == "My cat is called Zanzibar."
    reply = say(second, token, "What is her name?")
    session = second.engine.session(opened.session_id)
    assert "Zanzibar" in session.stream_text and second.engine.stats(opened.session_id)["seen_tokens"] > 40
    # Exactly what restoring the downloaded history gives.
    restored = restore_history(second.engine, exported)
    events = list(second.engine.chat(restored, "What is her name?", max_new_tokens=4, **GREEDY))
    assert events[-1].text == reply
    assert len(second.store.load(token).messages) == 6


def test_partial_replies_are_saved_while_streaming_and_replaced_when_the_turn_ends(make):
    conversations = make()
    token = conversations.start().token
    seen = []
    for event in conversations.chat(token, "Write a lot.", max_new_tokens=12, **GREEDY):
        stored = conversations.store.load(token)
        if stored is not None and len(stored.messages) == 2:
            seen.append(stored.messages[-1])
    assert seen and all(m.get("interrupted") for m in seen)
    final = conversations.store.load(token).messages[-1]
    assert not final.get("interrupted") and final["content"] == event.text


def test_a_reader_that_goes_away_leaves_its_reply_saved_as_interrupted(make):
    conversations = make()
    token = conversations.start().token
    stream = conversations.chat(token, "Tell me a long story.", max_new_tokens=400, **GREEDY)
    shown = ""
    for event in stream:
        shown += event.text
        if len(shown) > 20:
            break
    stream.close()  # the tab closed mid-reply
    last = conversations.store.load(token).messages[-1]
    assert last["interrupted"] and last["content"] == shown
    assert conversations.open(token).messages[-1].get("interrupted")


def test_retry_delete_rename_and_list_change_the_store(make):
    conversations = make()
    token = conversations.start().token
    say(conversations, token, "first")
    say(conversations, token, "second")
    assert conversations.retry(token) == "second"
    assert [m["content"] for m in conversations.store.load(token).messages][:1] == ["first"]
    assert len(conversations.store.load(token).messages) == 2
    assert conversations.rename(token, "My chat") and conversations.list([token])[0].title == "My chat"
    assert conversations.delete(token)
    assert conversations.list([token]) == [] and conversations.engine.open_sessions() == 0
    with pytest.raises(ConversationNotFound):
        conversations.open(token)


def test_nothing_is_stored_before_the_first_message_or_for_a_refused_one(make):
    conversations = make()
    token = conversations.start().token
    assert conversations.store.load(token) is None
    assert list(conversations.chat(token, "   "))[-1].kind == "error"
    assert conversations.store.load(token) is None


def test_an_uploaded_history_becomes_a_stored_bounded_conversation(make):
    conversations = make()
    upload = json.dumps({"format": "streaming-llm-chat", "mode": "dense", "messages": [
        {"role": "user", "content": "Old question"}, {"role": "assistant", "content": "Old answer"}]})
    opened = conversations.import_history(upload, owner="me")
    assert conversations.engine.stats(opened.session_id)["mode"] == "streaming"
    assert [m["content"] for m in conversations.store.load(opened.token).messages] == ["Old question", "Old answer"]


def test_an_upload_at_a_full_session_cap_makes_room_from_parked_sessions_as_a_new_chat_does(make):
    conversations = make(max_sessions_per_owner=1)
    parked = conversations.start(owner="me")
    say(conversations, parked.token, "Hello")
    conversations.park(parked.token, owner="me")
    upload = json.dumps({"format": "streaming-llm-chat", "messages": [
        {"role": "user", "content": "Old question"}, {"role": "assistant", "content": "Old answer"}]})
    opened = conversations.import_history(upload, owner="me")
    assert conversations.parked() == [] and conversations.engine.open_sessions() == 1
    assert [m["content"] for m in conversations.messages(opened.token)] == ["Old question", "Old answer"]
    with pytest.raises(EngineBusy):  # nothing parked left: the cap stands
        conversations.import_history(upload, owner="me")


def test_an_uploaded_download_is_stored_and_downloaded_again_with_its_recall_records_and_marks(make):
    from test_config import STORED as stored

    conversations = make()
    opened = conversations.import_history(json.dumps({"format": "streaming-llm-chat", "messages": stored}))
    assert conversations.store.load(opened.token).messages == stored
    assert [[key for key in MARK_KEYS if m.get(key)] for m in opened.messages] == [
        [], ["stopped"], [], ["interrupted"], [], ["truncated"]]
    assert conversations.engine.memory_map(opened.session_id)[2]["recalled"] == [0]
    assert json.loads(conversations.export(opened.token))["messages"] == stored


def test_a_reply_is_marked_truncated_exactly_when_it_ended_at_its_length_limit_and_keeps_it_across_a_restart(make):
    """The note under a reply cut at `max_new_tokens` is stored with it, as "(stopped)" is, so a reload, a restart or
    another replica shows it too; a reply that ended otherwise (here at a stop string) carries no mark."""
    conversations = make()
    token = conversations.start().token
    cut = list(conversations.chat(token, "Tell me everything", **GREEDY, max_new_tokens=4))[-1]
    ended = list(conversations.chat(token, "Now stop at a space", **GREEDY, max_new_tokens=64, stop=[" "]))[-1]
    assert (cut.finish_reason, ended.finish_reason) == ("length", "stop")
    marked = lambda messages: [[key for key in MARK_KEYS if m.get(key)] for m in messages]  # noqa: E731
    assert marked(conversations.messages(token)) == [[], ["truncated"], [], []]
    restarted = make()  # a server started afresh on the same database re-opens it from the store
    assert marked(restarted.open(token).messages) == [[], ["truncated"], [], []]
    restarted.retry(token)  # the exchange goes, and with it nothing of its marks stays behind
    restarted.retry(token)
    say(restarted, token, "Again", max_new_tokens=64, stop=[" "])
    assert marked(restarted.messages(token)) == [[], []] and marked(restarted.store.load(token).messages) == [[], []]


def test_without_persistence_a_reload_still_reattaches_and_nothing_is_written(make, tmp_path):
    conversations = make(persist=False)
    token = conversations.start().token
    say(conversations, token, "Hello")
    assert conversations.open(token).reattached
    conversations.release(token)
    with pytest.raises(ConversationNotFound):
        conversations.open(token)
    assert list(tmp_path.iterdir()) == []


def test_a_full_store_never_breaks_the_chat(make):
    conversations = make(store_kwargs=dict(max_conversations=1))
    conversations.store.create()
    token = conversations.start().token
    say(conversations, token, "Hello")
    assert "could not be saved" in conversations.save_error(token)
    assert conversations.save_error(token) is None and len(conversations.messages(token)) == 2


@pytest.mark.parametrize("bad", ["", "x" * 100_000, None, "../etc"], ids=["empty", "huge", "null", "path"])
def test_malformed_tokens_are_refused_without_echo(make, bad):
    conversations = make()
    with pytest.raises(ConversationNotFound) as caught:
        conversations.open(bad)
    assert len(str(caught.value)) < 100
    events = list(conversations.chat(bad, "hi"))
    assert events[-1].kind == "error" and len(events[-1].text) < 100


CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from conftest import tiny_model
from transformers import AutoTokenizer
from streaming_engine import EngineConfig, StreamingEngine
from streaming_engine.conversations import Conversations
from streaming_engine.loading import ensure_default_model
from streaming_engine.store import ChatStore
tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
model = tiny_model("llama", layers=2, vocab_size=len(tokenizer), max_positions=4096)
model.generation_config.eos_token_id = tokenizer.eos_token_id
engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=4, recent_size=1000, prefill_chunk_size=256))
conversations = Conversations(engine, ChatStore(sys.argv[2]), partial_save_interval_s=0.0)
token = conversations.start().token
print(token, flush=True)
greedy = dict(temperature=0.0, repetition_penalty=1.0)
for message in ("My cat is called Zanzibar.", "She is seven.", "She likes fish."):
    assert list(conversations.chat(token, message, max_new_tokens=4, **greedy))[-1].kind == "done"
for event in conversations.chat(token, "Tell me everything.", max_new_tokens=4096, **greedy):
    pass
print("finished before the kill", flush=True)
"""


@pytest.mark.slow  # two app processes, one killed
def test_kill_9_mid_reply_then_restart_brings_back_three_turns_and_the_interrupted_reply(
    tiny_chat_model, default_tokenizer, tmp_path
):
    path = tmp_path / "chats.sqlite"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT / "tests"), str(path)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        token = child.stdout.readline().strip()
        assert token, "the child did not start"
        deadline = time.monotonic() + 120
        with ChatStore(path) as watcher:
            while time.monotonic() < deadline:  # wait until the 4th reply is being written
                stored = watcher.load(token)
                if stored and len(stored.messages) == 8 and len(stored.messages[-1]["content"]) > 10:
                    break
                assert child.poll() is None, "the child ended early"
                time.sleep(0.02)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    with ChatStore(path) as store:  # the restarted server
        conversations = Conversations(engine_for(tiny_chat_model, default_tokenizer), store)
        opened = conversations.open(token)
        users = [m["content"] for m in opened.messages if m["role"] == "user"]
        assert users == ["My cat is called Zanzibar.", "She is seven.", "She likes fish.", "Tell me everything."]
        assert len(opened.messages) == 8 and opened.messages[-1]["interrupted"]
        assert not any(m.get("interrupted") for m in opened.messages[:-1])
        say(conversations, token, "What is her name?")
        assert "Zanzibar" in conversations.engine.session(opened.session_id).stream_text
        stored = store.load(token).messages
        assert len(stored) == 10 and stored[7]["interrupted"] and not stored[9].get("interrupted")


def test_a_session_closed_for_idleness_is_recreated_from_the_store_on_the_next_message(make):
    conversations = make(idle_timeout_s=60)
    opened = conversations.start()
    say(conversations, opened.token, "The password is swordfish.")
    assert conversations.engine.close_idle() == 0  # just used: not idle
    conversations.engine.clock = lambda: time.monotonic() + 120  # idle twice the timeout, without a sleep
    assert conversations.engine.close_idle() == 1
    conversations.engine.clock = time.monotonic
    say(conversations, opened.token, "What was the password?")
    sid = conversations.open(opened.token).session_id
    assert sid != opened.session_id and "swordfish" in conversations.engine.session(sid).stream_text
    assert len(conversations.store.load(opened.token).messages) == 4


def test_a_postgresql_outage_keeps_the_chat_going_and_health_follows_it(
        tiny_chat_model, default_tokenizer, postgres_server, fresh_database):
    """The server stops mid-conversation: replies still come, the user is told the chat is unsaved and
    `storage_problem` (/health) names the outage; once it is back the next turn saves the whole history again."""
    from streaming_engine.store_pg import PostgresStore

    with PostgresStore(fresh_database) as store:
        conversations = Conversations(engine_for(tiny_chat_model, default_tokenizer), store, partial_save_interval_s=0.0)
        token = conversations.start(owner="me").token
        say(conversations, token, "one")
        postgres_server.stop()
        try:
            say(conversations, token, "two")
            assert "unreachable" in conversations.storage_problem()
            assert "could not be saved" in conversations.save_error(token)
            assert conversations.list([token]) == []
        finally:
            postgres_server.start()
        say(conversations, token, "three")
        assert conversations.storage_problem() is None
        with PostgresStore(fresh_database) as replica:
            assert [m["content"] for m in replica.load(token).messages][::2] == ["one", "two", "three"]


def test_a_replica_whose_live_session_another_replica_moved_on_reloads_it_from_the_store(make):
    """A browser chats on replica A, moves to B (A was unreachable for a while) and chats there, then comes back to
    A, which still holds its old live session: A must continue B's history, not its own stale one."""
    a, b = make(), make()
    opened = a.start(owner="10.0.0.1")
    say(a, opened.token, "one")
    say(b, opened.token, "two")  # B loads the transcript and re-primes
    again = a.open(opened.token, owner="10.0.0.1")
    assert not again.reattached and again.session_id != opened.session_id
    assert [m["content"] for m in again.messages][::2] == ["one", "two"]
    say(a, opened.token, "three")
    assert [m["content"] for m in b.open(opened.token).messages][::2] == ["one", "two", "three"]
    # Its own writes keep a replica's live session current: re-opening re-attaches, nothing is re-primed.
    assert a.rename(opened.token, "renamed") and a.open(opened.token).reattached


def test_a_write_committed_as_the_server_stopped_does_not_make_the_replica_drop_what_it_held_meanwhile(
        make, monkeypatch):
    """The end-of-turn write reaches the store but its answer is lost (the server stopped mid-commit), then the
    server is down for a turn: the next turn, once it is back, must store the whole conversation. The revision
    that moved is this replica's own write, so its live session (holding the turn of the outage) is kept, not
    re-loaded from the store. A replica that another one moved on still re-loads (the test above)."""
    a = make()
    store, mode = a.store, {"now": "up"}
    replace, save_partial = store.replace, store.save_partial

    def down(*args, **kwargs):
        raise StoreError("the chat database server is unreachable", code=UNREACHABLE)

    def replacing(*args, **kwargs):
        if mode["now"] == "down":
            down()
        revision = replace(*args, **kwargs)
        if mode["now"] == "answer lost":
            mode["now"] = "down"  # committed; the server goes away before it answers
            down()
        return revision

    monkeypatch.setattr(store, "replace", replacing)
    monkeypatch.setattr(store, "save_partial", lambda *a, **k: down() if mode["now"] == "down" else save_partial(*a, **k))
    for name in ("revision", "exists", "load"):
        original = getattr(store, name)
        monkeypatch.setattr(store, name, lambda *a, _o=original, **k: down() if mode["now"] == "down" else _o(*a, **k))
    token = a.start(owner="me").token
    events = a.chat(token, "one", **GREEDY, max_new_tokens=4)
    first = next(events)  # the acceptance and first-piece writes are in
    assert first.kind == "delta"
    mode["now"] = "answer lost"
    assert list(events)[-1].kind == "done"  # its end-of-turn write commits, then the server is gone
    assert mode["now"] == "down"
    say(a, token, "two")  # unsaved: the server is down
    mode["now"] = "up"
    say(a, token, "three")
    stored = make().open(token).messages  # another replica reads the store
    assert [m["content"] for m in stored if m["role"] == "user"] == ["one", "two", "three"]
    assert [m["role"] for m in stored] == ["user", "assistant"] * 3 and not any(m.get("interrupted") for m in stored)
    assert [m["content"] for m in stored] == [m["content"] for m in a.messages(token)]


def test_a_conversation_reopened_from_the_store_after_a_restart_recalls_its_evicted_fact_and_keeps_recall_off(make):
    from test_recall import FACT, QUESTION, TOPICS

    first = make(recent_size=124, prefill_chunk_size=32)
    token, off = first.start().token, first.start().token
    first.set_recall(off, False)
    for message in [FACT, *TOPICS]:
        for t in (token, off):
            say(first, t, message, max_new_tokens=8)
    second = make(recent_size=124, prefill_chunk_size=32)  # a restart: the history comes back from the store
    second.open(token)
    events = list(second.chat(token, QUESTION, **{**GREEDY, "max_new_tokens": 8}))
    stats = events[-1].stats
    assert stats["recalled_tokens"] > 0 and stats["recalled_messages"][:1] == [0]  # no system prompt: the fact
    assert second.store.load(token).messages[-2]["content"] == QUESTION  # the store keeps what was typed
    # The switch is kept by the process that was told, and applied to the session it re-creates.
    first.release(off)
    first.open(off)
    events = list(first.chat(off, QUESTION, **{**GREEDY, "max_new_tokens": 8}))
    assert events[-1].stats["recalled_tokens"] == 0 and events[-1].stats["recall_budget"] == 0


# --- what recall did survives a restart and another replica --------------------------------------------------------

#: test_recall's window, where its fact leaves the cache after its topics (the prompt chunk follows the window).
SMALL_WINDOW = dict(start_size=4, recent_size=124, prefill_chunk_size=None)

def _recall_until_quoted(conversations, token):
    """Talk until the first message has left a 4+124 cache, then ask about it: the question's turn recalls it."""
    from test_recall import FACT, QUESTION, TOPICS

    for message in [FACT, *TOPICS, QUESTION]:
        say(conversations, token, message, max_new_tokens=8)
    memory = conversations.memory_map(token)
    assert memory[1]["state"] == "gone" and memory[-2].get("recalled") == [1], memory  # [system, fact, ..., question]


def test_a_conversation_reopened_after_a_restart_gives_the_model_the_same_context_and_keeps_its_markers(make):
    before = make(**SMALL_WINDOW)
    opened = before.start(system_prompt="You are helpful.")
    _recall_until_quoted(before, opened.token)
    fed = before.engine.session(opened.session_id).fed  # what the model was given, quoted passages included
    markers = [m.get("recalled") for m in before.memory_map(opened.token)]

    after = make(**SMALL_WINDOW)  # a restarted server on the same database
    again = after.open(opened.token)
    assert not again.reattached
    assert after.engine.session(again.session_id).fed == fed
    assert [m.get("recalled") for m in after.memory_map(opened.token)] == markers
    assert [m["content"] for m in again.messages] == [m["content"] for m in before.messages(opened.token)]
    say(after, opened.token, "And the cello?", max_new_tokens=4)  # re-primed from the stored context
    assert [m.get("recalled") for m in after.memory_map(opened.token)][: len(markers)] == markers


def test_a_download_uploaded_on_another_server_gives_the_model_the_same_context_and_keeps_the_switch(make):
    before = make(**SMALL_WINDOW)
    opened = before.start(system_prompt="You are helpful.")
    _recall_until_quoted(before, opened.token)
    before.set_recall(opened.token, False)
    fed = before.engine.session(opened.session_id).fed
    markers = [m.get("recalled") for m in before.memory_map(opened.token)]
    download = before.export(opened.token)
    assert json.loads(download)["recall"] is False

    after = make(**SMALL_WINDOW)
    uploaded = after.import_history(download)
    assert after.engine.session(uploaded.session_id).fed == fed
    assert [m.get("recalled") for m in after.memory_map(uploaded.token)] == markers
    assert not after.recall_enabled(uploaded.token) and after.store.load(uploaded.token).recall is False
    assert after.engine.stats(uploaded.session_id)["recall_budget"] == 0
    # Switched back on, the next download says so, and an upload of it recalls again.
    after.set_recall(uploaded.token, True)
    again = after.import_history(after.export(uploaded.token))
    assert after.recall_enabled(again.token) and after.engine.stats(again.session_id)["recall_budget"] > 0


def test_the_recall_switch_is_stored_with_the_conversation_and_every_replica_follows_it(make):
    a, b = make(**SMALL_WINDOW), make(**SMALL_WINDOW)
    off_from_start = a.start(recall=False)
    say(a, off_from_start.token, "Hello")  # its first save stores the switch
    assert not b.recall_enabled(b.open(off_from_start.token).token)
    assert b.engine.stats(b.open(off_from_start.token).session_id)["recall_budget"] == 0

    opened = a.start()
    say(a, opened.token, "Hello")
    a.set_recall(opened.token, False)
    sid = b.open(opened.token).session_id
    assert not b.recall_enabled(opened.token) and b.engine.stats(sid)["recall_budget"] == 0
    a.set_recall(opened.token, True)  # the revision moves: b re-loads the conversation at its next use
    sid = b.open(opened.token).session_id
    assert b.recall_enabled(opened.token) and b.engine.stats(sid)["recall_budget"] > 0
    assert a.open(opened.token).reattached  # a's own write does not make a's session stale
