"""fp32 against bf16 on this machine: decode and prefill speed, and perplexity. `python -m benchmarks.dtype`.

The evidence behind `loading.default_cpu_dtype()`. Both copies of the model are loaded side by side, as `load()`
gives them (bf16 on CPU with eager attention, see `loading.prefer_fast_attention`), and timed in alternation, round
after round, so a machine shared with other work slows both alike:

* **decode**: one batched step (`forward_batch` over a `BatchedSinkCache`, as the engine decodes) for 1, 8 and 16
  rows, each row holding `--held` tokens (attention's share of a step grows with it);
* **prefill**: one `--prefill-tokens` chunk of a prompt;
* **perplexity**: dense, teacher-forced over `--ppl-tokens` tokens of an eval text (chunks of 1,024 tokens), and
  streaming, one token per step with a 4 + 252 cache over `--stream-tokens` tokens (keys re-rotated on every
  eviction, where bf16 rounding could add up).

Writes `--output FILE.json`, `FILE.png` beside it, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
from tqdm import tqdm

from streaming_engine.batch_cache import BatchedSinkCache, ConversationCache
from streaming_engine.cache import StartRecentKVCache
from streaming_engine.families import find_rotary_embedding
from streaming_engine.generation import forward, forward_batch
from streaming_engine.loading import DEFAULT_MODEL_NAME, default_cpu_dtype, describe_cpu, load
from . import cli
from .methods import make_runner
from .serve import parse_counts
from .texts import DATASETS, load_text

DTYPES = ("float32", "bfloat16")
#: Variants compared: the two dtypes as `load()` gives them, and bf16 kept on PyTorch's SDPA kernel (the reason
#: `load()` moves bf16 on CPU to eager attention). The SDPA variant computes the same thing as eager: no perplexity.
VARIANTS = ("float32", "bfloat16", "bfloat16-sdpa")
BATCH_SIZES = (1, 8, 16)
PPL_CHUNK = 1024


def token(model, i: int) -> int:
    """A deterministic ordinary token id (the lowest ids are special tokens in most vocabularies)."""
    return 3 + i % (model.config.vocab_size - 3)


def filled_batch(model, rows: int, held: int, cache_size: int) -> BatchedSinkCache:
    """A batch of `rows` conversations holding `held` tokens each (one prefill, copied: timing ignores content)."""
    rotary = find_rotary_embedding(model)
    first = StartRecentKVCache(4, cache_size - 4, rotary_emb=rotary)
    forward(model, first, [token(model, 7 * i + 100) for i in range(held)])
    layers, stream_index = first._take_tokens()
    batch = BatchedSinkCache(max_batch=rows)
    for _ in range(rows):
        solo = StartRecentKVCache(4, cache_size - 4, rotary_emb=rotary)
        solo._put_tokens([(k.clone(), v.clone()) for k, v in layers], stream_index.clone(), held, 0)
        batch.join(ConversationCache(solo))
    return batch


@torch.inference_mode()
def streaming_ppl(model, ids: list[int], progress: bool = True) -> float:
    """Perplexity of `ids` fed one token at a time through a 4 + 252 streaming cache (the paper's protocol)."""
    runner = make_runner("streaming", model, 4, 252)
    total = 0.0
    for t in tqdm(range(len(ids) - 1), desc="streaming ppl", disable=not progress, dynamic_ncols=True):
        logits = runner.step(ids[t])
        total -= float(torch.log_softmax(logits.float(), dim=-1)[ids[t + 1]])
    return round(math.exp(total / max(1, len(ids) - 1)), 4)


def dense_ppl(model, ids: list[int]) -> float:
    """Teacher-forced perplexity over `ids`, in independent chunks of `PPL_CHUNK` tokens."""
    total, count = 0.0, 0
    for begin in range(0, len(ids) - 1, PPL_CHUNK):
        chunk = torch.tensor([ids[begin : begin + PPL_CHUNK + 1]], device=model.device)
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total, count = total + float(nll), count + chunk.shape[1] - 1
    return math.exp(total / count)


def run(models: dict, ids: list[int], *, rounds: int, steps: int, held: list[int], prefill_tokens: int,
        stream_tokens: int, progress: bool = True, config: dict | None = None) -> dict:
    device = next(iter(models.values())).device
    result = {"config": {**(config or {}), "rounds": rounds, "steps": steps, "held": held,
                         "prefill_tokens": prefill_tokens, "ppl_tokens": len(ids), "stream_tokens": stream_tokens,
                         "device": str(device), "device_name": describe_cpu() if device.type == "cpu"
                         else torch.cuda.get_device_name(device), "torch_threads": torch.get_num_threads(),
                         "default_dtype_here": str(default_cpu_dtype()).replace("torch.", "")},
              "dtypes": {}}
    cells = [(b, h) for h in held for b in BATCH_SIZES]
    batches = {(d, b, h): filled_batch(m, b, h, h + 256) for d, m in models.items() for b, h in cells}
    decode = {key: [] for key in batches}  # (dtype, rows, held) -> ms per step, one entry per round
    prefill = {d: [] for d in models}
    prompt = ids[:prefill_tokens]
    for r in tqdm(range(rounds), desc="speed rounds", disable=not progress, dynamic_ncols=True):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for d in order:
            model = models[d]
            for b, h in cells:
                batch = batches[(d, b, h)]
                forward_batch(model, batch, [token(model, 11)] * b)  # untimed: settle this shape's buffers
                began = time.perf_counter()
                for i in range(steps):
                    forward_batch(model, batch, [token(model, 13 * i + j + 100) for j in range(b)])
                decode[(d, b, h)].append((time.perf_counter() - began) / steps * 1000)
            cache = StartRecentKVCache(4, max(prefill_tokens, 8), rotary_emb=find_rotary_embedding(model))
            began = time.perf_counter()
            forward(model, cache, prompt)
            prefill[d].append(len(prompt) / (time.perf_counter() - began))
    for d, model in models.items():
        quality = not d.endswith("-sdpa")  # the SDPA variant computes what eager does: speed only
        streaming = {"ppl": streaming_ppl(model, ids[:stream_tokens], progress)} if quality else None
        result["dtypes"][d] = {
            "decode_ms": {f"{b}x{h}": statistics.median(decode[(d, b, h)]) for b, h in cells},
            "decode_ms_rounds": {f"{b}x{h}": [round(x, 2) for x in decode[(d, b, h)]] for b, h in cells},
            "attention": models[d].config._attn_implementation,
            "prefill_tok_s": statistics.median(prefill[d]),
            "ppl_dense": dense_ppl(model, ids) if quality else None,
            "ppl_streaming": streaming["ppl"] if quality else None,
        }
    if set(DTYPES) <= set(models):
        f32, b16 = result["dtypes"]["float32"], result["dtypes"]["bfloat16"]
        result["bf16_vs_fp32"] = {
            "decode_speedup": {key: f32["decode_ms"][key] / b16["decode_ms"][key] for key in f32["decode_ms"]},
            "prefill_speedup": b16["prefill_tok_s"] / f32["prefill_tok_s"],
            "ppl_dense_change": b16["ppl_dense"] / f32["ppl_dense"] - 1,
            "ppl_streaming_change": b16["ppl_streaming"] / f32["ppl_streaming"] - 1,
        }
    return result


def format_table(result: dict) -> str:
    keys = list(next(iter(result["dtypes"].values()))["decode_ms"])
    head = " | ".join(f"{k.split('x')[0]} rows × {k.split('x')[1]} held" for k in keys)
    rows = [f"| dtype (attention) | decode ms/step: {head} | prefill tok/s | PPL dense | PPL streaming |",
            "|---|" + "---:|" * (len(keys) + 3)]
    for d, r in result["dtypes"].items():
        ms = " | ".join(f"{r['decode_ms'][k]:.1f}" for k in keys)
        ppl = " | ".join("same as eager" if r[k] is None else f"{r[k]:.3f}" for k in ("ppl_dense", "ppl_streaming"))
        rows.append(f"| {d.split('-')[0]} ({r['attention']}) | {ms} | {r['prefill_tok_s']:.0f} | {ppl} |")
    rel = result.get("bf16_vs_fp32")
    if rel:
        sp = " | ".join(f"×{rel['decode_speedup'][k]:.2f}" for k in keys)
        rows.append(f"| bf16 speed-up, PPL change | {sp} | ×{rel['prefill_speedup']:.2f} | "
                    f"{rel['ppl_dense_change'] * 100:+.2f}% | {rel['ppl_streaming_change'] * 100:+.2f}% |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("benchmarks.dtype", __doc__)
    p.add_argument("--model", default=None, help=f"Hugging Face id or local path (default: the offline {DEFAULT_MODEL_NAME})")
    p.add_argument("--device", default="cpu", help="where to compare (the default dtype question is a CPU one)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--dataset", default="austen-pride-and-prejudice", choices=sorted(DATASETS), help="eval text")
    p.add_argument("--ppl-tokens", type=int, default=8192, help="tokens of dense perplexity")
    p.add_argument("--stream-tokens", type=int, default=1000, help="tokens of streaming perplexity")
    p.add_argument("--rounds", type=int, default=6, help="alternating speed rounds")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per round and batch size")
    p.add_argument("--held", default="256,1000", help="comma list: tokens each row holds while decoding")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt tokens of the prefill timing")
    p.add_argument("--output", default="runs/dtype.json", help="JSON path; the PNG goes beside it")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cli.check_min(ppl_tokens=(args.ppl_tokens, 2), stream_tokens=(args.stream_tokens, 2), rounds=(args.rounds, 1),
                      steps=(args.steps, 1), prefill_tokens=(args.prefill_tokens, 1), threads=(args.threads, 1))
        held = parse_counts(args.held, "--held")
        torch.set_num_threads(args.threads)
        text, source = load_text(None, args.dataset)
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if not variants or set(variants) - set(VARIANTS):
            raise ValueError(f"--variants takes a comma list of {', '.join(VARIANTS)} (got {args.variants!r})")
        models = {}
        for variant in variants:
            models[variant], tokenizer = load(args.model, args.device, variant.split("-")[0])
            if variant.endswith("-sdpa"):
                models[variant].set_attn_implementation("sdpa")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.ppl_tokens]
        if len(ids) < max(args.stream_tokens, args.prefill_tokens, 2):
            raise ValueError(f"the text has only {len(ids)} tokens")
        result = run(models, ids, rounds=args.rounds, steps=args.steps, held=held,
                     prefill_tokens=args.prefill_tokens, stream_tokens=args.stream_tokens,
                     config={"model": args.model or DEFAULT_MODEL_NAME, "source": source})
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"error: {exc}\n")
    from .plots import plot_dtype

    cli.write_outputs(args.output, result, plot_dtype, format_table(result), cli.run_metadata(args, argv, parser.prog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
