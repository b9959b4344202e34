"""Stateless clients (the OpenAI-compatible API): a conversation arrives whole with every request; find the live
session it continues, or open one holding it.

Job: two functions over an engine's public surface. `find_conversation` picks the idle session of the same
*client* whose conversation, system prompt first, equals the request's messages, so one more user turn continues it
on its cache as it stands; `open_conversation` opens a session for that client holding the messages, primed on its
first turn from the attention sinks and the tail that fits (like a restored history).

A client here is whoever sends such conversations (an API key, a login, an address: `webui/openai_api.py` decides),
and it is only ever matched against its own sessions, so an identical history from another client never reuses
the first client's cache. It is not `SessionTag.owner`, the holder a per-owner cap counts: a stateless client's
sessions are bounded by its pool (`openai_api.ConversationPool`), not by that cap.

Boundary: no locks and no session internals; a session that closes while it is looked at is simply not a match.
"""

from __future__ import annotations

from .validate import clean_text


def conversation(engine, messages) -> tuple[str | None, list[dict]]:
    """`messages` (an optional leading system message, then user and assistant turns) checked and cleaned like
    chat input: `(system prompt or None, the turns)`. An empty system prompt is no system prompt."""
    clean = engine.clean_messages(messages, system_first=True)
    if clean and clean[0]["role"] == "system":
        return clean[0]["content"] or None, clean[1:]
    return None, clean


def find_conversation(engine, messages, client: str, exclude=()) -> str | None:
    """The id of `client`'s idle live session whose whole conversation equals `messages` (the most recently active
    when several do), or None. Sessions in `exclude` (claimed by a concurrent request) are skipped."""
    system, turns = conversation(engine, messages)
    wanted = ([{"role": "system", "content": system}] if system else []) + turns
    best, best_active = None, None
    for sid in engine.session_ids(client=client):
        if sid in exclude:
            continue
        try:
            if engine.replying(sid):
                continue
            held = engine.history(sid)
            if len(held) != len(wanted):
                continue
            # Replies are stored as generated; compare them cleaned, as the client's copy was.
            if [{"role": m["role"], "content": clean_text(m["content"])} for m in held] != wanted:
                continue
            active = engine.session(sid).last_active
        except KeyError:  # `SessionNotFound`: closed (idle, or by the pool) while we looked
            continue
        if best is None or active > best_active:
            best, best_active = sid, active
    return best


def open_conversation(engine, messages, client: str, mode: str = "streaming", last_reply_open: bool = False) -> str:
    """A new session for `client` holding `messages`; nothing is computed until its first turn. Origin "api": it is
    reaped on the API's shorter idle timeout. `last_reply_open`: `messages` end with a reply to continue."""
    system, turns = conversation(engine, messages)
    return engine.open_history(turns, system, mode=mode, origin="api", client=client,
                               last_reply_open=last_reply_open)
