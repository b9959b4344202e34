"""ZeroGPU: turns run in forked GPU workers while every conversation stays in the main process.

`zerogpu_standin.GPU` forks, pickles and streams like the `spaces` package (see its docstring); the model carries a
guard that makes any forward pass in the main process fail, so these tests also prove that only the worker
computes. Every handler a visitor can trigger (send, stop, retry, new chat, download, upload, reload, the
comparison tab, the HTTP API) is driven against `RemoteTurnsEngine` under the stand-in.
"""

from __future__ import annotations

import json
import os
import threading

import gradio as gr
import pytest
import zerogpu_standin as zs
from chat_page import SKIP, Page
from conftest import tiny_model

from streaming_engine import MODES, EngineConfig, StreamingEngine
from streaming_engine.conversations import Conversations
from streaming_engine.remote import RemoteTurnsEngine
from streaming_engine.store import ChatStore
from webui import chat_tab, compare_tab, handlers
from webui.conversation_list import empty_record
from webui.render import mark_memory
from streaming_engine.history import export_history

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
#: Chat-tab sampling inputs: system prompt, temperature, top-p, top-k, max new tokens, penalty.
GREEDY_INPUTS = ("", 0.0, 1.0, 0, 12, 1.0)
CONFIG = dict(start_size=4, recent_size=48, prefill_chunk_size=16, max_new_tokens=12, dense_max_tokens=160)
#: Forward passes a worker may run before it kills itself (set before a fresh fork; -1: never).
_crash_after = [-1]


class MainProcessForward(AssertionError):
    pass


def _only_in_a_worker(module, args):
    if not zs.forked:
        raise MainProcessForward("a forward pass ran in the main process")
    if _crash_after[0] >= 0:
        _crash_after[0] -= 1
        if _crash_after[0] < 0:
            os._exit(3)  # the worker dies mid-turn, as an out-of-memory kill would


@pytest.fixture(scope="module")
def guarded_model(default_tokenizer):
    """The same weights as `tiny_chat_model` (same seed), but any forward pass outside a worker fails."""
    model = tiny_model("llama", layers=2, vocab_size=len(default_tokenizer), max_positions=4096)
    model.generation_config.eos_token_id = default_tokenizer.eos_token_id
    model.register_forward_pre_hook(_only_in_a_worker)
    yield model
    zs.shutdown()


def remote_engine(model, tokenizer, reuse=True, schedule=None, **config):
    return RemoteTurnsEngine(model, tokenizer, EngineConfig(**{**CONFIG, **config}),
                             run_elsewhere=zs.GPU(duration=30, reuse=reuse, schedule=schedule))


@pytest.fixture
def engine(guarded_model, default_tokenizer):
    engine = remote_engine(guarded_model, default_tokenizer)
    yield engine
    for sid in engine.session_ids():
        engine.close(sid)


def last(outputs):
    return list(outputs)[-1]


def conversations(engine, folder):
    """The chat tab's conversations over `engine`, stored under `folder` (a second call: the same store after a
    restart)."""
    return Conversations(engine, ChatStore.open(folder), partial_save_interval_s=0.0)


class ChatPage(Page):
    """A chat-tab page whose turns ask for this module's reply length."""

    def send(self, message, inputs=GREEDY_INPUTS):
        return super().send(message, inputs)

    def retry(self, inputs=GREEDY_INPUTS):
        return super().retry(inputs)

    @property
    def sid(self):
        return self.conv.open(self.token).session_id


def test_the_guard_refuses_a_forward_pass_in_the_main_process(guarded_model):
    import torch

    with pytest.raises(MainProcessForward):
        guarded_model(torch.tensor([[1, 2]]))


