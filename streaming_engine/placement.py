"""Placement: spreading one model over several devices (GPUs, CPU, disk) through accelerate's device maps.

Boundary: this module turns the user's settings (`--device-map`, `--max-memory`, `--offload-folder`) into the
keyword arguments of transformers' `from_pretrained`, and answers two questions about a loaded model: where its
inputs go and how many weight bytes sit where. It moves no tensor itself; accelerate's hooks do that on every
forward pass (a layer mapped to `"cpu"` or `"disk"` keeps its weights there and borrows the main device to run).

Why the streaming cache needs nothing special here: every layer's keys and values are made by that layer's
forward, so they live on the device the layer *executes* on; `StartRecentKVCache` evicts and re-rotates each
layer's tensors where they are (`cache.py` computes one rotation per device). Offloading moves weights, never the
KV cache: with a GPU, a `"cpu"` or `"disk"` layer executes, and keeps its cache, on the GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .defaults import DEVICE_MAP_STRATEGIES  # noqa: F401  (its home is defaults.py)

#: Byte multipliers of the size suffixes accepted by `--max-memory` (GB = 10^9, GiB = 2^30, like accelerate).
SIZE_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_GPU_KEY = re.compile(r"^(?:cuda:)?(\d+)$")


def parse_size(text: str) -> int:
    """`"20GiB"` -> 21474836480 bytes; a bare number is bytes. Raises `ValueError` on anything else or on 0."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise ValueError(f"bad memory size {text!r}: use a number with an optional unit, e.g. 20GiB, 512MB, 1.5GB")
    size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be more than 0 bytes")
    return size


def parse_max_memory(text: str) -> dict[int | str, int]:
    """`"0=20GiB,1=20GiB,cpu=30GiB"` -> `{0: ..., 1: ..., "cpu": ...}` in bytes (accelerate's `max_memory`).

    Keys are a GPU index (`0` or `cuda:0`), `cpu` or `mps`. Disk has no budget: what fits nowhere else goes there.
    """
    budget: dict[int | str, int] = {}
    items = [item for item in str(text).split(",") if item.strip()]
    if not items:
        raise ValueError("--max-memory is empty: give DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=30GiB")
    for item in items:
        name, sep, size = item.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise ValueError(f"bad --max-memory entry {item.strip()!r}: expected DEVICE=SIZE, e.g. 0=20GiB or cpu=30GiB")
        gpu = _GPU_KEY.match(name)
        if gpu:
            key: int | str = int(gpu.group(1))
        elif name in ("cpu", "mps"):
            key = name
        elif name == "disk":
            raise ValueError("--max-memory takes no disk budget: layers that fit nowhere else are offloaded to disk")
        else:
            raise ValueError(f"unknown device {name!r} in --max-memory: use a GPU index (0, cuda:1), cpu or mps")
        if key in budget:
            raise ValueError(f"device {name!r} appears twice in --max-memory")
        budget[key] = parse_size(size)
    return budget


