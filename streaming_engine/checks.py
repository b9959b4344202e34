"""Range checks for settings: one wording for "must be an integer / a number in this range", used by every config.

`check_int` and `check_number` return the value when it is acceptable and otherwise raise `ValueError` naming the
setting, the allowed range and the value given. A bool is not a number here (`True` would pass as 1), nor is NaN
or infinity. `check_number` returns a float even for an int (`1` for a temperature): JSON, JavaScript and curl
users write `1`, and transformers' warpers refuse anything but a float, so the coercion happens here, where the
value enters, and never downstream. What each setting's range *is* stays with the setting; only the checking and the message live here.
"""

from __future__ import annotations

import math


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _shown(value) -> str:
    # repr of an int past 4,300 digits raises (Python's int-to-text limit); such a value is shown by its size.
    return "an integer of 20+ digits" if isinstance(value, int) and abs(value) >= 10**20 else repr(value)


def _outside(value, low, high, low_open: bool, high_open: bool) -> bool:
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    return too_low or too_high


def check_int(name: str, value, low: int | None = None, high: int | None = None, *, note: str = "") -> int:
    """`value` if it is an int (not a bool) in `[low, high]` (either bound may be None); else `ValueError`.

    `note` is appended to the range in the message, e.g. `" (0 = off)"`.
    """
    if isinstance(value, bool) or not isinstance(value, int) or _outside(value, low, high, False, False):
        raise ValueError(
            f"{name} must be an integer {_range_text(low, high, False, False)}{note}, got {_shown(value)}")
    return value


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, note: str = "") -> float:
    """`value` as a float if it is a finite int or float (not a bool) within the bounds; else `ValueError`.

    `low_open` / `high_open` exclude the bound itself, as in `(0, 1]`.
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # An int beyond float's range (a JSON 1e400 written out in digits) is out of every range, not an OverflowError.
    if number and isinstance(value, int) and abs(value) > 2**1023:
        number = False
    if not number or not math.isfinite(value) or _outside(value, low, high, low_open, high_open):
        raise ValueError(f"{name} must be {_range_text(low, high, low_open, high_open)}{note}, got {_shown(value)}")
    return float(value)
