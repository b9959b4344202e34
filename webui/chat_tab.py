"""The Chat tab: one streaming conversation at a time beside live cache gauges, with stop, retry, continue, new chat,
history download/upload, and the list of this browser's conversations (switch, rename, delete).

Conversations live on the server (`streaming_engine.conversations`; stored in SQLite unless `--no-persist`). The
browser keeps only their random tokens (`conversation_list.py`). A page load re-attaches to the conversation the
page showed (a reload creates no session; after a server restart it is re-created from the store), a closed
page frees its session within seconds (`sessions.TABS`), and every session counts against its client's cap
(`sessions.owner_of`). An uploaded history becomes a new conversation whose mode and sizes the server decides;
with `--visitor-cache-sizes` a visitor may give a new chat a smaller cache than the server's, never a larger one.

Handlers are plain functions whose first argument is the `Conversations`; `build_chat_tab` lays out the tab and
binds them. Each returns (or yields) the values of its event's outputs, in the order named on it; a trailing
`request` parameter is gradio's (None when a test calls the handler). A refused message (empty, bad setting,
busy server) goes back into the input box; nothing else changes.
"""

from __future__ import annotations

import time

import gradio as gr

from streaming_engine import EngineBusy
from streaming_engine.conversations import (
    UNDO_DELETE_S,
    ConversationNotFound,
    Conversations,
    ConversationUnavailable,
    Opened,
)
from streaming_engine.engine import refusal
from streaming_engine.history import upload_limit_note
from streaming_engine.sampling import MAX_NEW_TOKENS_LIMIT
from streaming_engine.session import NO_REPLY_TO_CONTINUE
from streaming_engine.validate import EMPTY_TEXT, MAX_MESSAGE_CHARS

from . import files
from .assets import icon, load_json_list
from .browser_key import bound
from .conversation_list import (
    BROWSER_STORAGE_KEY,
    browser_record,
    build_conversation_list,
    empty_record,
    forget,
    list_update,
    remember,
    summaries,
)
from .handlers import bind
from .render import (
    Throttle,
    error_reply,
    final_reply,
    gauges_html,
    inert,
    mark_memory,
    mark_note,
    user_and_pending_reply,
)
from .sessions import TABS, conversation_state, owner_of, tab_of

CONTEXT_FULL_NOTE = "*(context full)*"
EMPTY_MESSAGE = f"The message {EMPTY_TEXT}."
#: Said when a message is sent while this chat's reply is still streaming: the message is not taken, and stays.
WAIT_FOR_REPLY = ("A reply is still being written: your message stays in the box. Press Enter again once the reply "
                  "ends, or press Stop first.")
NOTHING_YET = "Nothing to download yet: send a message first."
CLEARED_NOTE = ("Cleared from the screen: the conversation is still in your list. Use \"Delete this chat\" to remove "
                "it for good.")
#: Said when a chat is deleted: how to take it back, and for how long.
DELETED_NOTE = (f"Conversation deleted. Press \"Undo delete\" within {UNDO_DELETE_S / 60:g} minutes to bring it "
                "back.")
#: Said when the undo comes after the window (or after a restart), and the delete is final.
STORE_UNAVAILABLE = ("Your saved conversations cannot be listed now: the chat database is unreachable. Your list is kept "
                     "and comes back once the database does.")
TOO_LATE_TO_UNDO = "Too late to undo: that conversation was deleted for good."
#: Longest system prompt the settings box takes (the engine's own limit is far larger).
MAX_SYSTEM_PROMPT_CHARS = 4000
#: The "Max new tokens" slider's top; the engine accepts up to `MAX_NEW_TOKENS_LIMIT`.
MAX_NEW_TOKENS_SLIDER = min(1024, MAX_NEW_TOKENS_LIMIT)

SKIP = gr.skip()
#: Browser storage key of the visitor's Settings (system prompt, sampling, cache sizes), kept across reloads.
SETTINGS_STORAGE_KEY = "streaming-llm-settings"
#: The Settings inputs, in the order the turn handlers take them.
SETTING_NAMES = ("system_prompt", "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty",
                 "start_size", "recent_size")


