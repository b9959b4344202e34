"""Capacity planning: how many streaming conversations fit in a device's memory, for any model config.

`python -m benchmarks.capacity` prints, per model, the KV-cache bytes of one token and of one
conversation (a streaming conversation never holds more than `start_size + recent_size` tokens), the weights'
bytes, and how many conversations fit in each `--memory`:

    KV bytes per token        = 2 (keys and values) x layers x KV heads x head dim x bytes per element
    KV bytes per conversation = KV bytes per token x (start_size + recent_size)
    conversations that fit    = (memory - weights - overhead) / KV bytes per conversation

A decode batch of B conversations needs B of them resident at once (plus its activations). `--measure` loads the
first model, fills real caches and checks the formula against them (bytes per token per layer, process RSS).

`--replicas 1,2,4` adds the plan for N replicas over one shared store (docs/deploy.md): N times the warm
conversations, and what a replica's death costs the others. Its conversations are served on by the survivors,
each re-primed once from the transcript (at most `start_size + recent_size` tokens, whatever its length); with
`--reprime JSON` (written by `eval.reprime` on the machine and model being planned) that work is given in seconds
per surviving replica, from the measured median cost of one miss.
Boundary: arithmetic on configs plus one optional measurement; weights are counted on the `meta` device, so a
70B config costs no memory. Presets are the public shapes of well-known models; `--model` also takes a local
folder or a hub id (its config only, unless `--measure`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

import torch

from streaming_engine.loading import DEFAULT_MODEL_NAME, ensure_default_model
from streaming_engine.placement import parse_size
from . import cli
from .runinfo import run_metadata, write_result

#: Public shapes of 1B/7B/70B-class models (Llama-3.2-1B, Llama-2-7B, Mistral-7B, Llama-3-70B).
PRESETS: dict[str, dict] = {
    "1b": dict(label="1B GQA (Llama-3.2-1B shape)", num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
               tie_word_embeddings=True),
    "7b": dict(label="7B MHA (Llama-2-7B shape)", num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
               num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=32000,
               tie_word_embeddings=False),
    "7b-gqa": dict(label="7B GQA (Mistral-7B shape)", num_hidden_layers=32, hidden_size=4096,
                   intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                   vocab_size=32000, tie_word_embeddings=False),
    "70b": dict(label="70B GQA (Llama-3-70B shape)", num_hidden_layers=80, hidden_size=8192,
                intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                vocab_size=128256, tie_word_embeddings=False),
}
DEFAULT_MODELS = ("default", "1b", "7b", "7b-gqa", "70b")
DEFAULT_SIZES = "4+1020,4+2044"
DEFAULT_MEMORY = "24GiB,80GiB,160GiB"
MIB, GIB = 2**20, 2**30


@dataclass
class Row:
    """One model's numbers (bytes throughout)."""

    model: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    weights_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_conversation: dict[str, int]
    conversations_fit: dict[str, dict[str, int]]  # memory label -> cache size label -> conversations


def _falcon_caches_kv_groups() -> bool:
    """Whether the installed transformers' Falcon keeps grouped KV heads in its cache (it then has `repeat_kv`)."""
    from transformers.models.falcon import modeling_falcon

    return hasattr(modeling_falcon, "repeat_kv")


