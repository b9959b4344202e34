"""Device-map exactness check: a streaming conversation gives the same logits when the model is spread out.

`python -m benchmarks.devicemap_check --device cuda` runs one multi-turn streaming conversation
(chunked prefill of a prompt longer than the window, eviction reserved per turn, one eviction per decoded token,
key re-rotation after every eviction) through `generation.generate_reply` in three placements and prints JSON:

* `single`: the whole model on `--device` (the reference);
* `offload`: `load(device_map="auto", max_memory=...)` with budgets that leave about half of the weights on the
  main device, a quarter stored on the CPU and the rest on disk (accelerate copies them in on every forward);
* `split`: the second half of the decoder layers *executes* on the CPU through accelerate hooks, so the KV cache
  lives on two devices and every eviction re-rotates keys on both (a real second device only with `--device cuda`).

Each variant replays the reference's tokens and is compared with it: logits, every layer's keys and values, the
stream positions held and the eviction counters. `ok` is true when all logits agree within `--tolerance` (fp32)
and the offload variant really placed weights on the CPU and on disk. Boundary: a check to run by hand or from a
test; it changes nothing in the library. The model is `--model` (a local folder or hub id), `random` (random
weights in the default model's shape: 30 layers, so runs anywhere without a download) or `random-tiny`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from streaming_engine.batch_cache import ConversationCache
from streaming_engine.hf_integration import enable_streaming_llm
from streaming_engine.families import cache_keyword
from streaming_engine.generation import generate_reply, run_alone
from streaming_engine.loading import default_model_available, ensure_default_model, load
from streaming_engine.placement import describe_placement, weight_bytes_by_placement
from . import cli
from .runinfo import package_version, run_metadata, write_result

#: Logits of the spread-out model may differ from the single-device run by at most this much (fp32).
TOLERANCE = 1e-4
#: The conversation: (prompt tokens, new tokens) per turn; the 300-token prompt exceeds the window (chunked).
TURNS: tuple[tuple[int, int], ...] = ((40, 48), (40, 48), (300, 24), (40, 48))
START_SIZE, RECENT_SIZE, CHUNK_SIZE = 4, 124, 32
#: Shape of the default model (SmolLM2-135M-Instruct), for random weights where the real ones are not at hand.
DEFAULT_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=96, max_position_embeddings=512,
                  rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2)


def build_parser():
    p = cli.parser("benchmarks.devicemap_check", __doc__)
    p.add_argument("--model", default=None,
                   help="local folder or hub id, 'random' (default model's shape) or 'random-tiny' "
                        "(default: the offline default model when installed, else 'random')")
    p.add_argument("--device", default=None, help="main device (default: cuda when available, else cpu)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest logit difference accepted")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt tokens")
    p.add_argument("--output", default=None, help="also write the JSON result here")
    return p


def random_checkpoint(shape: dict, folder: Path, seed: int) -> str:
    """Save a random-weight Llama of `shape` (fp32) into `folder`; returns the folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(shape)
    theta = shape.pop("rope_theta")
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": theta}, **shape)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    placeholder_tokenizer().save_pretrained(folder)
    return str(folder)


def placeholder_tokenizer():
    """A one-word tokenizer, so that `load()` finds one: the check feeds token ids and never decodes text."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>")


def weights_bytes(model) -> int:
    return sum(weight_bytes_by_placement(model).values())


def offload_budget(model, main: torch.device) -> str:
    """A `--max-memory` string keeping ~1/2 of the weights on the main device and ~1/4 on the CPU (rest: disk)."""
    total = weights_bytes(model)
    if main.type == "cuda":
        return f"{main.index or 0}={total // 2},cpu={total // 4}"
    return f"cpu={total // 2}"


def split_execution(model, cpu_from: int) -> None:
    """Make decoder layers `cpu_from..` execute on the CPU (weights moved there, accelerate hook on each)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    layers = decoder_layers(model)
    skip = sorted({cache_keyword(model), "past_key_values", "cache"})
    for layer in layers[cpu_from:]:
        layer.to("cpu")
        # io_same_device: hidden states return to the main device after each CPU layer, as between two GPUs.
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", io_same_device=True, skip_keys=skip))


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of decoder layers (the ModuleList with `num_hidden_layers` entries)."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"no list of {count} decoder layers in {type(model).__name__}")


def conversation(vocab: int, seed: int) -> list[list[int]]:
    """Random prompt token ids per turn (ids 3.. avoid the special tokens of the tiny configs)."""
    generator = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n, _ in TURNS]


