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
