"""The llama.cpp backend: a GGUF model on the CPU through `llama-cpp-python`, delegating to `streaming_engine/llamacpp/`.

One `llamacpp.context.LlamaCppContext` per engine, sized from its config (`engine_context`: a sequence for every
turn that may run at once, each as long as the largest cache a session gets by default). A conversation's cache is
a `llamacpp.cache.LlamaCppCache` on that context; `forward` is the context's `llama_decode` over several sequences
at once, prompt slices and decode tokens alike (`packs_rows`), so the scheduler gives it the packed policy.
Nothing here imports `llama_cpp` itself: the model object, made by `load(..., backend="llama.cpp")`, did.
"""

from __future__ import annotations

import torch

from ..llamacpp.context import engine_context
from ..llamacpp.model import load_llamacpp
from .base import Backend, Description


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    packs_rows = True
    worker_name = "streaming-engine-llamacpp"

    @staticmethod
    def load_model(model_name_or_path=None, *, device=None, device_map=None, max_memory=None, dtype=None,
                   n_threads: int | None = None, trust_remote_code: bool = False,
                   require_streaming_support: bool = True):
        """`(LlamaCppModel, tokenizer)` for `loading.load(..., backend="llama.cpp")`: a GGUF on the CPU with its own
        weight types, so a device other than the CPU, a device map or a dtype is refused with the reason."""
        if device_map is not None or max_memory is not None or (device is not None and torch.device(device).type != "cpu"):
            raise ValueError("the llama.cpp backend runs on the CPU: drop --device / --device-map")
        if dtype is not None:
            raise ValueError("the llama.cpp backend runs the GGUF's own weight types: drop --dtype")
        return load_llamacpp(model_name_or_path, n_threads=n_threads, trust_remote_code=trust_remote_code,
                             require_streaming_support=require_streaming_support)

    def __init__(self, model, config):
        super().__init__(model)
        self.context = engine_context(model, config)

    @property
    def max_positions(self) -> int:
        return self.context.seq_capacity

    @property
    def input_device(self) -> torch.device:
        return self.model.device

    @property
    def pass_tokens(self) -> int:
        return self.context.batch_tokens

    @property
    def max_rows(self) -> int:
        return self.context.sequences

    def new_cache(self, start_size: int, recent_size: int, *, pos_shift: bool = True, eviction: str = "tokens",
                  evict_block: int = 1):
        return self.context.new_cache(start_size, recent_size, pos_shift=pos_shift, eviction=eviction,
                                      evict_block=evict_block)

    def forward(self, rows: list) -> list[torch.Tensor]:
        return self.context.forward(rows)

    def describe(self) -> Description:
        # Weights in llama.cpp's own buffers, its own thread count.
        return Description(torch.device("cpu"), self.model.n_threads, (f"cpu, {self.model.dtype}",))

    def close(self) -> None:
        self.context.close()
