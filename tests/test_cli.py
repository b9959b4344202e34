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
