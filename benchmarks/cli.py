"""Command-line plumbing shared by the evaluation CLIs: help formatting, model/device options, outputs. The options
the product shares with them (placement, decode path) live in `streaming_engine.cli_options`; they are re-exported
here for the benchmarks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

# torch-free at import time, so that the CLIs built on these parsers answer `--help` at once.
from streaming_engine.cli_options import (  # noqa: F401 - re-exported: the benchmarks add these from here
    DECODE_ENV,
    add_decode_args,
    add_placement_args,
    decode_kwargs,
    placement_kwargs,
)
from streaming_engine.defaults import DEFAULT_MODEL_NAME
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


def add_text_args(p: argparse.ArgumentParser, text_help: str, dataset_help: str) -> None:
    """`--text FILE` or `--dataset NAME` (one of `texts.DATASETS`), never both."""
    from .texts import DATASETS

    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help=text_help)
    source.add_argument("--dataset", default=None, choices=sorted(DATASETS), help=dataset_help)


def load_model(args):
    """`(model, tokenizer)` from the parsed model options, after applying `--threads`."""
    import torch

    from streaming_engine.loading import load

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
