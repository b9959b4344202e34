"""The composed app in process (`app.py`): its settings, its static files, and the launched page driven with
gradio_client."""

from __future__ import annotations

import copy
import json
import resource
import sys

import psutil
import pytest
from browser_util import RELOAD_RACES, reload_page, served

from streaming_engine import EngineConfig, StreamingEngine
from streaming_engine.history import MAX_HISTORY_BYTES
from webui import settings as app_settings
from webui.assets import ASSETS, load_json_list


def vm_hwm_bytes() -> int:
    """This process's peak resident memory as the kernel keeps it (VmHWM, in KiB in /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


@pytest.fixture(scope="module")
def launched(tiny_chat_model, default_tokenizer):
    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=96, prefill_chunk_size=48, max_new_tokens=16))
    with served(engine, "tiny-test-model") as (url, demo):
        yield url, engine, demo


def test_the_launched_app_chats_through_its_api_and_keeps_sessions_apart(launched):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, engine, _ = launched
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    sid_a, sid_b = a.predict(api_name="/new_session"), b.predict(api_name="/new_session")
    assert sid_a != sid_b
    reply_a, stats_a = a.predict(sid_a, "hello from A", 8, api_name="/chat")
    reply_b, _ = b.predict(sid_b, "hello from B", 8, api_name="/chat")
    assert stats_a["finish_reason"] in ("eos", "length") and stats_a["cache_capacity"] == 100
    history_a = a.predict(sid_a, api_name="/history")
    assert [m["content"] for m in history_a] == ["hello from A", reply_a]
    assert "hello from B" not in json.dumps(history_a)
    with pytest.raises(AppError, match="empty") as refused:
        a.predict(sid_a, "", 8, api_name="/chat")
    assert refused.value.title == "invalid_argument"
    # The server runs in this process, so its readings are this process's, in bytes. The peak is at least the
    # kernel's high-water mark read just before (it never goes down). The kernel updates its RSS counters lazily
    # (a few hundred KiB apart), hence the factor-2 band for the current reading: wide for lag, narrow for units.
    hwm_before, rss_before = vm_hwm_bytes(), psutil.Process().memory_info().rss
    health = a.predict(api_name="/health")
    ceiling = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert health["sessions"] == len(engine.session_ids()) and {sid_a, sid_b} <= set(engine.session_ids())
    assert hwm_before <= health["peak_rss_bytes"] <= 2 * ceiling
    assert rss_before / 2 <= health["rss_bytes"] <= 2 * ceiling
    for client, sid in ((a, sid_a), (b, sid_b)):
        client.predict(sid, api_name="/close_session")
    assert sid_a not in engine.session_ids()


def test_ui_handlers_are_private_and_the_layout_has_every_control(launched):
    _, _, demo = launched
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    for needed in ("chatbot", "msg", "send", "stop", "retry", "continue", "new-chat", "export", "upload", "gauges",
                   "conversations", "conversation-title", "rename-conversation", "delete-conversation",
                   "chat-streaming", "chat-dense", "chat-window", "compare-autopilot", "plot-memory", "diagram"):
        assert needed in ids, needed
    public = {d.get("api_name") for d in demo.config["dependencies"] if d.get("api_visibility") == "public"}
    assert public == {"new_session", "chat", "continue_reply", "history", "close_session", "health"}


def test_a_page_load_never_copies_the_engine(launched):
    """gradio deep-copies the page config on every load; nothing in it may hold the engine (or its model)."""
    _, engine, demo = launched
    memo = {}
    copy.deepcopy(demo.config, memo)
    assert id(engine) not in memo and id(engine.model) not in memo


def test_settings_come_from_flags_or_environment_and_bind_to_loopback_by_default():
    settings = app_settings.parse_settings([], env={})
    assert settings.host == "127.0.0.1" and settings.port == 7860 and settings.auth is None
    assert not settings.share and not settings.trust_remote_code
    env = {"MODEL_ID": "some/model", "START_SIZE": "8", "RECENT_SIZE": "500", "PORT": "9000",
           "APP_AUTH": "ann:secret", "SHARE": "true"}
    settings = app_settings.parse_settings([], env=env)
    assert (settings.model, settings.start_size, settings.recent_size, settings.port) == ("some/model", 8, 500, 9000)
    assert settings.auth == ("ann", "secret") and settings.share
    assert app_settings.parse_settings(["--host", "0.0.0.0"], env={}).host == "0.0.0.0"
    assert app_settings.parse_settings([], env={"SPACE_ID": "me/space"}).host == "0.0.0.0"
    for argv in (["--auth", "nopassword"], ["--recent-size", "0"], ["--port", "70000"]):
        with pytest.raises(SystemExit):
            app_settings.parse_settings(argv, env={})


def test_storage_caps_and_header_settings_come_from_flags_or_environment(tmp_path):
    settings = app_settings.parse_settings([], env={})
    assert settings.data_dir is None and settings.persist  # the store's default folder, written to
    assert (settings.max_sessions, settings.max_sessions_per_client) == (64, 8)
    assert settings.frame_ancestors == "'self' https://huggingface.co"
    assert settings.forwarded_allow_ips == "127.0.0.1,::1"
    env = {"DATA_DIR": str(tmp_path), "NO_PERSIST": "1", "MAX_SESSIONS": "20", "MAX_SESSIONS_PER_CLIENT": "3",
           "FRAME_ANCESTORS": "'none'", "FORWARDED_ALLOW_IPS": "10.0.0.5"}
    settings = app_settings.parse_settings([], env=env)
    assert (settings.data_dir, settings.persist, settings.max_sessions, settings.max_sessions_per_client) == (
        str(tmp_path), False, 20, 3)
    assert settings.frame_ancestors == "'none'" and settings.forwarded_allow_ips == "10.0.0.5"
    flags = app_settings.parse_settings(["--data-dir", "/srv/chats", "--no-persist", "--max-sessions-per-client",
                                         "2"], env={})
    assert (flags.data_dir, flags.persist, flags.max_sessions_per_client) == ("/srv/chats", False, 2)
    assert app_settings.parse_settings([], env={"SPACE_ID": "me/space"}).forwarded_allow_ips == "*"
    for argv in (["--max-sessions-per-client", "0"], ["--max-sessions", "4", "--max-sessions-per-client", "5"],
                 ["--frame-ancestors", "x; script-src *"], ["--max-sessions", "lots"]):
        with pytest.raises(SystemExit):
            app_settings.parse_settings(argv, env={})


def test_the_app_starts_unsaved_and_degraded_on_an_unusable_database(tmp_path, tiny_chat_model, default_tokenizer):
    """Issue 28 item 7: an unusable database no longer stops start-up; chats run unsaved and /health says why."""
    import app
    from webui import health

    (tmp_path / "chats.sqlite").write_bytes(b"not a database at all" * 100)
    engine = StreamingEngine(tiny_chat_model, default_tokenizer, EngineConfig(start_size=4, recent_size=96))
    settings = app_settings.parse_settings(["--data-dir", str(tmp_path)], env={})
    try:
        assert not app.open_conversations(engine, settings).persistent
        assert "not a usable chat database" in health.problems()["storage"]
    finally:
        health.PROBLEM_SOURCES.pop("storage", None)
    settings = app_settings.parse_settings(["--data-dir", str(tmp_path / "new"), "--no-persist"], env={})
    assert not app.open_conversations(engine, settings).persistent and not (tmp_path / "new").exists()


SECURITY_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "same-origin",
                    "content-security-policy": "frame-ancestors 'self' https://huggingface.co"}


def fetch(url, data=None):
    """(status, headers, body) of one request; error statuses are answers too."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def test_every_response_carries_the_security_headers(launched):
    url, *_ = launched
    status, _, body = fetch(f"{url}/gradio_api/call/health", data=b'{"data": []}')
    event_id = json.loads(body)["event_id"]
    answers = {
        "page": fetch(f"{url}/"),
        "config": fetch(f"{url}/config"),
        "api info": fetch(f"{url}/gradio_api/info"),
        "API call": (status, *fetch(f"{url}/gradio_api/call/health", data=b'{"data": []}')[1:]),
        "event stream": fetch(f"{url}/gradio_api/call/health/{event_id}"),
        "missing file": fetch(f"{url}/gradio_api/file=/etc/passwd"),
        "not found": fetch(f"{url}/no-such-page"),
    }
    for name, (status, headers, _) in answers.items():
        for header, value in SECURITY_HEADERS.items():
            assert headers.get(header) == value, (name, status, header, headers.get(header))
    assert answers["page"][0] == 200 and answers["event stream"][0] == 200
    assert b"rss_bytes" in answers["event stream"][2]  # the stream itself came through whole


