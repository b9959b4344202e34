"""Every check of a value where it enters the library, with one wording, and the limits those checks enforce.

One module, so that a setting, a sampling knob, an HTTP API argument and an uploaded file are refused the same
way: the message names the value, the allowed type and range, and what was received, e.g.
"max_new_tokens must be an integer in [1, 4096]; got text 'x'". What was received is shown through `preview`,
in JSON's names (null, true, an object …), and a long text is cut to a few characters: a megabyte-long session
id is neither echoed nor logged whole.

- `check_int` / `check_number`: a number in a range. A bool is no number here (`True` would pass as 1), nor is
  NaN or infinity; `check_number` returns a float even for an int (`1` for a temperature), because JSON,
  JavaScript and curl users write `1` and transformers' warpers take only floats. `whole` lets an integral float
  (`5.0`, as JSON may carry it) pass as an integer where the value came from JSON.
- `check_text`: a message, a system prompt, a stored reply: text, within a length, optionally not blank, with
  control characters dropped (`clean_text`) where the model will read it.
- `check_sampling` / `sampling_arguments`: the sampling knobs' ranges, declared once (`SAMPLING_RANGES`) and used
  by `SamplingParams` and by the HTTP API alike.
- `check_messages`: a conversation sent as a list of `{"role", "content"}` messages (a history file, an API
  request, a stored transcript).
- `parse_json`: JSON with messages a user can act on, including a nesting bomb (`[[[[…`).

What each setting's range *is* stays with the setting (the config dataclass that owns it), except the limits
below, which several layers enforce and which therefore live here. Pure functions, no torch, no gradio, no
engine: whether a call may run at all (server busy) is the engine's decision, not this module's.
"""

from __future__ import annotations

import json
import math
import re

#: Longest accepted user message, system prompt or stored message, in characters (a 200,000-character paste must
#: work): the engine's default `max_message_chars`, the chat box's limit and the store's.
MAX_MESSAGE_CHARS = 250_000
#: Most messages in one conversation sent whole (a history file, an API request) and kept in the store (beyond
#: it the oldest stored ones are dropped: the model only sees the tail anyway).
MAX_MESSAGES = 20_000
#: The roles of a conversation's messages (a system prompt, where there is one, is kept apart or comes first).
ROLES = ("user", "assistant")
#: Longest accepted `owner` string (an address or a user name; longer ones are a caller bug).
MAX_OWNER_CHARS = 256
#: Longest session id looked up at all: a uuid written with hyphens (ours are 32 hex digits).
SESSION_ID_MAX_CHARS = 36
#: Session ids are hexadecimal uuids; anything else is refused before lookup.
SESSION_ID_PATTERN = re.compile(r"[0-9a-fA-F-]{1,%d}" % SESSION_ID_MAX_CHARS)
#: How many characters of a bad text value an error message may quote.
PREVIEW_CHARS = 12

#: Hard upper bound on `max_new_tokens` for one reply (the UI slider and the API share it).
MAX_NEW_TOKENS_LIMIT = 4096
MAX_TEMPERATURE = 5.0
MAX_REPETITION_PENALTY = 10.0
MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 100
#: Largest accepted seed (the sampler's generator takes 64-bit seeds).
MAX_SEED = 2**63 - 1

#: How a blank message is refused, by the library and by the chat box alike.
EMPTY_TEXT = "is empty: type something first"

_CONTROL = {c for c in range(32) if chr(c) not in "\n\t"} | {127}


def preview(value) -> str:
    """A short, safe description of `value` for an error message (JSON names: null, true, an object …)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        # repr of an int past 4,300 digits raises (Python's int-to-text limit); such a value is shown by its size.
        digits = len(str(abs(value))) if abs(value) < 10**100 else None
        return str(value) if digits is not None and digits <= 20 else "a number with more than 20 digits"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        shown = f"{value:.6g}"
        return shown if any(c in shown for c in ".e") else f"{shown}.0"  # 2.0 is shown as a float, not as 2
    if isinstance(value, str):
        if len(value) <= PREVIEW_CHARS:
            return f"text {value!r}"
        return f"text {value[:PREVIEW_CHARS]!r}… ({len(value):,} characters)"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


# --- numbers -----------------------------------------------------------------------------------------------------


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _outside(value, low, high, low_open: bool, high_open: bool) -> bool:
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    return too_low or too_high


def check_int(name: str, value, low: int | None = None, high: int | None = None, *, note: str = "") -> int:
    """`value` if it is an int (not a bool) in `[low, high]` (either bound may be None); else `ValueError`.

    `note` is appended to the range in the message, e.g. `" (0 = off)"`."""
    if isinstance(value, bool) or not isinstance(value, int) or _outside(value, low, high, False, False):
        raise ValueError(f"{name} must be an integer {_range_text(low, high, False, False)}{note}; "
                         f"got {preview(value)}")
    return value


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, note: str = "") -> float:
    """`value` as a float if it is a finite int or float (not a bool) within the bounds; else `ValueError`.

    `low_open` / `high_open` exclude the bound itself, as in `(0, 1]`."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # An int beyond float's range (a JSON 1e400 written out in digits) is out of every range, not an OverflowError.
    if number and isinstance(value, int) and abs(value) > 2**1023:
        number = False
    if not number or not math.isfinite(value) or _outside(value, low, high, low_open, high_open):
        raise ValueError(f"{name} must be a number {_range_text(low, high, low_open, high_open)}{note}; "
                         f"got {preview(value)}")
    return float(value)


