"""One reply as a coroutine over token ids (what to feed, when to evict, when to stop), and the forward passes.

`generate_reply` never runs the model itself. It yields *requests* and the driver (the scheduler's worker, or
`run_alone`) answers each with logits, so a worker can gather many conversations' requests into few forward
passes:

* `Prefill(cache, ids)`: feed these prompt tokens on the conversation's own cache (`forward`); answer: the last
  position's logits `[vocab]`. Prompts go in chunks of at most `chunk_size`; the first chunks of conversations
  whose prompts arrive together may share one padded pass (`padded_prefill_rows`, `forward_padded`).
* `Decode(cache, token_id, sampling)`: feed this one sampled token; answer: its logits `[vocab]`. The batched worker
  feeds every decoding conversation's token in one pass (`forward_batch` over a `BatchedSinkCache`). A driver that
  samples on the device (the static step, `device_sampling.SampledDecodeStep`) may answer `Sampled(token_id)`
  instead: the next token, drawn with the turn's settings (`sampling`, a `RowSampling`); the turn then takes it as
  its own sampler's choice.

An answer may also be `STOP` (the user stopped: end now, nothing more is fed) or an exception instance (the forward
pass failed for this conversation: it is raised here, so only this conversation fails). Between requests it yields
`Step`s (tokens fed, a token sampled, the finish), answered with nothing.

The eviction policy lives here, so that a conversation makes exactly the same evictions alone or batched:

* before the prompt goes in, room for the prompt and the whole reply is made with one `evict_for_space` call
  when it fits in the window after the protected head (one eviction, one key re-rotation per turn); which tokens
  that takes (oldest tokens, or whole oldest messages) is the cache's policy (`eviction.py`);
* a prompt longer than that is fed in chunks, evicting before each chunk, so a 50,000-token paste runs in bounded
  memory;
* a reply that outgrows the window (rare: room is reserved up front whenever it fits) evicts when the cache is
  full, at least the cache's `evict_block` tokens at once (1: one token per step, as the paper), as
  `model.generate` with the same cache does, so both give the same text;
* a dense cache (no eviction) reports `context_full` instead of growing past its limit.

The last sampled token (often the end-of-turn token) is not fed here; the caller feeds it first thing next turn,
so it stays in the cache without spending a forward pass at the end of every reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, Iterator, Literal, Sequence

import torch
from transformers.cache_utils import DynamicCache

from .families import cache_keyword
from .placement import input_device
from .positions import batch_position_ids, next_position_ids


@dataclass
class Step:
    """What one forward pass produced: `kind` is "prefill" (a prompt chunk fed), "token" (`token_id` sampled)
    or "finish" (`reason`: "eos", "length", "stopped" or "context_full")."""

    kind: Literal["prefill", "token", "finish"]
    token_id: int = -1
    reason: str = ""


@dataclass
class Prefill:
    """Request: feed prompt `ids` on `cache` (a `ConversationCache`, not in a batch); answer the last logits."""

    cache: object
    ids: list[int]


@dataclass(eq=False)
class RowSampling:
    """One turn's sampling, for a driver that draws a decode row's next token itself: the turn's `params` (a
    `SamplingParams`), the tokens its repetition penalty reads (`recent_ids`: the session's own live sequence, read
    when the driver takes the row, so it holds the prompt and every token sampled so far), the tokens drawn so far
    in this reply (`drawn`, kept up to date by `generate_reply`) and the seed of the driver's draws (`seed`: the
    driver picks one the first time when the settings give none, so the turn keeps it). One object per turn, compared
    by identity: a driver knows a row changed hands when its object changes."""

    params: object
    recent_ids: Sequence[int]
    drawn: int = 0
    seed: int | None = None


@dataclass
class Decode:
    """Request: feed one sampled `token_id` on `cache` (alone or as a batch row); answer its logits `[vocab]`, or
    `Sampled` (the next token, drawn by the driver with `sampling`; None: the turn samples itself)."""

    cache: object
    token_id: int
    sampling: RowSampling | None = None


@dataclass(frozen=True)
class Sampled:
    """A driver's answer to a `Decode`: the next token, already drawn with the request's `RowSampling`."""

    token_id: int


class TurnStopped(Exception):
    """The driver answered a request with `STOP`: the user stopped this turn."""


#: The answer that stops a turn at its next request (nothing more is fed).
STOP = object()


def answer_logits(answer, sampled: bool = False) -> torch.Tensor | Sampled:
    """The logits in a driver's answer (or, with `sampled`, a `Sampled` token as it is); raises `TurnStopped` for
    `STOP` and re-raises a forwarded exception."""
    if answer is STOP:
        raise TurnStopped()
    if isinstance(answer, BaseException):
        raise answer
    if sampled and isinstance(answer, Sampled):
        return answer
    if not isinstance(answer, torch.Tensor):
        raise TypeError(f"a request must be answered with logits, STOP or an exception; got {type(answer).__name__}")
    return answer


# --- forward passes -------------------------------------------------------------------------------------------


@torch.inference_mode()
def forward(model, cache, ids: list[int]) -> torch.Tensor:
    """Feed `ids` on top of `cache` (one conversation); return the last position's logits `[vocab]`."""
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


