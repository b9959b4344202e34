"""Decode speed of the static step (with CUDA graphs where they run) against the eager batched step and `generate`.

Job: for each model shape (random weights built `from_config`: decode speed does not depend on the weights'
values, and EOS is ignored) and each row count, decode `--tokens` greedy tokens per row past a full sink cache
(every row evicts as it goes, as in a long chat) three ways, interleaved within each repeat:

* `static`: `StaticSinkCache` + `GraphedDecodeStep` (graphs per `--cuda-graphs`) + `DeviceSampler` (one
  device->host copy of the ids per step);
* `static-overlap`: `static` with the next step launched before the ids of this one are read back
  (`overlap.OverlappedDecodeStep`, every row a greedy `generation.RowSampling`); a step where a row is full (it
  evicts first) is not launched ahead, as in the engine (`steps_taken_ahead` counts the ones that were);
* `static-compile`: the same static step with its fixed-shape device work (`StaticDecodeStep.run`) under
  `torch.compile` instead of hand-captured graphs (`--compile-mode`: inductor's default on CPU, "reduce-overhead",
  i.e. inductor plus its own CUDA graphs, on CUDA), one compilation per row count, static shapes, graphs off;
* `eager`: `BatchedSinkCache` + `generation.forward_batch` + a host-side argmax, the scheduler's path on CPU;
* `generate`: plain `model.generate` with transformers' DynamicCache (no sinks, no eviction), the rows as one
  unpadded batch, as the reference transformers users get.

Warm-up steps (graph capture and compilation included; the first compiled call's seconds are recorded as
`compile_s`) are not timed; the median over `--repeats` is reported. Boundary: measures
only; the step, the graphs and the sampler live in `static_step.py`, `cuda_graphs.py`, `device_sampling.py`.

    python -m benchmarks.gpu_decode --device cuda --output assets/eval/gpu/static_step.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from streaming_engine.defaults import CUDA_GRAPH_MODES, DEFAULT_CUDA_GRAPHS

#: Model shapes (transformers LlamaConfig fields). `smollm2-135m`: HuggingFaceTB/SmolLM2-135M's architecture;
#: `llama-1b`: Llama-3.2-1B's (default RoPE instead of its llama3 scaling, which changes no cost);
#: `tiny`: a small shape for quick CPU runs.
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_theta=500000.0, max_position_embeddings=131072),
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=4096),
}
PATHS = ("static", "eager", "generate", "static-overlap", "static-compile")
#: The paths a run takes unless `--paths` says otherwise (compiling costs minutes on a CPU: asked for by name).
DEFAULT_PATHS = ("static", "eager", "generate")
#: `torch.compile` modes `static-compile` may use; "auto": "reduce-overhead" on CUDA, "default" elsewhere.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


def build_model(shape: str, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _conversations(model, args, rows: int, generator):
    """`rows` fresh conversations, each with a prompt that leaves the cache nearly full (so decoding evicts)."""
    import torch

    from streaming_engine.batch_cache import ConversationCache
    from streaming_engine.generation import forward
    from streaming_engine.hf_integration import enable_streaming_llm

    convs = []
    for _ in range(rows):
        solo = enable_streaming_llm(model, args.start_size, args.recent_size)
        conv = ConversationCache(solo)
        prompt = torch.randint(3, model.config.vocab_size, (args.prompt,), generator=generator).tolist()
        conv.evict_for_space(len(prompt))
        logits = forward(model, conv.solo, prompt)
        convs.append((conv, int(logits.argmax())))
    return convs


def _decode(batch, convs, steps: int, step_fn) -> None:
    tokens = [token for _, token in convs]
    for _ in range(steps):
        for conv in batch.rows:
            conv.evict_for_space(1)
        tokens = step_fn(tokens)


def _joined(batch, model, args, rows: int, generator):
    """`_conversations`, each joined to `batch`."""
    convs = _conversations(model, args, rows, generator)
    for conv, _ in convs:
        batch.join(conv)
    return convs


def _timed_decode(batch, convs, args, step_fn) -> float:
    """Seconds for `args.tokens` steps after `args.warmup` untimed ones (the device synchronized at both ends);
    the rows then leave `batch`, so the next repeat starts empty."""
    _decode(batch, convs, args.warmup, step_fn)
    _sync(args.device)
    began = time.perf_counter()
    _decode(batch, convs, args.tokens, step_fn)
    _sync(args.device)
    elapsed = time.perf_counter() - began
    for conv in list(batch.rows):
        batch.leave(conv, keep=False)
    return elapsed


def run_static(model, args, rows: int, generator, state: dict) -> float:
    """Seconds for `args.tokens` steps of `rows` rows through the static step (graphs per `--cuda-graphs`)."""
    from streaming_engine.cuda_graphs import GraphedDecodeStep, StaticStepConfig
    from streaming_engine.device_sampling import DeviceSampler
    from streaming_engine.static_step import StaticDecodeStep, StaticSinkCache

    if "graphed" not in state:  # one cache and one set of graphs per shape and row count, kept across repeats
        cache = StaticSinkCache(max_batch=rows, capacity=args.start_size + args.recent_size)
        step = StaticDecodeStep(model, cache)
        state["graphed"] = GraphedDecodeStep(step, StaticStepConfig(cuda_graphs=args.cuda_graphs))
        state["sampler"] = DeviceSampler(rows, step.device)  # all rows greedy
    graphed, sampler = state["graphed"], state["sampler"]
    batch = graphed.step.cache
    convs = _joined(batch, model, args, rows, generator)

    def step_fn(tokens):
        return sampler.sample(graphed(tokens)).tolist()  # the one device->host copy per step

    elapsed = _timed_decode(batch, convs, args, step_fn)
    state["captured"] = graphed.captured
    return elapsed


def run_static_overlap(model, args, rows: int, generator, state: dict) -> float:
    """`run_static` through `OverlappedDecodeStep`: the step for token n+1 runs while token n's id comes back."""
    from streaming_engine.cuda_graphs import GraphedDecodeStep, StaticStepConfig
    from streaming_engine.generation import RowSampling
    from streaming_engine.overlap import OverlappedDecodeStep
    from streaming_engine.static_step import StaticDecodeStep, StaticSinkCache

    if "overlapped" not in state:
        cache = StaticSinkCache(max_batch=rows, capacity=args.start_size + args.recent_size)
        step = StaticDecodeStep(model, cache)
        graphed = GraphedDecodeStep(step, StaticStepConfig(cuda_graphs=args.cuda_graphs))
        state["overlapped"] = OverlappedDecodeStep(graphed, cache.rows_allocated, step.device)
    overlapped = state["overlapped"]
    batch = overlapped.cache
    convs = _joined(batch, model, args, rows, generator)
    samplings = [RowSampling(None, [], seed=0) for _ in convs]  # greedy, drawn on the device

    def step_fn(tokens):
        return overlapped.decode(tokens, samplings)[1]

    elapsed = _timed_decode(batch, convs, args, step_fn)
    state["captured"] = overlapped.step.captured
    state["taken"], state["taken_back"] = overlapped.taken, overlapped.taken_back
    return elapsed


