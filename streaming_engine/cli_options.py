"""Command-line options of the product that the benchmarks share: where the model's layers go (`--device-map`,
`--max-memory`, `--offload-folder`), how the batched decode runs (`--decode-step`, `--cuda-graphs`) and how much
of the evicted conversation a turn may quote back (`--recall-budget`). The app
(`webui/settings.py`), the chat CLI and every benchmark CLI (`benchmarks/cli.py`) add them from here, so each flag has
one spelling, one help text and one default. Boundary: parser options and their engine keywords only; torch-free,
so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
from typing import Mapping

from .defaults import (
    CUDA_GRAPH_MODES,
    DECODE_STEPS,
    DEFAULT_CUDA_GRAPHS,
    DEFAULT_DECODE_STEP,
    DEFAULT_OVERLAP,
    DEVICE_MAP_STRATEGIES,
    OVERLAP_MODES,
    RECALL_MIN_BUDGET,
)


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


#: The environment variables the app reads `--decode-step`, `--cuda-graphs` and `--overlap` from (`add_decode_args(env=...)`).
DECODE_ENV = {"decode_step": "DECODE_STEP", "cuda_graphs": "CUDA_GRAPHS", "overlap": "OVERLAP"}


def add_decode_args(p, env: Mapping[str, str] | None = None) -> None:
    """`--decode-step`, `--cuda-graphs` and `--overlap`: how the engine's batched decode runs (docs/gpu-decode.md). With `env`
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
    p.add_argument("--overlap", choices=OVERLAP_MODES, default=default("overlap", DEFAULT_OVERLAP),
                   help="launch the static step's next decode step before answering the turns with this one's "
                        "tokens: auto (on CUDA), on, off; the eager step never overlaps "
                        f"({env_note('overlap')}default %(default)s)")


def decode_kwargs(args) -> dict:
    """The `EngineConfig` keywords of the parsed decode-path options."""
    return dict(decode_step=args.decode_step, cuda_graphs=args.cuda_graphs, overlap=args.overlap)


def env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    """An integer environment variable (unset or empty: `default`); anything else stops with its name."""
    text = env.get(name)
    try:
        return int(text) if text else default
    except ValueError:
        raise SystemExit(f"error: environment variable {name} must be a whole number, got {text!r}") from None


def env_float(env: Mapping[str, str], name: str, default: float | None = None) -> float | None:
    """A number environment variable (unset or empty: `default`); anything else stops with its name."""
    text = env.get(name)
    try:
        return float(text) if text else default
    except ValueError:
        raise SystemExit(f"error: environment variable {name} is not a number: {text!r}") from None


#: The environment variable the app reads `--recall-budget` from (`add_recall_arg(env=...)`).
RECALL_ENV = "RECALL_BUDGET"


def add_recall_arg(p, env: Mapping[str, str] | None = None) -> None:
    """`--recall-budget`: most tokens of evicted messages quoted back into a turn (0 = off, none: the default of the
    window). With `env` (the app's settings) it defaults to `RECALL_ENV`; the value is checked where it enters the
    engine's settings (`recall.check_budget`, against the recent size)."""
    note = f"env {RECALL_ENV}; " if env is not None else ""
    p.add_argument("--recall-budget", type=int, default=env_int(env, RECALL_ENV) if env is not None else None,
                   help=f"most tokens of evicted messages quoted back into a turn that matches them; 0 = off "
                        f"({note}default: a quarter of the recent size, at least {RECALL_MIN_BUDGET}, at most half)")
