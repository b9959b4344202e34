"""The backend seam: what the engine asks of whatever runs the model, and nothing else.

The scheduler decides WHAT runs (policy: which turns get a prompt slice or a decode row this iteration, the
budget, stops, retrying each row alone when a shared pass fails, see `scheduler.py`); the backend, which is the
scheduler's *runner*, decides HOW (where a conversation's keys live, how rows become one forward pass, how a row's
tokens go home when its reply ends). The engine, the sessions and the scheduler hold a `Backend` and ask it; none
of them tests which backend it is. `factory.backend_for` is the one place that looks at the model to pick one.

A backend supplies:

* `max_positions`: most tokens one conversation's cache may hold (None: no limit known);
* `input_device`: where a turn's token ids go (`Runtime.device`);
* `new_cache(...)`: an empty cache for one conversation, as the session keeps it (the contract of
  `cache.StartRecentKVCache`: sizes, `pin`, `evict_for_space`, `evict_range`, counters, `stream_positions`,
  `kv_bytes`);
* `forward(rows)`: the runner's one pass, each `(cache, ids)` row's last-token logits (`[vocab]`); `packs_rows`
  says whether several rows of any kind share one pass (else they go one after another, or a backend shares
  those it can), `pass_tokens` / `max_rows`
  bound such a pass; a `batchable` backend also makes the batch decoding rows join (`new_batch`) and steps it
  (`forward_batch`); `turn_over(cache)` is told when a reply ends;
* `make_scheduler(...)`: the worker for it (`scheduler.make_scheduler` picks the policy from the capabilities);
* `describe()`: what the status line shows; `close()`: free native memory now.

How to add one: docs/backends.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..defaults import DEFAULT_CUDA_GRAPHS, DEFAULT_DECODE_STEP, DEFAULT_OVERLAP
from ..scheduler import Scheduler, make_scheduler


@dataclass(frozen=True)
class Description:
    """What the app's status line says of a backend: where inputs go, its thread count, the placement phrases."""

    device: torch.device
    threads: int
    where: tuple[str, ...]  # e.g. ("cpu (all on cpu)", "float32") or ("cpu, GGUF Q4_1 (llama.cpp)",)


class Backend(ABC):
    """One loaded model as the engine runs it (see the module docstring). Subclasses: `hf.TransformersBackend`,
    `llama.LlamaCppBackend`."""

    #: The `--backend` name (`choice.BACKENDS`).
    name: str = ""
    #: Several conversations' rows (prompt slices and decode tokens) share one `forward` pass.
    packs_rows: bool = False
    #: The worker thread's name (what a stack dump shows).
    worker_name: str = "streaming-engine"

    def __init__(self, model):
        self.model = model

    @property
    @abstractmethod
    def max_positions(self) -> int | None:
        """Most tokens one conversation's cache may hold on this backend (None: the model states no limit)."""

    @property
    @abstractmethod
    def input_device(self) -> torch.device:
        """Where a turn's token ids go."""

    @property
    def batchable(self) -> bool:
        """Whether decoding conversations may share a batched pass (`scheduler.BatchedScheduler`)."""
        return False

    @property
    def pass_tokens(self) -> int | None:
        """Most tokens one `forward` pass takes, all rows together (None: no limit of the backend's own)."""
        return None

    @property
    def max_rows(self) -> int | None:
        """Most rows one `forward` pass takes (None: no limit of the backend's own)."""
        return None

    @abstractmethod
    def new_cache(self, start_size: int, recent_size: int, *, pos_shift: bool = True, eviction: str = "tokens",
                  evict_block: int = 1):
        """An empty cache for one conversation, as its `Session` keeps it; `pos_shift=False` is dense's plain
        growing cache (positions are stream positions, nothing evicted)."""

    @abstractmethod
    def forward(self, rows: list[tuple[object, list[int]]]) -> list[torch.Tensor]:
        """Feed each `(cache, ids)` row on its own cache; each row's last-token logits `[vocab]`. Raises when the
        pass fails with no row fed (the scheduler then retries each row alone); a backend that feeds some rows in
        passes of their own answers such a row that fails with its exception instead, once other rows went in (they
        must not be fed twice). Rows that can share one pass may (transformers: fresh conversations' first prompt
        chunks, `generation.padded_prefill_rows`)."""

    def new_batch(self, max_batch: int, *, decode_step: str = DEFAULT_DECODE_STEP,
                  cuda_graphs: str = DEFAULT_CUDA_GRAPHS, overlap: str = DEFAULT_OVERLAP):
        """`(batch, static_step)`: the batch decoding rows join (`batchable` backends only:
        `batch_cache.BatchedSinkCache`, whose rows are the caches `new_cache` made) and, for `decode_step="static"`
        (or "auto" where the backend prefers it) where the backend has one, a fixed-shape step over the whole batch
        that also samples its rows (`decode(tokens, samplings) -> (logits [rows, vocab], ids)`, `graphs`: whether
        it replays CUDA graphs; `device_sampling.SampledDecodeStep`, or per `overlap` an
        `overlap.OverlappedDecodeStep`, `overlaps` True, which launches the next step before it returns), else None
        (the scheduler then calls `forward_batch`)."""
        raise NotImplementedError(f"the {self.name} backend does not batch decode rows")

    def forward_batch(self, batch, tokens: list[int], rows=None) -> torch.Tensor:
        """One decode step for `batch`'s rows (or the `rows` range of them), one token each: logits `[rows, vocab]`."""
        raise NotImplementedError(f"the {self.name} backend does not batch decode rows")

    def turn_over(self, cache) -> None:  # noqa: B027 - a hook: most backends borrow nothing
        """A reply on `cache` ended (or the turn failed): whatever the backend borrowed for it goes back."""

    def make_scheduler(self, kind: str, *, max_batch: int, prefill_budget: int,
                       decode_step: str = DEFAULT_DECODE_STEP, cuda_graphs: str = DEFAULT_CUDA_GRAPHS,
                       overlap: str = DEFAULT_OVERLAP) -> Scheduler:
        """The worker that serves this backend's turns (`"batched"` or `"round-robin"`)."""
        return make_scheduler(kind, self, max_batch=max_batch, prefill_budget=prefill_budget,
                              decode_step=decode_step, cuda_graphs=cuda_graphs, overlap=overlap)

    @abstractmethod
    def describe(self) -> Description:
        """What the status line shows (see `Description`)."""

    def close(self) -> None:  # noqa: B027 - a hook: most backends hold no native memory
        """Free the backend's native memory now (transformers: nothing to do); later passes may raise."""
