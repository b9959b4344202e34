"""Prompt files for the command-line tools: JSON Lines records (one JSON value per line, MT-Bench style
`{"turns": [...]}`), read with errors that name the file and line. Shared by the terminal chat (`chat.py`) and the
MT-Bench benchmark (`benchmarks/mtbench.py`); what a record must hold is each tool's own rule.
"""

from __future__ import annotations

import json
from typing import Iterator


def jsonl_records(text: str, source: str) -> Iterator[tuple[int, object]]:
    """`(line number, value)` for every non-blank line of `text`; `ValueError` naming `source:line` on bad JSON."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{number} is not JSON ({exc.msg})") from None
        yield number, value
