"""The llama.cpp backend (`streaming_engine/llamacpp`) on the real default GGUF, against llama.cpp's own generation
and against the transformers backend; plus the backend choice, which needs no package.

Tests that run llama.cpp are skipped, with the reason, only where `llama-cpp-python` is not installed
(`pip install -r requirements-cpu.txt`; CI installs it).
"""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from streaming_engine import EngineConfig, StreamingEngine, load
from streaming_engine.backends import BACKENDS, choose_backend, resolve_backend
from streaming_engine.llamacpp import llamacpp_available, require_llamacpp
from streaming_engine.history import export_history, restore_history

needs_llamacpp = pytest.mark.skipif(
    not llamacpp_available(), reason="llama-cpp-python is not installed (pip install -r requirements-cpu.txt)")
GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
#: The eval text of the agreement tests: the library's own module documentation (English prose, always present).
EVAL_MODULES = ("streaming_engine.cache", "streaming_engine.positions", "streaming_engine.generation",
                "streaming_engine.batch_cache", "streaming_engine.session", "streaming_engine.scheduler")


@pytest.fixture(scope="module")
def llama():
    """The offline default model on llama.cpp, one thread (the test machines are shared). Skips by itself where the
    package is missing, so a test that forgets `needs_llamacpp` still skips with the reason instead of erroring."""
    if not llamacpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install -r requirements-cpu.txt)")
    return load(backend="llama.cpp", n_threads=1)


_ENGINES: list[StreamingEngine] = []


@pytest.fixture(autouse=True)
def free_contexts():
    """Each test's llama.cpp contexts are freed when it ends: an engine's worker thread would keep them (and their
    KV memory) for the rest of the test session."""
    yield
    while _ENGINES:
        engine = _ENGINES.pop()
        for sid in engine.session_ids():
            engine.close(sid)
        engine.backend.close()


def llama_engine(llama, **config) -> StreamingEngine:
    """An engine on the llama.cpp model; two sequences unless a test asks for more (each holds KV memory)."""
    model, tokenizer = llama
    config = {"start_size": 4, "recent_size": 124, "max_active_turns": 2, "max_batch": 2, **config}
    engine = StreamingEngine(model, tokenizer, EngineConfig(**config))
    _ENGINES.append(engine)
    return engine


def reply(engine, sid, message, **sampling) -> tuple[str, object]:
    events = list(engine.chat(sid, message, **{**GREEDY, **sampling}))
    return "".join(e.text for e in events if e.kind == "delta"), events[-1]


# --- choosing a backend (no package needed) --------------------------------------------------------------------


@pytest.mark.parametrize("installed", [True, False])
@pytest.mark.parametrize("gpu", [True, False])
def test_auto_runs_transformers_whether_or_not_llamacpp_is_installed(monkeypatch, tmp_path, installed, gpu):
    """Issue 27 item 3: installing llama-cpp-python (which `make test` does) must not change what `make run` runs;
    llama.cpp runs when asked for, and the reason names the choice."""
    import streaming_engine.backends.choice as package

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(package, "llamacpp_available", lambda: installed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    for model in (None, str(gguf), "HuggingFaceTB/SmolLM2-135M-Instruct"):
        backend, reason = choose_backend("auto", model)
        assert backend == resolve_backend("auto", model) == "transformers"
        assert reason.startswith("auto picks transformers") and "--backend llama.cpp" in reason
        assert f"llama-cpp-python is {'installed' if installed else 'not installed'}" in reason
    assert choose_backend("llama.cpp", str(gguf)) == ("llama.cpp", "asked for with --backend llama.cpp")
    assert choose_backend("transformers") == ("transformers", "asked for with --backend transformers")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("vllm")
    assert BACKENDS == ("auto", "transformers", "llama.cpp")


def test_asking_for_llamacpp_without_the_package_says_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    monkeypatch.delitem(__import__("sys").modules, "llama_cpp", raising=False)
    with pytest.raises(RuntimeError, match=r"pip install -r requirements-cpu.txt"):
        require_llamacpp()
    with pytest.raises(RuntimeError, match="llama-cpp-python"):
        load(backend="llama.cpp")


@needs_llamacpp
def test_the_llamacpp_backend_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="GGUF"):
        load("HuggingFaceTB/SmolLM2-135M-Instruct", backend="llama.cpp")
    with pytest.raises(ValueError, match="--dtype"):
        load(backend="llama.cpp", dtype="bfloat16")


# --- the real default model ------------------------------------------------------------------------------------


