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
  unpadded batch, as the reference transformers users get;
* `hf-static`: `model.generate(cache_implementation="static")`, transformers' own static cache, which transformers
  compiles by itself on CUDA (`torch.compile`, mode "reduce-overhead"; recorded as `hf_compiled`) and runs
  uncompiled on CPU: the peer the issue names, same model, dtype and run.

Warm-up steps (graph capture and compilation included; the first compiled call's seconds are recorded as
`compile_s`) are not timed; the median over `--repeats` is reported. Every timed step's interval (from one step's
ids on the host to the next's: the inter-token latency a reader sees) is kept, so each cell also has p50/p95
latency, split into the steps where some row evicted and the others (`eviction_cost_of_p95`: how much longer an
evicting step takes, at the median, as a share of the other steps' p95). The roofline: the bytes one step must
read at the least (the weights, less an untied input embedding of which only the rows' entries are read, plus the
keys and values each row holds) over the device's copy bandwidth, measured in the same process
(`copy_bandwidth_gb_s`), gives `roofline_tok_s`; `roofline_share` is each cell's share of it. A run writes its JSON
after every model shape (`complete: false` until the last), so a run stopped by a timeout keeps what it measured.
Boundary: measures only; the step, the graphs and the sampler live in `static_step.py`, `cuda_graphs.py`,
`device_sampling.py`.

    python -m benchmarks.gpu_decode --device cuda --output assets/eval/gpu/static_step.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from streaming_engine.defaults import CUDA_GRAPH_MODES, DEFAULT_CUDA_GRAPHS

#: Model shapes (transformers LlamaConfig fields). `smollm2-135m`: HuggingFaceTB/SmolLM2-135M's architecture;
#: `llama-1b`: Llama-3.2-1B's and `llama-8b`: Llama-3.1-8B's (default RoPE instead of their llama3 scaling, which
#: changes no cost); `tiny`: a small shape for quick CPU runs. `tests/test_gpu_decode.py` checks the published
#: parameter counts.
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_theta=500000.0, max_position_embeddings=131072),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                     rope_theta=500000.0, max_position_embeddings=131072),
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=4096),
}
PATHS = ("static", "eager", "generate", "static-overlap", "static-compile", "hf-static")
#: The module as `python -m` starts it (the parser's name, and the command recorded with a partial result).
PROG = "benchmarks.gpu_decode"
#: Paths whose model attends over a cache that grows from the prompt (no sinks, no eviction).
GROWING_PATHS = ("generate", "hf-static")
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
    """`rows` fresh conversations, each with a prompt that leaves the cache nearly full (so decoding evicts), with
    the engine's eviction block (`--evict-block`)."""
    import torch

    from streaming_engine.batch_cache import ConversationCache
    from streaming_engine.generation import forward
    from streaming_engine.hf_integration import enable_streaming_llm

    convs = []
    for _ in range(rows):
        solo = enable_streaming_llm(model, args.start_size, args.recent_size, evict_block=args.evict_block)
        conv = ConversationCache(solo)
        prompt = torch.randint(3, model.config.vocab_size, (args.prompt,), generator=generator).tolist()
        conv.evict_for_space(len(prompt))
        logits = forward(model, conv.solo, prompt)
        convs.append((conv, int(logits.argmax())))
    return convs


def _decode(batch, convs, steps: int, step_fn, clock: list | None = None) -> None:
    """`steps` decode steps; with `clock`, each step appends `(time its ids reached the host, whether a row
    evicted before it)`."""
    tokens = [token for _, token in convs]
    for _ in range(steps):
        evicted = 0
        for conv in batch.rows:
            evicted += conv.evict_for_space(1)
        tokens = step_fn(tokens)  # ids on the host: every path's step ends with its device->host copy
        if clock is not None:
            clock.append((time.perf_counter(), evicted > 0))


def _joined(batch, model, args, rows: int, generator):
    """`_conversations`, each joined to `batch`."""
    convs = _conversations(model, args, rows, generator)
    for conv, _ in convs:
        batch.join(conv)
    return convs


def _timing(began: float, clock: list) -> dict:
    """A repeat's `seconds`, each step's interval (`steps_s`) and whether it evicted, from `_decode`'s clock."""
    times = [began] + [t for t, _ in clock]
    return {"seconds": times[-1] - began, "steps_s": [b - a for a, b in zip(times, times[1:])],
            "evicted": [e for _, e in clock]}


