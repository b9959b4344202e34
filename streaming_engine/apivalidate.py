"""Validation of untrusted arguments (HTTP API calls, uploaded JSON): clear messages, nothing echoed whole.

API callers send JSON, so a value may arrive as text, null, a list, an object, a boolean, NaN or a fraction where
an integer belongs. Each checker here accepts exactly the allowed JSON type and range and otherwise raises
`ValueError` with a message that names the argument, the allowed type and range, and what was received, e.g.
"max_new_tokens must be an integer in [1, 4096]; got text 'x'". What was received is shown through `preview`:
long strings are cut to a few characters (a megabyte-long session id is neither echoed nor logged whole).

`parse_json` turns a JSON document into Python values with the same kind of messages (including "not valid JSON
(nested too deep)" for `[[[[…` bombs, which the standard decoder answers with a `RecursionError`).

Pure functions, no gradio, no engine: the UI and the engine both call them. Whether a call may run at all (server
busy) is the engine's decision, not this module's.
"""

from __future__ import annotations

import json
import math
import re

from .sampling import (
    MAX_NEW_TOKENS_LIMIT,
    MAX_REPETITION_PENALTY,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
)

#: Longest session id looked up at all: a uuid written with hyphens (ours are 32 hex digits).
SESSION_ID_MAX_CHARS = 36
#: Session ids are hexadecimal uuids; anything else is refused before lookup.
SESSION_ID_PATTERN = re.compile(r"[0-9a-fA-F-]{1,%d}" % SESSION_ID_MAX_CHARS)
#: How many characters of a bad text value an error message may quote.
PREVIEW_CHARS = 12
#: Largest accepted seed (exclusive bound, as the sampler's generator takes 64-bit seeds).
SEED_LIMIT = 2**63


def preview(value) -> str:
    """A short, safe description of `value` for an error message (JSON names: null, true, an object …)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        digits = len(str(abs(value))) if abs(value) < 10**100 else None
        return str(value) if digits is not None and digits <= 20 else "a number with more than 20 digits"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return f"{value:.6g}"
    if isinstance(value, str):
        if len(value) <= PREVIEW_CHARS:
            return f"text {value!r}"
        return f"text {value[:PREVIEW_CHARS]!r}… ({len(value):,} characters)"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _range(lo, hi, lo_open: bool) -> str:
    if hi is None:
        return f"> {lo}" if lo_open else f">= {lo}"
    return f"{'(' if lo_open else '['}{lo}, {hi}]"


def integer(value, name: str, lo: int, hi: int | None = None):
    """`value` as an int in [lo, hi] (hi None: unbounded). Integral floats (5.0) pass; 1.5, true, "5" do not."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an integer {'in ' if hi is not None else ''}{_range(lo, hi, False)}; "
                         f"got {preview(value)}")
    return value


def number(value, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """`value` as a finite float in [lo, hi] (or (lo, hi] with `lo_open`). NaN, infinities, true, "1" do not pass."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        raise ValueError(f"{name} must be a number in {_range(lo, hi, lo_open)}; got {preview(value)}")
    return float(value)


def text(value, name: str, max_chars: int, *, allow_empty: bool = False) -> str:
    """`value` as text of at most `max_chars` characters (and not blank unless `allow_empty`)."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text (a JSON string) of at most {max_chars:,} characters; "
                         f"got {preview(value)}")
    if len(value) > max_chars:
        raise ValueError(f"{name} is too long: {len(value):,} characters (limit {max_chars:,})")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} is empty: type something first")
    return value


def session_id(value) -> str:
    """A session id as `/new_session` returned it. Refused before any lookup when it cannot be one."""
    if not isinstance(value, str) or not SESSION_ID_PATTERN.fullmatch(value):
        raise ValueError(f"session_id must be the id /new_session returned (at most {SESSION_ID_MAX_CHARS} "
                         f"hexadecimal characters); got {preview(value)}")
    return value


def stop_strings(value, name: str = "stop") -> list[str]:
    """null, one string, or a list of at most `MAX_STOP_STRINGS` strings of at most `MAX_STOP_STRING_CHARS`."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or len(items) > MAX_STOP_STRINGS
            or any(not isinstance(s, str) or len(s) > MAX_STOP_STRING_CHARS for s in items)):
        raise ValueError(f"{name} must be null, a string, or a list of at most {MAX_STOP_STRINGS} strings of at most "
                         f"{MAX_STOP_STRING_CHARS} characters; got {preview(value)}")
    return list(items)


#: Every sampling argument an API caller may set, with its checker (the ranges `SamplingParams` enforces).
SAMPLING_CHECKS = {
    "max_new_tokens": lambda v: integer(v, "max_new_tokens", 1, MAX_NEW_TOKENS_LIMIT),
    "temperature": lambda v: number(v, "temperature", 0, MAX_TEMPERATURE),
    "top_p": lambda v: number(v, "top_p", 0, 1, lo_open=True),
    "top_k": lambda v: integer(v, "top_k", 0),
    "repetition_penalty": lambda v: number(v, "repetition_penalty", 0, MAX_REPETITION_PENALTY, lo_open=True),
    "seed": lambda v: None if v is None else integer(v, "seed", 0, SEED_LIMIT - 1),
    "stop": stop_strings,
}


def sampling_arguments(values: dict) -> dict:
    """Check every sampling argument in `values` (unknown names refused); returns the cleaned values."""
    if not isinstance(values, dict):
        raise ValueError(f"sampling settings must be an object; got {preview(values)}")
    unknown = [k for k in values if k not in SAMPLING_CHECKS]
    if unknown:
        names = ", ".join(preview(k) if not isinstance(k, str) or len(k) > 30 else k for k in unknown[:3])
        raise ValueError(f"unknown sampling setting {names} (allowed: {', '.join(SAMPLING_CHECKS)})")
    return {name: SAMPLING_CHECKS[name](value) for name, value in values.items()}


def chat_arguments(session, message, max_chars: int, **sampling) -> tuple[str, str, dict]:
    """The `/chat` call's arguments checked in order: (session_id, message, sampling settings)."""
    return session_id(session), text(message, "message", max_chars), sampling_arguments(sampling)


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
