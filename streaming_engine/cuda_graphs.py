"""CUDA graphs for the static decode step: each row bucket's forward pass captured once, then replayed.

A decode step of a small model on a big GPU is bound by kernel launches (hundreds per step, each a few
microseconds of Python and driver work), not by the GPU. `StaticDecodeStep.run` has fixed shapes and reads
everything that changes from persistent device tensors, so its kernels can be recorded once per bucket
(`torch.cuda.CUDAGraph`) and replayed with one launch. What is not per-step stays outside the graph, eagerly:
staging the inputs (`prepare`), joins, leaves, evictions and their key re-rotation, all of which write the same
buffers the graph reads, in place.

Capture happens the first time a bucket is used, on that step's own staged inputs: the warm-up runs and the
recorded run write the same key/value into the same column and mark the same cell valid, so running them before
the real replay changes nothing (the step is idempotent for fixed inputs). If the cache's buffers move (a
`release()` and a new allocation), the recorded graphs are dropped and recaptured.

Selection lives in `StaticStepConfig.cuda_graphs`: "auto" captures on CUDA and stays eager elsewhere, "on"
insists (a typed error without CUDA), "off" never captures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .defaults import CUDA_GRAPH_MODES, DEFAULT_CUDA_GRAPHS  # their home: defaults.py (torch-free, for --help)
from .static_step import StaticDecodeStep
from .validate import check_choice, check_int

#: `CudaGraphsUnavailable.code`.
CUDA_GRAPHS_UNAVAILABLE = "cuda_graphs_unavailable"


class CudaGraphsUnavailable(RuntimeError):
    """cuda_graphs="on" where CUDA graphs cannot run (no CUDA, or the step is not on a CUDA device)."""

    code = CUDA_GRAPHS_UNAVAILABLE

    def __init__(self, message: str):
        super().__init__(f"{CUDA_GRAPHS_UNAVAILABLE}: {message}")


@dataclass
class StaticStepConfig:
    """How the static step runs. `cuda_graphs`: "auto" | "on" | "off" (see the module docstring);
    `warmup`: eager runs of a bucket before it is captured (lazy kernel and library initialisation)."""

    cuda_graphs: str = DEFAULT_CUDA_GRAPHS
    warmup: int = 2

    def __post_init__(self):
        check_choice("cuda_graphs", self.cuda_graphs, CUDA_GRAPH_MODES)
        check_int("warmup", self.warmup, 1)
        if self.cuda_graphs == "on" and not torch.cuda.is_available():
            raise CudaGraphsUnavailable("cuda_graphs='on' needs CUDA, and torch sees no CUDA device")

    def captures_on(self, device: torch.device) -> bool:
        """Whether a step on `device` is captured (raises for "on" off CUDA)."""
        if self.cuda_graphs == "off":
            return False
        if device.type != "cuda":
            if self.cuda_graphs == "on":
                raise CudaGraphsUnavailable(f"cuda_graphs='on' but the model runs on {device}")
            return False
        return True


class GraphedDecodeStep:
    """A `StaticDecodeStep` replayed from one CUDA graph per row bucket (or run eagerly where graphs are off).

    Call it like the step: `logits = graphed(token_ids)`, `[rows, vocab]`, a copy the next step does not
    overwrite. `captured` lists the buckets recorded so far.
    """

    def __init__(self, step: StaticDecodeStep, config: StaticStepConfig | None = None):
        self.step = step
        self.config = config or StaticStepConfig()
        self.enabled = self.config.captures_on(step.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._buffers: tuple | None = None  # addresses the graphs were recorded against

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def _addresses(self) -> tuple:
        cache = self.step.cache
        return tuple(t.data_ptr() for t in cache._keys + cache._values) + (cache._valid.data_ptr(),)

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream (as torch's CUDA graph notes ask), then record on it.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.config.warmup):
                self.step.run(bucket)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.step.run(bucket)  # [bucket, vocab], memory owned by the graph
        return graph, logits

    @torch.inference_mode()
    def launch(self, token_ids: list[int], device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Stage and run (or replay) one step, *without* accounting it: the caller then calls `step.finish()` or
        `step.abort()`. `device_tokens` as in `StaticDecodeStep.prepare`. Returns the live rows' logits, a copy
        the next replay does not overwrite. On failure the step is aborted here."""
        step = self.step
        bucket = step.prepare(token_ids, device_tokens)
        try:
            if not self.enabled:
                return step.run(bucket)[: len(token_ids)]
            addresses = self._addresses()
            if addresses != self._buffers:  # the cache was reallocated: recorded pointers are stale
                self._graphs.clear()
                self._buffers = addresses
            if bucket not in self._graphs:
                self._graphs[bucket] = self._capture(bucket)
            graph, logits = self._graphs[bucket]
            graph.replay()
            return logits[: len(token_ids)].clone()
        except BaseException:
            step.abort()
            raise

    @torch.inference_mode()
    def __call__(self, token_ids: list[int]) -> torch.Tensor:
        result = self.launch(token_ids)
        self.step.finish()
        return result
