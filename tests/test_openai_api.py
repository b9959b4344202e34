"""The OpenAI-compatible API and /metrics of the launched app, driven with the official `openai` client on loopback:
streaming, a long conversation sent whole every turn (the live session and its cache are reused, so each turn
encodes only its new message), OpenAI-style errors for bad parameters, and the login."""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.request

import openai
import pytest

import app
import streaming_engine
from browser_util import free_port
from conftest import ManualClock
from streaming_engine import EngineConfig, StreamingEngine
from streaming_engine.llamacpp import llamacpp_available

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
    # The last request's prompt (the whole history, counted by the server) is far beyond one turn's bound: had the
    # server re-encoded it, this turn's prefill would have broken the bound.
    assert max(prefill[1:]) <= MAX_CONTINUED_PREFILL < reply.usage.prompt_tokens
    assert extra["evicted_tokens"] > 0  # the history outgrew the 256-token cache: only a bounded cache holds it
    # One session carried the whole conversation, holding exactly the history the client sent.
    owned = [sid for sid in engine.session_ids() if engine.history(sid) == messages]
    assert len(owned) == 1


def test_usage_reports_the_evicted_messages_recalled_into_a_turn(client, server):
    from test_recall import FACT, QUESTION, TOPICS

    more = ["Compare owls and hawks at night.", "Outline the rules of chess openings.",
            "Recommend hiking boots for winter mountains.", "Summarize photosynthesis for children."]
    messages = [{"role": "system", "content": "You are a patient assistant."}, {"role": "user", "content": FACT}]
    recalled = []
    for topic in [*TOPICS, *more, QUESTION]:
        reply = client.chat.completions.create(model=MODEL, messages=messages, **greedy())
        recalled.append(reply.model_extra["streaming_llm"]["recalled_tokens"])
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": topic}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, **greedy())
    extra = reply.model_extra["streaming_llm"]
    assert extra["history_messages_dropped"] > 0 and extra["session_reused"]
    assert extra["recalled_messages"][:1] == [1]  # the request's messages[1]: the fact, evicted long ago
    assert 0 < extra["recalled_tokens"] <= extra["prefill_tokens"]
    assert recalled[0] == 0  # the first turn: nothing evicted, nothing recalled
    # The same turn with recall off for this request: nothing quoted, and the next request is back to the default.
    messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                 {"role": "user", "content": "Where is my locker?"}]
    off = client.chat.completions.create(model=MODEL, messages=messages, extra_body={"recall_budget": 0}, **greedy())
    assert off.model_extra["streaming_llm"]["session_reused"]
    assert off.model_extra["streaming_llm"]["recalled_tokens"] == 0
    assert off.model_extra["streaming_llm"]["recalled_messages"] == []
    engine = server[1]
    sid = next(s for s in engine.session_ids() if engine.history(s)[-2:-1] == messages[-1:])
    assert engine.stats(sid)["recall_budget"] == 0
    messages += [{"role": "assistant", "content": off.choices[0].message.content},
                 {"role": "user", "content": "Thanks."}]
    client.chat.completions.create(model=MODEL, messages=messages, **greedy())
    assert engine.stats(sid)["recall_budget"] > 0


def test_a_request_cannot_turn_on_recall_the_server_turned_off(client, server, monkeypatch):
    monkeypatch.setattr(server[1].config, "recall_budget", 0)
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, extra_body={"recall_budget": 40}, **greedy())
    assert err.value.body["param"] == "recall_budget" and err.value.body["code"] == "recall_off"
    reply = client.chat.completions.create(model=MODEL, messages=messages, extra_body={"recall_budget": 0}, **greedy())
    assert reply.model_extra["streaming_llm"]["recalled_tokens"] == 0


@pytest.mark.parametrize("budget", [-1, True, 1.5, "40", 100_000])
def test_a_bad_recall_budget_is_a_400_naming_it(client, budget):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"recall_budget": budget}, **greedy())
    assert err.value.body["param"] == "recall_budget"


def test_a_history_that_extends_no_live_conversation_opens_a_primed_session(client):
    history = [{"role": "user", "content": "An old question"}, {"role": "assistant", "content": "An old answer."}]
    reply = client.chat.completions.create(
        model=MODEL, messages=history + [{"role": "user", "content": "And now?"}], **greedy())
    extra = reply.model_extra["streaming_llm"]
    assert extra["session_reused"] is False
    assert extra["prefill_tokens"] == reply.usage.prompt_tokens > 10  # the history was encoded once, here


