"""One reply as a generator over token ids: prefill and decode steps, eviction, stopping. No threads here.

`prefill` and `decode_step` are the two kinds of forward pass. `generate_reply` strings them together for one
turn and yields after every forward pass, so a scheduler can interleave many conversations one step at a time:

* before the prompt goes in, room for the prompt and the whole reply is made with one `evict_for_space` call
  when it fits in the recent window (one eviction, one key re-rotation per turn);
* a prompt longer than that is fed in chunks, evicting before each chunk, so a 50,000-token paste runs in bounded
  memory;
* every decode step makes room for its one token (a no-op when room was reserved up front);
* a dense cache (no eviction) reports `context_full` instead of growing past its limit.

The last sampled token (often the end-of-turn token) is not fed here; the caller feeds it first thing next turn,
so it stays in the cache without spending a forward pass at the end of every reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch

from .families import cache_keyword
from .placement import input_device
from .positions import next_position_ids


@dataclass
class Step:
    """What one forward pass produced: `kind` is "prefill" (a prompt chunk fed), "token" (`token_id` sampled)
    or "finish" (`reason`: "eos", "length", "stopped" or "context_full")."""

    kind: Literal["prefill", "token", "finish"]
    token_id: int = -1
    reason: str = ""


@torch.inference_mode()
def forward(model, cache, ids: list[int]) -> torch.Tensor:
    """Feed `ids` on top of `cache`; return the last position's logits `[vocab]`."""
    device = input_device(model)  # not model.device: under a device map that can be `meta`
    input_ids = torch.tensor([ids], device=device, dtype=torch.long)  # [1, n]
    out = model(
        input_ids=input_ids,
        position_ids=next_position_ids(cache, len(ids), device),
        use_cache=True,
        logits_to_keep=1,
        **{cache_keyword(model): cache},
    )
    return out.logits[0, -1]  # [vocab]


def prefill(model, cache, ids: list[int], chunk_size: int, evict: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """Feed `ids` in chunks of at most `chunk_size`; yields `(tokens_fed, last_logits)` after each chunk."""
    for begin in range(0, len(ids), chunk_size):
        chunk = ids[begin : begin + chunk_size]
        if evict:
            cache.evict_for_space(len(chunk))
        yield len(chunk), forward(model, cache, chunk)


def decode_step(model, cache, token_id: int, evict: bool) -> torch.Tensor:
    """Feed one sampled token; return the next logits `[vocab]`."""
    if evict:
        cache.evict_for_space(1)
    return forward(model, cache, [token_id])


def generate_reply(
    model,
    cache,
    prompt_ids: list[int],
    sample: Callable[[torch.Tensor], int],
    *,
    max_new_tokens: int,
    eos_ids: set[int],
    evict: bool,
    chunk_size: int,
    context_limit: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[Step]:
    """Run one turn. Yields a `Step` after every forward pass and ends with a "finish" step.

    `sample(logits) -> token_id` chooses tokens; `should_stop()` is polled before every forward pass (user stop,
    stop strings), so a stop takes effect within one step.
    """

    if not prompt_ids:
        raise ValueError("a turn needs at least one prompt token")

    def fits(count: int) -> bool:
        return context_limit is None or cache.get_seq_length() + count <= context_limit

    # At most len(prompt) + max_new_tokens - 1 tokens are fed this turn (the last sampled one waits for the next
    # turn), so reserving exactly that leaves the cache full, not short, after a reply that runs to the limit.
    reserve = len(prompt_ids) + max_new_tokens - 1
    if evict and reserve <= cache.recent_size:
        cache.evict_for_space(reserve)
    if not fits(len(prompt_ids)):
        yield Step("finish", reason="context_full")
        return
    logits = None
    for _, logits in prefill(model, cache, prompt_ids, chunk_size, evict):
        yield Step("prefill")
        if should_stop():
            yield Step("finish", reason="stopped")
            return
    generated = 0
    while True:
        token_id = sample(logits)
        generated += 1
        yield Step("token", token_id=token_id)
        if token_id in eos_ids:
            yield Step("finish", reason="eos")
            return
        if generated >= max_new_tokens:
            yield Step("finish", reason="length")
            return
        if should_stop():
            yield Step("finish", reason="stopped")
            return
        # The sampled token is fed next step; keep one slot for the token the caller feeds next turn.
        if not fits(2):
            yield Step("finish", reason="context_full")
            return
        logits = decode_step(model, cache, token_id, evict)
