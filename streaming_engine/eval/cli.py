"""Command-line plumbing shared by the evaluation CLIs: help formatting and the model/device/dtype options."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch

from ..loading import DEFAULT_MODEL_NAME


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


def load_model(args):
    """`(model, tokenizer)` from the parsed model options, after applying `--threads`."""
    from ..loading import load

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load(args.model, args.device, args.dtype)


def check_min(**values: tuple[int | float, int | float]) -> None:
    """`check_min(tokens=(args.tokens, 2))`: raise `ValueError` naming the option when a value is too small."""
    for name, (value, low) in values.items():
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def write_outputs(output: str, result: dict, plot: Callable[[dict, Path], list[str]], table: str) -> None:
    """Save `result` as JSON at `output`, draw its plot(s) beside it, print the results table and the paths."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    written = plot(result, path)
    print(table)
    print("wrote", path, *written)