def test_frame_ancestors_are_configurable_for_embedding(tiny_chat_model, default_tokenizer):
    engine = StreamingEngine(tiny_chat_model, default_tokenizer, EngineConfig(start_size=4, recent_size=96))
    with served(engine, "tiny", frame_ancestors="https://huggingface.co https://example.org") as (url, _):
        _, headers, _ = fetch(f"{url}/")
    assert headers["content-security-policy"] == "frame-ancestors https://huggingface.co https://example.org"


def test_example_and_autopilot_prompts_ship_in_assets():
    assert len(load_json_list("examples.json")) >= 4
    assert len(load_json_list("autopilot.json")) >= 10
    assert (ASSETS / "attention_sinks.png").stat().st_size > 10_000


def test_uploads_are_size_limited_and_the_queue_is_bounded(launched):
    *_, demo = launched
    assert demo.max_file_size == MAX_HISTORY_BYTES  # gradio refuses bigger uploads before any handler runs
    assert demo._queue.max_size == app_settings.DEFAULT_QUEUE_MAX_SIZE
    assert demo._queue.default_concurrency_limit == app_settings.DEFAULT_QUEUE_CONCURRENCY


def test_placement_dtype_threads_and_queue_settings_come_from_flags_or_environment():
    settings = app_settings.parse_settings(
        ["--dtype", "bfloat16", "--threads", "3", "--device-map", "auto", "--max-memory", "cpu=2GiB",
         "--offload-folder", "/tmp/offload", "--queue-concurrency", "4", "--queue-max-size", "10"], env={})
    assert settings.load_kwargs() == dict(trust_remote_code=False, device=None, dtype="bfloat16", device_map="auto",
                                          max_memory="cpu=2GiB", offload_folder="/tmp/offload", backend="auto",
                                          n_threads=3)
    assert (settings.threads, settings.queue_concurrency, settings.queue_max_size) == (3, 4, 10)
    env = {"DEVICE": "cpu", "DTYPE": "float32", "THREADS": "2", "QUEUE_CONCURRENCY": "8", "QUEUE_MAX_SIZE": "5",
           "VISITOR_CACHE_SIZES": "1"}
    settings = app_settings.parse_settings([], env=env)
    assert (settings.device, settings.dtype, settings.threads) == ("cpu", "float32", 2)
    assert (settings.queue_concurrency, settings.queue_max_size, settings.visitor_cache_sizes) == (8, 5, True)
    assert app_settings.parse_settings([], env={"DEVICE_MAP": "balanced"}).device_map == "balanced"
    for argv in (["--dtype", "int3"], ["--threads", "0"], ["--device", "cpu", "--device-map", "auto"],
                 ["--max-memory", "cpu=2GiB"], ["--device-map", "everywhere"], ["--device-map", "auto",
                 "--max-memory", "cpu=lots"], ["--queue-max-size", "0"], ["--device", "toaster"]):
        with pytest.raises(SystemExit):
            app_settings.parse_settings(argv, env={})
    with pytest.raises(SystemExit, match="QUEUE_MAX_SIZE"):
        app_settings.parse_settings([], env={"QUEUE_MAX_SIZE": "many"})


