"""Old home of the load test, kept for one release so `python -m streaming_engine.loadtest` still works (with a
DeprecationWarning): see `benchmarks/loadtest.py`."""

from __future__ import annotations

import sys
import warnings

from benchmarks.loadtest import build_parser, main, run_load, run_user

warnings.warn("streaming_engine.loadtest moved to benchmarks.loadtest (this path goes in the next release)",
              DeprecationWarning, stacklevel=2)

__all__ = ["build_parser", "main", "run_load", "run_user"]

if __name__ == "__main__":
    sys.exit(main())
