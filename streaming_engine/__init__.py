"""StreamingLLM (attention sinks + position shift) for transformers models, with a threaded chat engine.

Public API: `StartRecentKVCache`, `enable_streaming_llm`, `load`, `SUPPORTED_FAMILIES`, and the chat engine
(`StreamingEngine`, `EngineConfig`, `Event`). This package never imports
gradio; the web UI lives in `app.py`.
"""

from .cache import StartRecentKVCache, enable_streaming_llm
from .engine import EngineBusy, EngineConfig, SessionNotFound, StreamingEngine
from .families import SUPPORTED_FAMILIES, check_supported
from .hf_integration import stream_forward
from .loading import load
from .positions import next_position_ids
from .session import MODES, Event

__all__ = [
    "MODES",
    "EngineBusy",
    "EngineConfig",
    "Event",
    "SessionNotFound",
    "StreamingEngine",
    "SUPPORTED_FAMILIES",
    "StartRecentKVCache",
    "check_supported",
    "enable_streaming_llm",
    "load",
    "next_position_ids",
    "stream_forward",
]
