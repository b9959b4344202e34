"""The OpenAI-compatible API and /metrics of the launched app, driven with the official `openai` client on loopback:
streaming, a long conversation sent whole every turn (the live session and its cache are reused, so each turn
encodes only its new message), OpenAI-style errors for bad parameters, and the login."""

from __future__ import annotations

import base64
import re
import urllib.error
import urllib.request

import openai
import pytest

import app
from browser_util import free_port
from streaming_engine import EngineConfig, StreamingEngine

USER, PASSWORD = "tester", "s3cret-pass"
MODEL = "tiny-test-model"
#: Most tokens a continued turn may encode: the chat template's markup around one short user message plus the
#: previous reply's last token. Re-encoding the history instead would grow by ~30 tokens every turn.
MAX_CONTINUED_PREFILL = 40


@pytest.fixture(scope="module")
def server(tiny_chat_model, default_tokenizer):
    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=252, prefill_chunk_size=64, max_new_tokens=12))
    settings = app.AppSettings(start_size=4, recent_size=252, port=free_port(), auth=(USER, PASSWORD))
    demo = app.build_ui(engine, MODEL)
    app.launch(demo, settings, engine=engine, model_label=MODEL, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{settings.port}", engine
    demo.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=f"{USER}:{PASSWORD}", max_retries=0, timeout=120)


def greedy(**kwargs):
    return {"temperature": 0, "max_tokens": 12, **kwargs}


def test_models_lists_the_served_model_and_unknown_ones_are_404(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found"


def test_streaming_chat_streams_deltas_ends_with_a_reason_and_reports_usage(client, server):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        stream=True, stream_options={"include_usage": True}, **greedy())
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert finish in (["stop"], ["length"]) and text
    assert usage.completion_tokens >= 1 and usage.prompt_tokens > usage.prompt_tokens_details.cached_tokens == 0
    # The same reply, non-streamed, from the same history: greedy decoding is repeatable.
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        **greedy())
    assert again.choices[0].message.content == text
    assert again.object == "chat.completion" and again.usage.completion_tokens == usage.completion_tokens


def test_thirty_turns_sent_whole_reuse_one_session_and_encode_only_the_new_message(client, server):
    _, engine = server
    messages = [{"role": "system", "content": "You are a patient assistant."}]
    prefill, cached, reused = [], [], []
    for turn in range(30):
        messages.append({"role": "user", "content": f"Question number {turn}: tell me something new."})
        reply = client.chat.completions.create(model=MODEL, messages=messages, **greedy())
        extra = reply.model_extra["streaming_llm"]
        prefill.append(extra["prefill_tokens"])
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        reused.append(extra["session_reused"])
        assert extra["cache_tokens"] <= extra["cache_capacity"] == 256
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    print("\nprefill tokens per turn:", prefill, "\ncached tokens per turn:", cached)
    assert reused == [False] + [True] * 29
    assert max(prefill[1:]) <= MAX_CONTINUED_PREFILL < prefill[0] + 29 * 20  # a re-encode would keep growing
    assert extra["evicted_tokens"] > 0  # the history outgrew the 256-token cache: only a bounded cache holds it
    # One session carried the whole conversation, holding exactly the history the client sent.
    owned = [sid for sid in engine.session_ids() if engine.history(sid) == messages]
    assert len(owned) == 1


def test_a_history_that_extends_no_live_conversation_opens_a_primed_session(client):
    history = [{"role": "user", "content": "An old question"}, {"role": "assistant", "content": "An old answer."}]
    reply = client.chat.completions.create(
        model=MODEL, messages=history + [{"role": "user", "content": "And now?"}], **greedy())
    extra = reply.model_extra["streaming_llm"]
    assert extra["session_reused"] is False
    assert extra["prefill_tokens"] == reply.usage.prompt_tokens > 10  # the history was encoded once, here


def test_sampling_settings_are_honoured(client):
    def sample(seed):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Pick words"}], temperature=1.0, top_p=0.9,
            seed=seed, max_tokens=10).choices[0].message.content

    assert sample(7) == sample(7) != sample(8)  # same seed, same words (each time in a fresh session)
    short = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count"}],
                                           temperature=0, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Stop test"}],
                                          **greedy())
    text = full.choices[0].message.content
    cut = re.search(r"\S+", text[len(text) // 2:]).group(0)[:3]  # a piece of the reply's second half
    stopped = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Stop test"}],
                                             stop=[cut], **greedy())
    assert stopped.choices[0].message.content == text[: text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"stop": ["x"] * 9}, "stop"),
    ({"n": 2}, "n"),
    ({"extra_body": {"best_of": 3}}, "best_of"),
    ({"messages": [{"role": "assistant", "content": "no user turn"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"},
                   {"role": "user", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": []}, "messages"),
])
def test_bad_parameters_get_openai_style_error_objects(client, kwargs, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**request)
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == param
    assert err.value.body["message"]


def test_the_api_and_metrics_sit_behind_the_apps_login(server):
    url, _ = server
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="tester:wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(f"{url}/metrics")
    assert http.value.code == 401


def test_metrics_report_sessions_tokens_evictions_memory_and_rates(client, server):
    url, engine = server
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "for the metrics"}], **greedy())
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        page = response.read().decode()
    values = dict(re.findall(r"^(streaming_llm_\w+) (\S+)$", page, flags=re.M))
    for name in ("sessions_open", "turns_active", "queue_length", "tokens_generated_total", "tokens_evicted_total",
                 "kv_cache_bytes", "decode_tokens_per_second", "process_resident_memory_bytes"):
        assert f"streaming_llm_{name}" in values, name
        assert f"# TYPE streaming_llm_{name} " in page
    assert int(values["streaming_llm_sessions_open"]) == len(engine.session_ids()) >= 1
    assert int(values["streaming_llm_tokens_generated_total"]) >= 1
    assert int(values["streaming_llm_kv_cache_bytes"]) == sum(engine.stats(s)["kv_bytes"] for s in engine.session_ids())
    assert float(values["streaming_llm_decode_tokens_per_second"]) > 0
