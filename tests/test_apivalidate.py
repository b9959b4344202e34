"""Every API argument is refused clearly (allowed type and range named), nothing is echoed whole."""

from __future__ import annotations

import math

import pytest

from streaming_engine import validate as v
from streaming_engine.history import restore_history

SID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("value,shown", [
    ("x", "text 'x'"), (math.nan, "NaN"), (None, "null"), ([1], "a list"), ({}, "an object"),
    (True, "true"), (1.5, "1.5"), (0, "0"), (5000, "5000"), (math.inf, "Infinity"), ("64", "text '64'"),
])
def test_max_new_tokens_accepts_only_an_integer_in_range(value, shown):
    with pytest.raises(ValueError) as caught:
        v.chat_arguments(SID, "hi", 1000, max_new_tokens=value)
    assert str(caught.value) == f"max_new_tokens must be an integer in [1, 4096]; got {shown}"


@pytest.mark.parametrize("value", [1, 64, 64.0, 4096])
def test_integral_numbers_pass_as_integers(value):
    assert v.chat_arguments(SID, "hi", 1000, max_new_tokens=value)[2] == {"max_new_tokens": int(value)}
    assert type(v.check_int("n", v.whole(value), 1, 4096)) is int


@pytest.mark.parametrize("name,value,allowed", [
    ("temperature", -0.1, "a number in [0, 5.0]"), ("temperature", "hot", "a number in [0, 5.0]"),
    ("temperature", math.nan, "a number in [0, 5.0]"), ("top_p", 0, "a number in (0, 1]"),
    ("top_p", True, "a number in (0, 1]"), ("top_k", -1, "an integer >= 0"), ("top_k", 2.5, "an integer >= 0"),
    ("repetition_penalty", 0, "a number in (0, 10.0]"), ("seed", -1, "an integer in [0, 9223372036854775807]"),
    ("seed", "7", "an integer in [0, 9223372036854775807]"), ("stop", [1], "null, a string, or a list"),
    ("stop", ["x"] * 9, "null, a string, or a list"),
])
def test_every_sampling_argument_names_its_type_and_range(name, value, allowed):
    with pytest.raises(ValueError, match=rf"^{name} must be {__import__('re').escape(allowed)}"):
        v.sampling_arguments({name: value})


def test_good_sampling_arguments_come_back_clean():
    got = v.sampling_arguments({"temperature": 0, "top_p": 1, "top_k": 40.0, "seed": None, "stop": "END",
                                "repetition_penalty": 1.1})
    assert got == {"temperature": 0.0, "top_p": 1.0, "top_k": 40, "seed": None, "stop": ["END"],
                   "repetition_penalty": 1.1}


def test_unknown_arguments_are_named_and_long_names_cut():
    with pytest.raises(ValueError, match="unknown sampling setting bogus .allowed: max_new_tokens"):
        v.sampling_arguments({"bogus": 1})
    with pytest.raises(ValueError) as caught:
        v.sampling_arguments({"k" * 100_000: 1})
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("value", [None, 5, [SID], "x" * 37, "a" * 1_000_000, "../../etc/passwd", "'; DROP"],
                         ids=["null", "number", "list", "37-chars", "1M-chars", "path", "sql"])
def test_session_ids_that_cannot_be_ours_are_refused_and_never_echoed_whole(value):
    with pytest.raises(ValueError, match="session_id must be the id /new_session returned") as caught:
        v.session_id(value)
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize("message,match", [
    (None, "message must be text"), (["hi"], "message must be text"), ("", "empty"), (" \n", "empty"),
    ("x" * 1001, "too long: 1,001 characters"),
], ids=["null", "list", "empty", "blank", "too-long"])
def test_messages_must_be_text_within_the_limit(message, match):
    with pytest.raises(ValueError, match=match):
        v.chat_arguments(SID, message, 1000)


@pytest.mark.parametrize("document,match", [
    ("[" * 200_000, r"not valid JSON \(nested too deep\)"),
    ('{"a":' * 200_000, r"not valid JSON \(nested too deep\)"),
    ("{not json", r"not valid JSON \(Expecting property name"),
    ("1" * 5000, r"not valid JSON \(a number is too long\)"),
], ids=["array-bomb", "object-bomb", "broken", "huge-number"])
def test_json_documents_fail_with_a_reason(document, match):
    with pytest.raises(ValueError, match=match):
        v.parse_json(document, "history file")


def test_a_nesting_bomb_upload_is_refused_by_restore_with_the_same_reason(tiny_chat_model, default_tokenizer):
    from streaming_engine import EngineConfig, StreamingEngine

    engine = StreamingEngine(tiny_chat_model, default_tokenizer,
                             EngineConfig(start_size=4, recent_size=64, prefill_chunk_size=32))
    with pytest.raises(ValueError, match=r"^history file is not valid JSON \(nested too deep\)$"):
        restore_history(engine, ("[" * 200_000).encode())
    assert engine.session_ids() == []