@pytest.mark.parametrize("reuse", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["reused-worker", "fresh-fork-every-call"])
@pytest.mark.parametrize("mode", MODES)
def test_turns_run_in_forked_workers_reply_exactly_as_a_local_engine(
        guarded_model, tiny_chat_model, default_tokenizer, mode, reuse):
    local = StreamingEngine(tiny_chat_model, default_tokenizer, EngineConfig(**CONFIG))
    remote = remote_engine(guarded_model, default_tokenizer, reuse=reuse)
    sids = [engine.new_session(mode) for engine in (local, remote)]
    forks = zs.stats.forks
    prompts = ["Hello!", "Tell me about the sea.", "And the mountains?", "One more thing, please.", "Thanks."]
    for prompt in prompts:
        finals = [list(engine.chat(sid, prompt, **GREEDY))[-1] for engine, sid in zip((local, remote), sids)]
        assert finals[0].text == finals[1].text and finals[0].finish_reason == finals[1].finish_reason
        assert finals[0].stats == {**finals[1].stats, **{k: finals[0].stats[k] for k in (
            "tokens_per_s", "time_to_first_token_s", "last_token_latency_s")}}  # timings differ, nothing else
    assert local.history(sids[0]) == remote.history(sids[1])
    # The same export but for its own time stamp (taken to the second: the two may straddle a second's edge).
    exports = [json.loads(export_history(engine, sid)) for engine, sid in zip((local, remote), sids)]
    assert all(isinstance(e.pop("exported_at"), str) for e in exports) and exports[0] == exports[1]
    kept = remote.stats(sids[1])
    assert kept["seen_tokens"] == kept["cache_tokens"] + kept["evicted_tokens"] > 0
    if mode != "dense":
        assert kept["evicted_tokens"] > 0  # the cache that crossed the boundary had been evicted and re-rotated
    assert zs.stats.forks - forks == (1 if reuse else len(prompts))  # one worker per decorated function
    assert remote.counters.snapshot() == local.counters.snapshot()  # /metrics counts the workers' turns too


@pytest.mark.parametrize("eviction", ["turns", "tokens"])
def test_a_pinned_system_prompt_and_the_memory_map_cross_to_the_worker_and_back(
        guarded_model, tiny_chat_model, default_tokenizer, eviction):
    """What issue 11 added to a session (pinned head, message spans and boundaries, the memory map) travels with
    its state: a fresh worker every turn evicts exactly as a local engine, and the main process reads the same map."""
    config = dict(CONFIG, eviction=eviction)
    local = StreamingEngine(tiny_chat_model, default_tokenizer, EngineConfig(**config))
    remote = remote_engine(guarded_model, default_tokenizer, reuse=False, eviction=eviction)
    system = "You are a careful assistant. Always answer in one short sentence."
    sids = [engine.new_session("streaming", system) for engine in (local, remote)]
    for prompt in ["Hello!", "Tell me about the sea.", "And the mountains?", "One more thing, please."]:
        for engine, sid in zip((local, remote), sids):
            list(engine.chat(sid, prompt, **GREEDY))
    stats = [engine.stats(sid) for engine, sid in zip((local, remote), sids)]
    assert stats[0]["pinned_tokens"] == stats[1]["pinned_tokens"] == local.system_tokens(system) > CONFIG["start_size"]
    assert stats[1]["evicted_tokens"] > 0 and stats[1]["turns_in_memory"] == stats[0]["turns_in_memory"]
    assert remote.memory_map(sids[1]) == local.memory_map(sids[0])
    assert remote.memory_map(sids[1])[0] == {"role": "system", **remote.memory_map(sids[1])[0], "state": "full"}
    caches = [engine.session(sid).cache for engine, sid in zip((local, remote), sids)]
    assert caches[1].stream_positions == caches[0].stream_positions
    assert caches[1].boundaries == caches[0].boundaries and caches[1].eviction == eviction
    pinned = stats[1]["pinned_tokens"]
    assert caches[1].stream_positions[:pinned] == list(range(pinned))


def test_a_restored_system_prompt_too_long_to_pin_still_runs_its_turns_in_a_worker(guarded_model, default_tokenizer):
    engine = remote_engine(guarded_model, default_tokenizer, pin_limit=8)
    system = "You are a careful assistant who always answers in one short sentence and never uses lists."
    with pytest.raises(ValueError, match="pin_limit=8"):
        engine.new_session("streaming", system)  # a new chat is refused, naming the limit
    sid = engine.open_history([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], system)
    final = list(engine.chat(sid, "Tell me about the sea.", **GREEDY))[-1]
    assert final.kind == "done" and final.stats["pinned_tokens"] == 0  # kept unpinned, in the worker too
    assert engine.stats(sid)["turns"] == 2
    engine.close(sid)