def slider_ranges(cfg) -> dict[str, tuple[float, float, float]]:
    """Each Settings slider's (lowest, highest, step): the layout builds the sliders from it and a saved value is
    checked against it."""
    return {"temperature": (0, 2, 0.05), "top_p": (0.05, 1, 0.05), "top_k": (0, 200, 1),
            "max_new_tokens": (1, MAX_NEW_TOKENS_SLIDER, 1), "repetition_penalty": (1.0, 2.0, 0.05),
            "start_size": (0, cfg.start_size, 1), "recent_size": (min(16, cfg.recent_size), cfg.recent_size, 1)}


def remember_settings(*values) -> dict:
    """The Settings as the browser keeps them (`SETTINGS_STORAGE_KEY`): {name: value} in `SETTING_NAMES` order;
    without `--visitor-cache-sizes` the cache sizes are not among the values."""
    return dict(zip(SETTING_NAMES, values))


def saved_settings(cfg, saved, visitor_cache_sizes: bool = False) -> list:
    """Page load: the values the browser kept for the Settings, one per input (`SETTING_NAMES`, the cache sizes
    only with `visitor_cache_sizes`). Kept values are untrusted: one of the wrong type or out of its slider's
    range is skipped (the input keeps the server's default), as is one never saved."""
    saved = saved if isinstance(saved, dict) else {}
    ranges = slider_ranges(cfg)
    names = SETTING_NAMES if visitor_cache_sizes else SETTING_NAMES[:6]
    values = []
    for name in names:
        value = saved.get(name)
        if name == "system_prompt":
            ok = isinstance(value, str) and len(value) <= MAX_SYSTEM_PROMPT_CHARS
        else:
            low, high, step = ranges[name]
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
                  and (step != 1 or float(value).is_integer()))
        values.append(value if ok else SKIP)
    return values



# --- what the page shows --------------------------------------------------------------------------------------


def shown_messages(messages: list[dict]) -> list[dict]:
    """A conversation's messages for the Chatbot: text made inert, a reply's mark noted (as it was when it ended:
    `render.final_reply`)."""
    return [{"role": m["role"], "content": "\n\n".join(part for part in (inert(m["content"]), mark_note(m)) if part)}
            for m in messages if m["role"] in ("user", "assistant")]


def session_stats(conversations: Conversations, session_id: str | None) -> dict | None:
    try:
        return conversations.engine.stats(session_id) if session_id else None
    except KeyError:
        return None


# Outputs of everything that changes which conversation the page shows (`view`): chatbot, gauges, state, browser
# record, conversation list, title box, download file.


def view(conversations: Conversations, opened: Opened | None, record: dict) -> list:
    """The page showing `opened` (None: an empty new chat), with `record` as the browser's record."""
    state = {"token": opened.token} if opened else {}
    return [
        mark_memory(shown_messages(opened.messages), conversations.memory_map(opened.token)) if opened else [],
        gauges_html(session_stats(conversations, opened.session_id) if opened else None,
                    capacity=conversations.engine.config.cache_size,
                    start_size=conversations.engine.config.start_size),
        state,
        record,
        list_update(conversations, record),
        opened.title if opened else "",
        gr.update(visible=False, value=None),
    ]


def unchanged(record=SKIP) -> list:
    return [SKIP, SKIP, SKIP, record, SKIP, SKIP, SKIP]


def attach(conversations: Conversations, state: dict, record: dict, request) -> str | None:
    """The token of the conversation this page works on, re-opened if the page kept showing it across a server
    restart (its state is gone but the browser record still names it); None when there is none (yet)."""
    token = state.get("token")
    if token:
        return token
    token = record["current"]
    if not token:
        return None
    try:
        conversations.open(token, owner=owner_of(request))
    except ConversationNotFound:
        return None
    state["token"] = token
    TABS.show(tab_of(request), token, conversations.release)
    return token


def leave(conversations: Conversations, token: str | None, request) -> None:
    """This page stops showing `token` (for another conversation, or a new chat): unless another page shows it,
    its live session is parked, so that switching back to one of the most recent re-primes nothing
    (`Conversations.park`, `KEEP_RECENT`)."""
    TABS.show(tab_of(request), None)
    if token and not TABS.held(token):
        conversations.park(token, owner_of(request))


def switch_to(conversations: Conversations, state: dict, record: dict, opened: Opened | None, request) -> list:
    """Show `opened` (None: an empty new chat) instead of the page's current conversation."""
    previous = state.get("token")
    if opened is None or opened.token != previous:
        leave(conversations, previous, request)
    if opened is not None:
        TABS.show(tab_of(request), opened.token, conversations.release)
    return view(conversations, opened, remember(record, opened.token if opened else None))


