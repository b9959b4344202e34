"""A GGUF model loaded by llama.cpp: its weights, its tokenizer, its config. No contexts, no caches, no decoding.

`LlamaCppModel` is what `load(..., backend="llama.cpp")` returns in place of a transformers model. It carries what
the engine reads from a model (`config`, `generation_config`, `device`, `dtype`) and makes one `LlamaCppContext`
per engine (`new_context`), sized for that engine's conversations. Tokenization stays with a transformers
tokenizer built from the same GGUF (the engine's chat templating, template-injection guard and incremental
detokenization are then identical on both backends); llama.cpp only ever sees token ids.

`llama-cpp-python` is optional: `require_llamacpp()` imports it or raises a `RuntimeError` that says how to install
it. On CPUs that advertise AMX, llama.cpp 0.3.36's extra AMX buffer type crashed (SIGILL) on batches of two or more
tokens, so the weights are loaded without extra buffer types there (`use_extra_bufts=False`); elsewhere the
defaults stand.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import torch

from ..families import check_supported
from ..modelfiles import (
    cpu_flags,
    default_cache_dir,
    default_gguf_path,
    gguf_cache_dir,
)
from ..validate import check_int
from .context import LlamaCppContext

LLAMACPP_INSTALL = "pip install -r requirements-cpu.txt"
#: `/proc/cpuinfo` flags of Intel AMX: llama.cpp's AMX weight buffers are skipped on such CPUs (module docstring).
AMX_CPU_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
#: Bytes per element of llama.cpp's default KV cache type (F16), for the KV-bytes gauge.
KV_ELEMENT_BYTES = 2

_init_lock = threading.Lock()
_log_sink = None  # the C callback that silences llama.cpp's log; kept referenced for the process's lifetime


def require_llamacpp():
    """The `llama_cpp` module, initialised once; a `RuntimeError` with the install command when it is missing."""
    global _log_sink
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeError(
            "the llama.cpp backend needs the package llama-cpp-python, which is not installed: run "
            f"`{LLAMACPP_INSTALL}` (it compiles llama.cpp from source the first time, several minutes on 2 cores), "
            "or use --backend transformers"
        ) from exc
    with _init_lock:
        if _log_sink is None:
            llama_cpp.llama_backend_init()
            if not os.environ.get("STREAMING_LLM_LLAMACPP_LOG"):
                _log_sink = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
                llama_cpp.llama_log_set(_log_sink, ctypes.c_void_p(0))
            else:
                _log_sink = True
    return llama_cpp


def has_amx(flags: frozenset[str] | None = None) -> bool:
    return bool((cpu_flags() if flags is None else flags) & AMX_CPU_FLAGS)


def model_params(llama_cpp, flags: frozenset[str] | None = None):
    """llama.cpp model parameters for a CPU load (no GPU layers; no AMX buffers on AMX CPUs, see the module doc)."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    if has_amx(flags):
        params.use_extra_bufts = False
    return params


def default_threads() -> int:
    """Threads for llama.cpp: torch's intra-op thread count, so `OMP_NUM_THREADS` bounds both backends alike."""
    return max(1, torch.get_num_threads())


