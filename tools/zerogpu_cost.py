"""What one chat turn costs the ZeroGPU way, measured on a GPU: `RemoteTurnsEngine` over the fork stand-in of
`spaces.GPU` (tests/zerogpu_standin.py) against the same conversation on a local engine.

    python tools/zerogpu_cost.py --output assets/eval/zerogpu_cost.json

Three variants, each in a fresh process so that the process that forks never touches CUDA (as on ZeroGPU, where
the main process has no GPU at all):

* `local`: a `StreamingEngine` with the model on the GPU; the baseline.
* `zerogpu-reused`: every turn is one call into a forked worker, which is reused while idle (the platform's usual
  case). The first call forks and moves the weights to the GPU; each call moves the session's KV cache in and out.
* `zerogpu-fresh`: a fresh fork for every call (the platform may hand out a new worker at any time): each turn
  also pays the fork and the weights' move.

Per turn it records the wall time from sending to the final event, the time to the first streamed text, the reply
tokens, and the KV bytes carried each way. Greedy decoding: the replies of the three variants must be identical
token for token (the cache that crossed two processes and the CPU is exactly the one that never left). It does not
include the platform's own scheduling round trip (an HTTP call to the ZeroGPU API), which nothing here can reach.

`--model-dir` takes any local model folder; `--random-weights` builds its architecture from its config with random
weights instead (the per-turn cost depends on shapes, not weights; for machines the weights cannot be copied to).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PROMPTS = ["What is the capital of France?", "Explain attention sinks in one paragraph.",
           "Write a short poem about the sea.", "Tell me a story about a lighthouse keeper and a storm.",
           "Describe the water cycle step by step.", "Write a letter from a cat to its owner.",
           "Give me three tips for learning Python.", "Summarise our conversation so far."]
VARIANTS = ("local", "zerogpu-reused", "zerogpu-fresh")


def load_model(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dtype = getattr(torch, args.dtype)
    if args.random_weights:
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(args.model_dir)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    return model.eval(), tokenizer


def run_variant(args) -> dict:
    import torch

    from streaming_engine import EngineConfig, StreamingEngine
    from streaming_engine.remote import RemoteTurnsEngine

    torch.set_num_threads(1)  # the forking process must not have started OpenMP threads (libgomp is not fork-safe)
    model, tokenizer = load_model(args)
    config = EngineConfig(start_size=args.start_size, recent_size=args.recent_size, max_new_tokens=args.max_new_tokens,
                          temperature=0.0, repetition_penalty=1.0)
    if args.variant == "local":
        engine = StreamingEngine(model.to(args.device), tokenizer, config)
    else:
        import zerogpu_standin

        def move_weights():  # what spaces does in a new worker: the packed weights go to the GPU
            model.to(args.device)

        zerogpu_standin.on_worker_start.append(move_weights)
        engine = RemoteTurnsEngine(model, tokenizer, config, run_elsewhere=zerogpu_standin.GPU(
            duration=60, reuse=args.variant == "zerogpu-reused"))
    sid = engine.new_session("streaming")
    turns = []
    for prompt in PROMPTS[: args.turns]:
        sent_kv = engine.stats(sid)["kv_bytes"]
        started, first, final = time.perf_counter(), None, None
        for event in engine.chat(sid, prompt):
            if first is None and event.kind == "delta" and event.text:
                first = time.perf_counter() - started
            final = event
        wall = time.perf_counter() - started
        turns.append({"wall_s": wall, "first_text_s": first, "reply_tokens": final.stats["reply_tokens"],
                      "kv_bytes_in": sent_kv, "kv_bytes_out": final.stats["kv_bytes"],
                      "cache_tokens": final.stats["cache_tokens"], "reply": final.text})
    if args.variant != "local":
        import zerogpu_standin

        turns[0]["forks_total"] = zerogpu_standin.stats.forks
        zerogpu_standin.shutdown()
    return {"turns": turns}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    colors = {"local": "#1f77b4", "zerogpu-reused": "#2ca02c", "zerogpu-fresh": "#ff7f0e"}
    for name, data in result["variants"].items():
        walls = [t["wall_s"] * 1000 for t in data["turns"]]
        ax.plot(range(1, len(walls) + 1), walls, marker="o", label=name, color=colors.get(name))
    ax.set_xlabel("turn")
    ax.set_ylabel("ms per turn (send → done)")
    ax.set_title(f"{result['model']} · {result['gpu']} · {result['max_new_tokens']} new tokens per turn", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None, help="a local model folder (default: the converted offline default)")
    p.add_argument("--random-weights", action="store_true", help="the model's architecture with random weights")
    p.add_argument("--label", default=None, help="the model's name in the results (default: its folder's name)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--turns", type=int, default=len(PROMPTS))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--start-size", type=int, default=4)
    p.add_argument("--recent-size", type=int, default=1020)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    p.add_argument("--output", type=Path, default=ROOT / "assets" / "eval" / "zerogpu_cost.json")
    args = p.parse_args(argv)
    if args.model_dir is None:
        from streaming_engine.loading import ensure_default_model

        args.model_dir = str(ensure_default_model())
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    result = {"model": (args.label or Path(args.model_dir).name) + (" (random weights)" if args.random_weights else ""),
              "dtype": args.dtype, "device": args.device, "max_new_tokens": args.max_new_tokens,
              "cache": f"{args.start_size} + {args.recent_size}", "variants": {}}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, *(argv if argv is not None else sys.argv[1:])]
        command += ["--model-dir", args.model_dir]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return done.returncode
        result["variants"][variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(variant, [round(t["wall_s"] * 1000) for t in result["variants"][variant]["turns"]], file=sys.stderr)
    replies = {name: [t.pop("reply") for t in data["turns"]] for name, data in result["variants"].items()}
    result["replies_identical"] = all(r == replies["local"] for r in replies.values())
    import torch

    result["gpu"] = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    for data in result["variants"].values():
        walls = [t["wall_s"] for t in data["turns"]]
        data["first_turn_s"], data["later_turns_mean_s"] = walls[0], sum(walls[1:]) / max(1, len(walls) - 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(result, args.output.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