def visitor_cache_sizes(config, start=None, recent=None) -> dict:
    """A visitor's cache sizes for a new chat as `new_session` arguments (None: the server's). They may shrink the
    cache the server's owner configured, never grow it; raises `ValueError` naming the allowed range."""
    if start is not None and not 0 <= int(start) <= config.start_size:
        raise ValueError(f"attention sinks must be between 0 and {config.start_size}")
    if recent is not None and not 1 <= int(recent) <= config.recent_size:
        raise ValueError(f"the recent window must be between 1 and {config.recent_size} tokens")
    return {"start_size": None if start is None else int(start), "recent_size": None if recent is None else int(recent)}


# --- handlers -------------------------------------------------------------------------------------------------
# Outputs of a turn (respond, retry_last, stream_turn): chatbot, message box, gauges, state, browser record,
# conversation list. `start` and `recent` are a visitor's cache sizes for a new chat: inputs only when the owner
# allows them (`--visitor-cache-sizes`), so they come after gradio's `request`, which it inserts by position.


def stream_turn(conversations, message, messages, state, record, system_prompt, temp, p, k, new_tokens, rep,
                request=None, start=None, recent=None, from_box=True):
    """Shared by Send and Retry: append the turn, stream the reply, keep the gauges live; the conversation saves
    itself as it goes. A page without a conversation starts one here (the system prompt and a visitor's cache
    sizes apply to it).

    The message box is written once, when the turn starts (emptied if the message came from it, `from_box`):
    while the reply streams the user may already be typing the next message, which a repaint must not wipe."""
    state, record = bound(state, request), browser_record(record)
    owner = owner_of(request)
    try:
        token = attach(conversations, state, record, request)
        started = token is None
        if started:
            sizes = visitor_cache_sizes(conversations.engine.config, start, recent)
            opened = conversations.start(owner=owner, system_prompt=system_prompt or None,
                                         recall=not state.pop("recall_off", False), **sizes)
            token = state["token"] = opened.token
            TABS.show(tab_of(request), token, conversations.release)
        # Every turn re-asserts the browser's record, not only a new chat's first: gradio's BrowserState can lose
        # an update that reaches the page before the component has mounted (its mount then reloads local
        # storage over it), and a record lost that way would otherwise stay lost for the whole conversation.
        record = remember(record, token)
    except (EngineBusy, ValueError) as exc:
        gr.Warning(str(exc))
        yield messages, message, SKIP, state, SKIP, SKIP
        return
    # The chat as the conversation has it, not as the page sent it: a page's copy can lag (an event queued behind
    # a reply still streaming was handed the chat as it was then).
    try:
        shown = shown_messages(conversations.messages(token)) if not started else list(messages or [])
    except ConversationNotFound:  # its live session closed meanwhile: `chat` re-creates it from the store
        shown = list(messages or [])
    messages = mark_memory(shown + user_and_pending_reply(message), conversations.memory_map(token))
    sampling = turn_sampling(temp, p, k, new_tokens, rep)
    # Submitted and stored before the page shows the message: what the user saw survives a crash right after.
    events = conversations.chat(token, message, owner=owner, **sampling)
    not_taken = refusal(events)
    if not_taken is not None:  # never shown as sent
        yield _given_back(not_taken, shown, message, state, record)
        return
    yield from _streamed(events, conversations, token, messages, shown, message, from_box, state, record)


def turn_sampling(temp, p, k, new_tokens, rep) -> dict:
    """The Settings sliders' values as the engine's sampling keywords (Send, Retry and Continue alike)."""
    return dict(temperature=float(temp), top_p=float(p), top_k=int(k), max_new_tokens=int(new_tokens),
                repetition_penalty=float(rep))


