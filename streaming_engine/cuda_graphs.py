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

The sampler's draw is recorded behind the forward pass, in the same graph (`GraphedDecodeStep.sampled`): on a small
model the eager draw (penalty, sort, cumulative sum, noise, argmax: about 150 kernels) costs as many launches as
several decoder layers. A draw's ops depend on two host-side flags only (`DeviceSampler.mode`: does any live row
penalize, does any draw at random), so there is one graph per `(bucket, penalized, random)`; the draw keys its
noise on device counters (`device_sampling.uniform_noise`), so a replay draws what the eager sampler would. Warm-up
runs draw for real, so the sampler's state is saved before them and put back after (`DeviceSampler.snapshot`);
the record of the last draw (what `retract` takes back, for an overlapped step) is the graph's own output tensors. A padded row
draws too and its state is then stale: `device_sampling.SampledDecodeStep` sets such rows again before a turn uses
them. Should recording the draw fail, sampling stays outside the graphs (one logged line) and the forward pass is
still replayed. Should recording a forward pass fail, the step stops capturing and runs uncaptured (one logged
line; the decode path then reads "static"): a model with an op that syncs with the host mid-step must still serve.

How a body is recorded is one callable, `CudaGraphRecorder` (`recorder(body, warmup) -> (replay, outputs)`); a test
can pass another with the same contract (outputs are fixed tensors that each `replay()` refreshes) to exercise the
bookkeeping around capture on a machine without CUDA.

Selection lives in `StaticStepConfig.cuda_graphs`: "auto" captures on CUDA and stays eager elsewhere, "on"
insists (a typed error without CUDA), "off" never captures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .defaults import CUDA_GRAPH_MODES, DEFAULT_CUDA_GRAPHS  # their home: defaults.py (torch-free, for --help)
from .static_step import StaticDecodeStep
from .validate import check_choice, check_int

logger = logging.getLogger(__name__)

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