def whole(value):
    """An integral float (`5.0`, as JSON may carry an integer) as an int; anything else unchanged, for
    `check_int` to judge."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def check_bool(name: str, value) -> bool:
    """`value` if it is True or False (not 0, 1 or "yes")."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {preview(value)}")
    return value


def check_choice(name: str, value, choices):
    """`value` if it is one of `choices` (a mode, a policy, a backend's name)."""
    if not isinstance(value, (str, int)) or isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {preview(value)}")
    return value


# --- text --------------------------------------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """Drop control characters (tabs and newlines stay) and replace lone surrogates, which UTF-8 cannot carry."""
    return "".join(
        "\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text if ord(ch) not in _CONTROL
    )


def check_text(value, name: str, max_chars: int = MAX_MESSAGE_CHARS, *, allow_empty: bool = False,
               clean: bool = False) -> str:
    """`value` as text of at most `max_chars` characters, not blank unless `allow_empty`; `clean` drops control
    characters first (`clean_text`: what the model will read), so text that is only control characters is blank."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text (a JSON string) of at most {max_chars:,} characters; "
                         f"got {preview(value)}")
    if len(value) > max_chars:
        raise ValueError(f"{name} is too long: {len(value):,} characters (limit {max_chars:,})")
    if clean:
        value = clean_text(value)
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} {EMPTY_TEXT}")
    return value


def check_owner(owner) -> str | None:
    """An engine session's `owner`: None (not counted against a per-owner cap) or a short non-empty string."""
    if owner is not None and (not isinstance(owner, str) or not 0 < len(owner) <= MAX_OWNER_CHARS):
        raise ValueError(f"owner must be null or a non-empty string of at most {MAX_OWNER_CHARS} characters; "
                         f"got {preview(owner)}")
    return owner


def session_id(value) -> str:
    """A session id as `/new_session` returned it. Refused before any lookup when it cannot be one."""
    if not isinstance(value, str) or not SESSION_ID_PATTERN.fullmatch(value):
        raise ValueError(f"session_id must be the id /new_session returned (at most {SESSION_ID_MAX_CHARS} "
                         f"hexadecimal characters); got {preview(value)}")
    return value


# --- conversations -----------------------------------------------------------------------------------------------


def check_messages(messages, what: str = "messages", *, system_first: bool = False,
                   max_messages: int = MAX_MESSAGES) -> list[dict]:
    """A conversation sent as a list: at most `max_messages` `{"role": "user"|"assistant", "content": text}`
    dicts (a leading "system" one too with `system_first`); returns plain `{"role", "content"}` copies, extra
    keys dropped. What the *texts* may hold (length, control characters) is `check_text`'s, applied by the caller
    that knows its limit."""
    if not isinstance(messages, list) or len(messages) > max_messages:
        shown = f"holds {len(messages):,} messages" if isinstance(messages, list) else f"is {preview(messages)}"
        raise ValueError(f"{what} must be a list of at most {max_messages:,} messages; it {shown}")
    return [check_message(m, i, ("system", *ROLES) if system_first and i == 0 else ROLES)
            for i, m in enumerate(messages)]


def check_message(message, index: int, roles: tuple[str, ...] = ROLES) -> dict:
    """Message `index` of a conversation as a plain `{"role", "content"}` dict, its role one of `roles`."""
    if (not isinstance(message, dict) or message.get("role") not in roles
            or not isinstance(message.get("content"), str)):
        raise ValueError(f"message {index} must be {{'role': {'|'.join(roles)}, 'content': text}}; "
                         f"got {preview(message)}")
    return {"role": message["role"], "content": message["content"]}


#: The keys of a recall record (`check_recall_records`), as a stored message carries them beside its own.
RECALL_RECORD_KEYS = ("fed", "recalled")
#: The marks a stored reply may carry, each `True` when set: cut off while being written, stopped by the user, or
#: ended at its `max_new_tokens`. In this order a page picks the one note it shows under a reply.
MARK_KEYS = ("interrupted", "stopped", "truncated")
#: The mark a finished reply keeps for why it ended (`session.FinishReason`); the other reasons leave none, and a
#: turn that failed part-way is "interrupted" (an error event, not a finish reason).
FINISH_MARKS = {"stopped": "stopped", "length": "truncated"}
#: Longest text a recall record says was fed: the typed message (at most `MAX_MESSAGE_CHARS`) after the quoted
#: passages, which the recall budget (under half the window, in tokens) keeps far shorter than another message.
MAX_FED_CHARS = 2 * MAX_MESSAGE_CHARS