def compile_mode(args) -> str:
    """The `torch.compile` mode `--compile-mode` means on `--device`."""
    if args.compile_mode != "auto":
        return args.compile_mode
    return "reduce-overhead" if args.device.startswith("cuda") else "default"


def compiled_step(model, cache, mode: str | None, backend: str = "inductor"):
    """A `GraphedDecodeStep` (graphs off) over a `StaticDecodeStep` whose `run` is compiled with `mode` by
    `backend` (tests trace with dynamo's "eager" backend, which takes no mode: nothing to build)."""
    import torch

    from streaming_engine.cuda_graphs import GraphedDecodeStep, StaticStepConfig
    from streaming_engine.static_step import StaticDecodeStep

    step = StaticDecodeStep(model, cache)
    step.run = torch.compile(step.run, mode=mode, backend=backend, dynamic=False)  # one bucket per run: static shapes
    return GraphedDecodeStep(step, StaticStepConfig(cuda_graphs="off"))


def run_static_compile(model, args, rows: int, generator, state: dict) -> float:
    """`run_static` with `StaticDecodeStep.run` under `torch.compile` (the first call, which compiles, is timed
    apart as `compile_s`)."""
    from streaming_engine.device_sampling import DeviceSampler
    from streaming_engine.static_step import StaticSinkCache

    if "graphed" not in state:
        cache = StaticSinkCache(max_batch=rows, capacity=args.start_size + args.recent_size)
        state["graphed"] = compiled_step(model, cache, compile_mode(args))
        state["sampler"] = DeviceSampler(rows, state["graphed"].step.device)
    graphed, sampler = state["graphed"], state["sampler"]
    batch = graphed.step.cache
    convs = _joined(batch, model, args, rows, generator)

    def step_fn(tokens):
        return sampler.sample(graphed(tokens)).tolist()

    if "compile_s" not in state:
        _sync(args.device)
        began = time.perf_counter()
        _decode(batch, convs, 1, step_fn)
        _sync(args.device)
        state["compile_s"] = time.perf_counter() - began
    return _timed_decode(batch, convs, args, step_fn)


def run_eager(model, args, rows: int, generator, state: dict) -> float:
    from streaming_engine.batch_cache import BatchedSinkCache
    from streaming_engine.generation import forward_batch

    batch = BatchedSinkCache(max_batch=rows)
    convs = _joined(batch, model, args, rows, generator)

    def step_fn(tokens):
        return forward_batch(model, batch, tokens).argmax(dim=-1).tolist()

    return _timed_decode(batch, convs, args, step_fn)