def padded_prefill_rows(rows: Sequence[tuple[object, list[int]]], batchable: bool) -> list[int]:
    """Which of `rows` (`(ConversationCache, ids)` prompt chunks handed to one runner call) share one padded pass
    (`forward_padded`); the others keep a pass each (`forward`). The one home of that rule.

    A row shares when its conversation's cache is *fresh*: nothing held and nothing ever seen (a conversation's
    first chunk), not in a batch, not driven by `generate()` (`auto_evict`), and its chunk of at least one token
    fits the cache. Then no eviction can happen inside the pass and the positions are `0..len-1` whether or not
    the cache shifts positions (in-cache and stream positions agree on an empty cache), so every row's pass is the
    same arithmetic as alone, only side by side. A cache that already holds tokens would need a padded past too
    (its keys are in its own tensors, of another length than its neighbours'): those rows stay alone. The model
    must be one whose conversations share a decode pass (`batchable`, `families.batchable`): the scratch cache of
    the padded pass is plain full attention, which local sliding-window layers are not. A cache named by an
    earlier row of the call does not share (its rows must go in their order, and the later one would not find it
    fresh). Fewer than two sharing rows: none.
    """
    if not batchable:
        return []
    shared, seen = [], set()
    for index, (cache, ids) in enumerate(rows):
        solo = getattr(cache, "solo", None)
        named_before = id(cache) in seen
        seen.add(id(cache))
        if solo is None or named_before or cache.attached or solo.auto_evict:
            continue
        if solo.get_seq_length() == 0 and solo.seen_tokens == 0 and 0 < len(ids) <= solo.cache_size:
            shared.append(index)
    return shared if len(shared) > 1 else []


@torch.inference_mode()
def forward_padded(model, rows: Sequence[tuple[object, list[int]]]) -> list[torch.Tensor]:
    """Feed every `(ConversationCache, ids)` row, each a fresh cache (`padded_prefill_rows`), in ONE forward pass;
    return each row's last-token logits `[vocab]`, and leave each cache as its own `forward` would have.

    The rows are right-padded to the longest: with causal attention a valid token sees only the tokens before
    it, all valid, so padding changes no valid token's result (only float rounding of the batched kernels). The
    pass writes a scratch `DynamicCache`; only after it succeeded does each row's valid keys and values (its first
    `len(ids)` columns) go to its own cache, with the counters a pass of its own leaves (so a failed pass changes
    no cache)."""
    device = input_device(model)
    lengths = [len(ids) for _, ids in rows]
    width = max(lengths)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)  # padding: any valid id, masked below
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (_, ids) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[b, : len(ids)] = 1
    last = torch.tensor(lengths, dtype=torch.long).unsqueeze(1) - 1  # [rows, 1]
    scratch = DynamicCache()
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=torch.arange(width, dtype=torch.long).expand(len(rows), -1).to(device),
        use_cache=True,
        logits_to_keep=last.to(device),  # each row's own last position: [rows, 1, vocab]
        **{cache_keyword(model): scratch},
    )
    logits = out.logits
    if logits.shape[1] != 1:  # a model that kept every position
        logits = torch.take_along_dim(logits, last.to(logits.device)[..., None], dim=1)
    moved = [[(layer.keys[b : b + 1, :, :held].clone(), layer.values[b : b + 1, :, :held].clone())
              for layer in scratch.layers if layer.is_initialized] for b, held in enumerate(lengths)]
    for (cache, _), layers, held in zip(rows, moved, lengths):  # every copy made: from here nothing can fail
        cache.solo._put_tokens(layers, torch.arange(held), held, cache.solo.evicted_tokens)
    return [logits[b, 0] for b in range(len(rows))]


