"""Draw `assets/attention_sinks.png`: the StreamingLLM cache layout (sinks | evicted | recent window).

Run `python tools/make_diagram.py` to regenerate it.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

SINK, EVICTED, RECENT, NEXT = "#1f77b4", "#d9d9d9", "#2ca02c", "#ff7f0e"


def draw(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 3.1))
    ax.set_xlim(0, 30)
    ax.set_ylim(-1.8, 2.1)
    ax.axis("off")
    cells = [SINK] * 4 + [EVICTED] * 12 + [RECENT] * 10 + [NEXT]
    for i, color in enumerate(cells):
        x = 1 + i
        ax.add_patch(Rectangle((x, 0), 0.9, 0.9, facecolor=color, edgecolor="white", linewidth=1.5))
        if color == EVICTED:
            ax.plot([x + 0.15, x + 0.75], [0.15, 0.75], color="#999999", linewidth=1)
    ax.text(3.0, 1.25, "attention sinks\nstart_size = 4", ha="center", va="bottom", fontsize=10, color=SINK)
    ax.text(11.0, 1.25, "evicted (freed)", ha="center", va="bottom", fontsize=10, color="#777777")
    ax.text(22.0, 1.25, "recent window\nrecent_size tokens", ha="center", va="bottom", fontsize=10, color=RECENT)
    ax.text(27.45, 1.25, "next\ntoken", ha="center", va="bottom", fontsize=10, color=NEXT)
    ax.annotate("", xy=(1, -0.35), xytext=(28, -0.35), arrowprops=dict(arrowstyle="<-", color="#444444"))
    ax.text(14.5, -0.8, "token stream (time →)", ha="center", fontsize=9, color="#444444")
    ax.add_patch(FancyArrowPatch((17.0, -1.2), (5.0, -1.2), arrowstyle="->", mutation_scale=12, color="#444444"))
    ax.text(11.0, -1.62, "position shift: kept keys are re-rotated to in-cache positions 0 … cache_size-1",
            ha="center", fontsize=9, color="#444444")
    fig.tight_layout()
    fig.savefig(path, dpi=130, facecolor="white")
    plt.close(fig)


if __name__ == "__main__":
    draw(Path(__file__).resolve().parent.parent / "assets" / "attention_sinks.png")
