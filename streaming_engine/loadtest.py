"""Old home of the load test, kept so `python -m streaming_engine.loadtest` still works: see `eval/loadtest.py`."""

from __future__ import annotations

import sys

from .eval.loadtest import build_parser, main, run_load, run_user

__all__ = ["build_parser", "main", "run_load", "run_user"]

if __name__ == "__main__":
    sys.exit(main())
