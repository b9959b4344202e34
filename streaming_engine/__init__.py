"""StreamingLLM (attention sinks + position shift) for transformers models, with a threaded chat engine.

Public API: `StartRecentKVCache`, `enable_streaming_llm`, `load`, `SUPPORTED_FAMILIES`, the chat engine
(`StreamingEngine`, `EngineConfig`, `Event`) and persistent conversations (`open_store`, `ChatStore`, `Conversations`). This
package never imports gradio; the web UI lives in `webui/`, composed by `app.py`.
"""

from .cache import StartRecentKVCache, enable_streaming_llm
from .conversations import ConversationNotFound, Conversations
from .engine import EngineBusy, EngineConfig, PinTooLong, SessionNotFound, StreamingEngine
from .families import SUPPORTED_FAMILIES, check_supported
from .hf_integration import stream_forward
from .loading import load
from .positions import next_position_ids
from .session import MODES, Event
from .store import ChatStore, ConversationStore, StoreConflict, StoreError, StoreFull, open_store

__all__ = [
    "MODES",
    "ChatStore",
    "ConversationStore",
    "ConversationNotFound",
    "Conversations",
    "EngineBusy",
    "EngineConfig",
    "Event",
    "PinTooLong",
    "SessionNotFound",
    "StreamingEngine",
    "SUPPORTED_FAMILIES",
    "StartRecentKVCache",
    "StoreConflict",
    "StoreError",
    "StoreFull",
    "check_supported",
    "enable_streaming_llm",
    "load",
    "next_position_ids",
    "open_store",
    "stream_forward",
]