def test_send_download_retry_reload_restart_upload_and_new_chat_all_see_one_conversation(
        engine, guarded_model, default_tokenizer, tmp_path):
    conv = conversations(engine, tmp_path / "data")
    page = ChatPage(conv)
    outputs = page.send("Remember: pineapple")
    chat, box, *_ = outputs[-1]
    # The box empties when the turn starts and is left alone after (the user may be typing the next message).
    assert outputs[0][1] == "" and box == SKIP and chat[1]["content"] and page.sid in engine.session_ids()
    download = chat_tab.export_history(conv, page.state, page.record)  # a main-process handler sees the reply
    assert download["visible"] is True
    exported = json.loads(open(download["value"], encoding="utf-8").read())
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    assert exported["messages"][1]["content"] == conv.messages(page.token)[1]["content"]

    page.send("Second message")
    page.retry()
    assert page.texts("user") == ["Remember: pineapple", "Second message"]
    assert engine.stats(page.sid)["turns"] == 2 and len(engine.history(page.sid)) == 4

    reloaded = ChatPage(conv, record=page.record)  # a page reload re-attaches to the live session
    reloaded.load()
    shown = mark_memory(chat_tab.shown_messages(conv.messages(page.token)), conv.memory_map(page.token))
    assert reloaded.chat == shown == page.chat and reloaded.sid == page.sid  # forgotten messages marked alike

    # A restart: a new engine and the same store. The conversation comes back with an empty cache; the next turn
    # re-primes it from the stored history, in a worker (the guard refuses the main process).
    after = remote_engine(guarded_model, default_tokenizer)
    restarted = ChatPage(conversations(after, tmp_path / "data"), record=page.record)
    restarted.load()
    assert restarted.token == page.token and after.stats(restarted.sid)["cache_tokens"] == 0
    restarted.send("What was the word?")
    assert len(restarted.chat) == 6 and after.stats(restarted.sid)["seen_tokens"] > 0
    for sid in after.session_ids():
        after.close(sid)

    page.show(chat_tab.upload_history(conv, open(download["value"], "rb").read(), page.state, page.record))
    assert len(page.chat) == 2 and page.token != reloaded.token
    page.send("What was the word?")
    assert len(page.chat) == 4

    uploaded = page.token
    page.show(chat_tab.start_new_chat(conv, page.state, page.record))
    assert page.chat == [] and conv.parked()[-1] == uploaded  # left, its session kept for a switch back
    with pytest.warns(UserWarning, match="Nothing to download"):
        chat_tab.export_history(conv, page.state, page.record)


def _respond_in_thread(conv, message, inputs):
    """Start a Send in a thread; returns (thread, outputs list, event set at the first streamed reply text)."""
    outputs, streaming = [], threading.Event()

    def run():
        for out in chat_tab.respond(conv, message, [], {}, empty_record(), *inputs):
            outputs.append(out)
            if out[0] and out[0][-1]["content"]:
                streaming.set()
        streaming.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outputs, streaming


def test_stop_in_the_main_process_ends_the_reply_running_in_the_worker(engine, tmp_path):
    conv = conversations(engine, tmp_path / "data")
    thread, outputs, streaming = _respond_in_thread(conv, "Write a very long story.", ("", 0.0, 1.0, 0, 4000, 1.0))
    assert streaming.wait(60)
    chat_tab.stop_reply(conv, outputs[-1][3])
    thread.join(60)
    chat, _, gauges, state, *_ = outputs[-1]
    assert chat[-1]["content"].endswith("*(stopped)*")
    sid = conv.open(state["token"]).session_id
    stats = engine.stats(sid)
    assert 0 < stats["reply_tokens"] < 4000
    stored = conv.store.load(state["token"]).messages
    assert stored[0]["content"] == "Write a very long story." and stored[1]["role"] == "assistant"
    page = ChatPage(conv, record={"tokens": [state["token"]], "current": state["token"]})
    page.chat, page.state = chat, state
    page.send("Go on.")  # the chat continues
    assert len(page.chat) == 4 and engine.stats(sid)["turns"] == 2


def test_continue_is_refused_under_zerogpu_with_what_to_do_instead(engine, tmp_path):
    """A reply continues from the cache as it ended, which the state shipped to a worker does not carry."""
    conv = conversations(engine, tmp_path / "data")
    page = ChatPage(conv)
    page.send("Tell me a story")
    before = list(page.chat)
    with pytest.warns(UserWarning, match="Continue is not available on this server"):
        page.continue_()
    assert page.chat == before and not engine.continues_replies  # so the page hides its Continue button


