"""Sampling that stays on the device: a whole batch's next tokens chosen by tensor ops, no host round trip.

`sampling.Sampler` draws one row at a time on the host side of the loop (`.item()` per row, a `torch.Generator`
per turn), which forces a device->host sync per row per step and cannot be captured in a CUDA graph. Here every
row's settings (temperature, top-k, top-p, repetition penalty, seed) are device tensors, and the randomness is a
*hash* of `(seed, step, token id)` rather than a generator's state:

* **Gumbel-max.** `argmax(scores / T + g)` with `g = -log(-log(u))`, `u` uniform, draws exactly from
  `softmax(scores / T)`; restricting the argmax to the allowed tokens (top-k, top-p) draws from the renormalized
  restriction, the distribution the reference sampler draws from.
* **Counter-based noise.** `u` comes from an integer hash of the row's seed, the row's own step counter and the
  token id, so there is no generator state to advance on the host: the same seed and step always give the same
  token (replayable, graph-safe), and a row's draws do not depend on which other rows share the batch.
* **Rows differ.** Temperature 0 (greedy: plain argmax of the penalized logits), top-k 0 (off), top-p 1 (off) and
  penalty 1 (off) are per row, so one call serves a batch of mixed settings.
* **Repetition penalty.** `sampling.Sampler`'s rule, which is transformers' `RepetitionPenaltyLogitsProcessor` over
  the row's last `sampling.PENALTY_WINDOW` tokens (prompt and reply alike; token 0 stands in for an empty history,
  as there): a token seen there has its score divided by the penalty when positive, multiplied when negative, once
  however often it was seen. Each row keeps its window as a ring of token ids and a count per token (a token stays
  penalized while its count is above 0); after every draw the new token enters and the one that falls out of the
  window leaves, by scatters on the device. `set_row` copies a row's history in once.

The hash works on 32-bit values held in int64 with multipliers below 2**31, so no product overflows and CPU and
CUDA compute the same bits. The order of the cuts follows `sampling.Sampler`: the penalty on the raw scores, top-k
on those, then the temperature, then top-p on the tempered, top-k-restricted distribution (transformers'
`TopPLogitsWarper` rule: a token stays while the probability of the tokens ranked above it is below `top_p`).

`SampledDecodeStep` puts a sampler behind a fixed-shape decode step: the batched scheduler's static path runs the
step and samples every row with it, one device->host copy of the ids per step (the logits never leave the device).

Boundary: this module draws tokens from logits; which settings a row has comes from the turn
(`generation.RowSampling`), the logits from the step it wraps.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from .sampling import MAX_SEED, PENALTY_WINDOW
from .validate import check_int

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31 (so a 32-bit value times one stays inside int64): Wellons' lowbias32 first
# constant, MurmurHash3's c2, MurmurHash2's m.
_MULTIPLIERS = (0x7FEB352D, 0x1B873593, 0x5BD1E995)
#: Bits of each uniform draw (a float32 holds 24 exactly).
_UNIFORM_BITS = 24
#: Devices whose `tensor / python_number` multiplies by the number's reciprocal (CUDA's and XPU's division kernels
#: do, CPU's divides): the penalty divides the same way there, so it equals the reference bit for bit.
_RECIPROCAL_DIVISION = ("cuda", "xpu")


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift / multiply rounds) of int64 `x` holding values in [0, 2**32)."""
    for multiplier in _MULTIPLIERS:
        x = x ^ (x >> 16)
        x = (x * multiplier) & _MASK32
    return x ^ (x >> 15)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), `[rows, vocab]` float32, a pure function of each row's `seed` and `step` (`[rows]`,
    int64) and the token id: no generator state, identical on every device."""
    token = torch.arange(vocab, device=seed.device, dtype=torch.long)  # [vocab]
    key = _mix(_mix(seed & _MASK32) ^ ((seed >> 32) & _MASK32))
    key = _mix(key ^ (step & _MASK32))  # [rows]
    bits = _mix(key[:, None] ^ token[None, :]) >> (32 - _UNIFORM_BITS)  # [rows, vocab]
    return (bits.float() + 0.5) / float(1 << _UNIFORM_BITS)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise `[rows, vocab]` from `uniform_noise`."""
    return -torch.log(-torch.log(uniform_noise(seed, step, vocab)))


