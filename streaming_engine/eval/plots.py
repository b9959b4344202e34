"""Matplotlib figures for the evaluation CLIs (Agg backend: files only, no display)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "dense": "#6c757d",
    "window": "#d62728",
    "streaming": "#1f77b4",
    "streaming-noshift": "#9467bd",
    "recompute": "#2ca02c",
    "perstep-rope": "#ff7f0e",
}


def rolling_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_ppl(result: dict, path: str, window: int = 100) -> None:
    """Rolling log-perplexity against token index, one line per method."""
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for method, data in result["methods"].items():
        nll = data["nll"]
        ax.plot(range(1, len(nll) + 1), rolling_mean(nll, window), label=f"{method} (PPL {data['ppl']:.2f})",
                color=COLORS.get(method), linewidth=1.4)
    cfg = result["config"]
    if cfg.get("cache_size"):
        ax.axvline(cfg["cache_size"], color="black", linestyle=":", linewidth=1, label="cache full")
    ax.set_xlabel("token index")
    ax.set_ylabel(f"log PPL (rolling mean of NLL over {window} tokens)")
    ax.set_title(f"{cfg['model']} · cache {cfg['start_size']}+{cfg['recent_size']} · {cfg['source'][:60]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lines(series: dict[str, tuple[list, list]], path: str, xlabel: str, ylabel: str, title: str,
               log_y: bool = False) -> None:
    """Generic one-line-per-name plot: `series[name] = (xs, ys)`."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (xs, ys) in series.items():
        base = name.split(" ")[0]
        ax.plot(xs, ys, label=name, color=COLORS.get(base), marker="o" if len(xs) < 30 else None,
                markersize=3, linewidth=1.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