def _streamed(events, conversations, token, messages, shown, message, from_box, state, record, reply=""):
    """`stream_turn`'s updates while the turn's events come (and `continue_last`'s, into the reply that has
    `reply` already: the page's last message). A page gone mid-reply (gradio closes this generator) closes
    `events`, so the turn's outcome is saved now, not at garbage collection."""
    try:
        throttle, taken = Throttle(), False
        yield messages, "" if from_box else SKIP, SKIP, state, record, SKIP
        for event in events:
            if event.kind == "delta":
                reply += event.text
                if throttle.due():
                    messages[-1] = {"role": "assistant", "content": inert(reply)}
                    messages = mark_memory(messages, conversations.memory_map(token))  # live: evictions fade older ones
                    yield messages, SKIP, gauges_html(event.stats, phase="generating"), state, SKIP, SKIP
            elif event.kind == "done":
                taken, gauges = True, gauges_html(event.stats)
                messages[-1] = {"role": "assistant", "content": final_reply(event, CONTEXT_FULL_NOTE)}
                messages = mark_memory(messages, conversations.memory_map(token))
                yield messages, SKIP, gauges, state, SKIP, SKIP
            elif event.accepted:  # failed part-way: the conversation kept the message and the partial reply
                gr.Warning(event.text)
                taken, gauges = True, gauges_html(event.stats) if event.stats else SKIP
                messages[-1] = {"role": "assistant", "content": error_reply(event.text)}
                yield messages, SKIP, gauges, state, SKIP, SKIP
            else:  # refused (bad setting, busy): nothing happened
                yield _given_back(event, shown, message, state, SKIP)
        problem = conversations.save_error(token)
        if problem:
            gr.Warning(problem)
        if taken:  # the turn is saved now (the conversation saves once its stream ends): list its new title and count,
            # and send the record again: the page has surely mounted by now, so a first write it lost is repaired
            yield messages, SKIP, gauges, state, record, list_update(conversations, record)
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def _given_back(event, shown, message, state, record):
    """The update for a turn not taken (`event.accepted` False): the chat as it was, the text back in the box to
    send again or edit, the reason as a notice."""
    gr.Warning(event.text)
    return shown, message, gauges_html(event.stats) if event.stats else SKIP, state, record, SKIP


def respond(conversations, message, messages, state, record, system_prompt, temp, p, k, new_tokens, rep,
            request: gr.Request = None, start=None, recent=None):
    """Send: one turn with the message in the box."""
    if not isinstance(message, str) or not message.strip():
        gr.Warning(EMPTY_MESSAGE)
        yield messages, message, SKIP, state, SKIP, SKIP
        return
    if conversations.replying(bound(state, request).get("token")):
        # Sent while this chat's reply streams (Enter pressed again): the engine would refuse it anyway. Nothing on
        # the page changes, so the text stays in the box, as typed since, and the user is told why.
        gr.Warning(WAIT_FOR_REPLY)
        yield SKIP, SKIP, SKIP, SKIP, SKIP, SKIP
        return
    yield from stream_turn(conversations, message, messages, state, record, system_prompt, temp, p, k, new_tokens,
                           rep, request, start, recent)


def set_recall(conversations, enabled, state, request: gr.Request = None):
    """The recall switch: on or off for the conversation on the page, or, before there is one, for the chat the
    next message starts (kept in the page's state until then). Returns the state."""
    state = bound(state, request)
    token = state.get("token")
    if token:
        conversations.set_recall(token, bool(enabled))
    else:
        state["recall_off"] = not enabled
    return state


def recall_shown(conversations, state, request: gr.Request = None):
    """The recall switch as it stands for what the page shows (on for a chat not started yet, unless set off)."""
    state = bound(state, request)
    token = state.get("token")
    if token or not conversations.recall_available():
        return conversations.recall_enabled(token)
    return not state.get("recall_off", False)


def retry_last(conversations, messages, state, record, system_prompt, temp, p, k, new_tokens, rep,
               request: gr.Request = None, start=None, recent=None):
    """Retry: drop the last exchange and send its message again."""
    state, record = bound(state, request), browser_record(record)
    try:
        token = attach(conversations, state, record, request)
        if not token:
            raise ValueError("there is no message to retry yet")
        message = conversations.retry(token, owner=owner_of(request))
        shown = mark_memory(shown_messages(conversations.messages(token)), conversations.memory_map(token))
    except (ValueError, KeyError, EngineBusy) as exc:
        gr.Warning(str(exc))
        yield messages, SKIP, SKIP, state, SKIP, SKIP
        return
    yield from stream_turn(conversations, message, shown, state, record, system_prompt, temp, p, k, new_tokens,
                           rep, request, start, recent, from_box=False)