def allowed_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tempered scores and the allowed set of each row, in *vocabulary* order.

    logits `[rows, vocab]`; temperature, top_p `[rows]` float; top_k `[rows]` int64 (0: off). Returns
    `(scaled [rows, vocab] float32, allowed [rows, vocab] bool)`. Greedy rows (temperature 0) are tempered by 1
    here; `sample_tokens` takes their argmax instead.
    """
    scores = logits.float()
    rows, vocab = scores.shape
    sorted_scores, order = scores.sort(dim=-1, descending=True)  # [rows, vocab], best first
    rank = torch.arange(vocab, device=scores.device)
    k = torch.where(top_k > 0, top_k, vocab)  # [rows]
    keep = rank[None, :] < k[:, None]  # [rows, vocab] in rank order
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled_sorted = (sorted_scores / temp[:, None]).masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scaled_sorted, dim=-1)
    above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    keep = keep & (above < top_p[:, None])
    keep[:, 0].fill_(True)  # the best token always stays (top_p > 0); a fill, not a host tensor: graph-safe
    allowed = torch.zeros_like(keep).scatter_(-1, order, keep)
    return scores / temp[:, None], allowed


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' repetition-penalty rule for a batch: scores `[rows, vocab]` float32, seen `[rows, vocab]` bool
    (the tokens each row's history holds), penalty `[rows]` float32 (1 = off). A seen token's score is divided by
    its row's penalty when positive and multiplied when negative; the others are unchanged."""
    p = penalty[:, None]
    if scores.device.type in _RECIPROCAL_DIVISION:  # as the reference's `score / penalty` computes it there
        shrunk = scores * (torch.ones_like(p) / p)
    else:
        shrunk = scores / p
    return torch.where(seen, torch.where(scores < 0, scores * p, shrunk), scores)


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """One token per row, `[rows]` int64 on the logits' device; every argument is a `[rows]` tensor there.

    Greedy rows get `argmax(logits)`; the others a Gumbel-max draw over their allowed set, keyed by
    `(seed, step)`. Only tensor ops: nothing is read back to the host, so it can sit inside a CUDA graph.
    """
    scaled, allowed = allowed_tokens(logits, temperature, top_k, top_p)
    noisy = (scaled + gumbel_noise(seed, step, logits.shape[-1])).masked_fill(~allowed, float("-inf"))
    drawn = noisy.argmax(dim=-1)
    return torch.where(temperature > 0, drawn, logits.argmax(dim=-1))


