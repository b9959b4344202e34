"""Hostile and careless input, limits and faults: clear messages, nothing lost, other users unaffected."""

from __future__ import annotations

import time

import pytest

from streaming_engine import EngineBusy, EngineConfig, StreamingEngine, load

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)


def engine_for(model, tokenizer, **overrides):
    config = dict(start_size=4, recent_size=64, prefill_chunk_size=32)
    config.update(overrides)
    return StreamingEngine(model, tokenizer, EngineConfig(**config))


def final_event(engine, sid, message, **sampling):
    return list(engine.chat(sid, message, **{**GREEDY, **sampling}))[-1]


@pytest.mark.slow
def test_a_200k_character_paste_is_answered_in_bounded_memory(tiny_chat_model, default_tokenizer):
    engine = engine_for(tiny_chat_model, default_tokenizer, recent_size=508, prefill_chunk_size=254)
    sid = engine.new_session()
    paste = ("All work and no play makes Jack a dull boy. " * 4600)[:200_000]
    peak = 0
    for event in engine.chat(sid, paste, max_new_tokens=4, **GREEDY):
        peak = max(peak, event.stats.get("cache_tokens", 0))
    assert event.kind == "done"
    assert peak <= 512 and event.stats["evicted_tokens"] > 30_000
    assert engine.history(sid)[0]["content"] == paste  # nothing the user wrote is lost


def test_control_characters_and_lone_surrogates_are_cleaned_not_fatal(tiny_chat_model, default_tokenizer):
    engine = engine_for(tiny_chat_model, default_tokenizer)
    sid = engine.new_session()
    final = final_event(engine, sid, "a\x00b\x07c\ud800d\te\nf \u202eRTL 👋", max_new_tokens=3)
    assert final.kind == "done"
    assert engine.history(sid)[0]["content"] == "abc\ufffdd\te\nf \u202eRTL 👋"


def test_too_many_sessions_get_a_polite_busy_message(tiny_chat_model, default_tokenizer):
    engine = engine_for(tiny_chat_model, default_tokenizer, max_sessions=2)
    engine.new_session(), engine.new_session()
    with pytest.raises(EngineBusy, match="Server busy"):
        engine.new_session()


def test_too_many_running_replies_get_a_polite_busy_message(tiny_chat_model, default_tokenizer):
    engine = engine_for(tiny_chat_model, default_tokenizer, max_active_turns=1, recent_size=600,
                        prefill_chunk_size=256)
    first, second = engine.new_session(), engine.new_session()
    running = engine.chat(first, "Tell me a long story.", max_new_tokens=400, **GREEDY)
    next(running)  # the first reply is now being generated
    refused = list(engine.chat(second, "Me too!", max_new_tokens=3, **GREEDY))
    assert len(refused) == 1 and refused[0].kind == "error" and "Server busy" in refused[0].text
    assert refused[0].accepted is False and engine.history(second) == []
    engine.stop(first)
    assert list(running)[-1].finish_reason == "stopped"
    assert final_event(engine, second, "Me too!", max_new_tokens=3).kind == "done"


def test_idle_sessions_are_closed_and_their_cache_freed(tiny_chat_model, default_tokenizer):
    engine = engine_for(tiny_chat_model, default_tokenizer, idle_timeout_s=60)
    now = [time.monotonic()]
    engine.clock = lambda: now[0]  # time moves only when the test says so: no sleep
    sid, fresh = engine.new_session(), engine.new_session()
    final_event(engine, sid, "hello", max_new_tokens=3)
    cache = engine.session(sid).cache
    assert cache.kv_bytes() > 0
    assert engine.close_idle() == 0  # just used: not idle
    now[0] += 120  # twice the timeout later,
    final_event(engine, fresh, "hello", max_new_tokens=2)  # with only the other session used meanwhile
    assert engine.close_idle() == 1 and sid not in engine.session_ids() and fresh in engine.session_ids()
    assert cache.kv_bytes() == 0
    events = list(engine.chat(sid, "still there?"))
    assert events[-1].kind == "error" and "expired" in events[-1].text


def test_a_reader_that_goes_away_mid_reply_stops_the_turn_and_keeps_the_partial_reply(
    tiny_chat_model, default_tokenizer
):
    engine = engine_for(tiny_chat_model, default_tokenizer, recent_size=600, prefill_chunk_size=256)
    sid, other = engine.new_session(), engine.new_session()
    reader = engine.chat(sid, "Talk for a long time.", max_new_tokens=400, **GREEDY)
    for event in reader:
        if event.stats.get("reply_tokens", 0) >= 3:
            break
    reader.close()  # what happens when a browser tab closes mid-stream
    handle = engine.session(sid).turn
    assert handle.finished.wait(10)
    history = engine.history(sid)
    assert history[-1]["role"] == "assistant" and engine.stats(sid)["reply_tokens"] < 400
    assert final_event(engine, other, "Are you there?", max_new_tokens=3).kind == "done"
    assert final_event(engine, sid, "Back again", max_new_tokens=3).kind == "done"


def test_unknown_model_ids_and_unsupported_families_fail_at_startup_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not load model"):
        load("no-such-org/no-such-model-xyz")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="supported families .*llama, mistral, qwen2, gpt_neox, falcon"):
        load(str(tmp_path))


def test_remote_code_stays_off_unless_asked(tmp_path, monkeypatch):
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(tmp_path)
    seen = []
    original = transformers.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    # The folder has no tokenizer, so loading stops there; every config read before it is what we check.
    with pytest.raises((OSError, ValueError, TypeError)):
        load(str(tmp_path))
    assert seen and set(seen) == {False}
    seen.clear()
    with pytest.raises((OSError, ValueError, TypeError)):
        load(str(tmp_path), trust_remote_code=True)
    assert seen and set(seen) == {True}


#: Calls through which text could become code, a command or an object graph. None may appear in the app's code.
FORBIDDEN = {
    "eval/exec": r"(?<![\w.])(eval|exec)\(",
    "pickle": r"\b(pickle|cPickle|dill|marshal)\b",
    "shell": r"shell\s*=\s*True|os\.system\(|os\.popen\(",
    "torch.load": r"torch\.load\(",
}


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_no_user_input_can_reach_a_shell_eval_or_pickle(name):
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sources = [root / "app.py", *sorted((root / "webui").rglob("*.py")),
               *sorted((root / "streaming_engine").rglob("*.py"))]
    hits = [f"{path.relative_to(root)}:{number}: {line.strip()}"
            for path in sources
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(FORBIDDEN[name], line)]
    assert not hits, "\n".join(hits)