def test_the_decode_path_settings_come_from_flags_or_environment_and_refuse_other_values(capsys):
    from streaming_engine.defaults import CUDA_GRAPH_MODES, DECODE_STEPS, OVERLAP_MODES

    defaults = app_settings.parse_settings([], env={})
    assert (defaults.decode_step, defaults.cuda_graphs, defaults.overlap) == ("auto", "auto", "auto")
    for overlap in OVERLAP_MODES:
        assert app_settings.parse_settings(["--overlap", overlap], env={}).overlap == overlap
        assert app_settings.parse_settings([], env={"OVERLAP": overlap}).overlap == overlap
    for step in DECODE_STEPS:
        for graphs in CUDA_GRAPH_MODES:
            flags = app_settings.parse_settings(["--decode-step", step, "--cuda-graphs", graphs], env={})
            assert (flags.decode_step, flags.cuda_graphs) == (step, graphs)
            env = app_settings.parse_settings([], env={"DECODE_STEP": step, "CUDA_GRAPHS": graphs})
            assert (env.decode_step, env.cuda_graphs) == (step, graphs)
    flag_wins = app_settings.parse_settings(["--decode-step", "eager"], env={"DECODE_STEP": "static"})
    assert flag_wins.decode_step == "eager"
    for argv, env, named in ((["--decode-step", "fast"], {}, "invalid choice"),
                             (["--cuda-graphs", "yes"], {}, "invalid choice"),
                             ([], {"DECODE_STEP": "fast"}, "DECODE_STEP must be one of auto, eager, static"),
                             ([], {"CUDA_GRAPHS": "always"}, "CUDA_GRAPHS must be one of auto, on, off"),
                             ([], {"OVERLAP": "always"}, "OVERLAP must be one of auto, on, off")):
        with pytest.raises(SystemExit):
            app_settings.parse_settings(argv, env=env)
        assert named in capsys.readouterr().err