def test_a_reply_cut_at_max_tokens_continues_with_continue_final_message_into_the_reply_never_cut(client):
    """vLLM's `continue_final_message`: the last message is the assistant's reply to go on with, and the answer is
    the new text only. The live session still holds the cut reply, so nothing is re-encoded."""
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, **greedy(max_tokens=12))
    first = client.chat.completions.create(model=MODEL, messages=messages, **greedy(max_tokens=5))
    assert first.choices[0].finish_reason == "length"
    cut = first.choices[0].message.content
    rest = client.chat.completions.create(
        model=MODEL, messages=messages + [{"role": "assistant", "content": cut}], extra_body={
            "continue_final_message": True}, **greedy(max_tokens=7))
    assert cut + rest.choices[0].message.content == whole.choices[0].message.content
    assert rest.choices[0].finish_reason == "length" and rest.usage.completion_tokens == 7
    assert rest.model_extra["streaming_llm"]["session_reused"] is True


def test_continue_final_message_goes_on_with_a_reply_the_client_wrote(client):
    """A prefix the client wrote (no live session holds it) is re-encoded left open, then continued, streamed or
    not alike; a last message that is not the assistant's is a 400 naming `messages`."""
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "My favourite is"}]
    extra = {"continue_final_message": True}
    plain = client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra, **greedy(max_tokens=6))
    assert plain.model_extra["streaming_llm"]["session_reused"] is False and plain.usage.completion_tokens == 6
    stream = client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra, stream=True,
                                            **greedy(max_tokens=6))
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == plain.choices[0].message.content and streamed
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages[:1], extra_body=extra, **greedy())
    assert err.value.body["param"] == "messages" and "continue_final_message" in err.value.body["message"]


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


def test_metrics_report_sessions_tokens_evictions_memory_and_rates(client, server, monkeypatch):
    url, engine = server
    # A clock frozen a window past now: the rate counts exactly this test's tokens, however slow the machine.
    monkeypatch.setattr(engine.counters, "clock", ManualClock(time.monotonic() + 2 * engine.counters.window_s))
    generated_before = engine.counters.snapshot()["tokens_generated"]
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
    assert f'\nstreaming_llm_decode_path_info{{path="{engine.decode_path}"}} 1\n' in page
    assert int(values["streaming_llm_tokens_generated_total"]) >= 1
    assert int(values["streaming_llm_kv_cache_bytes"]) == sum(engine.stats(s)["kv_bytes"] for s in engine.session_ids())
    generated = engine.counters.snapshot()["tokens_generated"] - generated_before
    assert generated >= 1
    assert float(values["streaming_llm_decode_tokens_per_second"]) == round(generated / engine.counters.window_s, 3)


# --- every numeric parameter as JSON writes it: int, float, integer-valued float (issue 27, item 1) -------------

needs_llamacpp = pytest.mark.skipif(
    not llamacpp_available(), reason="llama-cpp-python is not installed (pip install -r requirements-cpu.txt)")