def continue_last(conversations, messages, state, record, system_prompt, temp, p, k, new_tokens, rep,
                  request: gr.Request = None, start=None, recent=None):
    """Continue: the last reply, cut at its length limit or stopped, goes on where it ended, in the bubble it has
    (`Conversations.continue_reply`; its note goes until the reply ends again). The message box is left alone.
    Outputs: a turn's (`start`, `recent` and the system prompt are taken as for a turn, and apply to nothing)."""
    state, record = bound(state, request), browser_record(record)
    try:
        token = attach(conversations, state, record, request)
        if not token:
            raise ValueError(NO_REPLY_TO_CONTINUE)
        # Read before the continuation is submitted: the worker extends the reply in the history when it ends.
        stored = conversations.open(token, owner=owner_of(request)).messages
    except (ValueError, KeyError, EngineBusy) as exc:
        gr.Warning(str(exc))
        yield messages, SKIP, SKIP, state, SKIP, SKIP
        return
    sampling = turn_sampling(temp, p, k, new_tokens, rep)
    events = conversations.continue_reply(token, owner=owner_of(request), **sampling)
    not_taken = refusal(events)
    if not_taken is not None:
        gr.Warning(not_taken.text)
        yield messages, SKIP, gauges_html(not_taken.stats) if not_taken.stats else SKIP, state, SKIP, SKIP
        return
    shown = mark_memory(shown_messages(stored[:-1]) + [{"role": "assistant", "content": inert(stored[-1]["content"])}],
                        conversations.memory_map(token))
    yield from _streamed(events, conversations, token, shown, shown, SKIP, False, state, record,
                         reply=stored[-1]["content"])


def stop_reply(conversations, state, request: gr.Request = None) -> None:
    conversations.stop(bound(state, request).get("token"))


def load_conversation(conversations, record, state, request: gr.Request = None):
    """Page load: show the conversation this browser was on (re-attached, or re-created from the store) and the
    list of its conversations; forget those that no longer exist. Outputs: `view`.

    Only what changed is sent: this event may finish after the user's first message on a fresh page, whose
    conversation and browser record it must not overwrite with empty ones."""
    sent = browser_record(record)
    if bound(state, request).get("token"):  # this page already shows one
        return unchanged()
    stored = conversations.listing(sent["tokens"])
    items = summaries(conversations, sent, stored or [])
    record = sent
    if stored is None:  # the store cannot answer now: the browser keeps its whole list until it can
        gr.Warning(STORE_UNAVAILABLE)
    else:
        alive = {s.token for s in items}
        record = browser_record({"tokens": [t for t in sent["tokens"] if t in alive], "current": sent["current"]})
    opened = None
    if record["current"]:
        try:
            opened = conversations.open(record["current"], owner=owner_of(request))
        except ConversationUnavailable as exc:  # kept in the record: it is back once the store is
            gr.Warning(f"Could not reopen your conversation: {exc}")
        except ConversationNotFound:
            record = forget(record, record["current"])
        except (EngineBusy, ValueError) as exc:
            gr.Warning(f"Could not reopen your conversation: {exc}")
    if opened is None:
        changed = record if record != sent else SKIP
        return [SKIP, SKIP, SKIP, changed, list_update(conversations, remember(record, None), items), SKIP, SKIP]
    TABS.show(tab_of(request), opened.token, conversations.release)
    return view(conversations, opened, record)


def start_new_chat(conversations, state, record, request: gr.Request = None):
    """New chat: leave the current conversation (it stays in the list); the next message starts a new one.
    Outputs: `view`."""
    return switch_to(conversations, bound(state, request), browser_record(record), None, request)


def clear_chat(conversations, state, record, request: gr.Request = None):
    """The chatbot's trash icon. It used to clear only the view (the conversation came back on reload); now it
    means what New chat means: the page leaves the conversation, which stays in the list, and a reload shows the
    empty chat. Removing a conversation for good is "Delete this chat". Outputs: `view`."""
    gr.Info(CLEARED_NOTE)
    return start_new_chat(conversations, state, record, request)


def switch_conversation(conversations, token, state, record, request: gr.Request = None):
    """A conversation picked in the list. Outputs: `view`."""
    state, record = bound(state, request), browser_record(record)
    if not token or token == state.get("token"):
        return unchanged()
    try:
        opened = conversations.open(token, owner=owner_of(request))
    except ConversationUnavailable as exc:
        gr.Warning(f"Could not open that conversation: {exc}")
        return unchanged()[:4] + [list_update(conversations, record), SKIP, SKIP]
    except ConversationNotFound:
        gr.Warning("That conversation is no longer available.")
        record = forget(record, token)
        return unchanged(record)[:4] + [list_update(conversations, record), SKIP, SKIP]
    except (EngineBusy, ValueError) as exc:
        gr.Warning(str(exc))
        return unchanged()[:4] + [list_update(conversations, record), SKIP, SKIP]
    return switch_to(conversations, state, record, opened, request)