@needs_llamacpp
@pytest.mark.model
def test_without_eviction_a_greedy_reply_equals_llamacpps_own_generation(llama):
    from streaming_engine.llamacpp.model import plain_llama

    model, tokenizer = llama
    engine = llama_engine(llama, recent_size=1020)
    question = "Tell me about the history of the bicycle."
    text, done = reply(engine, engine.new_session(), question, max_new_tokens=48)
    assert done.stats["evicted_tokens"] == 0
    prompt = engine.runtime.templater.encode(
        engine.runtime.templater.render([{"role": "user", "content": question}], add_generation_prompt=True))
    reference = plain_llama(model.path, n_ctx=1024, n_threads=1)
    ids = []
    for token in reference.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if token in engine.runtime.eos_ids or len(ids) == 48:
            break
        ids.append(token)
    reference.close()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) >= 16  # a real reply, not an immediate end of turn


@needs_llamacpp
@pytest.mark.model
@pytest.mark.parametrize("start_size,recent_size,chunk", [(4, 60, 16), (4, 124, 32), (0, 64, 8)])
def test_after_evictions_both_backends_keep_the_same_tokens_and_predict_alike(llama, default_model, start_size,
                                                                             recent_size, chunk):
    """Measured (`eval.backend_agreement`, 4 + 252, 32-token chunks, 1000 tokens of Persuasion): KL 0.0035 (0.0032
    without eviction: the 4-bit floor), top-1 agreement 0.97, perplexity ratio 1.004. The bounds leave room for
    another text (here the library's docs) and other sizes."""
    import importlib

    from benchmarks.backend_agreement import compare

    hf_model, tokenizer = default_model
    text = "\n\n".join(importlib.import_module(name).__doc__ for name in EVAL_MODULES)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:400]
    context = llama[0].new_context(sequences=1, seq_capacity=start_size + recent_size, batch_tokens=chunk)
    try:
        result = compare(hf_model, context, ids, start_size=start_size, recent_size=recent_size, chunk=chunk)
    finally:
        context.close()
    assert result["bookkeeping_mismatches"] == 0  # same held / evicted / seen and the same kept tokens
    final = result["final"]
    assert final["seen"] == 400 and final["held"] + final["evicted"] == 400
    assert 0 < final["held"] <= start_size + recent_size and final["evicted"] > 0
    assert result["kl_mean"] < 0.02 and result["top1_agreement"] > 0.9
    assert abs(result["ppl_ratio"] - 1) < 0.03


@needs_llamacpp
@pytest.mark.model
@pytest.mark.parametrize("eviction", ["turns", "tokens"])
@pytest.mark.parametrize("start_size,recent_size,pin,chunk", [(4, 92, 24, 16), (0, 80, 12, 8)])
def test_with_a_pinned_head_both_backends_keep_the_same_tokens_and_predict_alike(llama, default_model, eviction,
                                                                               start_size, recent_size, pin, chunk):
    """As above, with a pinned head longer than the sinks and messages of irregular lengths: both caches evict
    through `eviction.py`, so they keep the same stream positions after every chunk, the pinned head included; under
    eviction="turns" what is kept after the head starts at a message."""
    import importlib

    from benchmarks.backend_agreement import compare

    hf_model, tokenizer = default_model
    text = "\n\n".join(importlib.import_module(name).__doc__ for name in EVAL_MODULES)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:300]
    boundaries, position = [], pin
    for length in (9, 23, 14, 31, 6, 27, 18, 11, 25, 20, 8, 29, 16, 22, 13, 30):
        boundaries.append(position)
        position += length
    context = llama[0].new_context(sequences=1, seq_capacity=start_size + recent_size, batch_tokens=chunk)
    try:
        result = compare(hf_model, context, ids, start_size=start_size, recent_size=recent_size, chunk=chunk, pin=pin,
                         eviction=eviction, boundaries=boundaries)
    finally:
        context.close()
    assert result["bookkeeping_mismatches"] == 0  # same held / evicted / seen and the same kept tokens
    final = result["final"]
    assert final["seen"] == 300 and final["held"] + final["evicted"] == 300 and final["evicted"] > 0
    head = max(start_size, pin)
    assert final["kept"][:head] == list(range(head))  # the pinned head survived every eviction
    if eviction == "turns":
        assert final["kept"][head] in boundaries
    assert result["kl_mean"] < 0.02 and result["top1_agreement"] > 0.9


@needs_llamacpp
@pytest.mark.model
def test_a_pinned_system_prompt_stays_and_the_memory_map_works_on_llamacpp(llama):
    engine = llama_engine(llama, recent_size=92, max_new_tokens=24, eviction="turns")
    system = "You are Captain Lumen, a lighthouse keeper who answers briefly."
    sid = engine.new_session("streaming", system)
    for i in range(4):
        _, done = reply(engine, sid, f"Question {i}: describe a walk through a busy market.")
    stats, cache = done.stats, engine.session(sid).cache
    pinned = engine.system_tokens(system)
    assert stats["pinned_tokens"] == pinned > 4 and stats["evicted_tokens"] > 0
    assert cache.stream_positions[:pinned] == list(range(pinned))
    memory = engine.memory_map(sid)
    assert memory[0]["role"] == "system" and memory[0]["state"] == "full"
    assert memory[1]["state"] == "gone" and memory[-1]["state"] == "full"
    assert 0 < stats["turns_in_memory"] < 4
    # eviction="turns": no message is held in part except one longer than the window
    assert all(entry["state"] != "partial" for entry in memory)