def check_recall_records(records, messages: list[dict]) -> list[dict]:
    """What recall did in a stored conversation (`Session.recall_records`), parallel to its checked `messages`:
    `{}`, or for a user message `{"fed": text, "recalled": [indices of earlier messages]}`. Returns plain copies,
    the indices sorted; a record that recalled nothing becomes `{}`. The one check of a record: the store applies it
    when it writes one (`store.py`), the engine when a session takes one (`StreamingEngine.open_history`)."""
    if not isinstance(records, list) or len(records) != len(messages):
        raise ValueError(f"recall records must be a list parallel to the {len(messages):,} messages; got "
                         f"{preview(records)}")
    out = []
    for i, (record, message) in enumerate(zip(records, messages)):
        if not isinstance(record, dict) or set(record) - set(RECALL_RECORD_KEYS):
            raise ValueError(f"recall record {i} must be a dict of 'fed' and 'recalled'; got {preview(record)}")
        if not record.get("recalled"):
            out.append({})
            continue
        indices = record["recalled"]
        if (message["role"] != "user" or not isinstance(indices, (list, tuple))
                or any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < i for k in indices)):
            raise ValueError(f"recall record {i} must belong to a user message and list earlier messages; got "
                             f"{preview(record)}")
        fed = check_text(record.get("fed", message["content"]), f"recall record {i}'s fed text", MAX_FED_CHARS,
                         allow_empty=True)
        out.append({"fed": fed, "recalled": sorted(set(indices))})
    return out


# --- sampling ----------------------------------------------------------------------------------------------------


def stop_strings(value, name: str = "stop") -> list[str]:
    """null, one string, or a list of at most `MAX_STOP_STRINGS` strings of at most `MAX_STOP_STRING_CHARS`
    characters; empty strings (which would stop every reply at once) are dropped."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, (list, tuple)) or len(items) > MAX_STOP_STRINGS
            or any(not isinstance(s, str) or len(s) > MAX_STOP_STRING_CHARS for s in items)):
        raise ValueError(f"{name} must be null, a string, or a list of at most {MAX_STOP_STRINGS} strings of at most "
                         f"{MAX_STOP_STRING_CHARS} characters; got {preview(value)}")
    return [s for s in items if s != ""]


#: Each sampling knob's check, the one home of its range: `SamplingParams` (every chat call, the CLIs, the gradio
#: API) and the HTTP API's argument check both apply these. Integer knobs take integral floats (`5.0` from JSON).
SAMPLING_RANGES = {
    "max_new_tokens": lambda v: check_int("max_new_tokens", whole(v), 1, MAX_NEW_TOKENS_LIMIT),
    "temperature": lambda v: check_number("temperature", v, 0, MAX_TEMPERATURE, note=" (0 = greedy)"),
    "top_p": lambda v: check_number("top_p", v, 0, 1, low_open=True),
    "top_k": lambda v: check_int("top_k", whole(v), 0, note=" (0 = off)"),
    "repetition_penalty": lambda v: check_number("repetition_penalty", v, 0, MAX_REPETITION_PENALTY,
                                                 low_open=True, note=" (1 = off)"),
    "seed": lambda v: None if v is None else check_int("seed", whole(v), 0, MAX_SEED, note=" or null"),
    "stop": stop_strings,
}


def check_sampling(name: str, value):
    """One sampling knob checked and made the type the sampler needs (`SAMPLING_RANGES`)."""
    return SAMPLING_RANGES[name](value)


def sampling_arguments(values: dict) -> dict:
    """Check every sampling argument in `values` (unknown names refused); returns the cleaned values."""
    if not isinstance(values, dict):
        raise ValueError(f"sampling settings must be an object; got {preview(values)}")
    unknown = [k for k in values if k not in SAMPLING_RANGES]
    if unknown:
        names = ", ".join(preview(k) if not isinstance(k, str) or len(k) > 30 else k for k in unknown[:3])
        raise ValueError(f"unknown sampling setting {names} (allowed: {', '.join(SAMPLING_RANGES)})")
    return {name: check_sampling(name, value) for name, value in values.items()}


def chat_arguments(session, message, max_chars: int, **sampling) -> tuple[str, str, dict]:
    """The `/chat` call's arguments checked in order: (session_id, message, sampling settings)."""
    return session_id(session), check_text(message, "message", max_chars), sampling_arguments(sampling)


# --- documents ---------------------------------------------------------------------------------------------------


def parse_json(document: str, what: str = "document"):
    """`json.loads` with messages a user can act on; a nesting bomb is "not valid JSON (nested too deep)"."""
    try:
        return json.loads(document)
    except RecursionError:
        # The C decoder recurses once per nesting level; the interpreter's limit (~1000 levels) stops it cleanly.
        raise ValueError(f"{what} is not valid JSON (nested too deep)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except ValueError:  # an integer literal longer than Python converts (4,300 digits)
        raise ValueError(f"{what} is not valid JSON (a number is too long)") from None