class DeviceSampler:
    """Per-row sampling settings, step counters and penalty windows as device tensors for up to `rows` rows.

    `set_row` is called when a conversation takes a row (rare, host side: one copy of its history); `sample` is the
    per-step call: it penalizes, draws, advances the sampled rows' counters and puts the drawn tokens into their
    rows' windows, all on the device. `window` is how many recent tokens the penalty reads (the reference's).
    """

    def __init__(self, rows: int, device: torch.device | str = "cpu", window: int = PENALTY_WINDOW):
        check_int("rows", rows, 1)
        check_int("window", window, 1)
        self.rows, self.window = rows, window
        self.device = torch.device(device)
        self.temperature = torch.zeros(rows, device=self.device)  # [rows] float32, 0 = greedy
        self.top_k = torch.zeros(rows, dtype=torch.long, device=self.device)  # [rows], 0 = off
        self.top_p = torch.ones(rows, device=self.device)  # [rows], 1 = off
        self.penalty = torch.ones(rows, device=self.device)  # [rows], 1 = off
        self.seed = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.step = torch.zeros(rows, dtype=torch.long, device=self.device)  # draws made by each row's turn
        # The penalty's window per row: a ring of the last `window` token ids (the next one goes to column
        # `written % window`), `written` tokens ever put in, and `stand_in` = 1 while the history is empty and
        # token 0 stands in for it (the reference's rule), until the first token enters.
        self.ring = torch.zeros(rows, window, dtype=torch.long, device=self.device)
        self.written = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.stand_in = torch.zeros(rows, dtype=torch.long, device=self.device)
        #: `[rows, vocab + 1]` int32: how often each token is in the row's window (the last column takes ids beyond
        #: the logits' vocabulary, which the reference ignores too). Made at the first penalized draw, which
        #: knows the vocabulary.
        self.counts: torch.Tensor | None = None
        self._arange = torch.arange(rows, device=self.device)
        # Host mirrors, known when the settings are set and never read back: which rows draw at random (an
        # all-greedy batch skips the sort and the noise), which penalize (no penalty: no window upkeep), which
        # rows' counts must be rebuilt from their ring (`set_row` since the counts were last made), and how many
        # tokens `set_row` put in each ring.
        self._random = [False] * rows
        self._penalized = [False] * rows
        self._stale: set[int] = set()
        self._held = [0] * rows
        #: What `retract` needs to take back the last draw: `(rows, ids, window changes)`, device tensors (after a
        #: replayed draw, the graph's own outputs: `cuda_graphs.GraphedDecodeStep` sets it).
        self.last_draw: tuple | None = None

    def set_row(self, row: int, params=None, seed: int | None = None, history: Sequence[int] = (),
                step: int = 0) -> int:
        """Give `row` the settings of `params` (a `SamplingParams`; None: greedy, no penalty), the tokens its
        repetition penalty reads (`history`, oldest first: the prompt and what was sampled so far; only the last
        `window` count) and its step counter (`step`: draws its turn made before). Returns the seed used (`seed`,
        else `params.seed`, else a fresh random one)."""
        if not 0 <= row < self.rows:
            raise ValueError(f"row {row} outside 0..{self.rows - 1}")
        temperature, top_k, top_p, penalty = ((0.0, 0, 1.0, 1.0) if params is None else (
            float(params.temperature), int(params.top_k), float(params.top_p), float(params.repetition_penalty)))
        if seed is None and params is not None:
            seed = params.seed
        if seed is None:
            seed = random.SystemRandom().randrange(MAX_SEED)
        self.temperature[row], self.top_k[row], self.top_p[row] = temperature, top_k, top_p
        self.penalty[row] = penalty
        self.seed[row], self.step[row] = int(seed), int(step)
        self._random[row], self._penalized[row] = temperature > 0, penalty != 1.0
        self._stale.discard(row)
        if penalty != 1.0:  # a row without a penalty keeps no window: nothing reads it
            ids = list(history)[-self.window:]
            if ids:
                self.ring[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)  # the one copy of the history
            self.written[row], self.stand_in[row] = len(ids), int(not ids)
            self._held[row] = len(ids)
            self._stale.add(row)
        return seed

    def move_row(self, source: int, target: int) -> None:
        """Row `source`'s settings, counter and window now belong to row `target` (a batch filling a gap)."""
        for t in (self.temperature, self.top_k, self.top_p, self.penalty, self.seed, self.step, self.ring,
                  self.written, self.stand_in) + ((self.counts,) if self.counts is not None else ()):
            t[target] = t[source]
        for mirror in (self._random, self._penalized, self._held):
            mirror[target] = mirror[source]
        self._stale.discard(target)
        if source in self._stale:
            self._stale.add(target)

    def seen(self, n: int, vocab: int) -> torch.Tensor:
        """`[n, vocab]` bool: the tokens in the windows of rows `0..n-1` (made up to date first)."""
        self._ensure_counts(vocab)
        return self.counts[:n, :vocab] > 0

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits `[n, vocab]` for rows `0..n-1` (n <= rows): their tokens `[n]` on the device; counters advance
        and the tokens enter the rows' penalty windows."""
        n, vocab = logits.shape
        if n > self.rows:
            raise ValueError(f"{n} rows of logits for a sampler of {self.rows} rows")
        mode = self.mode(n)
        self.ready(vocab, penalized=mode[0])
        ids, self.last_draw = self.draw(logits, *mode)
        return ids

    def mode(self, n: int) -> tuple[bool, bool]:
        """`(penalized, random)` for rows `0..n-1`, from the host mirrors: whether a draw for them needs the
        penalty's window and the sort and noise. The ops of a draw depend on these two only (a CUDA graph of a
        draw is recorded per mode)."""
        return any(self._penalized[:n]), any(self._random[:n])

    def ready(self, vocab: int, penalized: bool) -> None:
        """Host-side upkeep before a draw whose mode has `penalized` (the caller's mode, so the host mirrors are
        read once per step): the penalty's counts made up to date (rows set since they were last made are
        rebuilt), so `draw` itself is device work only. A random draw needs nothing on the host."""
        if penalized:
            self._ensure_counts(vocab)

    def draw(self, logits: torch.Tensor, penalized: bool, random: bool) -> tuple[torch.Tensor, tuple]:
        """The device work of `sample` for rows `0..n-1` (logits `[n, vocab]`), after `ready`, under `mode`
        flags at least as wide as those rows': only tensor ops of shapes fixed by `n`, nothing read back to the
        host and no host state changed, so `cuda_graphs.GraphedDecodeStep` records it behind the step. Returns
        `(ids [n], record)`; the caller makes `record` the `last_draw`. Rows beyond the live ones (a padded
        bucket) draw too; their tokens are dropped and their state is set again before a turn uses them."""
        n, vocab = logits.shape
        scores = logits
        if penalized:
            scores = repetition_penalty(logits.float(), self.counts[:n, :vocab] > 0, self.penalty[:n])
        if random:
            ids = sample_tokens(scores, self.temperature[:n], self.top_k[:n], self.top_p[:n], self.seed[:n],
                                self.step[:n])
        else:
            ids = scores.argmax(dim=-1)
        self.step[:n] += 1
        return ids, (n, ids, self._enter(ids, vocab) if penalized else None)

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        """Copies of what a draw changes (counters, windows, counts): `restore` puts them back. A CUDA graph's
        warm-up runs draw for real; the capture must leave the rows as it found them."""
        return tuple(t.clone() for t in self._changing())

    def restore(self, saved: tuple[torch.Tensor, ...]) -> None:
        for t, kept in zip(self._changing(), saved):
            t.copy_(kept)

    def _changing(self) -> tuple[torch.Tensor, ...]:
        return (self.step, self.ring, self.written, self.stand_in) + ((self.counts,) if self.counts is not None
                                                                      else ())

    def retract(self) -> None:
        """Take back the last `sample` (an overlapped step drawn ahead for rows that changed): the counters go
        back and the drawn tokens leave the windows, the tokens they pushed out return. Device ops only; once."""
        if self.last_draw is None:
            raise RuntimeError("nothing to retract: no draw since the last retract")
        (n, ids, entered), self.last_draw = self.last_draw, None
        self.step[:n] -= 1
        if entered is None:
            return
        rows, column, leaving, old, full, stand_in = entered
        counts = self.counts
        counts.index_put_((rows, ids), -torch.ones_like(ids, dtype=torch.int32), accumulate=True)
        counts.index_put_((rows, leaving), full, accumulate=True)
        counts[:n, 0] += stand_in.to(torch.int32)
        self.ring[rows, column] = old
        self.stand_in[:n] = stand_in
        self.written[:n] -= 1

    def _ensure_counts(self, vocab: int) -> None:
        if self.counts is None or self.counts.shape[1] != vocab + 1:
            with torch.inference_mode(False):  # a plain tensor, like the others: updated in place in and out of it
                self.counts = torch.zeros(self.rows, vocab + 1, dtype=torch.int32, device=self.device)
            self._stale |= {row for row in range(self.rows) if self._penalized[row]}
        for row in sorted(self._stale):  # rows set since the counts were made: rebuilt from their ring
            counts = self.counts[row]
            counts.zero_()
            held = self.ring[row, : self._held[row]].clamp(max=vocab)
            counts.index_put_((held,), torch.ones_like(held, dtype=torch.int32), accumulate=True)
            counts[0] += self.stand_in[row].to(torch.int32)
        self._stale.clear()

    def _enter(self, ids: torch.Tensor, vocab: int) -> tuple:
        """Token `ids[b]` enters row b's window (rows `0..n-1`), the oldest leaves a full one: device ops only.
        Returns what `retract` needs to undo it."""
        n = ids.shape[0]
        rows, written = self._arange[:n], self.written[:n]
        column = written % self.window
        old = self.ring[rows, column]  # what the new token overwrites (a full window)
        leaving = old.clamp(max=vocab)
        full = (written >= self.window).to(torch.int32)
        stand_in = self.stand_in[:n].clone()
        counts = self.counts
        counts.index_put_((rows, leaving), -full, accumulate=True)
        counts[:n, 0] -= stand_in.to(torch.int32)  # the stand-in goes once a real token is there
        self.stand_in[:n].zero_()
        self.ring[rows, column] = ids
        counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.int32), accumulate=True)
        self.written[:n] += 1
        return rows, column, leaving, old, full, stand_in


