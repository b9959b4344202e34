"""Summary statistics shared by the benchmarks and the load test (one definition of a percentile)."""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, `q` in [0, 100]: the smallest value with at least q% of the values at or below it.

    Exact for the few dozen to few hundred samples the benchmarks take (no interpolation); None for no values.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q!r}")
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))  # 1-based
    return ordered[min(max(rank, 1), len(ordered)) - 1]