def run_generate(model, args, rows: int, generator, state: dict) -> float:
    import torch

    ids = torch.randint(3, model.config.vocab_size, (rows, args.prompt), generator=generator).to(args.device)
    settings = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids, max_new_tokens=args.warmup, min_new_tokens=args.warmup, **settings)
    _sync(args.device)
    began = time.perf_counter()
    # Prefill is inside the timing here; it is subtracted with a one-token generate measured right after.
    model.generate(ids, max_new_tokens=args.tokens + 1, min_new_tokens=args.tokens + 1, **settings)
    _sync(args.device)
    total = time.perf_counter() - began
    began = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **settings)
    _sync(args.device)
    return max(total - (time.perf_counter() - began), 1e-9)


RUNNERS = {"static": run_static, "eager": run_eager, "generate": run_generate, "static-overlap": run_static_overlap,
           "static-compile": run_static_compile}


def measure(args: argparse.Namespace) -> dict:
    import torch

    from streaming_engine.static_step import unsupported_reason
    from . import cli

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows_list = cli.parse_int_list(args.rows, "--rows")
    cli.check_min(tokens=(args.tokens, 1), warmup=(args.warmup, 1), repeats=(args.repeats, 1), prompt=(args.prompt, 1))
    if args.prompt > args.start_size + args.recent_size - 1:
        raise ValueError("--prompt must leave room in the cache (start + recent - 1 at most)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device}: torch sees no CUDA device (use --device cpu)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    runs = []
    for shape in args.shapes:
        model = build_model(shape, args.device, dtype)
        reason = unsupported_reason(model)
        if reason is not None:
            raise RuntimeError(f"{shape}: {reason.code}: {reason.message}")
        params = sum(p.numel() for p in model.parameters())
        for rows in rows_list:
            seconds = {path: [] for path in args.paths}
            states = {path: {} for path in args.paths}
            generator = torch.Generator().manual_seed(rows)
            for _ in range(args.repeats):
                for path in args.paths:  # interleaved: a shared machine slows every path alike
                    seconds[path].append(RUNNERS[path](model, args, rows, generator, states[path]))
            for path in args.paths:
                rates = [rows * args.tokens / s for s in seconds[path]]
                runs.append({"shape": shape, "parameters": params, "rows": rows, "path": path,
                             "median_tok_s": statistics.median(rates), "tok_s": rates,
                             "ms_per_step_median": 1000 * statistics.median(seconds[path]) / args.tokens,
                             "cuda_graphs_captured": states[path].get("captured"),
                             "compile_s": states[path].get("compile_s"),
                             "steps_taken_ahead": states[path].get("taken"),
                             "steps_taken_back": states[path].get("taken_back")})
        del model
    by_key = {(r["shape"], r["rows"], r["path"]): r["median_tok_s"] for r in runs}
    for r in runs:
        eager = by_key.get((r["shape"], r["rows"], "eager"))
        r["ratio_to_eager"] = r["median_tok_s"] / eager if eager else None
    return {"device": args.device, "dtype": str(dtype).removeprefix("torch."), "machine_note": args.note,
            "compile_mode": compile_mode(args) if "static-compile" in args.paths else None,
            "tokens_per_row": args.tokens, "cache": [args.start_size, args.recent_size], "prompt": args.prompt,
            "runs": runs}


def plot(result: dict, path: Path) -> list[str]:
    return []  # the table is the result; a figure waits for the GPU numbers


def table(result: dict) -> str:
    return "\n".join(f"{r['shape']:13s} rows={r['rows']:<3d} {r['path']:9s} {r['median_tok_s']:9.1f} tok/s  "
                     f"{r['ms_per_step_median']:7.2f} ms/step  x{(r['ratio_to_eager'] or 0):.2f} vs eager"
                     for r in result["runs"])


def build_parser() -> argparse.ArgumentParser:
    from . import cli

    p = cli.parser("benchmarks.gpu_decode", __doc__)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["smollm2-135m", "llama-1b"])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(DEFAULT_PATHS))
    p.add_argument("--compile-mode", default="auto", choices=COMPILE_MODES,
                   help="torch.compile mode of the static-compile path (auto: reduce-overhead on CUDA, default on CPU)")
    p.add_argument("--rows", default="1,4,16", help="comma list of conversations decoded together")
    p.add_argument("--device", default="cuda", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--cuda-graphs", default=DEFAULT_CUDA_GRAPHS, choices=CUDA_GRAPH_MODES)
    p.add_argument("--start-size", type=int, default=4)
    p.add_argument("--recent-size", type=int, default=252)
    p.add_argument("--prompt", type=int, default=200, help="prompt tokens per row (the cache fills while decoding)")
    p.add_argument("--tokens", type=int, default=128, help="timed decode steps per repeat")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (graph capture happens here)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--note", default="", help="recorded with the result, e.g. that the machine was shared")
    p.add_argument("--output", default="assets/eval/gpu/static_step.json")
    return p


def main(argv: list[str] | None = None) -> int:
    from . import cli

    return cli.run_cli(build_parser(), argv, measure, plot, table)


if __name__ == "__main__":
    raise SystemExit(main())
