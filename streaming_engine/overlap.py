"""Overlapping the host with the device on the static decode path: step n+1 is launched before the turns are
answered with step n's tokens, so the device computes while the host does a step's bookkeeping.

Without overlap, every decode step ends in a wait: the host copies the drawn ids back (`tolist`), and only then
advances each turn's coroutine (the token's text and stop strings, `textstream.TextStream`; the event for its
reader; the eviction and stop checks of `generation.generate_reply`) and stages the next step. On a GPU all of
that is time the device sits idle. `OverlappedDecodeStep` (a `device_sampling.SampledDecodeStep`) reorders one
step, as vLLM's and SGLang's overlap schedulers do, with one step of lag:

1. the step for the current tokens runs and the sampler draws the rows' next ids, on the device;
2. the ids start their copy into pinned host memory (non-blocking, with a CUDA event);
3. the *next* step is launched at once with those ids as its input ids, copied device to device (no host round
   trip), and its draws queued behind it; its bookkeeping is held aside, not yet accounted in the cache;
4. the host waits for the copy only (the device keeps computing the next step) and returns the ids: the scheduler
   answers the turns with them while the next step runs.

At the next call the launched step is *taken* when nothing changed: the same conversations in the same rows with
the same counters (no join, leave or eviction), each asking to feed exactly the token that step fed, with the
same sampling settings. Then it is accounted (`StaticDecodeStep.finish`) and its draws are the answer. Otherwise it
is *taken back* before anything changes: the cache calls `rewind` before any row joins, leaves, evicts or takes an
eager step (`static_step.StaticSinkCache.before_change`); its cells are released (`abort`) and its draws
retracted (`DeviceSampler.retract`), so the rows and the sampler are exactly as if it never ran, and the step is
run again the plain way. A turn that ended at step n (end of sequence, length, a stop string, the user's stop)
leaves its row, which takes the launched step back first: the token drawn for it at step n+1 is never seen by
anyone. Replies are therefore the plain loop's token for token; what overlap costs is one discarded step per
join or end, and what it buys is the host's per-step work hidden behind the device's.

A step is launched ahead only when every row samples on the device (a turn that samples itself needs the logits
first) and every row has a free column (a full row must evict first, which the turn decides).

Boundary: the order of device work and host bookkeeping for one batch; which turns decode is the scheduler's, the
step and its graphs are `static_step.py` / `cuda_graphs.py`, the draws `device_sampling.py`. The mode's home is
`defaults.OVERLAP_MODES`; `resolve_overlap` says what "auto" means on a device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .device_sampling import SampledDecodeStep

logger = logging.getLogger(__name__)

#: Devices where overlap="auto" overlaps: CUDA, whose kernels run asynchronously to the host. On the CPU every op
#: finishes before the next line runs, so launching ahead hides nothing and only adds the discarded steps.
AUTO_OVERLAP_DEVICES = ("cuda",)


def resolve_overlap(overlap: str, device: torch.device | str) -> bool:
    """Whether the static step overlaps for `overlap` (one of `defaults.OVERLAP_MODES`) on `device`."""
    if overlap == "auto":
        return torch.device(device).type in AUTO_OVERLAP_DEVICES
    return overlap == "on"


@dataclass
class _Launched:
    """A step launched ahead: what it assumed (rows, their counters, the turns' settings, the tokens it fed) and
    what it produced (logits and draws, on the device), with the cache's bookkeeping held aside."""

    rows: list
    counters: list[tuple[int, int, int]]
    samplings: list
    tokens: list[int] | None  # the ids it fed, known on the host once their copy lands
    bookkeeping: dict
    bucket: int
    logits: torch.Tensor
    ids: torch.Tensor


def _counters(conv) -> tuple[int, int, int]:
    return conv._held, conv._evicted, conv._head


class OverlappedDecodeStep(SampledDecodeStep):
    """A `SampledDecodeStep` that launches the next step before returning this one's ids (module docstring).

    `step` is a `cuda_graphs.GraphedDecodeStep`. `launched_ahead`, `taken` and `taken_back` count the steps
    launched early, used, and discarded (tests and benchmarks read them)."""

    overlaps = True

    def __init__(self, step, rows: int, device: torch.device | str):
        super().__init__(step, rows, device)
        self.static = step.step  # the StaticDecodeStep under the graphs
        self.cache = self.static.cache
        self.cache.before_change = self.rewind
        self._launched: _Launched | None = None
        pinned = self.static.device.type == "cuda"
        self._host_ids = torch.zeros(rows, dtype=torch.long, pin_memory=pinned)
        self._copied = torch.cuda.Event() if pinned else None
        self.launched_ahead = self.taken = self.taken_back = 0

    def rewind(self) -> None:
        """Take back the step launched ahead, if any: its cells are free again and its draws retracted."""
        launched, self._launched = self._launched, None
        if launched is None:
            return
        self.cache._step, self.static.bucket = launched.bookkeeping, launched.bucket
        self.static.abort()
        self.sampler.retract()
        self.taken_back += 1

    def _take(self, token_ids: list[int], samplings: list) -> _Launched | None:
        """The step launched ahead when it is the one these rows ask for (module docstring), else None."""
        launched = self._launched
        rows = self.cache.rows
        if launched is None or launched.tokens != list(token_ids) or len(launched.rows) != len(rows):
            return None
        if any(a is not b for a, b in zip(launched.rows, rows)):
            return None
        if any(a is not b for a, b in zip(launched.samplings, samplings)):
            return None
        if any(_counters(conv) != counters for conv, counters in zip(rows, launched.counters)):
            return None
        return launched

    def decode(self, token_ids: list[int], samplings: list) -> tuple[torch.Tensor, list[int] | None]:
        launched = self._take(token_ids, samplings)
        try:
            if launched is not None:
                self._launched = None
                self.cache._step, self.static.bucket = launched.bookkeeping, launched.bucket
                self.static.finish()  # its tokens now count: the rows are where the plain step would leave them
                logits, ids = launched.logits, launched.ids
                self.taken += 1
            else:
                self.rewind()
                self._own(token_ids, samplings)
                if all(sampling is None for sampling in samplings):
                    return self.step(token_ids), None
                logits, ids, drawn = self.step.sampled(token_ids, self.sampler)
                self._drew(len(token_ids), drawn)
            n = len(token_ids)
            host = self._host_ids[:n]
            host.copy_(ids, non_blocking=True)
            if self._copied is not None:
                self._copied.record()
            if all(sampling is not None for sampling in samplings):
                self._launch_ahead(ids, list(samplings))
            if self._copied is not None:
                self._copied.synchronize()  # the ids only: the step launched ahead keeps running
            drawn = host.tolist()
            if self._launched is not None:
                self._launched.tokens = drawn
        except BaseException:
            self.rewind()
            self._owners = [None] * len(self._owners)  # as the plain step: set again from the turns next time
            raise
        return logits, drawn

    def _launch_ahead(self, ids: torch.Tensor, samplings: list) -> None:
        rows = list(self.cache.rows)
        if any(conv._held >= conv.cache_size for conv in rows):
            return  # a full row evicts before its next token, which its turn decides: no step ahead
        logits, drawn, advanced = self.step.launch_sampled([0] * len(rows), self.sampler, device_tokens=ids)
        self._drew(len(rows), advanced)
        # Held aside: the cache must look to the turns as it will after the plain step (counters unchanged), and
        # stays free to change; a change calls `rewind` first.
        bookkeeping, self.cache._step = self.cache._step, None
        self._launched = _Launched(rows, [_counters(conv) for conv in rows], samplings, None, bookkeeping,
                                   self.static.bucket, logits, drawn)
        self.launched_ahead += 1