def test_a_reader_that_leaves_mid_reply_still_lands_the_partial_turn(engine):
    sid = engine.new_session()
    events = engine.chat(sid, "Write a very long story.", max_new_tokens=4000, **GREEDY)
    for event in events:
        if event.kind == "delta" and event.text:
            break
    events.close()  # the tab went away
    history = engine.history(sid)
    assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["content"]
    assert engine.stats(sid)["cache_tokens"] > 0 and engine.remote_turns == 0


def test_a_worker_that_dies_mid_reply_keeps_the_message_and_the_chat_recovers(
        guarded_model, default_tokenizer, tmp_path):
    engine = remote_engine(guarded_model, default_tokenizer, reuse=False)
    page = ChatPage(conversations(engine, tmp_path / "data"))
    _crash_after[0] = 6  # inherited by the next fork: prompt + a few tokens, then the worker dies
    try:
        with pytest.warns(UserWarning, match="Generation failed"):
            chat, box, *_ = page.send("Hello")[-1]
    finally:
        _crash_after[0] = -1
    assert box == SKIP and chat[1]["content"].startswith("⚠️")  # accepted: not given back to the box
    assert page.conv.store.load(page.token).messages[0]["content"] == "Hello"
    page.send("Again")
    assert page.chat[-1]["content"] and not page.chat[-1]["content"].startswith("⚠️")
    assert engine.stats(page.sid)["turns"] == 2


def test_a_call_the_platform_refuses_gives_the_message_back_unchanged(guarded_model, default_tokenizer, tmp_path):
    def out_of_quota(seconds):
        raise gr.Error("You have exceeded your GPU quota (30s requested vs. 10s left).")

    engine = remote_engine(guarded_model, default_tokenizer, schedule=out_of_quota)
    page = ChatPage(conversations(engine, tmp_path / "data"))
    with pytest.warns(UserWarning, match="exceeded your GPU quota"):
        chat, box, *_, listing = page.send("Keep this text")[-1]
    assert chat == [] and box == "Keep this text" and listing == SKIP
    assert page.conv.messages(page.token) == [] and not page.conv.store.exists(page.token)
    assert engine.history(page.sid) == [] and engine.remote_turns == 0


def test_the_comparison_tab_runs_every_side_in_one_worker_call_and_stop_ends_the_autopilot(engine, monkeypatch):
    calls = zs.stats.calls
    box, note, *rest = last(compare_tab.compare_send(engine, "Hi there", [], [], [], {}, True, 8))
    assert all(chat[1]["content"] for chat in rest[:3]) and zs.stats.calls == calls + 1
    monkeypatch.setattr(compare_tab, "load_json_list", lambda name: ["One.", "Two.", "Three."])
    state = {}
    running = compare_tab.compare_autopilot(engine, [], [], [], state, True, 8)
    first = next(running)
    compare_tab.compare_stop(engine, first[-1])
    assert list(running)[-1][0] == "**Autopilot stopped** after 1 of 3 prompts."


def test_the_http_api_shares_the_sessions_under_zerogpu(guarded_model, default_tokenizer):
    from browser_util import served
    from gradio_client import Client

    engine = remote_engine(guarded_model, default_tokenizer)
    with served(engine, "tiny (ZeroGPU stand-in)") as (url, _):
        client = Client(url, verbose=False)
        sid = client.predict(api_name="/new_session")
        reply, stats = client.predict(sid, "hello", 8, api_name="/chat")
        assert stats["finish_reason"] in ("eos", "length")
        assert [m["content"] for m in client.predict(sid, api_name="/history")] == ["hello", reply]
        assert engine.history(sid)[-1]["content"] == reply  # the main process holds what the worker wrote
        client.predict(sid, api_name="/close_session")
        assert sid not in engine.session_ids()


def test_the_gpu_duration_asked_for_grows_with_the_reply_and_stays_within_the_platform_cap():
    duration = handlers.zerogpu_duration(EngineConfig(**CONFIG))
    short = duration({"a": None}, "hi", {"max_new_tokens": 16}, {"a": 0})
    long = duration({"a": None, "b": None}, "hi", {"max_new_tokens": 1024}, {"a": 0, "b": 1})
    default = duration({"a": None}, "hi", {}, {"a": 0})  # no max_new_tokens given: the engine's default
    assert 0 < short < long == handlers.ZEROGPU_MAX_DURATION_S
    assert default == duration({"a": None}, "hi", {"max_new_tokens": CONFIG["max_new_tokens"]}, {"a": 0})