def test_the_engine_is_loaded_as_the_settings_say_and_the_footer_shows_where_it_runs(
        monkeypatch, capsys, tiny_chat_model, default_tokenizer):
    import app
    from webui import startup

    seen = {}

    def fake_load(name, **kwargs):
        seen.update(kwargs, name=name)
        return tiny_chat_model, default_tokenizer

    monkeypatch.setattr(startup, "load", fake_load)
    settings = app_settings.parse_settings(["--model", "/some/local/model", "--dtype", "float32", "--device", "cpu",
                                            "--threads", "1", "--recent-size", "96"], env={})
    engine, label = app.create_engine(settings)
    assert seen == dict(name="/some/local/model", trust_remote_code=False, device="cpu", dtype="float32",
                        device_map=None, max_memory=None, offload_folder=None, backend="auto", n_threads=1)
    assert label == "/some/local/model" and engine.config.recent_size == 96
    # One start-up line names the backend and why, before the model loads (issue 27 item 3).
    err = capsys.readouterr().err
    assert err.count("Backend: ") == 1 and "Backend: transformers (auto picks transformers:" in err
    assert err.index("Backend: ") < err.index("Loading ")
    footer = app.status_line(engine, label)
    assert "cpu, " in footer and " MB of weights" in footer and "float32" in footer
    assert "1 CPU thread ·" in footer and "4 sinks + 96" in footer
    assert "decode eager" in footer.split(" · ") and engine.config.decode_step == "auto"  # auto: eager on a CPU
    static, _ = app.create_engine(app_settings.parse_settings(["--decode-step", "static", "--cuda-graphs", "off"],
                                                              env={}))
    assert (static.config.decode_step, static.config.cuda_graphs) == ("static", "off")
    assert "decode static" in app.status_line(static, label).split(" · ")


def test_on_a_zerogpu_space_turns_go_to_gpu_workers_and_nothing_else_is_decorated(
        monkeypatch, tiny_chat_model, default_tokenizer):
    import types

    import app
    import zerogpu_standin
    from webui import startup

    from streaming_engine.remote import RemoteTurnsEngine

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=zerogpu_standin.GPU))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(startup, "load", lambda name, **kwargs: (tiny_chat_model, default_tokenizer))
    engine, _ = app.create_engine(app_settings.parse_settings(["--recent-size", "96"], env={}))
    assert isinstance(engine, RemoteTurnsEngine) and "ZeroGPU" in app.status_line(engine, "x")
    assert engine.config.decode_step == "eager" and "decode eager" in app.status_line(engine, "x")  # auto there
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert type(app.create_engine(app_settings.parse_settings([], env={}))[0]) is StreamingEngine


def test_without_the_offline_default_or_the_hub_the_error_says_how_to_get_a_model(monkeypatch, capsys):
    import app
    from webui import startup

    from streaming_engine.loading import DEFAULT_MODEL_INSTALL

    monkeypatch.setattr(startup, "default_model_available", lambda: False)
    monkeypatch.setattr(startup, "hub_reachable", lambda *a, **k: False)  # as with no network at all
    with pytest.raises(SystemExit) as stopped:
        app.main([])
    message = str(stopped.value)
    assert DEFAULT_MODEL_INSTALL in message and "hub is unreachable" in message
    assert "Omit the model" not in message  # no model was passed
    assert DEFAULT_MODEL_INSTALL in capsys.readouterr().err  # said before loading starts, too


def test_get_health_answers_plain_http(launched):
    import urllib.request

    url, engine, _ = launched
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        assert response.status == 200
        body = json.loads(response.read())
    assert body == {"status": "ok", "sessions": len(engine.session_ids())}




def test_the_partial_save_interval_is_a_flag_and_an_environment_variable_and_refuses_bad_values():
    assert app_settings.parse_settings([], env={}).partial_save_interval_s == app_settings.PARTIAL_SAVE_INTERVAL_S
    assert app_settings.parse_settings(["--partial-save-interval", "0.5"], env={}).partial_save_interval_s == 0.5
    assert app_settings.parse_settings([], env={"PARTIAL_SAVE_INTERVAL": "0"}).partial_save_interval_s == 0
    with pytest.raises(SystemExit):
        app_settings.parse_settings(["--partial-save-interval", "-1"], env={})


