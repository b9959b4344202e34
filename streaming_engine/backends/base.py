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
* `forward(rows)`: the runner's one prompt pass, each `(cache, ids)` row's last-token logits (`[vocab]`);
  `packs_rows` says whether several rows of any kind share one pass (else they go one after another, or a backend
  shares those it can), `pass_tokens` / `max_rows` bound such a pass; `forward_with_breaks(rows, between_layers)`,
  the same pass calling back between decoder layers where it can pause (default: it cannot);
* `new_decode_batch(...)`: the `DecodeBatch` decoding rows live in, owned by the backend (which rows it holds
  between steps, `join`, one `step` over its rows, `step_alone` for the scheduler's retry, `drop` after a failed
  row, `path` for `/metrics`). The default, `RowPasses`, decodes rows through `forward` (one packed pass where the
  backend packs rows, else one row per pass); a backend with a batched or captured step supplies its own
  (`hf.TransformersBackend`: a `BatchedSinkCache`, or the static step replayed from CUDA graphs);
* `turn_over(cache)`: told when a reply ends (a row borrowed for it goes back);
* `make_scheduler(...)`: the worker for it (`scheduler.make_scheduler`: the one loop, its budget from the
  capabilities);
* `describe()`: what the status line shows; `close()`: free native memory now.

How to add one: docs/backends.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from ..defaults import DEFAULT_CUDA_GRAPHS, DEFAULT_DECODE_STEP, DEFAULT_OVERLAP
from ..scheduler import DECODE_PATHS, Scheduler, make_scheduler


@dataclass(frozen=True)
class Description:
    """What the app's status line says of a backend: where inputs go, its thread count, the placement phrases."""

    device: torch.device
    threads: int
    where: tuple[str, ...]  # e.g. ("cpu, 269.0 MB of weights", "bfloat16") or ("cpu, GGUF Q4_1 (llama.cpp)",)


class DecodeBatch(ABC):
    """Where a backend's decoding rows live between steps, and the step over them: what `scheduler.Scheduler`'s
    decode round asks (which turns get a row is the scheduler's policy; how the rows run is this object's).

    A step's `requests` are `generation.Decode` requests (`cache`, `token_id`, `sampling`); each answer is the
    row's logits `[vocab]` or a `generation.Sampled` token (a step that samples on the device)."""

    #: Most rows one step takes.
    rows_per_pass: int = 1
    #: Which of `scheduler.DECODE_PATHS` this step is (the app's footer and `/metrics` show it).
    path: str = DECODE_PATHS[0]

    def holds(self, cache) -> bool:
        """Whether `cache` has a row here already (it then decodes in every step until its reply ends)."""
        return False

    def join(self, cache) -> None:  # noqa: B027 - a hook: a batch that holds no rows has nothing to do
        """Give `cache` a row before its first step; raises for a cache this batch cannot take (that turn fails
        alone)."""

    @abstractmethod
    def step(self, requests: list) -> list:
        """One pass for these rows (those this batch holds, and the newly joined): each row's answer, in order.
        Raises when the pass fails (the scheduler then retries each row with `step_alone`)."""

    @abstractmethod
    def step_alone(self, request):
        """`request`'s row in a pass of its own: its logits; raises with that conversation's error."""

    def drop(self, cache) -> None:  # noqa: B027 - a hook: nothing to drop where rows are not kept
        """`cache`'s step failed: forget whatever half-written step its row holds."""


class RowPasses(DecodeBatch):
    """Decode rows through the backend's `forward`, `(cache, [token])` rows on each conversation's own cache:
    `rows_per_pass` rows in one call (one packed pass where the backend packs rows), no row kept between steps."""

    def __init__(self, backend: Backend, rows_per_pass: int):
        self.backend, self.rows_per_pass = backend, rows_per_pass

    def step(self, requests: list) -> list:
        return self.backend.forward([(r.cache, [r.token_id]) for r in requests])

    def step_alone(self, request):
        return self.backend.forward([(request.cache, [request.token_id])])[0]


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
        """Whether decoding conversations may share a batched pass (a `DecodeBatch` of more than one row)."""
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

    def forward_with_breaks(self, rows: list[tuple[object, list[int]]], between_layers: Callable[[], None]
                            ) -> list[torch.Tensor]:
        """`forward(rows)`, calling `between_layers()` where the pass may pause: between two decoder layers, on the
        worker thread, with nothing of the pass in flight but its activations. The callback may run other
        conversations' passes (on their own caches) before this one goes on, which is how a new turn cuts into a
        long paste's pass (`Scheduler._cut_in`); this pass never calls it again until the callback returns. A backend
        whose pass cannot pause (llama.cpp: one `llama_decode`) never calls it: this default."""
        return self.forward(rows)

    def new_decode_batch(self, max_rows: int, *, round_robin: bool = False, decode_step: str = DEFAULT_DECODE_STEP,
                         cuda_graphs: str = DEFAULT_CUDA_GRAPHS, overlap: str = DEFAULT_OVERLAP) -> DecodeBatch:
        """The batch decoding rows live in, at most `max_rows` rows per step; `round_robin`: the one-row-per-pass
        baseline on each conversation's own cache. `decode_step` / `cuda_graphs` / `overlap` choose a static,
        captured or overlapped step where the backend has one (validated by the scheduler). The default: `RowPasses` through `forward`, rows
        packed into one pass where the backend packs rows (`packs_rows`, up to `max_rows`), else one per pass."""
        rows = min(max_rows, self.max_rows or max_rows) if self.packs_rows and not round_robin else 1
        return RowPasses(self, rows)

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

    def cache_state(self, cache) -> tuple[dict, int]:
        """`(contents, kv_bytes)`: what of a conversation's `cache` travels to another process (picklable, tensors
        on the CPU, independent copies), taken between turns, and the bytes of keys and values in it
        (`handoff.capture`; ZeroGPU, `remote.py`)."""
        raise NotImplementedError(f"the {self.name} backend cannot hand a conversation to another process")

    def load_cache_state(self, cache, contents: dict, *, onto_devices: bool) -> None:
        """Make `cache` hold `contents` (from `cache_state`); `onto_devices`: where the model runs, else kept on the
        CPU by a process that only holds conversations (`handoff.adopt`)."""
        raise NotImplementedError(f"the {self.name} backend cannot hand a conversation to another process")

    def close(self) -> None:  # noqa: B027 - a hook: most backends hold no native memory
        """Free the backend's native memory now (transformers: nothing to do); later passes may raise."""