@pytest.fixture(scope="module", params=["transformers", pytest.param("llama.cpp", marks=[needs_llamacpp, pytest.mark.slow])])
def backend_server(request):
    """The app on each backend: the tiny model on transformers (the module's server), the real default GGUF on
    llama.cpp (one thread, two sequences: the test machines are shared)."""
    if request.param == "transformers":
        yield request.getfixturevalue("server")[0]
        return
    model, tokenizer = streaming_engine.load(backend="llama.cpp", n_threads=1)
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=4, recent_size=124, max_active_turns=2,
                                                            max_batch=2, max_new_tokens=4))
    settings = app.AppSettings(start_size=4, recent_size=124, port=free_port(), auth=(USER, PASSWORD))
    demo = app.build_ui(engine, MODEL)
    app.launch(demo, settings, engine=engine, model_label=MODEL, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{settings.port}"
    demo.close()
    for sid in engine.session_ids():
        engine.close(sid)
    engine.backend.close()


def post(url: str, body: dict | str, path: str = "/v1/chat/completions", method: str = "POST"):
    """(status, parsed JSON or the raw SSE text) of a raw request: the exact JSON types, no client in between."""
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(f"{url}{path}", data=data if method == "POST" else None, method=method,
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read().decode()
    if raw.startswith("data: "):
        return status, raw
    return status, json.loads(raw)


def streamed_text(sse: str) -> str:
    """The reply text of an SSE body; fails on an error event (a 200 followed by an error is a failure too)."""
    text = ""
    for line in sse.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            assert "error" not in event, event
            text += "".join(c["delta"].get("content") or "" for c in event["choices"])
    return text


#: (parameter, values that must be accepted, a value that must be refused with a 400). Integer parameters take an
#: integer-valued float (4.0) but no fraction; float parameters take ints (`"temperature": 1` is what curl and
#: JavaScript clients write).
NUMERIC = [
    ("temperature", [1, 2, 0.7, 1.0], None),
    ("top_p", [1, 0.9, 1.0], None),
    ("repetition_penalty", [2, 1.1, 1.0], None),
    ("max_tokens", [3, 3.0], 3.5),
    ("max_completion_tokens", [3, 3.0], 3.5),
    ("top_k", [5, 5.0], 5.5),
    ("seed", [3, 3.0], 3.5),
    ("presence_penalty", [0, 0.0], 0.5),
    ("frequency_penalty", [0, 0.0], 0.5),
    ("n", [1, 1.0], 1.5),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("name,accepted,refused", NUMERIC, ids=[n[0] for n in NUMERIC])
def test_every_numeric_parameter_takes_ints_floats_and_integral_floats(backend_server, name, accepted, refused,
                                                                        stream):
    for value in accepted:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Say {name}"}], "max_tokens": 3,
                "stream": stream, name: value}
        status, answer = post(backend_server, body)
        assert status == 200, (value, answer)
        text = streamed_text(answer) if stream else answer["choices"][0]["message"]["content"]
        assert text, (name, value)
    for value in ([refused] if refused is not None else []) + [True, "1", None if name == "n" else [1]]:
        if value is None:
            continue
        status, answer = post(backend_server, {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                               "stream": stream, name: value})
        assert status == 400 and answer["error"]["param"] == name, (value, answer)


@pytest.mark.parametrize("body", [
    '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": %s}' % (MODEL, "9" * 5000),
    '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": %s}' % (MODEL, "9" * 400),
    '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "seed": %s}' % (MODEL, "9" * 30),
    '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}' % MODEL,
    '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "stop": {"a": 1}}' % MODEL,
    "[" * 100_000,
], ids=["5000-digit", "400-digit", "huge-seed", "nan", "stop-object", "nested"])
def test_no_number_or_shape_of_body_is_a_server_error(server, body):
    status, answer = post(server[0], body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]


def test_engine_chat_takes_an_int_temperature_in_the_library(server):
    _, engine = server
    sid = engine.new_session()
    try:
        events = list(engine.chat(sid, "hello", temperature=1, repetition_penalty=2, top_p=1, max_new_tokens=3.0))
    finally:
        engine.close(sid)
    assert events[-1].kind == "done" and "".join(e.text for e in events if e.kind == "delta")


# --- OpenAI's answers for what is not there (issue 27, item 7) ---------------------------------------------------


def test_an_unknown_model_is_a_404_in_openais_shape_streamed_or_not(server):
    for stream in (False, True):
        status, answer = post(server[0], {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}],
                                          "stream": stream})
        assert status == 404
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert answer["error"]["code"] == "model_not_found" and answer["error"]["param"] == "model"
        assert MODEL in answer["error"]["message"]


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/v1/completions", 404, "unknown_url"),
    ("POST", "/v1/embeddings", 404, "unknown_url"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ("POST", "/v1/models", 405, "method_not_allowed"),
    ("DELETE", "/v1/models/x", 405, "method_not_allowed"),
])
def test_unknown_routes_and_methods_answer_in_openais_shape(server, method, path, status, code):
    got, answer = post(server[0], "{}", path=path, method=method)
    assert got == status and answer["error"]["code"] == code and answer["error"]["message"], answer
    assert "detail" not in answer


def test_usage_says_when_a_regenerate_reprimes_and_what_history_was_dropped(client):
    history = [{"role": "user", "content": f"Old question {i} with some words in it."} if i % 2 == 0 else
               {"role": "assistant", "content": f"Old answer {i}, also a few words long."} for i in range(40)]
    first = client.chat.completions.create(model=MODEL, messages=history + [{"role": "user", "content": "Now?"}],
                                           **greedy())
    extra = first.model_extra["streaming_llm"]
    # 40 messages do not fit a 256-token cache: the reply saw a tail, and usage says how much was left out.
    assert extra["reprimed"] is True and extra["session_reused"] is False and extra["history_messages"] == 40
    assert 0 < extra["history_messages_dropped"] < 42
    # The same request again (a regenerate): the live session already holds this turn's reply, so it cannot be
    # continued; the cache is re-primed from the history, and the usage says so.
    again = client.chat.completions.create(model=MODEL, messages=history + [{"role": "user", "content": "Now?"}],
                                           **greedy())
    assert again.model_extra["streaming_llm"]["reprimed"] is True
    follow = client.chat.completions.create(
        model=MODEL, messages=history + [{"role": "user", "content": "Now?"},
                                         {"role": "assistant", "content": again.choices[0].message.content},
                                         {"role": "user", "content": "And then?"}], **greedy())
    assert follow.model_extra["streaming_llm"]["reprimed"] is False
    assert follow.model_extra["streaming_llm"]["session_reused"] is True