def _timed_decode(batch, convs, args, step_fn) -> dict:
    """`_timing` of `args.tokens` steps after `args.warmup` untimed ones (the device synchronized before); the rows
    then leave `batch`, so the next repeat starts empty."""
    _decode(batch, convs, args.warmup, step_fn)
    _sync(args.device)
    clock: list = []
    began = time.perf_counter()
    _decode(batch, convs, args.tokens, step_fn, clock)
    _sync(args.device)
    for conv in list(batch.rows):
        batch.leave(conv, keep=False)
    return _timing(began, clock)


def run_static(model, args, rows: int, generator, state: dict) -> dict:
    """`args.tokens` steps of `rows` rows through the static step (graphs per `--cuda-graphs`)."""
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
        return graphed.sampled(tokens, sampler)[1].tolist()  # the draw in the step's graph; one copy back

    timing = _timed_decode(batch, convs, args, step_fn)
    state["captured"] = graphed.captured
    return timing


def run_static_overlap(model, args, rows: int, generator, state: dict) -> dict:
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

    timing = _timed_decode(batch, convs, args, step_fn)
    state["captured"] = overlapped.step.captured
    state["taken"], state["taken_back"] = overlapped.taken, overlapped.taken_back
    return timing


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


def run_static_compile(model, args, rows: int, generator, state: dict) -> dict:
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


def run_eager(model, args, rows: int, generator, state: dict) -> dict:
    from streaming_engine.batch_cache import BatchedSinkCache
    from streaming_engine.generation import forward_batch

    batch = BatchedSinkCache(max_batch=rows)
    convs = _joined(batch, model, args, rows, generator)

    def step_fn(tokens):
        return forward_batch(model, batch, tokens).argmax(dim=-1).tolist()

    return _timed_decode(batch, convs, args, step_fn)


def _generate_timed(model, args, rows: int, generator, state: dict, **settings) -> dict:
    """One `generate` call of 1 + `warmup` + `tokens` new tokens; the last `tokens` steps are timed from the
    streamer's clock (prefill, the first token and the warm-up, where compilation happens, are not). The first
    decode step's seconds of the first repeat are kept as `first_step_s`."""
    import torch

    from .serve import TokenClock  # each put comes after the step's ids were copied to the host (`.cpu()` waits)

    ids = torch.randint(3, model.config.vocab_size, (rows, args.prompt), generator=generator).to(args.device)
    clock = TokenClock()
    new = 1 + args.warmup + args.tokens
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
                   streamer=clock, **settings)
    times = clock.times[-(args.tokens + 1):]  # [prompt, first token, warm-up steps..., timed steps...]
    state.setdefault("first_step_s", clock.times[2] - clock.times[1] if len(clock.times) > 2 else None)
    return _timing(times[0], [(t, False) for t in times[1:]])


def run_generate(model, args, rows: int, generator, state: dict) -> dict:
    return _generate_timed(model, args, rows, generator, state)


def run_hf_static(model, args, rows: int, generator, state: dict, compile_config=None) -> dict:
    """transformers' StaticCache through `generate`; transformers compiles the decode forward itself where its
    rules allow (CUDA; `compile_config` lets a test force it elsewhere). `compile_s` is the first decode step of
    the first repeat, which holds the compilation."""
    settings = {"cache_implementation": "static"}
    if compile_config is not None:
        settings["compile_config"] = compile_config
    timing = _generate_timed(model, args, rows, generator, state, **settings)
    state["hf_compiled"] = getattr(model, "_compiled_call", None) is not None
    state["compile_s"] = state["first_step_s"] if state["hf_compiled"] else None
    return timing


RUNNERS = {"static": run_static, "eager": run_eager, "generate": run_generate, "static-overlap": run_static_overlap,
           "static-compile": run_static_compile, "hf-static": run_hf_static}


def copy_bandwidth(device: str, mib: int | None = None, repeats: int = 5) -> float:
    """The device's memory bandwidth in bytes/s as one large copy sees it (read + write, best of `repeats`): the
    roofline's denominator, measured where the benchmark runs rather than taken from a data sheet."""
    import torch

    mib = mib or (1024 if device.startswith("cuda") else 256)
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        began = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - began)
    return 2 * src.numel() / best