def kv_geometry(config) -> tuple[int, int, int]:
    """`(layers, KV heads, head dim)` of a config, across the supported families' attribute names."""
    heads = config.num_attention_heads
    if getattr(config, "model_type", None) == "falcon":
        # New-architecture (40B/180B-style) Falcon: older transformers (5.17 among them) cached keys expanded to every query
        # head; later releases cache the num_kv_heads groups and expand at attention time (repeat_kv).
        if config.new_decoder_architecture:
            kv_heads = config.num_kv_heads if _falcon_caches_kv_groups() else heads
        else:
            kv_heads = 1 if config.multi_query else config.num_kv_heads
    else:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys plus values that one cached token takes across all layers."""
    layers, kv_heads, head_dim = kv_geometry(config)
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def weights_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in `dtype` (tied weights once), counted without allocating them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p.numel() for p in model.parameters()}
    return sum(unique.values()) * dtype.itemsize


def conversations_fit(memory: int, weights: int, per_conversation: int, overhead: int = 0) -> int:
    """How many conversations' full caches fit beside the weights (0 when the weights alone do not fit)."""
    free = memory - weights - overhead
    return max(0, free // per_conversation)


def parse_cache_sizes(text: str) -> list[tuple[int, int]]:
    """`"4+1020,4+2044"` -> `[(4, 1020), (4, 2044)]` (start_size + recent_size)."""
    sizes = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        start, plus, recent = item.partition("+")
        if not plus or not start.strip().isdigit() or not recent.strip().isdigit() or int(recent) < 1:
            raise ValueError(f"bad cache size {item!r}: expected START+RECENT, e.g. 4+2044")
        sizes.append((int(start), int(recent)))
    if not sizes:
        raise ValueError("--sizes is empty: give START+RECENT pairs, e.g. 4+1020,4+2044")
    return sizes


def parse_memories(text: str) -> dict[str, int]:
    """`"24GiB,80GiB"` -> `{"24GiB": ..., "80GiB": ...}` (labels kept as written)."""
    memories = {item.strip(): parse_size(item) for item in text.split(",") if item.strip()}
    if not memories:
        raise ValueError("--memory is empty: give sizes such as 24GiB,80GiB")
    return memories


def resolve_config(name: str):
    """`(label, config)` of a preset name, "default", a local folder or a hub id."""
    from transformers import AutoConfig, LlamaConfig

    if name in PRESETS:
        shape = dict(PRESETS[name])
        return shape.pop("label"), LlamaConfig(**shape)
    if name == "default":
        return DEFAULT_MODEL_NAME, AutoConfig.from_pretrained(ensure_default_model())
    try:
        return name, AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a config for {name!r}: use a preset ({', '.join(PRESETS)}), "
                         f"'default', a local model folder or a reachable hub id") from exc


def plan(label: str, config, dtype: torch.dtype, sizes, memories: dict[str, int], overhead: int = 0) -> Row:
    layers, kv_heads, head_dim = kv_geometry(config)
    per_token = kv_bytes_per_token(config, dtype)
    weights = weights_bytes(config, dtype)
    per_conversation = {f"{s}+{r}": per_token * (s + r) for s, r in sizes}
    fit = {mem: {size: conversations_fit(total, weights, per_conv, overhead) for size, per_conv in per_conversation.items()}
           for mem, total in memories.items()}
    return Row(label, layers, kv_heads, head_dim, str(dtype).replace("torch.", ""), weights, per_token,
               per_conversation, fit)


def table(rows: list[Row]) -> str:
    """A Markdown table of `rows` (sizes in binary units: KiB, MiB, GiB)."""
    sizes = list(rows[0].kv_bytes_per_conversation)
    memories = list(rows[0].conversations_fit)
    head = ["model", "layers", "KV heads", "head dim", "dtype", "weights GiB", "KV KiB/token"]
    head += [f"KV MiB/conv {s}" for s in sizes]
    head += [f"conv. in {m} ({' / '.join(sizes)})" for m in memories]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.model, str(r.layers), str(r.kv_heads), str(r.head_dim), r.dtype, f"{r.weights_bytes / GIB:.2f}",
                 f"{r.kv_bytes_per_token / 1024:g}"]
        cells += [f"{r.kv_bytes_per_conversation[s] / MIB:g}" for s in sizes]
        cells += [" / ".join(f"{r.conversations_fit[m][s]:,}" for s in sizes) for m in memories]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class ReplicaRow:
    """One line of the N-replica plan, for one model, memory and cache size."""

    replicas: int
    conversations_warm: int  # held in some replica's cache: their next turn re-primes nothing
    conversations_per_replica: int
    reprimes_when_one_fails: int  # the failed replica's conversations, each re-primed once by a survivor
    reprime_s_per_survivor: float | None  # their re-prime work spread over the survivors (None: not measured)


