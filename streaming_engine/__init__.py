"""StreamingLLM (attention sinks + position shift) for transformers models, with a threaded chat engine.

Public API: `StartRecentKVCache`, `enable_streaming_llm`, `load`, `SUPPORTED_FAMILIES`, the chat engine
(`StreamingEngine`, `EngineConfig`, `Event`) and persistent conversations (`open_store`, `ChatStore`, `Conversations`). This
package never imports gradio; the web UI lives in `webui/`, composed by `app.py`.
"""

import importlib

# Each public name is imported from its module on first use (PEP 562), not here: importing the package (e.g. for
# `streaming_engine.defaults` under `--help`) must not pull in torch and transformers, which take seconds.
_EXPORTS = {
    "StartRecentKVCache": "cache", "enable_streaming_llm": "hf_integration",
    "ConversationNotFound": "conversations", "Conversations": "conversations",
    "EngineBusy": "engine", "EngineConfig": "engine", "PinTooLong": "engine", "SessionNotFound": "engine",
    "StreamingEngine": "engine",
    "SUPPORTED_FAMILIES": "families", "check_supported": "families",
    "export_history": "history", "restore_history": "history",
    "stream_forward": "hf_integration",
    "load": "loading",
    "next_position_ids": "positions",
    "MODES": "session", "Event": "session",
    "Snippet": "recall", "recall_snippets": "recall",
    "ChatStore": "store", "ConversationStore": "store", "StoreConflict": "store", "StoreError": "store",
    "StoreFull": "store", "open_store": "stores",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


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
    "Snippet",
    "StreamingEngine",
    "SUPPORTED_FAMILIES",
    "StartRecentKVCache",
    "StoreConflict",
    "StoreError",
    "StoreFull",
    "check_supported",
    "enable_streaming_llm",
    "export_history",
    "load",
    "next_position_ids",
    "open_store",
    "recall_snippets",
    "restore_history",
    "stream_forward",
]
