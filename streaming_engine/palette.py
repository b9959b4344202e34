"""One colour per cache method, the same in the app's comparison plots and in the benchmarks' figures: a method
looks the same everywhere. Boundary: plain values, no imports (the app reads them without loading matplotlib).
"""

from __future__ import annotations

COLORS = {
    "dense": "#6c757d",
    "window": "#d62728",
    "streaming": "#1f77b4",
    "streaming-noshift": "#9467bd",
    "recompute": "#2ca02c",
    "perstep-rope": "#ff7f0e",
    "streaming-block": "#17becf",
}
