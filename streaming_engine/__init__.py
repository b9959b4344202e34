"""StreamingLLM (attention sinks + position shift) for transformers models, with a threaded chat engine.

Public API: `StartRecentKVCache`, `enable_streaming_llm`, `load`, `SUPPORTED_FAMILIES`. This package never imports
gradio; the web UI lives in `app.py`.
"""

from .cache import StartRecentKVCache, enable_streaming_llm
from .families import SUPPORTED_FAMILIES, check_supported
from .loading import load
from .positions import next_position_ids

__all__ = [
    "SUPPORTED_FAMILIES",
    "StartRecentKVCache",
    "check_supported",
    "enable_streaming_llm",
    "load",
    "next_position_ids",
]