class CudaGraphRecorder:
    """Records bodies as CUDA graphs that share one memory pool (a step's graphs never run at the same time)."""

    def __init__(self):
        self.pool = None

    def __call__(self, body: Callable[[], Any], warmup: int) -> tuple[Callable[[], None], Any]:
        """Run `body` `warmup` times on a side stream (lazy kernel and library set-up, as torch's CUDA graph notes
        ask), then record it as one `torch.cuda.CUDAGraph`. Returns `(replay, outputs)`: `outputs` is what the
        recorded call returned, tensors owned by the graph that every `replay()` overwrites in place."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                body()
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = body()
        return graph.replay, outputs


class GraphedDecodeStep:
    """A `StaticDecodeStep` replayed from one CUDA graph per row bucket (or run eagerly where graphs are off).

    Call it like the step: `logits = graphed(token_ids)`, `[rows, vocab]`, a copy the next step does not
    overwrite; `sampled(token_ids, sampler)` also draws every row's token in the same replay. `captured` lists the
    buckets recorded so far (with a draw or without), `captured_sampled` the `(bucket, penalized, random)` graphs
    that also draw; `sampling_outside` says why draws stay eager, when recording one failed, and `graphs_off` why
    nothing is captured any more, when recording a forward pass failed (`enabled` is then False). `recorder` is how
    a body is recorded (a `CudaGraphRecorder` unless given; see the module docstring).
    """

    def __init__(self, step: StaticDecodeStep, config: StaticStepConfig | None = None,
                 recorder: Callable | None = None):
        self.step = step
        self.config = config or StaticStepConfig()
        self.enabled = self.config.captures_on(step.device)
        self.recorder = recorder or CudaGraphRecorder()
        self.sampling_outside: str | None = None
        self.graphs_off: str | None = None  # why the step stopped capturing (a forward pass failed to record)
        self._graphs: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}
        self._sampled: dict[tuple[int, bool, bool], tuple[Callable[[], None], tuple]] = {}
        self._buffers: tuple | None = None  # addresses the graphs were recorded against
        self._sampler = None  # the DeviceSampler the sampled graphs read and write

    @property
    def captured(self) -> list[int]:
        return sorted(set(self._graphs) | {key[0] for key in self._sampled})

    @property
    def captured_sampled(self) -> list[tuple[int, bool, bool]]:
        return sorted(self._sampled)

    def _addresses(self) -> tuple:
        cache = self.step.cache
        counts = () if self._sampler is None or self._sampler.counts is None else (self._sampler.counts.data_ptr(),)
        return tuple(t.data_ptr() for t in cache._keys + cache._values) + (cache._valid.data_ptr(),) + counts

    def _record(self, body: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        return self.recorder(body, self.config.warmup)

    def _check_buffers(self) -> None:
        addresses = self._addresses()
        if addresses != self._buffers:  # the cache (or the penalty's counts) moved: recorded pointers are stale
            self._graphs.clear()
            self._sampled.clear()
            self._buffers = addresses

    @torch.inference_mode()
    def launch(self, token_ids: list[int], device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Stage and run (or replay) one step, *without* accounting it: the caller then calls `step.finish()` or
        `step.abort()`. `device_tokens` as in `StaticDecodeStep.prepare`. Returns the live rows' logits, a copy
        the next replay does not overwrite. On failure the step is aborted here."""
        step = self.step
        bucket = step.prepare(token_ids, device_tokens)
        try:
            return self._logits(bucket)[: len(token_ids)]
        except BaseException:
            step.abort()
            raise

    def _logits(self, bucket: int) -> torch.Tensor:
        if self.enabled:
            self._check_buffers()
        if not self._forward_recorded(bucket):
            return self.step.run(bucket)
        replay, logits = self._graphs[bucket]
        replay()
        return logits.clone()

    def _forward_recorded(self, bucket: int) -> bool:
        """Whether `bucket`'s forward pass has a graph, recording it first if need be. A forward pass that fails
        to record (a model whose ops sync with the host, such as an index built from a Python list on some
        transformers releases) turns capture off for good: `enabled` goes False, `graphs_off` says why in the one
        logged line, and the step runs uncaptured from then on (the decode path then reads "static"). The failed
        warm-ups and recording ran the step on its staged inputs, which a run repeats unchanged (idempotent)."""
        if not self.enabled:
            return False
        if bucket not in self._graphs:
            try:
                self._graphs[bucket] = self._record(lambda: self.step.run(bucket))  # [bucket, vocab], the graph's
            except Exception as error:  # noqa: BLE001 - the step goes on uncaptured
                self.enabled = False
                self.graphs_off = f"{type(error).__name__}: {error}"
                self._graphs.clear()
                self._sampled.clear()
                logger.warning("the static step runs without CUDA graphs (recording bucket %d failed: %s)", bucket,
                               self.graphs_off)
                return False
        return True

    @torch.inference_mode()
    def launch_sampled(self, token_ids: list[int], sampler, device_tokens: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`launch`, and each row's next token drawn by `sampler` (a `device_sampling.DeviceSampler`), in the
        same replay where graphs run. Returns `(logits [n, vocab], ids [n], drawn)`, device tensors the next
        replay does not overwrite; `drawn` is how many sampler rows the draw advanced (the bucket when the draw
        was replayed, else n). Not accounted: the caller then calls `step.finish()` or `step.abort()`."""
        step, n = self.step, len(token_ids)
        bucket = step.prepare(token_ids, device_tokens)
        try:
            if not self.enabled or self.sampling_outside is not None:
                return self._draw_after(bucket, n, sampler)
            if self._sampler is None:
                self._sampler = sampler
            elif sampler is not self._sampler:
                raise ValueError("a GraphedDecodeStep draws with one DeviceSampler")
            mode = sampler.mode(n)
            sampler.ready(step.vocab, penalized=mode[0])
            self._check_buffers()
            key = (bucket, *mode)
            # The forward pass is recorded alone first, so that a failure is put down to it, not to the draw.
            if key not in self._sampled and not (self._forward_recorded(bucket) and self._record_sampled(key, sampler)):
                return self._draw_after(bucket, n, sampler)
            replay, (logits, ids, record) = self._sampled[key]
            replay()
            sampler.last_draw = record  # what retract takes back: this replay's draw, held in the graph's outputs
            return logits[:n].clone(), ids[:n].clone(), bucket
        except BaseException:
            step.abort()
            raise

    def _draw_after(self, bucket: int, n: int, sampler) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The draw outside the graphs, eagerly after the (replayed or uncaptured) forward pass."""
        logits = self._logits(bucket)[:n]
        return logits, sampler.sample(logits), n

    def _record_sampled(self, key: tuple[int, bool, bool], sampler) -> bool:
        """Record the forward pass and the draw for `key` as one graph; False (and `sampling_outside` set, one
        logged line) when that fails, after which draws stay eager."""
        bucket, penalized, random = key

        def body():
            logits = self.step.run(bucket)  # [bucket, vocab]
            ids, record = sampler.draw(logits, penalized, random)  # ids [bucket]
            return logits, ids, record

        saved = sampler.snapshot()
        try:
            self._sampled[key] = self._record(body)
        except Exception as error:  # noqa: BLE001 - the draw stays outside the graphs; the forward pass does not
            self.sampling_outside = f"{type(error).__name__}: {error}"
            logger.warning("sampling stays outside the CUDA graphs (recording the draw failed: %s)",
                           self.sampling_outside)
            return False
        finally:
            sampler.restore(saved)  # the warm-ups' draws (and an eager recorder's recorded one) are taken back
        return True

    @torch.inference_mode()
    def sampled(self, token_ids: list[int], sampler) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`launch_sampled` and account the step."""
        result = self.launch_sampled(token_ids, sampler)
        self.step.finish()
        return result

    @torch.inference_mode()
    def __call__(self, token_ids: list[int]) -> torch.Tensor:
        result = self.launch(token_ids)
        self.step.finish()
        return result