def test_the_recall_budget_is_a_flag_and_an_environment_variable_checked_against_the_window(
        monkeypatch, capsys, tiny_chat_model, default_tokenizer):
    import app
    from webui import startup

    assert app_settings.parse_settings([], env={}).recall_budget is None
    assert app_settings.parse_settings(["--recall-budget", "0"], env={}).recall_budget == 0
    assert app_settings.parse_settings([], env={"RECALL_BUDGET": "40"}).recall_budget == 40
    assert app_settings.parse_settings(["--recall-budget", "20"], env={"RECALL_BUDGET": "40"}).recall_budget == 20
    for argv, env, named in ((["--recall-budget", "96", "--recent-size", "96"], {}, "must be smaller than"),
                             (["--recall-budget", "-1"], {}, "recall_budget must be an integer"),
                             ([], {"RECALL_BUDGET": "lots"}, "RECALL_BUDGET must be a whole number")):
        with pytest.raises(SystemExit) as stopped:
            app_settings.parse_settings(argv, env=env)
        assert named in capsys.readouterr().err + str(stopped.value.code)
    monkeypatch.setattr(startup, "load", lambda name, **kwargs: (tiny_chat_model, default_tokenizer))
    engine, _ = app.create_engine(app_settings.parse_settings(["--recall-budget", "0", "--recent-size", "96"], env={}))
    assert engine.config.recall_budget == 0 and engine.recall_budget_for("streaming", 96) == 0


@pytest.mark.parametrize("name", ["/nonexistent/model", "./missing-model", "../gone/model", "a/b/c", "missing.gguf",
                                  "models\\local"])
def test_a_model_name_that_can_only_be_a_missing_path_is_said_to_be_missing_without_asking_the_hub(
        name, monkeypatch, tmp_path):
    import app
    from webui import startup

    from streaming_engine import load
    from streaming_engine.modelfiles import ModelNotFound, llamacpp_available, local_path_only

    monkeypatch.chdir(tmp_path)  # relative names resolve where nothing is
    asked = []
    monkeypatch.setattr(startup, "hub_reachable", lambda *a, **k: asked.append(name) or False)
    assert local_path_only(name)
    with pytest.raises(ModelNotFound, match="no such") as refused:
        load(name)
    assert isinstance(refused.value, FileNotFoundError) and refused.value.code == "model_not_found"
    if name.endswith(".gguf") and llamacpp_available():  # the llama.cpp backend's own loader says the same
        with pytest.raises(ModelNotFound, match="no such GGUF file"):
            load(name, backend="llama.cpp")
    with pytest.raises(SystemExit) as stopped:
        app.main(["--model", name])
    message = str(stopped.value)
    assert f"could not load {name}: no such" in message and "hub" not in message.split("(")[0]
    assert asked == []  # no connection attempt: a path is never a hub id


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "owner/model.v2", "org_1/x-y"])
def test_a_name_with_the_shape_of_a_hub_id_is_not_taken_for_a_path(name, monkeypatch, tmp_path):
    from webui.startup import ModelSource

    from streaming_engine.modelfiles import local_path_only, missing_local_model

    monkeypatch.chdir(tmp_path)
    assert not local_path_only(name) and missing_local_model(name) is None
    assert ModelSource(name, name).from_hub
    (tmp_path / name).mkdir(parents=True)  # the same name as a folder here: loaded from disk, not the hub
    assert not ModelSource(name, name).from_hub


class RacingPage:
    """A page whose first `lost` navigations fail with `error` (what Chromium says when Gradio navigated first)."""

    def __init__(self, lost: int, error: str = RELOAD_RACES[1]):
        self.url, self.lost, self.error, self.calls = "http://127.0.0.1:1/?x=1", lost, error, []

    def _navigate(self, call: tuple) -> None:
        self.calls.append(call)
        if len(self.calls) <= self.lost:
            self.url = "chrome-error://chromewebdata/"  # where a lost race may leave the tab
            raise RuntimeError(f"Page.reload: {self.error}")

    def reload(self) -> None:
        self._navigate(("reload",))

    def goto(self, address: str) -> None:
        self._navigate(("goto", address))

    def wait_for_load_state(self, state: str) -> None:
        assert state == "load"


@pytest.mark.parametrize("lost", [0, 1, 2])
def test_a_reload_that_loses_a_race_is_retried_as_a_visit_to_the_address_the_page_had(lost):
    page = RacingPage(lost)
    reload_page(page)
    assert page.calls == [("reload",)] + [("goto", "http://127.0.0.1:1/?x=1")] * lost


def test_a_reload_raises_a_race_lost_on_every_try_and_at_once_any_other_error():
    with pytest.raises(RuntimeError, match=RELOAD_RACES[1]):
        reload_page(RacingPage(lost=3))
    page = RacingPage(lost=1, error="net::ERR_CONNECTION_REFUSED")
    with pytest.raises(RuntimeError, match="ERR_CONNECTION_REFUSED"):
        reload_page(page)
    assert page.calls == [("reload",)]