def rename_conversation(conversations, title, state, record, request: gr.Request = None):
    """Rename the current conversation. Outputs: the conversation list, the title box."""
    state, record = bound(state, request), browser_record(record)
    token = state.get("token") or record["current"]
    try:
        renamed = bool(token) and conversations.rename(token, title)
    except ValueError as exc:
        gr.Warning(str(exc))
        return SKIP, SKIP
    if not renamed:
        gr.Warning("Only a saved conversation can be renamed: send a message first"
                   + ("." if conversations.persistent else " (and this server keeps no conversations on disk)."))
        return SKIP, SKIP
    return list_update(conversations, record), SKIP


def delete_conversation(conversations, state, record, request: gr.Request = None):
    """Delete the current conversation: its live session and every stored row. For `UNDO_DELETE_S` the page offers
    "Undo delete" (the page state names the deleted token; the copy lives in the server's memory only). Its
    downloaded files are removed at once either way. Outputs: `view`."""
    state, record = bound(state, request), browser_record(record)
    token = state.get("token") or record["current"]
    if not token:
        gr.Warning("There is no conversation to delete.")
        return unchanged()
    TABS.show(tab_of(request), None)
    conversations.delete(token, undoable=True)
    files.forget_exports(token)  # its downloaded copies go with it (issue 28, item 8)
    shown = view(conversations, None, forget(record, token))
    if conversations.undoable(token):
        gr.Info(DELETED_NOTE)
        shown[2] = {"deleted": token}
    else:  # nothing had been said yet: nothing to bring back
        gr.Info("Conversation deleted.")
    return shown


def undo_delete(conversations, state, record, request: gr.Request = None):
    """Undo delete: the page's last deleted conversation comes back, shown, current and in the list again, with
    its messages and title. Outputs: `view`."""
    state, record = bound(state, request), browser_record(record)
    token = state.get("deleted")
    try:
        if not token:
            raise ConversationNotFound(TOO_LATE_TO_UNDO)
        opened = conversations.undelete(token, owner=owner_of(request))
    except ConversationNotFound:
        gr.Warning(TOO_LATE_TO_UNDO)
        return [SKIP, SKIP, {k: v for k, v in state.items() if k != "deleted"}, SKIP, SKIP, SKIP, SKIP]
    except (EngineBusy, ValueError) as exc:
        gr.Warning(str(exc))
        return unchanged()
    return switch_to(conversations, state, record, opened, request)


def undo_button(state, request: gr.Request = None):
    """The undo button shows exactly while the page state names a deleted conversation."""
    return gr.update(visible=bool(bound(state, request).get("deleted")))


def export_history(conversations, state, record, request: gr.Request = None):
    """Output: the download file (a JSON history in a fresh temporary folder)."""
    state, record = bound(state, request), browser_record(record)
    try:
        token = attach(conversations, state, record, request)
        data = conversations.export(token) if token else None
    except (ConversationNotFound, EngineBusy):
        data = None
    if not data or not conversations.messages(token):
        gr.Warning(NOTHING_YET)
        return gr.update(visible=False)
    too_large = upload_limit_note(data)
    if too_large:
        gr.Warning(too_large)
    folder = files.export_folder()
    path = folder / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(data, encoding="utf-8")
    files.remember_export(token, folder)
    return gr.update(visible=True, value=str(path))


def upload_history(conversations, data, state, record, request: gr.Request = None):
    """An uploaded history becomes a new conversation (stored at once); the server decides its mode and cache
    sizes, whatever the file says. Outputs: `view`."""
    state, record = bound(state, request), browser_record(record)
    try:
        if data is None:
            raise ValueError("no file received")
        opened = conversations.import_history(bytes(data), owner=owner_of(request))
    except (ValueError, EngineBusy) as exc:
        gr.Warning(f"Could not load that history: {exc}")
        return unchanged()
    gr.Info("History loaded: the conversation continues from here.")
    return switch_to(conversations, state, record, opened, request)


# --- layout ---------------------------------------------------------------------------------------------------