def run_conversation(model, prompts: list[list[int]], forced: list[int] | None = None) -> dict:
    """Stream `prompts` as turns (the last sampled token opens the next turn, as in `session.py`).

    Greedy, or replaying `forced` tokens so that every variant takes the reference's path. Returns the logits of
    every sampled position `[steps, vocab]`, the tokens, the cache and the wall time.
    """
    cache = enable_streaming_llm(model, START_SIZE, RECENT_SIZE)
    conversation = ConversationCache(cache)  # the turn's view of its cache, as in the engine
    logits, tokens = [], []

    def sample(step_logits: torch.Tensor) -> int:
        logits.append(step_logits.float().cpu())
        token = forced[len(tokens)] if forced is not None else int(step_logits.argmax())
        tokens.append(token)
        return token

    began = time.perf_counter()
    carry: list[int] = []
    for (_, new_tokens), prompt in zip(TURNS, prompts):
        run_alone(model, generate_reply(conversation, carry + prompt, sample, max_new_tokens=new_tokens,
                                        eos_ids=set(), evict=True, chunk_size=CHUNK_SIZE))
        carry = [tokens[-1]]
    return {"logits": torch.stack(logits), "tokens": tokens, "cache": cache, "seconds": time.perf_counter() - began}


def compare(reference: dict, run: dict) -> dict:
    """How far `run` is from `reference`: logits, keys/values per layer, positions and counters."""
    ref_cache, cache = reference["cache"], run["cache"]
    kv_diff = 0.0
    for ref_layer, layer in zip(ref_cache.layers, cache.layers):
        for a, b in ((ref_layer.keys, layer.keys), (ref_layer.values, layer.values)):
            kv_diff = max(kv_diff, (a.float().cpu() - b.float().cpu()).abs().max().item())
    return {
        "max_abs_logit_diff": (reference["logits"] - run["logits"]).abs().max().item(),
        "max_abs_kv_diff": kv_diff,
        "stream_positions_equal": ref_cache.stream_positions == cache.stream_positions,
        "evicted_tokens": cache.evicted_tokens,
        "counters_equal": (ref_cache.evicted_tokens, ref_cache.seen_tokens) == (cache.evicted_tokens, cache.seen_tokens),
        "kv_devices": sorted({str(layer.keys.device) for layer in cache.layers if layer.is_initialized}),
        "seconds": round(run["seconds"], 3),
    }


def check(source: str, device: torch.device, tolerance: float, seed: int, workdir: Path) -> dict:
    """Run the three variants on the checkpoint at `source`; return the JSON-ready result."""
    single, _ = load(source, device, "float32")
    prompts = conversation(single.config.vocab_size, seed)
    reference = run_conversation(single, prompts)
    variants = {"single": {"placement": describe_placement(single), "steps": len(reference["tokens"]),
                           "evicted_tokens": reference["cache"].evicted_tokens,
                           "seconds": round(reference["seconds"], 3)}}
    budget = offload_budget(single, device)

    spread, _ = load(source, device_map="auto", max_memory=budget, offload_folder=str(workdir / "offload"),
                     dtype="float32")
    stored = sorted({str(d) for d in spread.hf_device_map.values()})
    variants["offload"] = {"max_memory": budget, "placement": describe_placement(spread), "stored_on": stored,
                           **compare(reference, run_conversation(spread, prompts, reference["tokens"]))}
    del spread

    layers = len(decoder_layers(single))
    split_execution(single, layers // 2)
    variants["split"] = {"cpu_layers": f"{layers // 2}..{layers - 1}",
                         **compare(reference, run_conversation(single, prompts, reference["tokens"]))}

    worst = max(variants[name]["max_abs_logit_diff"] for name in ("offload", "split"))
    exact = all(variants[n]["stream_positions_equal"] and variants[n]["counters_equal"] for n in ("offload", "split"))
    offloaded = "cpu" in stored and "disk" in stored
    return {
        "ok": bool(worst <= tolerance and exact and offloaded),
        "max_abs_logit_diff": worst,
        "tolerance": tolerance,
        "offloaded_to_cpu_and_disk": offloaded,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, **{n: package_version(n) for n in ("transformers", "accelerate")}},
        "weights_bytes": weights_bytes(single),
        "conversation": {"turns": [list(t) for t in TURNS], "start_size": START_SIZE, "recent_size": RECENT_SIZE,
                         "chunk_size": CHUNK_SIZE},
        "variants": variants,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here: TF32 would blur the comparison
    with tempfile.TemporaryDirectory(prefix="devicemap-check-") as tmp:
        workdir = Path(tmp)
        name = args.model or ("default" if default_model_available() else "random")
        if name == "default":
            source, label = str(ensure_default_model()), "SmolLM2-135M-Instruct"
        elif name in ("random", "random-tiny"):
            shape = DEFAULT_SHAPE if name == "random" else TINY_SHAPE
            source = random_checkpoint(shape, workdir / "model", args.seed)
            label = f"{name} (random weights, {shape['num_hidden_layers']} layers)"
        else:
            source, label = name, name
        try:
            result = {"model": label, **check(source, device, args.tolerance, args.seed, workdir)}
        except (ValueError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(json.dumps(result, indent=1))
    if args.output:
        write_result(args.output, result, run_metadata(args, argv, parser.prog))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
