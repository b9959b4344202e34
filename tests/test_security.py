"""Issue 28: no single client can stall or lock out the others, bad input is a 4xx, accepted messages survive.

Every test here decides on counts and order (how many messages were rendered, which request was admitted), never
on wall-clock thresholds; servers bind to 127.0.0.1 and every loop is bounded."""

from __future__ import annotations

import pytest

from streaming_engine import EngineConfig, StreamingEngine
from streaming_engine.templating import ChatTemplater

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)


def engine_for(model, tokenizer, **overrides):
    config = dict(start_size=4, recent_size=64, prefill_chunk_size=32)
    config.update(overrides)
    return StreamingEngine(model, tokenizer, EngineConfig(**config))


def long_history(n: int) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(n)]


class CountingTokenizer:
    """The real tokenizer, counting how many messages its chat template is asked to render in all."""

    def __init__(self, tokenizer):
        self._tokenizer, self.rendered = tokenizer, 0

    def apply_chat_template(self, messages, **kwargs):
        self.rendered += len(messages)
        return self._tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self):
        return len(self._tokenizer)


@pytest.mark.parametrize("n", [400, 2000])
def test_priming_a_long_history_renders_it_a_bounded_number_of_times(tiny_chat_model, default_tokenizer, n):
    """Attack 1: 20,000 one-character messages cost ~10 s of the worker because every kept message re-rendered
    the whole history. Now priming renders the history a constant number of times plus a few messages per piece."""
    counting = CountingTokenizer(default_tokenizer)
    engine = engine_for(tiny_chat_model, counting)
    sid = engine.open_history(long_history(n))
    counting.rendered = 0
    events = list(engine.chat(sid, "hi", max_new_tokens=2, **GREEDY))
    assert events[-1].kind == "done"
    # Linear: a few full renderings (prime, the check, the turn) and O(1) per kept piece; quadratic was ~n*kept.
    assert counting.rendered <= 6 * n + 10 * engine.config.cache_size, counting.rendered


def test_local_pieces_equal_the_exact_pieces(default_tokenizer):
    """The stand-in context gives the same text as cutting the real rendering, for every message."""
    templater = ChatTemplater(default_tokenizer)
    messages = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * (i % 3)} for i in range(15)]
    exact = {k: templater.piece(messages, k) for k in range(len(messages))}
    assert templater.pieces(messages, range(len(messages))) == exact
    assert templater.pieces(messages, [0, 1, 12, 13, 14, 15]) == {k: exact[k] for k in (0, 1, 12, 13, 14, 15)}


def test_pieces_that_disagree_with_the_rendering_are_refused(default_tokenizer):
    templater = ChatTemplater(default_tokenizer)
    messages = long_history(12)
    good = templater.pieces(messages, [0, 10, 11])
    assert templater.pieces_agree(messages, good)
    assert not templater.pieces_agree(messages, {**good, 11: good[11] + "forged"})