def build_chat_tab(demo: gr.Blocks, conversations: Conversations, visitor_cache_sizes: bool = False) -> None:
    """The Chat tab inside the current `gr.Blocks` (`demo`, whose page load brings back the browser's
    conversation). The browser record is encrypted with a key kept in the store, so it survives a restart.

    Layout: the chat and its controls beside the conversation list and the gauges, then examples and settings
    across the page. On a narrow screen the two columns stack, so the gauges come right under the chat, before
    examples and settings (`assets/style.css` makes them compact there and the buttons one row of icons).
    `visitor_cache_sizes` lets visitors pick the cache sizes of new chats, up to the configured ones; otherwise
    they are shown read-only.
    """
    cfg = conversations.engine.config
    chat_state = conversation_state(conversations)
    saved = gr.BrowserState(empty_record(), storage_key=BROWSER_STORAGE_KEY,
                            secret=conversations.store.secret("browser-state"))
    with gr.Tab("Chat", id="chat"):
        with gr.Row(elem_id="chat-row", equal_height=False):
            with gr.Column(scale=3, min_width=300, elem_id="chat-main"):
                chatbot = gr.Chatbot(elem_id="chatbot", height=520, sanitize_html=True, allow_tags=False,
                                     buttons=["copy"], feedback_options=None, show_label=False,
                                     placeholder="Ask anything. The conversation can go on forever.")
                with gr.Row(elem_id="chat-input-row", equal_height=True):
                    msg = gr.Textbox(elem_id="msg", placeholder="Type a message and press Enter…",
                                     show_label=False, scale=8, lines=1, max_lines=8,
                                     max_length=MAX_MESSAGE_CHARS, autofocus=True)
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=60,
                                     icon=icon("send"))
                with gr.Row(elem_id="chat-actions", elem_classes=["icon-row"]):
                    stop = gr.Button("Stop", elem_id="stop", size="sm", icon=icon("stop"), min_width=40)
                    retry = gr.Button("Retry", elem_id="retry", size="sm", icon=icon("retry"), min_width=40)
                    go_on = gr.Button("Continue", elem_id="continue", size="sm", icon=icon("continue"), min_width=40,
                                      visible=conversations.engine.continues_replies)
                    new_chat = gr.Button("New chat", elem_id="new-chat", size="sm", icon=icon("new"), min_width=40)
                    export_btn = gr.Button("Download history", elem_id="export", size="sm", icon=icon("download"),
                                           min_width=40)
                    upload = gr.UploadButton("Upload history", file_types=[".json"], type="binary", elem_id="upload",
                                             size="sm", icon=icon("upload"), min_width=40)
                export_file = gr.File(label="Your conversation (JSON)", visible=False, elem_id="export-file")
            with gr.Column(scale=1, min_width=260, elem_id="gauges-col"):
                gauges = gr.HTML(gauges_html(None, capacity=cfg.cache_size, start_size=cfg.start_size), elem_id="gauges")
                listing, title, rename, delete, undo = build_conversation_list()
        examples = load_json_list("examples.json")
        if examples:
            gr.Examples([[e] for e in examples], inputs=msg, label="Try one", elem_id="examples")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            pinned = (f"pinned in the model's memory, up to {cfg.pin_limit} tokens" if cfg.pin_system
                      else "not pinned: it leaves the memory like any message")
            system = gr.Textbox(label=f"System prompt (applies to new chats; {pinned})", lines=2,
                                max_length=MAX_SYSTEM_PROMPT_CHARS, elem_id="system",
                                placeholder="Empty: the model's own default, if its chat template has one.")
            available = conversations.recall_available()
            recall = gr.Checkbox(available, interactive=available, elem_id="recall",
                                 label="Recall: quote earlier messages that left the model's memory back into the "
                                       "prompt when they match your message (this chat)" if available else
                                       "Recall: off on this server (--recall-budget 0)")
            ranges = slider_ranges(cfg)

            def slider(name, value, **kwargs):
                low, high, step = ranges[name]
                return gr.Slider(low, high, value=value, step=step, **kwargs)

            with gr.Row():
                temperature = slider("temperature", cfg.temperature, label="Temperature (0 = greedy)",
                                     elem_id="temperature")
                top_p = slider("top_p", cfg.top_p, label="Top-p")
            with gr.Row():
                top_k = slider("top_k", cfg.top_k, label="Top-k (0 = off)")
                max_new = slider("max_new_tokens", cfg.max_new_tokens, label="Max new tokens",
                                 elem_id="max-new-tokens")
                repetition = slider("repetition_penalty", cfg.repetition_penalty, label="Repetition penalty")
            with gr.Row(elem_id="cache-sizes"):
                start_size = slider("start_size", cfg.start_size, label="Attention sinks (start_size, new chats)",
                                    elem_id="start-size", interactive=visitor_cache_sizes)
                recent_size = slider("recent_size", cfg.recent_size, label="Recent window (recent_size, new chats)",
                                     elem_id="recent-size", interactive=visitor_cache_sizes)
            gr.Markdown(
                f"The cache keeps **{cfg.start_size} attention sinks + the {cfg.recent_size} most recent tokens** "
                f"({cfg.cache_size:,} in all). " + (
                    "You may choose a smaller cache for new chats." if visitor_cache_sizes else
                    "Set by the server's owner (`--start-size`, `--recent-size`; `--visitor-cache-sizes` lets "
                    "visitors choose smaller ones)."), elem_id="cache-sizes-note")
    sampling_inputs = [system, temperature, top_p, top_k, max_new, repetition]
    if visitor_cache_sizes:
        sampling_inputs += [start_size, recent_size]

    c = conversations
    turn_outputs = [chatbot, msg, gauges, chat_state, saved, listing]
    view_outputs = [chatbot, gauges, chat_state, saved, listing, title, export_file]
    # trigger_mode "multiple": gradio's default ("once") drops an Enter pressed while the reply streams without a
    # word; this way `respond` sees it and says why the message waits in the box (WAIT_FOR_REPLY).
    turns = [
        trigger(bind(respond, c), [msg, chatbot, chat_state, saved, *sampling_inputs], turn_outputs,
                concurrency_id="chat", api_visibility="private", trigger_mode="multiple")
        for trigger in (msg.submit, send.click)
    ]
    turns.append(retry.click(bind(retry_last, c), [chatbot, chat_state, saved, *sampling_inputs],
                             turn_outputs, concurrency_id="chat", api_visibility="private"))
    turns.append(go_on.click(bind(continue_last, c), [chatbot, chat_state, saved, *sampling_inputs],
                             turn_outputs, concurrency_id="chat", api_visibility="private"))
    stop.click(bind(stop_reply, c), [chat_state], None, queue=False, api_visibility="private")
    recall.input(bind(set_recall, c), [recall, chat_state], [chat_state], queue=False, api_visibility="private")
    # The switch follows the conversation the page shows (a switch, a new chat, a reload).
    chat_state.change(bind(recall_shown, c), [chat_state], [recall], queue=False, api_visibility="private")
    # Whatever replaces the conversation on the page first cancels a reply still streaming into it. Every event
    # that reads the browser record is queued: gradio 6 hands an unqueued event the record's default value.
    new_chat.click(bind(start_new_chat, c), [chat_state, saved], view_outputs, cancels=turns,
                   api_visibility="private")
    chatbot.clear(bind(clear_chat, c), [chat_state, saved], view_outputs, cancels=turns, api_visibility="private")
    listing.input(bind(switch_conversation, c), [listing, chat_state, saved], view_outputs, cancels=turns,
                  api_visibility="private")
    delete.click(bind(delete_conversation, c), [chat_state, saved], view_outputs, cancels=turns,
                 api_visibility="private")
    undo.click(bind(undo_delete, c), [chat_state, saved], view_outputs, cancels=turns, api_visibility="private")
    # Every event that replaces the page state (any `view`) shows or hides the undo button accordingly.
    chat_state.change(undo_button, [chat_state], [undo], queue=False, api_visibility="private")
    for trigger in (rename.click, title.submit):
        trigger(bind(rename_conversation, c), [title, chat_state, saved], [listing, title], api_visibility="private")
    export_btn.click(bind(export_history, c), [chat_state, saved], [export_file], api_visibility="private")
    upload.upload(bind(upload_history, c), [upload, chat_state, saved], view_outputs, cancels=turns,
                  api_visibility="private")
    demo.load(bind(load_conversation, c), [saved, chat_state], view_outputs, api_visibility="private")
    # The Settings survive a reload: every change is kept in the browser, and a page load puts them back.
    kept = gr.BrowserState({}, storage_key=SETTINGS_STORAGE_KEY, secret=conversations.store.secret("browser-state"))
    for setting in sampling_inputs:
        setting.change(remember_settings, sampling_inputs, [kept], api_visibility="private")

    def restore_settings(value):
        return saved_settings(cfg, value, visitor_cache_sizes)

    demo.load(restore_settings, [kept], sampling_inputs, api_visibility="private")