@dataclass
class Placement:
    """How `load()` places a model: one device (`device_map=None`) or a device map over several.

    `device_map` is a strategy name from `DEVICE_MAP_STRATEGIES` or an explicit `{module name: device}` dict
    (devices: GPU index, "cuda:N", "cpu", "disk"). `max_memory` is a dict or a `parse_max_memory` string;
    `offload_folder` is where weights mapped to "disk" are written when they cannot be read from the checkpoint
    itself (a safetensors checkpoint needs none).
    """

    device_map: str | dict | None = None
    max_memory: str | dict | None = None
    offload_folder: str | None = None

    def __post_init__(self):
        if self.device_map is None:
            if self.max_memory is not None or self.offload_folder is not None:
                raise ValueError("--max-memory and --offload-folder only apply with --device-map")
            return
        if isinstance(self.device_map, str):
            if self.device_map not in DEVICE_MAP_STRATEGIES:
                raise ValueError(
                    f"unknown device map {self.device_map!r}: use one of {', '.join(DEVICE_MAP_STRATEGIES)}"
                )
        elif isinstance(self.device_map, dict):
            if not self.device_map:
                raise ValueError("an explicit device map needs at least one module")
            for module, device in self.device_map.items():
                if not _is_map_device(device):
                    raise ValueError(f"device map entry {module!r}: {device!r} is not a GPU index, cuda:N, cpu or disk")
        else:
            raise TypeError(f"device_map must be a strategy name or a dict, got {type(self.device_map).__name__}")
        if isinstance(self.max_memory, str):
            self.max_memory = parse_max_memory(self.max_memory)
        elif self.max_memory is not None and not isinstance(self.max_memory, dict):
            raise TypeError(f"max_memory must be a string or a dict, got {type(self.max_memory).__name__}")
        if self.offload_folder is not None:
            self.offload_folder = str(self.offload_folder)

    def check_devices(self) -> None:
        """Raise `ValueError` when `max_memory` names a GPU this process cannot see."""
        visible = torch.cuda.device_count()
        for key in self.max_memory or {}:
            if isinstance(key, int) and key >= visible:
                raise ValueError(f"--max-memory names GPU {key}, but this process sees {visible} GPU(s)")

    def from_pretrained_kwargs(self) -> dict:
        """Keyword arguments for `from_pretrained` (empty for the single-device case)."""
        if self.device_map is None:
            return {}
        kwargs: dict = {"device_map": self.device_map}
        if self.max_memory is not None:
            kwargs["max_memory"] = dict(self.max_memory)
        if self.offload_folder is not None:
            kwargs["offload_folder"] = self.offload_folder
        return kwargs


def _is_map_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return device >= 0
    if isinstance(device, torch.device):
        return True
    return isinstance(device, str) and (device in ("cpu", "disk", "mps") or _GPU_KEY.match(device) is not None)


def _as_device(device) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where input ids must be created: the device the embedding executes on.

    Not `model.device`, which is the first parameter's device: with the embedding offloaded to disk that is
    `meta`. accelerate records the execution device on the hook it attaches (to the embedding, or to the whole
    model when the map has a single entry).
    """
    embedding = model.get_input_embeddings()
    for module in (embedding, model):
        hook = getattr(module, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return _as_device(device)
    weight = getattr(embedding, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return model.device


def weight_bytes_by_placement(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of weights per placement (`{"cuda:0": ..., "cpu": ..., "disk": ...}`); tied weights count once.

    A model without a device map reports everything on `model.device`. With a map, "cpu" and "disk" are where
    weights are *stored*; on a GPU machine those layers still execute on the GPU.
    """
    device_map = getattr(model, "hf_device_map", None) or {"": str(model.device)}
    seen: set[int] = set()
    totals: dict[str, int] = {}
    # Longest module names first, so a layer listed on its own is not also counted in its parent's entry.
    for name in sorted(device_map, key=lambda n: -len(n)):
        device = device_map[name]
        label = str(_as_device(device)) if device != "disk" else "disk"
        for param in model.get_submodule(name).parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            totals[label] = totals.get(label, 0) + param.numel() * param.element_size()
    return totals


def describe_placement(model: torch.nn.Module) -> str:
    """One line for logs and the UI, e.g. `"cuda:0 1.20 GB, cpu 310.5 MB, disk 95.0 MB"` (weights only)."""
    return format_placement(weight_bytes_by_placement(model))


def format_placement(totals: dict[str, int]) -> str:
    """`weight_bytes_by_placement`'s totals as `describe_placement` writes them, largest first (for a caller that
    already holds the totals and should not walk the weights again)."""
    parts = sorted(totals.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{where} {format_bytes(size)}" for where, size in parts)


def format_bytes(size: int) -> str:
    """A weight size as the placement line writes it: "1.20 GB" from a gigabyte up, else "310.5 MB"."""
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