def step_bytes(model, rows: int, columns: float) -> dict:
    """The fewest bytes one decode step of `rows` rows must read: every weight once (an untied input embedding
    only at the rows' entries), plus each row's keys and values over `columns` cached tokens in every layer."""
    from .capacity import kv_bytes_per_token

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed is not model.get_output_embeddings().weight:  # untied: a lookup reads `rows` of its rows
        weights -= embed.numel() * embed.element_size() - rows * embed.shape[1] * embed.element_size()
    kv = rows * columns * kv_bytes_per_token(model.config, embed.dtype)
    return {"weight_bytes": int(weights), "kv_bytes": int(kv)}


def latency_summary(timings: list[dict]) -> dict:
    """Inter-token latency of a cell over all its repeats' timed steps (ms): p50/p95 (`stats.percentile`, nearest
    rank) of every step, of the steps where some row evicted and of the others, and `eviction_cost_of_p95` = (evicting median - other median) /
    other p95: what an eviction adds to a step, as a share of the p95 a reader sees without one."""
    from .stats import percentile

    steps = [(1000 * s, e) for t in timings for s, e in zip(t["steps_s"], t["evicted"])]
    every = [s for s, _ in steps]
    evicting = [s for s, e in steps if e]
    others = [s for s, e in steps if not e]
    out = {"itl_ms_p50": percentile(every, 50), "itl_ms_p95": percentile(every, 95),
           "evicting_steps": len(evicting), "other_steps": len(others),
           "evicting_ms_p50": percentile(evicting, 50), "other_ms_p50": percentile(others, 50),
           "other_ms_p95": percentile(others, 95)}
    cost = None
    if evicting and others and out["other_ms_p95"]:
        cost = (out["evicting_ms_p50"] - out["other_ms_p50"]) / out["other_ms_p95"]
    out["eviction_cost_of_p95"] = cost
    return out


def _attended_columns(args, path: str) -> float:
    """Cached tokens a step of `path` reads per row on average over the timed steps: the sink cache stays full
    (between capacity - block and capacity: its capacity is the bound), a growing cache holds the prompt, the first
    token, the warm-up and on average half the timed steps."""
    if path in GROWING_PATHS:
        return args.prompt + 1 + args.warmup + args.tokens / 2
    return args.start_size + args.recent_size


def measure(args: argparse.Namespace) -> dict:
    import torch

    from streaming_engine.eviction import block_for, check_evict_block
    from streaming_engine.static_step import unsupported_reason
    from . import cli
    from .runinfo import run_metadata, write_result

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows_list = cli.parse_int_list(args.rows, "--rows")
    cli.check_min(tokens=(args.tokens, 1), warmup=(args.warmup, 1), repeats=(args.repeats, 1), prompt=(args.prompt, 1))
    if args.prompt > args.start_size + args.recent_size - 1:
        raise ValueError("--prompt must leave room in the cache (start + recent - 1 at most)")
    if args.evict_block is None:
        args.evict_block = block_for(args.recent_size)  # the engine's default
    check_evict_block(args.evict_block, args.recent_size)  # the engine's rule for it
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device}: torch sees no CUDA device (use --device cpu)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    bandwidth = copy_bandwidth(args.device)
    result = {"device": args.device, "dtype": str(dtype).removeprefix("torch."), "machine_note": args.note,
              "compile_mode": compile_mode(args) if "static-compile" in args.paths else None,
              "tokens_per_row": args.tokens, "cache": [args.start_size, args.recent_size],
              "evict_block": args.evict_block, "prompt": args.prompt, "copy_bandwidth_gb_s": bandwidth / 1e9,
              "complete": False, "runs": []}
    runs = result["runs"]
    for shape in args.shapes:
        model = build_model(shape, args.device, dtype)
        reason = unsupported_reason(model)
        if reason is not None:
            raise RuntimeError(f"{shape}: {reason.code}: {reason.message}")
        params = sum(p.numel() for p in model.parameters())
        for rows in rows_list:
            timings = {path: [] for path in args.paths}
            states = {path: {} for path in args.paths}
            generator = torch.Generator().manual_seed(rows)
            for _ in range(args.repeats):
                for path in args.paths:  # interleaved: a shared machine slows every path alike
                    timings[path].append(RUNNERS[path](model, args, rows, generator, states[path]))
            for path in args.paths:
                seconds = [t["seconds"] for t in timings[path]]
                rates = [rows * args.tokens / s for s in seconds]
                need = step_bytes(model, rows, _attended_columns(args, path))
                roofline = rows * bandwidth / (need["weight_bytes"] + need["kv_bytes"])
                runs.append({"shape": shape, "parameters": params, "rows": rows, "path": path,
                             "median_tok_s": statistics.median(rates), "tok_s": rates,
                             "ms_per_step_median": 1000 * statistics.median(seconds) / args.tokens,
                             **latency_summary(timings[path]), **need, "roofline_tok_s": roofline,
                             "roofline_share": statistics.median(rates) / roofline,
                             "cuda_graphs_captured": states[path].get("captured"),
                             "compile_s": states[path].get("compile_s"),
                             "hf_compiled": states[path].get("hf_compiled"),
                             "steps_taken_ahead": states[path].get("taken"),
                             "steps_taken_back": states[path].get("taken_back")})
        del model, states
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the next shape's weights need the room (8B: 16 GB in bf16)
        _ratios(runs)
        write_result(args.output, result, run_metadata(args, None, f"python -m {PROG}"))
    result["complete"] = True
    return result