@needs_llamacpp
@pytest.mark.model
def test_sinks_are_kept_and_the_counters_add_up_in_a_long_chat(llama):
    engine = llama_engine(llama, recent_size=60, max_new_tokens=24)
    sid = engine.new_session()
    for i in range(4):
        _, done = reply(engine, sid, f"Question {i}: describe a walk through a busy market.")
        s = done.stats
        assert s["seen_tokens"] == s["cache_tokens"] + s["evicted_tokens"] and s["cache_tokens"] <= 64
        assert s["kv_bytes"] == s["cache_tokens"] * engine.backend.context.bytes_per_token
    cache = engine.session(sid).cache
    assert cache.evicted_tokens > 0 and cache.stream_positions[:4] == [0, 1, 2, 3]


@needs_llamacpp
@pytest.mark.model
def test_conversations_are_isolated_even_when_they_outnumber_the_sequences(llama):
    questions = ["How do bees make honey?", "Explain how a rainbow forms.", "What is a lighthouse?",
                 "Give me advice for a job interview.", "Why is the sky blue?", "Name three rivers."]
    follow_up = "Thanks! One more sentence?"
    alone = []
    for q in questions:  # each conversation alone, on a fresh engine
        engine = llama_engine(llama, max_new_tokens=16)
        sid = engine.new_session()
        alone.append((reply(engine, sid, q)[0], reply(engine, sid, follow_up)[0]))
    # Six conversations on four sequences: first turns one after another (the oldest go to host memory), then
    # the second turns of four of them decode together (each swapped back in), then the other two.
    engine = llama_engine(llama, max_new_tokens=16, max_active_turns=4, max_batch=4)
    assert engine.backend.context.sequences == 4
    sids = [engine.new_session() for _ in questions]
    first = [reply(engine, sid, q)[0] for sid, q in zip(sids, questions)]
    second = {}
    for group in (sids[:4], sids[4:]):
        for sid, event in engine.chat_many(group, follow_up, **GREEDY):
            if event.kind in ("done", "error"):
                second[sid] = event.text
    assert list(zip(first, [second[sid] for sid in sids])) == alone
    assert engine.backend.context.swaps["out"] >= 2 and engine.backend.context.swaps["in"] >= 2


@needs_llamacpp
@pytest.mark.model
def test_batched_replies_equal_replies_run_one_by_one(llama):
    question = "Describe your ideal weekend."
    engine = llama_engine(llama, max_new_tokens=24, max_active_turns=3, max_batch=3)
    sids = [engine.new_session() for _ in range(3)]
    texts = {}
    for sid, event in engine.chat_many(sids, question, **GREEDY, seed=3):
        if event.kind == "done":
            texts[sid] = event.text
    solo = llama_engine(llama, max_new_tokens=24, scheduler="round-robin")
    expected = reply(solo, solo.new_session(), question)[0]
    assert [texts[sid] for sid in sids] == [expected] * 3
    assert engine.scheduler.passes["decode"] < 3 * 23  # the three rows shared their passes


@needs_llamacpp
@pytest.mark.model
def test_sampling_is_seeded_and_honours_stop_strings(llama):
    engine = llama_engine(llama, max_new_tokens=32)
    sampled = dict(temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.2, seed=7)
    a = reply(engine, engine.new_session(), "Write a poem about the sea.", **sampled)[0]
    b = reply(engine, engine.new_session(), "Write a poem about the sea.", **sampled)[0]
    assert a == b and a
    full = reply(engine, engine.new_session(), "Count from one to ten in words.")[0]
    words = full.split()
    assert len(words) > 3
    cut, done = reply(engine, engine.new_session(), "Count from one to ten in words.", stop=[words[2]])
    assert done.finish_reason == "stop" and words[2] not in cut and full.startswith(cut.rstrip()[:5])


@needs_llamacpp
@pytest.mark.model
def test_stop_ends_a_reply_and_the_chat_goes_on(llama):
    engine = llama_engine(llama, max_new_tokens=200)
    sid = engine.new_session()
    deltas = 0
    for event in engine.chat(sid, "Tell me a very long story about a dragon.", **GREEDY):
        if event.kind == "delta" and event.text:
            deltas += 1
            if deltas == 3:
                engine.stop(sid)
    assert event.kind == "done" and event.finish_reason == "stopped" and event.stats["reply_tokens"] < 20
    assert engine.history(sid)[-1]["role"] == "assistant"
    assert reply(engine, sid, "Now a short one.")[1].kind == "done"