class SampledDecodeStep:
    """A fixed-shape decode step (a `cuda_graphs.GraphedDecodeStep`: `step(tokens) -> logits [rows, vocab]`, and
    `step.sampled(tokens, sampler) -> (logits, ids, rows drawn)`, the draw replayed in the step's graph where graphs
    run) whose rows are also sampled on the device. `decode(tokens, samplings)` runs the step and draws every row's
    next token with one `DeviceSampler`: the logits stay on the device, the ids come to the host in one copy.

    Which settings each sampler row holds follows the turns, not the batch's bookkeeping: row b is (re)set from
    `samplings[b]` (the turn's `generation.RowSampling`) whenever that object is not the one it was set from (a
    join, a new turn, a row moved into a gap by a leave), reading the turn's live history and draw count, so a
    row's draws are the same whichever rows it shares the batch with. Calling the step itself (`step(tokens)`)
    still gives plain logits.
    """

    def __init__(self, step, rows: int, device: torch.device | str):
        self.step = step
        self.sampler = DeviceSampler(rows, device)
        self._owners: list[object] = [None] * rows  # the RowSampling each sampler row was set from
        self._greedy = object()  # the owner of a row whose turn samples itself (no RowSampling)

    @property
    def graphs(self) -> bool:
        """Whether the step is replayed from CUDA graphs."""
        return bool(getattr(self.step, "enabled", False))

    def __call__(self, token_ids: list[int]) -> torch.Tensor:
        return self.step(token_ids)

    def decode(self, token_ids: list[int], samplings: list) -> tuple[torch.Tensor, list[int] | None]:
        """Feed `token_ids` (one per row) and draw each row's next token with `samplings[b]` (None: that row is
        answered with logits, its turn samples itself). Returns `(logits [rows, vocab] on the device, ids)`, ids
        None when no row has settings."""
        self._own(token_ids, samplings)
        try:
            if all(sampling is None for sampling in samplings):
                return self.step(token_ids), None
            logits, ids, drawn = self.step.sampled(token_ids, self.sampler)
            self._drew(len(token_ids), drawn)
            ids = ids.tolist()  # the one device->host copy of the step
        except BaseException:
            # The scheduler retries the rows eagerly and their turns sample the token: every row is set again
            # from its turn's history next time.
            self._owners = [None] * len(self._owners)
            raise
        return logits, ids

    def _drew(self, n: int, drawn: int) -> None:
        """A draw advanced sampler rows `n..drawn-1` too (the padded rows of a replayed bucket): their state no
        longer matches any turn, so whichever turn takes such a row next sets it again."""
        for row in range(n, drawn):
            self._owners[row] = None

    def _own(self, token_ids: list[int], samplings: list) -> None:
        """Set every sampler row whose turn changed (see the class docstring)."""
        if len(samplings) != len(token_ids):
            raise ValueError(f"{len(samplings)} sampling settings for {len(token_ids)} rows")
        for b, sampling in enumerate(samplings):
            owner = self._greedy if sampling is None else sampling
            if self._owners[b] is not owner:
                self._set(b, sampling)
                self._owners[b] = owner

    def _set(self, row: int, sampling) -> None:
        if sampling is None:
            self.sampler.set_row(row, None, seed=0)
            return
        sampling.seed = self.sampler.set_row(row, sampling.params, seed=sampling.seed, history=sampling.recent_ids,
                                             step=sampling.drawn)