class LlamaCppModel:
    """The weights of one GGUF file in llama.cpp, and the transformers `config` describing the same model.

    `n_threads` (default `default_threads()`) is used by every context made from it.
    """

    is_llamacpp = True

    def __init__(self, gguf: str | Path, config, *, n_threads: int | None = None, name: str | None = None):
        llama_cpp = require_llamacpp()
        self.lc = llama_cpp
        self.path = Path(gguf)
        if not self.path.is_file():
            raise RuntimeError(f"GGUF file {str(self.path)!r} does not exist")
        if n_threads is not None:
            check_int("n_threads", n_threads, 1)
        self.n_threads = n_threads or default_threads()
        self.ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params(llama_cpp))
        if not self.ptr:
            raise RuntimeError(f"llama.cpp could not load {str(self.path)!r} (not a GGUF model it knows?)")
        weakref.finalize(self, llama_cpp.llama_model_free, self.ptr)
        vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self.ptr))
        self.n_layer = int(llama_cpp.llama_model_n_layer(self.ptr))
        self.config = config
        self.name = name or self.path.stem
        # What the engine reads from a transformers model: the end-of-turn ids, the device and a dtype label.
        from transformers import GenerationConfig

        eos = {int(t) for t in (llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)) if t >= 0}
        declared = getattr(config, "eos_token_id", None)
        eos |= set(declared if isinstance(declared, (list, tuple)) else [declared] if declared is not None else [])
        self.generation_config = GenerationConfig(eos_token_id=sorted(eos) or None)
        self.device = torch.device("cpu")
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.ptr, buf, len(buf))
        self.description = buf.value.decode(errors="replace")  # e.g. "llama ?B Q4_1"
        self.dtype = f"GGUF {self.description.split()[-1]} (llama.cpp)" if self.description else "GGUF (llama.cpp)"

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take in llama.cpp's F16 KV cache, all layers together."""
        cfg = self.config
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        return self.n_layer * 2 * kv_heads * head_dim * KV_ELEMENT_BYTES

    def new_context(self, *, sequences: int, seq_capacity: int, batch_tokens: int):
        """A llama.cpp context of `sequences` sequences of `seq_capacity` tokens each (see `context.py`)."""
        return LlamaCppContext(self, sequences=sequences, seq_capacity=seq_capacity, batch_tokens=batch_tokens)

    def __repr__(self) -> str:
        return f"LlamaCppModel({self.name!r}, {self.description!r}, threads={self.n_threads})"


def gguf_file(model_name_or_path) -> Path:
    """The GGUF file the llama.cpp backend loads: the offline default's (None) or a `.gguf` path."""
    if model_name_or_path is None:
        return default_gguf_path()
    path = Path(model_name_or_path)
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise ValueError(
            f"the llama.cpp backend loads GGUF files: pass --model path/to/model.gguf (got {str(model_name_or_path)!r}), "
            "or use --backend transformers for a Hugging Face id or folder"
        )
    return path


def hf_side(gguf: Path, *, default: bool, trust_remote_code: bool = False):
    """The transformers `(config, tokenizer)` of a GGUF, read from its metadata once and kept in the cache folder
    (the default model's converted folder when there is one, else `<cache root>/<stem>.tokenizer`)."""
    from transformers import AutoConfig, AutoTokenizer

    converted = default_cache_dir() if default else gguf_cache_dir(gguf)
    folder = converted if (converted / "tokenizer_config.json").exists() else converted.parent / f"{gguf.stem}.tokenizer"
    if not ((folder / "config.json").exists() and (folder / "tokenizer_config.json").exists()):
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=trust_remote_code)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=folder.parent))
        try:  # written beside and renamed, so a crash never leaves a half-written folder
            config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            try:
                os.replace(staging, folder)
            except OSError:
                if not (folder / "config.json").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return config, tokenizer


def load_llamacpp(model_name_or_path=None, *, n_threads: int | None = None, trust_remote_code: bool = False,
                  require_streaming_support: bool = True):
    """`(LlamaCppModel, tokenizer)` for the offline default (None) or a `.gguf` file."""
    require_llamacpp()
    gguf = gguf_file(model_name_or_path)
    config, tokenizer = hf_side(gguf, default=model_name_or_path is None, trust_remote_code=trust_remote_code)
    if require_streaming_support:
        check_supported(config)
    return LlamaCppModel(gguf, config, n_threads=n_threads), tokenizer


def plain_llama(path: str | Path, *, n_ctx: int, n_threads: int | None = None):
    """llama-cpp-python's own `Llama` on `path` (one sequence, its own KV cache and sampler), the reference the
    tests and the serve benchmark compare against. On AMX CPUs its weights are loaded without extra buffer types
    as ours are (`Llama` does not expose the switch, so its default parameters are adjusted for this one load)."""
    llama_cpp = require_llamacpp()
    import llama_cpp.llama_cpp as bindings  # the module `Llama` reads its defaults from

    defaults = bindings.llama_model_default_params
    if has_amx():
        bindings.llama_model_default_params = lambda: model_params(llama_cpp)
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=n_threads or default_threads(),
                               n_threads_batch=n_threads or default_threads(), n_gpu_layers=0, verbose=False)
    finally:
        bindings.llama_model_default_params = defaults
