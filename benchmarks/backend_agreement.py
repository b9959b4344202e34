"""Do the two backends compute the same StreamingLLM? `python -m benchmarks.backend_agreement`.

One text is streamed through a transformers `StartRecentKVCache` and a llama.cpp `LlamaCppCache` of the same sizes,
in the same chunks, each evicting with its own `evict_for_space` before every chunk (optionally with a pinned head
and eviction="turns" at given message boundaries, as a chat session uses them). After every chunk the two
caches must hold the same tokens (held / evicted / seen counters and the stream index of every kept token), and the
next-token distributions the two models give on those kept tokens are compared token by token:

* KL(transformers || llama.cpp) per predicted token (mean, p95, max) and how often the two argmaxes agree;
* the streaming perplexity of the text on each backend, and their ratio.

The transformers side runs the de-quantized fp32 weights, llama.cpp the file's own 4-bit ones, so the
distributions differ by the quantization error; the same comparison without any eviction (`--no-evict`, a cache
as long as the text) measures that floor. Writes `--output FILE.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
from tqdm import tqdm

from streaming_engine.cache import StartRecentKVCache
from streaming_engine.families import cache_keyword, find_rotary_embedding, layer_rope_kinds
from streaming_engine.positions import next_position_ids
from . import cli
from .stats import percentile


@torch.inference_mode()
def _hf_logits(model, cache, ids: list[int]) -> torch.Tensor:
    """Every position's logits `[len(ids), vocab]` for `ids` fed on top of `cache` (in-cache positions)."""
    out = model(input_ids=torch.tensor([ids]), position_ids=next_position_ids(cache, len(ids)), use_cache=True,
                **{cache_keyword(model): cache})
    return out.logits[0].float()


def _state(cache) -> tuple:
    return cache.get_seq_length(), cache.evicted_tokens, cache.seen_tokens, cache.stream_positions


def compare(hf_model, context, ids: list[int], *, start_size: int, recent_size: int, chunk: int,
            pin: int = 0, eviction: str = "tokens", boundaries: list[int] = (), progress: bool = False) -> dict:
    """Stream `ids` through both backends (see the module docstring); returns the measurements. `pin` protects the
    first tokens on both caches; `boundaries` (stream positions where messages begin) are marked on both before
    the first chunk, for eviction="turns"."""
    if chunk > start_size + recent_size - max(start_size, pin):
        raise ValueError(f"chunk ({chunk}) must not exceed the room after the protected head")
    rotary = find_rotary_embedding(hf_model)
    hf_cache = StartRecentKVCache(start_size, recent_size, rotary_emb=rotary, layer_rope=layer_rope_kinds(hf_model, rotary),
                                  pin=pin, eviction=eviction)
    ll_cache = context.new_cache(start_size, recent_size, pin=pin, eviction=eviction)
    for position in boundaries:
        hf_cache.mark_boundary(position)
        ll_cache.mark_boundary(position)
    kls, agree, nll = [], [], {"transformers": [], "llama.cpp": []}
    mismatches = 0
    try:
        for begin in tqdm(range(0, len(ids) - 1, chunk), desc="chunks", disable=not progress, dynamic_ncols=True):
            piece = ids[begin:begin + chunk]
            targets = torch.tensor(ids[begin + 1:begin + 1 + len(piece)])
            for cache in (hf_cache, ll_cache):
                cache.evict_for_space(len(piece))
            hf = _hf_logits(hf_model, hf_cache, piece)[: len(targets)].log_softmax(-1)
            ll = context.forward([(ll_cache, piece)], all_logits=True)[0][: len(targets)].float().log_softmax(-1)
            mismatches += _state(hf_cache) != _state(ll_cache)
            kls += (hf.exp() * (hf - ll)).sum(-1).tolist()
            agree += (hf.argmax(-1) == ll.argmax(-1)).tolist()
            nll["transformers"] += (-hf.gather(1, targets[:, None])[:, 0]).tolist()
            nll["llama.cpp"] += (-ll.gather(1, targets[:, None])[:, 0]).tolist()
        final = {"held": hf_cache.get_seq_length(), "evicted": hf_cache.evicted_tokens, "seen": hf_cache.seen_tokens,
                 "kept": hf_cache.stream_positions}
    finally:
        ll_cache.reset()
    ppl = {name: math.exp(statistics.fmean(values)) for name, values in nll.items()}
    return {
        "tokens": len(ids), "predicted": len(kls), "start_size": start_size, "recent_size": recent_size,
        "chunk": chunk, "bookkeeping_mismatches": mismatches, "final": final,
        "kl_mean": statistics.fmean(kls), "kl_p95": percentile(kls, 95), "kl_max": max(kls),
        "top1_agreement": sum(agree) / len(agree),
        "ppl": ppl, "ppl_ratio": ppl["llama.cpp"] / ppl["transformers"],
    }


def format_table(rows: list[dict]) -> str:
    out = ["| cache | tokens | evicted | KL mean | KL p95 | top-1 agree | ppl transformers (fp32) | ppl llama.cpp "
           "(GGUF) | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['tokens']} | {r['final']['evicted']} | {r['kl_mean']:.4f} | {r['kl_p95']:.4f} | "
                   f"{r['top1_agreement']:.3f} | {r['ppl']['transformers']:.3f} | {r['ppl']['llama.cpp']:.3f} | "
                   f"{r['ppl_ratio']:.4f} |")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("benchmarks.backend_agreement", __doc__)
    p.add_argument("--text", default=None, help="text file (default: --dataset)")
    p.add_argument("--dataset", default=None, help="dataset name (see benchmarks.texts)")
    p.add_argument("--tokens", type=int, default=4000, help="tokens of the text streamed")
    p.add_argument("--start-size", type=int, default=4)
    p.add_argument("--recent-size", type=int, default=508)
    p.add_argument("--chunk", type=int, default=64, help="tokens per forward pass (evicting before each)")
    p.add_argument("--output", default="runs/backend_agreement.json")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from streaming_engine.loading import load
    from .texts import load_text

    try:
        text, source = load_text(args.text, args.dataset)
        cli.check_min(tokens=(args.tokens, 2), start_size=(args.start_size, 0), recent_size=(args.recent_size, 2),
                      chunk=(args.chunk, 1))
        torch.set_num_threads(1)
        hf_model, tokenizer = load(dtype="float32")
        ll_model, _ = load(backend="llama.cpp", n_threads=1)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]
        context = ll_model.new_context(sequences=1, seq_capacity=max(args.start_size + args.recent_size, len(ids)),
                                       batch_tokens=args.chunk)
        rows = []
        for label, start, recent in (("streaming", args.start_size, args.recent_size),
                                     ("no eviction (quantization floor)", 0, len(ids))):
            row = compare(hf_model, context, ids, start_size=start, recent_size=recent, chunk=args.chunk, progress=True)
            rows.append({"label": f"{label}: {start} + {recent}", **row})
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"error: {exc}\n")
    result = {"config": {"source": source, "model": ll_model.name, "gguf": ll_model.description,
                         "threads": 1, **vars(args)}, "rows": rows}
    cli.write_outputs(args.output, result, lambda result, path: [], format_table(rows),
                      cli.run_metadata(args, argv, parser.prog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