@needs_llamacpp
@pytest.mark.model
def test_a_cut_reply_continued_on_llamacpp_is_the_reply_never_cut(llama):
    engine = llama_engine(llama)
    whole, cut = engine.new_session(), engine.new_session()
    prompt = "Tell me a very long story about a dragon."
    _, uncut = reply(engine, whole, prompt, max_new_tokens=30)
    shown, first = reply(engine, cut, prompt, max_new_tokens=12)
    assert uncut.finish_reason == first.finish_reason == "length"
    events = list(engine.continue_reply(cut, max_new_tokens=18, **GREEDY))
    assert shown + "".join(e.text for e in events if e.kind == "delta") == events[-1].text == uncut.text
    assert engine.history(cut) == engine.history(whole)


@needs_llamacpp
@pytest.mark.model
def test_export_and_restore_continue_the_conversation(llama):
    engine = llama_engine(llama, max_new_tokens=16)
    sid = engine.new_session(system_prompt="You are terse.")
    reply(engine, sid, "What is the capital of France?")
    exported = export_history(engine, sid)
    restored = restore_history(engine, exported)
    assert engine.history(restored) == engine.history(sid)
    text, done = reply(engine, restored, "And of Italy?")
    assert done.kind == "done" and text and done.stats["seen_tokens"] > 20  # the history was re-encoded
    assert json.loads(export_history(engine, restored))["messages"][-1]["content"] == text
    engine.reset(sid)
    assert engine.stats(sid)["cache_tokens"] == 0 and engine.stats(sid)["seen_tokens"] == 0


@needs_llamacpp
@pytest.mark.model
def test_dense_mode_stops_at_its_limit_on_llamacpp(llama):
    engine = llama_engine(llama, max_new_tokens=64)
    sid = engine.new_session("dense", max_context=48)
    _, done = reply(engine, sid, "Tell me a long story about a cat.")
    assert done.finish_reason == "context_full" and done.stats["cache_tokens"] <= 48
    assert done.stats["evicted_tokens"] == 0


# --- the app's handlers on both backends (tests/test_webui.py style: no browser, no server) ----------------------


@pytest.fixture(params=["transformers", "llama.cpp"])
def app_engine(request, default_model):
    if request.param == "llama.cpp" and not llamacpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install -r requirements-cpu.txt)")
    model, tokenizer = request.getfixturevalue("llama") if request.param == "llama.cpp" else default_model
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=4, recent_size=252, max_new_tokens=12))
    yield engine
    for sid in engine.session_ids():
        engine.close(sid)
    engine.backend.close()  # frees llama.cpp's context; nothing to free on transformers


@pytest.mark.model
def test_the_chat_and_comparison_tabs_work_on_both_backends(app_engine, tmp_path):
    import re

    from streaming_engine.conversations import Conversations
    from streaming_engine.store import ChatStore
    from webui import chat_tab, compare_tab
    from webui.conversation_list import empty_record

    store = ChatStore.open(tmp_path / "data")
    conv = Conversations(app_engine, store, partial_save_interval_s=0.0)
    outputs = list(chat_tab.respond(conv, "What is the capital of Italy?", [], {}, empty_record(),
                                    "", 0.0, 1.0, 0, 12, 1.0))
    chat, box, gauges, state, record, listing = outputs[-1]
    # the box empties when the turn starts and is left alone after (issue 27 item 5)
    assert chat[1]["role"] == "assistant" and chat[1]["content"] and outputs[0][1] == "" and box == chat_tab.SKIP
    assert re.search(r'data-phase="idle"', gauges)
    assert float(re.search(r'data-key="turns" data-value="([^"]*)"', gauges).group(1)) == 1
    held = int(re.search(r'data-key="fill" data-held="(\d+)"', gauges).group(1))
    assert held == app_engine.stats(conv._live[state["token"]])["cache_tokens"] > 0
    assert conv.messages(state["token"])[0]["content"] == "What is the capital of Italy?"
    conv.release(state["token"])
    store.close()
    compare_state = {}
    box, note, streaming, dense, window, *_ = list(compare_tab.compare_send(
        app_engine, "Name a color.", [], [], [], compare_state, True, 8))[-1]
    assert all(side and side[-1]["role"] == "assistant" for side in (streaming, dense, window))


@needs_llamacpp
@pytest.mark.model
def test_the_footer_names_llamacpp_its_weights_and_threads(llama):
    from app import status_line

    engine = llama_engine(llama)
    line = status_line(engine, "SmolLM2")
    assert "llama.cpp" in line and "GGUF" in line
    assert f"{llama[0].n_threads} CPU thread" in line