@torch.inference_mode()
def forward_batch(model, batch, token_ids: list[int], rows: range | None = None) -> torch.Tensor:
    """Feed one token per row of `batch` (a `BatchedSinkCache`; `rows`: a contiguous range, default all) in one
    forward pass; return logits `[len(rows), vocab]`. On failure nothing is fed and the rows are as before."""
    rows = range(len(batch.rows)) if rows is None else rows
    if len(token_ids) != len(rows):
        raise ValueError(f"{len(token_ids)} tokens for {len(rows)} rows")
    device = input_device(model)
    mask = batch.begin_step(rows)  # [rows, width] padding mask, or None when no row is padded
    try:
        out = model(
            input_ids=torch.tensor(token_ids, dtype=torch.long).unsqueeze(1).to(device),  # [rows, 1]
            position_ids=batch_position_ids(batch.rows[rows.start:rows.stop], device),  # [rows, 1]
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=1,
            **{cache_keyword(model): batch},
        )
    except BaseException:
        batch.abort_step()
        raise
    batch.end_step()
    return out.logits[:, -1]  # [rows, vocab]


def run_alone(model, requests: Generator) -> list:
    """Drive a request coroutine (`generate_reply`, a turn) by itself, one forward pass per request, on the
    conversation's own cache; returns everything else it yielded. The reference a batched row must equal."""
    items, answer = [], None
    while True:
        try:
            item = requests.send(answer)
        except StopIteration:
            return items
        answer = None
        if isinstance(item, Prefill):
            answer = forward(model, item.cache.solo, item.ids)
        elif isinstance(item, Decode):
            answer = forward(model, item.cache.solo, [item.token_id])
        else:
            items.append(item)


# --- one reply ------------------------------------------------------------------------------------------------


def prefill_requests(cache, ids: list[int], chunk_size: int, evict: bool) -> Generator:
    """Feed `ids` in chunks of at most `chunk_size`, evicting before each; yields `Prefill` requests and returns
    the last chunk's logits."""
    logits = None
    for begin in range(0, len(ids), chunk_size):
        chunk = ids[begin : begin + chunk_size]
        if evict:
            cache.evict_for_space(len(chunk))
        logits = answer_logits((yield Prefill(cache, chunk)))
    return logits


def generate_reply(
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
    sampling: RowSampling | None = None,
) -> Generator:
    """Run one turn on `cache` (a `ConversationCache`): yields `Prefill`/`Decode` requests and `Step`s, and ends
    with a "finish" step.

    `sample(logits) -> token_id` chooses tokens; `should_stop()` is polled before every request (user stop, stop
    strings), and a `STOP` answer ends the turn at once, so a stop takes effect within one step. With `sampling`
    (the same settings `sample` uses), every `Decode` carries it, so a driver may answer with the token instead.
    """

    if not prompt_ids:
        raise ValueError("a turn needs at least one prompt token")

    def fits(count: int) -> bool:
        return context_limit is None or cache.get_seq_length() + count <= context_limit

    # At most len(prompt) + max_new_tokens - 1 tokens are fed this turn (the last sampled one waits for the next
    # turn), so reserving exactly that leaves the cache full, not short, after a reply that runs to the limit.
    reserve = len(prompt_ids) + max_new_tokens - 1
    if evict and reserve <= cache.window:  # the room after the protected head (sinks or pinned prompt)
        cache.evict_for_space(reserve)
    if not fits(len(prompt_ids)):
        yield Step("finish", reason="context_full")
        return
    logits = None
    try:
        for begin in range(0, len(prompt_ids), chunk_size):
            chunk = prompt_ids[begin : begin + chunk_size]
            if evict:
                cache.evict_for_space(len(chunk))
            logits = answer_logits((yield Prefill(cache, chunk)))
            yield Step("prefill")
            if should_stop():
                yield Step("finish", reason="stopped")
                return
        generated = 0
        choice = logits  # logits to sample from, or the token a driver drew (`Sampled`)
        while True:
            token_id = choice.token_id if isinstance(choice, Sampled) else sample(choice)
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
            if evict:
                cache.evict_for_space(1)  # a no-op when room was reserved up front
            if sampling is not None:
                sampling.drawn = generated
            choice = answer_logits((yield Decode(cache, token_id, sampling)), sampled=sampling is not None)
    except TurnStopped:
        yield Step("finish", reason="stopped")