def _ratios(runs: list[dict]) -> None:
    """Each run's `ratio_to_eager` and `ratio_to_hf_static` where the same cell has those paths."""
    by_key = {(r["shape"], r["rows"], r["path"]): r["median_tok_s"] for r in runs}
    for r in runs:
        for name, path in (("ratio_to_eager", "eager"), ("ratio_to_hf_static", "hf-static")):
            other = by_key.get((r["shape"], r["rows"], path))
            r[name] = r["median_tok_s"] / other if other else None


def plot(result: dict, path: Path) -> list[str]:
    """Left: aggregate tok/s against conversations decoded together, a line per shape and path (log-log), each
    shape's roofline dotted. Right: each single-stream cell's share of its roofline."""
    from .plots import plt, save_png

    runs = result["runs"]
    if not runs:
        return []
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    shapes = list(dict.fromkeys(r["shape"] for r in runs))
    paths = list(dict.fromkeys(r["path"] for r in runs))
    colors = {p: f"C{k}" for k, p in enumerate(paths)}
    styles = ("-", "--", ":", "-.")
    for k, shape in enumerate(shapes):
        for p in paths:
            cells = sorted((r["rows"], r["median_tok_s"]) for r in runs if r["shape"] == shape and r["path"] == p)
            if cells:
                left.plot(*zip(*cells), marker="o", color=colors[p], linestyle=styles[k % len(styles)],
                          label=f"{shape} {p}")
        ceiling = sorted({(r["rows"], r["roofline_tok_s"]) for r in runs
                          if r["shape"] == shape and r["path"] not in GROWING_PATHS})
        if ceiling:
            left.plot(*zip(*ceiling), color="grey", linestyle=styles[k % len(styles)], linewidth=0.8,
                      label=f"{shape} roofline")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("conversations decoded together")
    left.set_ylabel("tokens/s, all rows")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7, ncol=2)
    single = [r for r in runs if r["rows"] == min(x["rows"] for x in runs)]
    labels = [f"{r['shape']}\n{r['path']}" for r in single]
    right.barh(range(len(single)), [100 * r["roofline_share"] for r in single],
               color=[colors[r["path"]] for r in single])
    right.set_yticks(range(len(single)), labels, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel(f"% of roofline, {single[0]['rows']} row(s)")
    fig.suptitle(f"decode, {result['device']} {result['dtype']}, cache {result['cache'][0]}+{result['cache'][1]}, "
                 f"block {result['evict_block']}, copy bandwidth {result['copy_bandwidth_gb_s']:.0f} GB/s"
                 + ("" if result.get("complete", True) else " (incomplete)"), fontsize=10)
    return save_png(fig, path)


def table(result: dict) -> str:
    def ratio(x):
        return f"x{x:.2f}" if x else "   -"

    return "\n".join(f"{r['shape']:13s} rows={r['rows']:<3d} {r['path']:14s} {r['median_tok_s']:9.1f} tok/s  "
                     f"{r['ms_per_step_median']:7.2f} ms/step  p95 {r['itl_ms_p95']:7.2f} ms  "
                     f"{100 * r['roofline_share']:5.1f}% roofline  {ratio(r['ratio_to_eager'])} vs eager  "
                     f"{ratio(r['ratio_to_hf_static'])} vs hf-static"
                     for r in result["runs"])


def build_parser() -> argparse.ArgumentParser:
    from . import cli

    p = cli.parser(PROG, __doc__)
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
    p.add_argument("--evict-block", type=int, default=None,
                   help="fewest tokens one eviction takes (default: the engine's, eviction.block_for(recent))")
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
