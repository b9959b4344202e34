"""Sampling that stays on the device: a whole batch's next tokens chosen by tensor ops, no host round trip.

`sampling.Sampler` draws one row at a time on the host side of the loop (`.item()` per row, a `torch.Generator`
per turn), which forces a device->host sync per row per step and cannot be captured in a CUDA graph. Here every
row's settings (temperature, top-k, top-p, seed) are device tensors, and the randomness is a *hash* of
`(seed, step, token id)` rather than a generator's state:

* **Gumbel-max.** `argmax(scores / T + g)` with `g = -log(-log(u))`, `u` uniform, draws exactly from
  `softmax(scores / T)`; restricting the argmax to the allowed tokens (top-k, top-p) draws from the renormalized
  restriction, the distribution the reference sampler draws from.
* **Counter-based noise.** `u` comes from an integer hash of the row's seed, the row's own step counter and the
  token id, so there is no generator state to advance on the host: the same seed and step always give the same
  token (replayable, graph-safe), and a row's draws do not depend on which other rows share the batch.
* **Rows differ.** Temperature 0 (greedy: plain argmax of the raw logits), top-k 0 (off) and top-p 1 (off) are
  per row, so one call serves a batch of mixed settings.

The hash works on 32-bit values held in int64 with multipliers below 2**31, so no product overflows and CPU and
CUDA compute the same bits. The order of the cuts follows `sampling.Sampler`: top-k on the raw scores, then the
temperature, then top-p on the tempered, top-k-restricted distribution (transformers' `TopPLogitsWarper` rule:
a token stays while the probability of the tokens ranked above it is below `top_p`).

Boundary: this module draws tokens from logits. The repetition penalty (which reads each row's history) stays
with `sampling.Sampler`; rows that need it are sampled there.
"""

from __future__ import annotations

import random

import torch

from .sampling import MAX_SEED

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31 (so a 32-bit value times one stays inside int64): Wellons' lowbias32 first
# constant, MurmurHash3's c2, MurmurHash2's m.
_MULTIPLIERS = (0x7FEB352D, 0x1B873593, 0x5BD1E995)
#: Bits of each uniform draw (a float32 holds 24 exactly).
_UNIFORM_BITS = 24


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
    keep[:, 0] = True  # the best token always stays (top_p > 0)
    allowed = torch.zeros_like(keep).scatter_(-1, order, keep)
    return scores / temp[:, None], allowed


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
    """Per-row sampling settings and step counters as device tensors for up to `rows` rows.

    `set_row` is called when a conversation takes a row (rare, host side); `sample` is the per-step call: it
    reads the settings, draws, and advances the sampled rows' counters, all on the device.
    """

    def __init__(self, rows: int, device: torch.device | str = "cpu"):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
        self.rows = rows
        self.device = torch.device(device)
        self.temperature = torch.zeros(rows, device=self.device)  # [rows] float32, 0 = greedy
        self.top_k = torch.zeros(rows, dtype=torch.long, device=self.device)  # [rows], 0 = off
        self.top_p = torch.ones(rows, device=self.device)  # [rows], 1 = off
        self.seed = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.step = torch.zeros(rows, dtype=torch.long, device=self.device)  # draws made by each row's turn
        # Host mirror of which rows draw at random: an all-greedy batch skips the sort and the noise without
        # asking the device (known when the settings are set, never read back).
        self._random = [False] * rows

    def set_row(self, row: int, params, seed: int | None = None) -> int:
        """Give `row` the settings of `params` (a `SamplingParams`) and restart its counter; returns the seed used
        (`seed`, else `params.seed`, else a fresh random one). Refuses a repetition penalty (see the module)."""
        if getattr(params, "repetition_penalty", 1.0) != 1.0:
            raise ValueError("DeviceSampler does not apply a repetition penalty: sample that row with Sampler")
        seed = params.seed if seed is None else seed
        if seed is None:
            seed = random.SystemRandom().randrange(MAX_SEED)
        self.temperature[row] = float(params.temperature)
        self.top_k[row] = int(params.top_k)
        self.top_p[row] = float(params.top_p)
        self.seed[row] = int(seed)
        self.step[row] = 0
        self._random[row] = params.temperature > 0
        return seed

    def move_row(self, source: int, target: int) -> None:
        """Row `source`'s settings and counter now belong to row `target` (a batch filling a gap on leave)."""
        for t in (self.temperature, self.top_k, self.top_p, self.seed, self.step):
            t[target] = t[source]
        self._random[target] = self._random[source]

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits `[n, vocab]` for rows `0..n-1` (n <= rows): their tokens `[n]` on the device; counters advance."""
        n = logits.shape[0]
        if n > self.rows:
            raise ValueError(f"{n} rows of logits for a sampler of {self.rows} rows")
        if not any(self._random[:n]):
            ids = logits.argmax(dim=-1)
            self.step[:n] += 1
            return ids
        ids = sample_tokens(logits, self.temperature[:n], self.top_k[:n], self.top_p[:n], self.seed[:n],
                            self.step[:n])
        self.step[:n] += 1
        return ids