def replica_plan(per_replica: int, replicas: list[int], miss_cost_s: float | None) -> list[ReplicaRow]:
    """The N-replica plan for replicas that each keep `per_replica` conversations warm; `miss_cost_s` is the
    measured cost of serving one conversation a replica did not hold (`eval.reprime`)."""
    rows = []
    for n in replicas:
        spread = None if miss_cost_s is None or n == 1 else per_replica * miss_cost_s / (n - 1)
        rows.append(ReplicaRow(n, n * per_replica, per_replica, per_replica if n > 1 else 0, spread))
    return rows


def read_miss_cost(path: str, cache: str) -> float:
    """The median miss cost of an `eval.reprime` JSON for cache size `cache` (the longest conversation's)."""
    try:
        result = json.loads(open(path, encoding="utf-8").read())
        summary = result["summary"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--reprime {path}: not a JSON written by benchmarks.reprime ({exc})") from None
    if result.get("cache") != cache:
        raise ValueError(f"--reprime {path} measured cache {result.get('cache')}, not {cache}: re-run eval.reprime "
                         f"with that cache or pass --sizes {result.get('cache')} first")
    longest = max(summary, key=int)
    return float(summary[longest]["median_miss_cost_s"])


def replica_table(label: str, memory: str, cache: str, rows: list[ReplicaRow]) -> str:
    head = ["replicas", "warm conversations", "per replica", "re-primed when one fails", "re-prime s per survivor"]
    lines = [f"{label}, {memory} per replica, cache {cache}:", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        spread = "-" if r.reprime_s_per_survivor is None else f"{r.reprime_s_per_survivor:,.1f}"
        lines.append(f"| {r.replicas} | {r.conversations_warm:,} | {r.conversations_per_replica:,} | "
                     f"{r.reprimes_when_one_fails:,} | {spread} |")
    return "\n".join(lines)


def measure(name: str, device, dtype, start_size: int, recent_size: int, conversations: int) -> dict:
    """Load `name`, fill `conversations` real caches to `start_size + recent_size` tokens; bytes and RSS."""
    import psutil

    from streaming_engine.hf_integration import enable_streaming_llm
    from streaming_engine.generation import forward
    from streaming_engine.loading import load

    process = psutil.Process()
    rss_start = process.memory_info().rss
    model, _ = load(None if name == "default" else name, device, dtype)
    rss_loaded = process.memory_info().rss
    held_dtype = model.dtype
    cache_size = start_size + recent_size
    generator = torch.Generator().manual_seed(0)
    caches, chunk, rss_first = [], max(1, min(256, recent_size // 2)), 0
    for _ in range(conversations):
        cache = enable_streaming_llm(model, start_size, recent_size)
        ids = torch.randint(3, model.config.vocab_size, (cache_size + chunk,), generator=generator).tolist()
        for begin in range(0, len(ids), chunk):  # one chunk more than fits: evictions included
            cache.evict_for_space(len(ids[begin:begin + chunk]))
            forward(model, cache, ids[begin:begin + chunk])
        caches.append(cache)
        # The first conversation also pages in the (memory-mapped) weights and the activations' peak; growth
        # is measured after it, so it is what one more conversation costs.
        rss_first = rss_first or process.memory_info().rss
    rss_filled = process.memory_info().rss
    layers = model.config.num_hidden_layers
    held = caches[0].get_seq_length()
    measured_per_token_layer = caches[0].kv_bytes() / held / layers
    formula = kv_bytes_per_token(model.config, held_dtype)
    weights = sum({id(p): p.numel() * p.element_size() for p in model.parameters()}.values())
    return {
        "model": name, "device": str(model.device), "dtype": str(held_dtype).replace("torch.", ""),
        "cache_tokens": held, "conversations": conversations,
        "kv_bytes_per_token_per_layer": measured_per_token_layer,
        "kv_bytes_per_token_per_layer_formula": formula / layers,
        "kv_bytes_per_conversation": caches[0].kv_bytes(),
        "weights_bytes": weights,
        "rss_before_load_bytes": rss_start, "rss_after_load_bytes": rss_loaded,
        "rss_after_first_conversation_bytes": rss_first, "rss_after_fill_bytes": rss_filled,
        "rss_growth_per_further_conversation_bytes": (rss_filled - rss_first) / (conversations - 1),
        "torch_threads": torch.get_num_threads(),
    }


def build_parser():
    p = cli.parser("benchmarks.capacity", __doc__)
    p.add_argument("--model", action="append", default=None,
                   help=f"repeatable: a preset ({', '.join(PRESETS)}), 'default' ({DEFAULT_MODEL_NAME}), a local "
                        f"folder or a hub id (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--dtype", default="bfloat16", help="dtype of weights and cache in the table")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="cache sizes START+RECENT, comma-separated")
    p.add_argument("--memory", default=DEFAULT_MEMORY, help="device memory sizes to plan for, comma-separated")
    p.add_argument("--overhead", default="0", help="memory kept for activations and runtime, e.g. 2GiB")
    p.add_argument("--measure", action="store_true",
                   help="also load the first --model and fill real caches (first --sizes) to check the formula")
    p.add_argument("--conversations", type=int, default=4, help="caches filled by --measure (at least 2)")
    p.add_argument("--device", default=None, help="device for --measure (default: CUDA when available)")
    p.add_argument("--measure-dtype", default=None, help="dtype for --measure (default: load()'s choice)")
    p.add_argument("--replicas", default=None, metavar="N,...",
                   help="also plan N replicas sharing one store, for the first --model, --memory and --sizes")
    p.add_argument("--reprime", default=None, metavar="JSON",
                   help="an eval.reprime result (same model and machine) to give --replicas' failover in seconds")
    p.add_argument("--output", default=None, help="write the table and measurement as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from streaming_engine.loading import pick_dtype

        dtype = pick_dtype(args.dtype, torch.device("cpu"))
        sizes = parse_cache_sizes(args.sizes)
        memories = parse_memories(args.memory)
        overhead = parse_size(args.overhead) if args.overhead.strip() not in ("", "0") else 0
        cli.check_min(conversations=(args.conversations, 2))
        names = args.model or list(DEFAULT_MODELS)
        rows = [plan(*resolve_config(name), dtype, sizes, memories, overhead) for name in names]
        measured = None
        if args.measure:
            measured = measure(names[0], args.device, args.measure_dtype, *sizes[0], args.conversations)
        replicas = None
        if args.replicas or args.reprime:
            if not args.replicas:
                raise ValueError("--reprime plans failover for --replicas: give --replicas too, e.g. 1,2,4")
            counts = cli.parse_int_list(args.replicas, "--replicas")
            cache, memory = f"{sizes[0][0]}+{sizes[0][1]}", next(iter(memories))
            miss = read_miss_cost(args.reprime, cache) if args.reprime else None
            replicas = {"model": rows[0].model, "memory": memory, "cache": cache, "miss_cost_s": miss,
                        "rows": replica_plan(rows[0].conversations_fit[memory][cache], counts, miss)}
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(rows))
    if replicas is not None:
        print()
        print(replica_table(replicas["model"], replicas["memory"], replicas["cache"], replicas["rows"]))
        replicas["rows"] = [asdict(r) for r in replicas["rows"]]
    if measured is not None:
        print(json.dumps(measured, indent=1))
    if args.output:
        result = {"overhead_bytes": overhead, "rows": [asdict(r) for r in rows], "measured": measured,
                  "replicas": replicas}
        write_result(args.output, result, run_metadata(args, argv, parser.prog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
