"""The native CPU backend: StreamingLLM on llama.cpp (through `llama-cpp-python`) for GGUF models.

The engine's turns, sampling, sessions and statistics are the same as on the transformers backend; only the three
things that touch the model are replaced:

* `model.py`: `LlamaCppModel`, the loaded GGUF weights (what `load(..., backend="llama.cpp")` returns), and the
  package's import with its install hint (whether it is installed is `modelfiles.llamacpp_available`, torch-free);
* `context.py`: `LlamaCppContext`, one llama.cpp context per engine holding one sequence per live conversation,
  the batched forward passes over those sequences, and the swapping of idle sequences to host memory;
* `cache.py`: `LlamaCppCache`, one conversation's KV cache, the contract of `StartRecentKVCache` (sinks kept,
  `evict_for_space`, `evict_range`, counters, KV bytes) over a llama.cpp sequence.

The engine reaches these through `streaming_engine/backends/llama.py` (`LlamaCppBackend`, the runner of the
one `scheduler.Scheduler` loop).

Nothing here imports `llama_cpp` at import time: the package is optional (`requirements-cpu.txt`).
"""

from ..modelfiles import llamacpp_available
from .model import LLAMACPP_INSTALL, LlamaCppModel, require_llamacpp

__all__ = ["LLAMACPP_INSTALL", "LlamaCppModel", "llamacpp_available", "require_llamacpp"]
