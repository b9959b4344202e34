"""Command-line plumbing shared by the evaluation CLIs (and the chat CLI and the app): help formatting,
model/device options, the decode-path options."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Mapping

# torch-free at import time, so that the CLIs built on these parsers answer `--help` at once.
from ..defaults import (
    CUDA_GRAPH_MODES,
    DECODE_STEPS,
    DEFAULT_CUDA_GRAPHS,
    DEFAULT_DECODE_STEP,
    DEFAULT_MODEL_NAME,
    DEVICE_MAP_STRATEGIES,
)
from .runinfo import run_metadata, write_result


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults in `--help`, except unset (None) ones, whose help already says what happens."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of the module docstring."""
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n\n")[0],
                                   formatter_class=HelpFormatter)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"Hugging Face id or local path (default: the offline {DEFAULT_MODEL_NAME})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: $STREAMING_LLM_DTYPE, else bf16 (fp16 without bf16 "
                        "support) on CUDA; on CPU bf16 where it has native bf16 units, fp32 otherwise)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add_placement_args(p)


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """`--device-map`, `--max-memory`, `--offload-folder`: spread a model that does not fit one device."""
    p.add_argument("--device-map", default=None, choices=DEVICE_MAP_STRATEGIES,
                   help="spread the layers over GPUs, CPU and disk with accelerate (instead of --device)")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="memory budget per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=30GiB; "
                        "what fits nowhere goes to disk")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="where disk-offloaded weights are written when the checkpoint cannot be read in place "
                        "(not needed for safetensors checkpoints)")


def placement_kwargs(args) -> dict:
    """The `load()` keywords of the parsed placement options."""
    return dict(device_map=args.device_map, max_memory=args.max_memory, offload_folder=args.offload_folder)


#: The environment variables the app reads `--decode-step` and `--cuda-graphs` from (`add_decode_args(env=...)`).
DECODE_ENV = {"decode_step": "DECODE_STEP", "cuda_graphs": "CUDA_GRAPHS"}


def add_decode_args(p, env: Mapping[str, str] | None = None) -> None:
    """`--decode-step` and `--cuda-graphs`: how the engine's batched decode runs (docs/gpu-decode.md). With `env`
    (the app's settings), each defaults to its environment variable (`DECODE_ENV`), as the app's other flags do;
    a bad value from there is the caller's to refuse (argparse checks only what the command line gives)."""

    def default(name: str, value: str) -> str:
        return (env.get(DECODE_ENV[name]) or value) if env is not None else value

    def env_note(name: str) -> str:
        return f"env {DECODE_ENV[name]}; " if env is not None else ""

    p.add_argument("--decode-step", choices=DECODE_STEPS, default=default("decode_step", DEFAULT_DECODE_STEP),
                   help="how decode steps run: static (fixed shapes, every row sampled on the device), eager, or "
                        "auto: static on CUDA, eager on CPU, MPS and ZeroGPU; a model the static step cannot "
                        f"serve decodes eagerly ({env_note('decode_step')}default %(default)s)")
    p.add_argument("--cuda-graphs", choices=CUDA_GRAPH_MODES, default=default("cuda_graphs", DEFAULT_CUDA_GRAPHS),
                   help="replay the static step from CUDA graphs: auto (on CUDA), on (an error without CUDA), off "
                        f"({env_note('cuda_graphs')}default %(default)s)")


def decode_kwargs(args) -> dict:
    """The `EngineConfig` keywords of the parsed decode-path options."""
    return dict(decode_step=args.decode_step, cuda_graphs=args.cuda_graphs)


def add_text_args(p: argparse.ArgumentParser, text_help: str, dataset_help: str) -> None:
    """`--text FILE` or `--dataset NAME` (one of `texts.DATASETS`), never both."""
    from .texts import DATASETS

    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help=text_help)
    source.add_argument("--dataset", default=None, choices=sorted(DATASETS), help=dataset_help)


def load_model(args):
    """`(model, tokenizer)` from the parsed model options, after applying `--threads`."""
    import torch

    from ..loading import load

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load(args.model, args.device, args.dtype, **placement_kwargs(args))


def parse_int_list(text: str, option: str, minimum: int = 1) -> list[int]:
    """`"1,2,4"` -> `[1, 2, 4]` (sorted, duplicates dropped); a `ValueError` naming `option` otherwise."""
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"{option} takes a comma list of integers (got {text!r})") from None
    if not values or values[0] < minimum:
        raise ValueError(f"{option} needs integers >= {minimum} (got {text!r})")
    return values


def check_min(**values: tuple[int | float, int | float]) -> None:
    """`check_min(tokens=(args.tokens, 2))`: raise `ValueError` naming the option when a value is too small."""
    for name, (value, low) in values.items():
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None, measure: Callable[[argparse.Namespace], dict],
            plot: Callable[[dict, Path], list[str]], table: Callable[[dict], str]) -> int:
    """The body of every benchmark's `main`: parse `argv`, `measure(args)` into a result, write its outputs.

    A `ValueError` or `RuntimeError` from `measure` (a bad option, a missing dataset) ends the run with
    `error: ...` on stderr and exit status 2, before anything is written.
    """
    args = parser.parse_args(argv)
    try:
        result = measure(args)
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"error: {exc}\n")
    write_outputs(args.output, result, plot, table(result), run_metadata(args, argv, parser.prog))
    return 0


def write_outputs(output: str, result: dict, plot: Callable[[dict, Path], list[str]], table: str, run: dict) -> None:
    """Save `result` with its provenance `run` (`runinfo.run_metadata`) as JSON at `output`, draw its plot(s) beside
    it, print the results table and the paths."""
    path = write_result(output, result, run)
    written = plot(result, path)
    print(table)
    print("wrote", path, *written)
