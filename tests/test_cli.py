"""`python -m streaming_engine.chat`: prompts from a file or stdin into one streaming session."""

from __future__ import annotations

import io
import json

import pytest

from streaming_engine import chat


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_chat_model, default_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-chat-model")
    tiny_chat_model.save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    return str(folder)


def test_every_prompt_gets_an_answer_and_the_cache_line_shows_evictions(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "questions.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [f"Question {i}a", f"Question {i}b"]}) for i in range(4)))
    assert chat.main([str(prompts), "--model", tiny_model_dir, "--recent-size", "60", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.count("USER: ") == 8 and out.count("[cache ") == 8
    cache_lines = [line for line in out.splitlines() if line.startswith("[cache ")]
    held = [int(line.split()[1].split("/")[0]) for line in cache_lines]
    assert max(held) <= 64 and "evicted 0 " not in cache_lines[-1]


def test_prompts_can_come_from_stdin_and_bad_files_are_reported(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nworld\n"))
    assert chat.main(["--model", tiny_model_dir, "--max-new-tokens", "3", "--recent-size", "100"]) == 0
    assert capsys.readouterr().out.count("USER: ") == 2
    with pytest.raises(SystemExit, match="does not exist"):
        chat.main([str(tmp_path / "missing.txt"), "--model", tiny_model_dir])
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(SystemExit, match="broken.jsonl:1"):
        chat.main([str(broken), "--model", tiny_model_dir])
    assert chat.main(["--model", tiny_model_dir, "--recent-size", "0"]) == 2


@pytest.mark.parametrize("eviction", ["tokens", pytest.param("turns", marks=pytest.mark.slow)])
def test_the_chat_pins_its_system_prompt_and_says_how_many_turns_it_still_holds(tiny_model_dir, tmp_path, capsys,
                                                                                  eviction):
    prompts = tmp_path / "questions.txt"
    prompts.write_text("\n".join(f"Question {i}: what about ships?" for i in range(8)))
    common = [str(prompts), "--model", tiny_model_dir, "--recent-size", "60", "--max-new-tokens", "12",
              "--system", "Be brief.", "--eviction", eviction]
    assert chat.main(common) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[cache ")]
    pinned = {line.split("pinned ")[1].split()[0] for line in lines}
    assert len(pinned) == 1 and int(pinned.pop()) > 4
    assert "turns in memory 8/8" not in lines[-1] and "turns in memory" in lines[-1]
    assert chat.main(common + ["--no-pin-system"]) == 0
    assert "| pinned 0 |" in capsys.readouterr().out
    assert chat.main(common + ["--pin-limit", "3"]) == 2
    assert "pin_limit=3" in capsys.readouterr().err


def test_the_chat_says_at_start_up_which_backend_runs_and_why(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "one.txt"
    prompts.write_text("Hello")
    common = [str(prompts), "--model", tiny_model_dir, "--max-new-tokens", "2", "--recent-size", "60"]
    assert chat.main(common) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Backend: ")]
    assert len(lines) == 1 and lines[0].startswith("Backend: transformers (auto picks transformers:")
    assert chat.main(common + ["--backend", "transformers"]) == 0
    assert "Backend: transformers (asked for with --backend transformers)" in capsys.readouterr().err


# --- the decode-path flags, shared by every command line that builds an engine (benchmarks/cli.add_decode_args) ---------

def decode_parsers():
    from benchmarks import fairness, mtbench, recall, serve

    return {"chat": chat.build_parser, "serve": serve.build_parser, "fairness": fairness.build_parser,
            "recall": recall.build_parser, "mtbench": mtbench.build_parser}


@pytest.mark.parametrize("cli", ["chat", "serve", "fairness", "recall", "mtbench"])
def test_every_engine_cli_takes_the_decode_flags_and_refuses_other_values(cli, capsys):
    from benchmarks.cli import decode_kwargs
    from streaming_engine.defaults import CUDA_GRAPH_MODES, DECODE_STEPS, OVERLAP_MODES

    build = decode_parsers()[cli]
    assert decode_kwargs(build().parse_args([])) == dict(decode_step="auto", cuda_graphs="auto", overlap="auto")
    for step in DECODE_STEPS:
        for graphs in CUDA_GRAPH_MODES:
            for overlap in OVERLAP_MODES:
                args = build().parse_args(["--decode-step", step, "--cuda-graphs", graphs, "--overlap", overlap])
                assert decode_kwargs(args) == dict(decode_step=step, cuda_graphs=graphs, overlap=overlap)
    for flag, bad in (("--decode-step", "fast"), ("--decode-step", "Static"), ("--cuda-graphs", "yes"),
                      ("--overlap", "always")):
        with pytest.raises(SystemExit):
            build().parse_args([flag, bad])
        assert "invalid choice" in capsys.readouterr().err


@pytest.fixture
def built_engines(monkeypatch):
    """`(made, control)`: `made` lists every `StreamingEngine` built from now on as (config, decode path);
    `control["stop"] = True` makes each construction raise once recorded (a benchmark then ends before it
    measures anything)."""
    from streaming_engine.engine import StreamingEngine

    made, control = [], {"stop": False}
    original = StreamingEngine.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append((self.config, self.decode_path))
        if control["stop"]:
            raise RuntimeError("stopped once the engine was built")

    monkeypatch.setattr(StreamingEngine, "__init__", recording)
    return made, control


def test_the_chat_cli_hands_the_decode_flags_to_the_engine(tiny_model_dir, tmp_path, capsys, built_engines):
    import torch

    made, _ = built_engines
    prompts = tmp_path / "one.txt"
    prompts.write_text("Hello")
    common = [str(prompts), "--model", tiny_model_dir, "--max-new-tokens", "3", "--recent-size", "60"]
    assert chat.main(common + ["--decode-step", "static", "--cuda-graphs", "off"]) == 0
    assert capsys.readouterr().out.count("[cache ") == 1
    config, path = made[-1]
    assert (config.decode_step, config.cuda_graphs, path) == ("static", "off", "static")
    assert chat.main(common) == 0
    assert (made[-1][0].decode_step, made[-1][1]) == ("auto", "eager")  # auto on the CPU
    if not torch.cuda.is_available():
        assert chat.main(common + ["--cuda-graphs", "on"]) == 2
        assert "cuda_graphs_unavailable" in capsys.readouterr().err


@pytest.mark.parametrize("cli", ["serve", "fairness", "recall", "mtbench"])
def test_every_benchmark_cli_hands_the_decode_flags_to_its_engine(cli, tmp_path, monkeypatch, built_engines,
                                                                 tiny_chat_model, default_tokenizer, capsys):
    from benchmarks import cli as eval_cli

    made, control = built_engines
    control["stop"] = True
    monkeypatch.setattr(eval_cli, "load_model", lambda args: (tiny_chat_model, default_tokenizer))
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"turns": ["Hi there", "And again"]}) + "\n")
    extra = {"serve": ["--recent-size", "100", "--sessions", "1"], "fairness": ["--recent-size", "100"],
             "recall": ["--recent-size", "100"], "mtbench": ["--questions", str(questions)]}[cli]
    module = __import__(f"benchmarks.{cli}", fromlist=["main"])
    argv = extra + ["--decode-step", "static", "--cuda-graphs", "off", "--output", str(tmp_path / "out.json")]
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    assert stopped.value.code == 2 and "stopped once the engine was built" in capsys.readouterr().err
    config, path = made[-1]
    assert (config.decode_step, config.cuda_graphs, path) == ("static", "off", "static")


def test_a_model_path_that_names_nothing_is_an_error_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    from benchmarks import ppl

    missing = str(tmp_path / "no-such-model")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))  # prompts piped in: the model is loaded after them
    assert chat.main(["--model", missing, "--max-new-tokens", "1"]) == 2
    assert f"error: could not load {missing}: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:  # every benchmark's main goes through benchmarks.cli.run
        ppl.main(["--model", missing, "--output", str(tmp_path / "ppl.json")])
    assert stopped.value.code == 2 and f"could not load {missing}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "ppl.json").exists()


def test_a_saved_chat_continues_from_its_file_and_every_turn_is_saved(tiny_model_dir, tmp_path, capsys):
    from streaming_engine.history import parse_history

    saved = tmp_path / "chat.json"
    first = tmp_path / "first.txt"
    first.write_text("Remember: pineapple\nAnd a second thing\n")
    common = ["--model", tiny_model_dir, "--recent-size", "60", "--max-new-tokens", "6", "--save", str(saved)]
    assert chat.main([str(first), *common, "--system", "Be brief."]) == 0
    before = parse_history(saved.read_bytes())
    assert [m["role"] for m in before.messages] == ["user", "assistant"] * 2 and before.system_prompt == "Be brief."
    assert not list(tmp_path.glob(".chat.json.*"))  # the temporary file was renamed over the target

    capsys.readouterr()
    more = tmp_path / "more.txt"
    more.write_text("What was the fruit?\n")
    assert chat.main([str(more), *common, "--history", str(saved)]) == 0
    assert f"[continuing 4 messages from {saved}]" in capsys.readouterr().err
    after = parse_history(saved.read_bytes())
    assert after.messages[:4] == before.messages and after.messages[4]["content"] == "What was the fruit?"
    assert len(after.messages) == 6 and after.system_prompt == "Be brief."


def test_a_continue_prompt_grows_the_cut_reply_into_the_reply_never_cut_and_saves_it(tiny_model_dir, tmp_path,
                                                                                     capsys):
    from streaming_engine.history import parse_history

    prompts, whole = tmp_path / "prompts.txt", tmp_path / "whole.txt"
    prompts.write_text(f"{chat.CONTINUE_COMMAND}\nTell me a story\n{chat.CONTINUE_COMMAND}\n")
    whole.write_text("Tell me a story\n")
    common = ["--model", tiny_model_dir, "--recent-size", "200"]
    assert chat.main([str(prompts), *common, "--max-new-tokens", "6", "--save", str(tmp_path / "cut.json")]) == 0
    out, err = capsys.readouterr()
    assert "There is no reply to continue yet" in err and "[continuing the last reply]" in out
    assert chat.main([str(whole), *common, "--max-new-tokens", "12", "--save", str(tmp_path / "whole.json")]) == 0
    cut, uncut = (parse_history((tmp_path / f"{name}.json").read_bytes()) for name in ("cut", "whole"))
    assert cut.messages == uncut.messages and len(cut.messages) == 2  # one reply of 6 + 6 tokens
    assert cut.marks["truncated"] == uncut.marks["truncated"] == {1}


def test_a_chat_interrupted_mid_reply_saves_the_partial_reply_marked_stopped(tiny_model_dir, tmp_path, monkeypatch):
    from streaming_engine.history import parse_history

    class CtrlC(io.StringIO):
        """Standard output that raises KeyboardInterrupt at the reply's first piece, as Ctrl-C would then."""

        pressed = False

        def write(self, text):
            if self.getvalue().endswith("ASSISTANT: ") and text and not self.pressed:
                self.pressed = True
                raise KeyboardInterrupt
            return super().write(text)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me a long story\nNever asked\n")
    saved = tmp_path / "chat.json"
    monkeypatch.setattr("sys.stdout", CtrlC())
    assert chat.main([str(prompts), "--model", tiny_model_dir, "--max-new-tokens", "200", "--save", str(saved)]) == 0
    history = parse_history(saved.read_bytes())
    assert [m["role"] for m in history.messages] == ["user", "assistant"]
    assert history.messages[0]["content"] == "Tell me a long story" and history.marks["stopped"] == {1}
    # Continued and saved again, the stopped reply keeps its mark.
    prompts.write_text("Go on\n")
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert chat.main([str(prompts), "--model", tiny_model_dir, "--max-new-tokens", "3", "--history", str(saved),
                      "--save", str(saved)]) == 0
    again = parse_history(saved.read_bytes())
    # ... and the new reply, cut at --max-new-tokens 3, is marked as the app marks one: truncated.
    assert len(again.messages) == 4 and again.marks == {"stopped": {1}, "interrupted": set(), "truncated": {3}}


def test_ctrl_c_at_the_prompt_saves_the_chat_and_marks_no_finished_reply_stopped(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    from streaming_engine.history import parse_history

    class Keyboard(io.StringIO):
        """A terminal: one message, then Ctrl-C while the chat waits for the next."""

        def isatty(self):
            return True

        def __iter__(self):
            yield "Hello there\n"
            raise KeyboardInterrupt

    saved = tmp_path / "chat.json"
    monkeypatch.setattr("sys.stdin", Keyboard())
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert chat.main(["--model", tiny_model_dir, "--max-new-tokens", "3", "--save", str(saved)]) == 0
    history = parse_history(saved.read_bytes())
    assert [m["role"] for m in history.messages] == ["user", "assistant"]
    assert history.marks == {"stopped": set(), "interrupted": set(), "truncated": {1}}  # cut at its 3 tokens


@pytest.mark.parametrize("setup, match", [
    (lambda path: None, "does not exist"),
    (lambda path: path.write_text("{not json"), "not valid JSON"),
    (lambda path: path.write_text('{"format": "streaming-llm-chat", "messages": []}'), "both give a system prompt"),
])
def test_a_history_file_that_cannot_be_continued_is_an_error_line(tiny_model_dir, tmp_path, setup, match):
    path, prompts = tmp_path / "chat.json", tmp_path / "prompts.txt"
    setup(path)
    prompts.write_text("Hello\n")
    extra = ["--system", "Be brief."] if "system" in match else []
    with pytest.raises(SystemExit, match=match) as refused:
        chat.main([str(prompts), "--model", tiny_model_dir, "--history", str(path), *extra])
    assert "history" in str(refused.value)
