"""Matplotlib figures for the evaluation CLIs (Agg backend: files only, no display)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from streaming_engine.palette import COLORS  # noqa: E402,F401 - the methods' colours (re-exported for the benchmarks)

#: Cache sizes are told apart by line style in the benchmark plots.
STYLES = ("-", "--", ":", "-.")
MIB = 2**20


def bar_with_repeats(ax, x: float, values: list[float], width: float = 0.8, **bar_style) -> None:
    """One bar at the median of a benchmark's repeats, each repeat a dot on it: the spread at a glance."""
    ax.bar(x, statistics.median(values), width, **bar_style)
    ax.plot([x] * len(values), values, "k.", ms=4)


def save_png(fig, path: Path, dpi: int = 120) -> list[str]:
    """Lay out `fig`, write it as the PNG beside `path` (the result's JSON), close it; the paths written."""
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return [str(out)]


def _run_styles(runs: dict) -> dict[str, dict]:
    """Colour by method, line style by its order among runs of the same method (e.g. two cache sizes)."""
    seen: dict[str, int] = {}
    styles = {}
    for label, r in runs.items():
        k = seen.get(r["method"], 0)
        seen[r["method"]] = k + 1
        styles[label] = dict(color=COLORS.get(r["method"]), linestyle=STYLES[k % len(STYLES)])
    return styles


def plot_ppl(summary: dict, output) -> list[str]:
    """Two PNGs beside `output` (the summary JSON path): `NAME.png`, log-PPL against token index on a log-x axis
    with the model's position limit drawn, and `NAME_memory.png`, KV bytes and RSS against tokens and per-token
    latency per segment. Returns their paths."""
    output = Path(output)
    paths = [str(output.with_suffix(".png")), str(output.with_name(output.stem + "_memory.png"))]
    cfg, runs = summary["config"], summary["runs"]
    styles = _run_styles(runs)
    limit = cfg.get("position_limit")
    if limit and max((r["predictions"] for r in runs.values()), default=0) < limit:
        limit = None  # the streams never reach the model's positions: no line to draw
    title = (f"{cfg.get('model', '')} · {cfg['rows']} rows × {cfg['tokens']:,} tokens · "
             f"{cfg.get('source', '').split(' (')[0][:50]} · {cfg['device']} {cfg['dtype']}")

    fig, (ax, lin) = plt.subplots(1, 2, figsize=(15, 5.4), gridspec_kw={"width_ratios": [3, 2]})
    settled = []
    for label, r in runs.items():
        xs, ys = r["curve_log"]["index"], r["curve_log"]["nll"]
        settled += [y for x, y in zip(xs, ys) if x >= 64]
        ppl = r["ppl"] if r["ppl_past_limit"] is None else r["ppl_past_limit"]
        which = "PPL" if r["ppl_past_limit"] is None else f"PPL past {limit:,}"
        ax.plot(xs, ys, label=f"{label} ({which} {ppl:.2f})", linewidth=1.5, **styles[label])
        lx, ly = r["curve_linear"]["index"], r["curve_linear"]["nll"]
        lin.plot(lx, ly, linewidth=1.2, **styles[label])
        if r["stopped_at"]:
            for axis, x, y in ((ax, xs[-1], ys[-1]), (lin, lx[-1], ly[-1])):
                axis.plot(x, y, marker="X", markersize=9, color=styles[label]["color"])
            ax.annotate(f"{label} stops:\n{limit:,} positions", (xs[-1], ys[-1]), xytext=(-8, 14),
                        textcoords="offset points", ha="right", fontsize=8, color=styles[label]["color"])
    for axis in (ax, lin):
        if limit:
            axis.axvline(limit, color="black", linestyle=":", linewidth=1.2,
                         label=f"model's position limit ({limit:,})" if axis is ax else None)
        if settled:
            low, high = min(settled), max(settled)
            pad = 0.08 * (high - low or 1.0)
            axis.set_ylim(low - pad, high + pad)
        axis.grid(alpha=0.3, which="both")
    ax.set_xscale("log")
    ax.set_xlabel("token index in the stream (log scale)")
    ax.set_ylabel("log PPL (mean NLL per bin, all rows)")
    ax.legend(fontsize=8, loc="upper left")
    step = r["curve_linear"]["index"][0] if runs else 0
    lin.set_xlabel(f"token index in the stream (bins of {step:,} tokens)")
    lin.set_ylabel("log PPL")
    fig.suptitle(f"Perplexity over long streams · {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    cuda = any("cuda_bytes" in m for r in runs.values() for m in r["memory"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for label, r in runs.items():
        mem = r["memory"]
        if mem:
            xs = [m["tokens"] for m in mem]
            axes[0].plot(xs, [m["kv_bytes"] / MIB for m in mem], label=label, linewidth=1.4, **styles[label])
            key = "cuda_bytes" if cuda else "rss_bytes"
            axes[1].plot(xs, [m[key] / MIB for m in mem], label=label, linewidth=1.4, **styles[label])
        segs = [s for s in r["segments"] if s["ms_per_token"] is not None]
        axes[2].plot([(s["start"] + s["end"]) / 2 for s in segs], [s["ms_per_token"] for s in segs], marker="o",
                     markersize=3, label=label, linewidth=1.4, **styles[label])
    axes[0].set_ylabel("KV cache, all rows (MiB)")
    axes[1].set_ylabel("CUDA memory allocated (MiB)" if cuda else "process RSS (MiB)")
    axes[2].set_ylabel(f"ms per token, all rows (mean per {cfg['segment']:,}-token segment)")
    for ax in axes:
        ax.set_xlabel("tokens per row")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)  # flat is flat only against zero
        if limit:
            ax.axvline(limit, color="black", linestyle=":", linewidth=1)
    axes[2].set_xlabel("tokens per row (middle of the segment)")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"Memory and latency · {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


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


def _bench_label(run: dict) -> str:
    return run["method"] if run["cache_size"] is None else f"{run['method']} @{run['cache_size']}"


def _bench_style(run: dict, sizes: list[int]) -> dict:
    style = STYLES[sizes.index(run["cache_size"]) % len(STYLES)] if run["cache_size"] in sizes else "-"
    return dict(color=COLORS.get(run["method"]), linestyle=style, linewidth=1.3)


def plot_bench(result: dict, output) -> list[str]:
    """Three PNGs beside `output` (a Path to the JSON): latency and memory against tokens, and steady latency
    against cache size. Returns their paths."""
    cfg, runs = result["config"], result["runs"]
    sizes = cfg["cache_sizes"]
    stem = output.with_suffix("")
    paths = [f"{stem}_latency.png", f"{stem}_memory.png", f"{stem}_steady.png"]
    title = f"{cfg.get('model', '')} · {cfg['device']} {cfg['dtype']} · {cfg['torch_threads']} threads"

    fig, ax = plt.subplots(figsize=(9, 5))
    for run in runs:
        xs = [w["tokens"] for w in run["windows"]]
        ax.plot(xs, [w["median_ms"] for w in run["windows"]], label=_bench_label(run), **_bench_style(run, sizes))
    ax.set_xlabel("tokens processed")
    ax.set_ylabel(f"median latency per token (ms, windows of {cfg['window']})")
    ax.set_yscale("log")
    ax.set_title(f"Decode latency · {title}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    cuda = any("cuda_bytes" in w for run in runs for w in run["windows"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for run in runs:
        xs = [w["tokens"] for w in run["windows"]]
        axes[0].plot(xs, [w["kv_bytes"] / MIB for w in run["windows"]], label=_bench_label(run),
                     **_bench_style(run, sizes))
        key = "cuda_bytes" if cuda else "rss_bytes"
        axes[1].plot(xs, [w[key] / MIB for w in run["windows"]], label=_bench_label(run), **_bench_style(run, sizes))
    axes[0].set_ylabel("KV cache (MiB)")
    axes[1].set_ylabel("CUDA memory allocated (MiB)" if cuda else "process RSS (MiB)")
    for ax in axes:
        ax.set_xlabel("tokens processed")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Memory · {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    methods = list(dict.fromkeys(run["method"] for run in runs))
    for method in methods:
        if method == "dense":
            # Dense holds as many tokens as it has seen: its latency at the window ending nearest each size.
            run = next(r for r in runs if r["method"] == "dense")
            pts = [(s, min(run["windows"], key=lambda w: abs(w["tokens"] - s))["median_ms"]) for s in sizes
                   if s <= run["tokens"]]
            label = "dense (holding that many tokens)"
        else:
            pts = [(r["cache_size"], r["summary"]["steady_median_ms"]) for r in runs if r["method"] == method]
            label = method
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label, color=COLORS.get(method), linewidth=1.4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("cache size (tokens attended)")
    ax.set_ylabel("median ms per token, cache full")
    ax.set_title(f"Steady-state decode latency · {title}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


def plot_chat(result: dict, output) -> list[str]:
    """Four panels against user turn, one line per mode: time to first token, decode speed, KV memory, and the
    repeated-4-gram share of each reply (a loop detector). Turns that got no reply (context full) are blank.
    Saved beside `output` (the JSON path) as a PNG of the same name; returns its path."""
    path = str(Path(output).with_suffix(".png"))
    cfg = result["config"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    panels = [
        (axes[0, 0], "time_to_first_token_s", 1.0, "time to first token (s)"),
        (axes[0, 1], "tokens_per_s", 1.0, "decode tokens/s"),
        (axes[1, 0], "kv_bytes", 1 / MIB, "KV cache held after the turn (MiB)"),
        (axes[1, 1], "repeated_4gram_share", 1.0, "repeated 4-gram share of the reply"),
    ]
    for mode, data in result["modes"].items():
        turns = data["turns"]
        answered = [r for r in turns if r["finish_reason"] not in ("context_full", "error")]
        for ax, key, scale, _ in panels:
            rows = turns if key == "kv_bytes" else answered
            pts = [(r["turn"], r[key] * scale) for r in rows if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), label=mode, color=COLORS.get(mode), linewidth=1.2,
                        marker="." if len(pts) < 60 else None)
        full = data["summary"].get("context_full_from_turn")
        if full:
            for ax, *_ in panels:
                ax.axvline(full, color=COLORS.get(mode), linestyle=":", linewidth=1)
            axes[0, 0].annotate(f"{mode}: context full", (full, 0), xycoords=("data", "axes fraction"),
                                xytext=(3, 6), textcoords="offset points", fontsize=8, color=COLORS.get(mode))
    for ax, _, _, label in panels:
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("user turn (MT-Bench, one session)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Streaming chat · {cfg.get('model', '')} · cache {cfg['start_size']}+{cfg['recent_size']}, "
                 f"window {cfg['window_size']}, dense up to {cfg['dense_max_context']} · "
                 f"{cfg['max_new_tokens']} new tokens max · {cfg['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot_load(report: dict, output) -> list[str]:
    """The server's resident memory over the load test (`loadtest --output`), with its peak: flat after the
    warm-up is what bounded caches buy. Saved beside `output` as a PNG of the same name; returns its path."""
    path = str(Path(output).with_suffix(".png"))
    samples = report.get("rss_timeline") or []
    fig, ax = plt.subplots(figsize=(8, 4))
    if samples:
        ax.plot([t for t, _ in samples], [rss / MIB for _, rss in samples], color=COLORS["streaming"],
                linewidth=1.4, label="server resident memory")
    if report.get("peak_rss_bytes"):
        ax.axhline(report["peak_rss_bytes"] / MIB, color="black", linestyle=":", linewidth=1,
                   label=f"peak {report['peak_rss_bytes'] / MIB:,.0f} MiB")
    ax.set_xlabel("seconds since the load began")
    ax.set_ylabel("MiB")
    ax.set_title(f"Load test · {report['sessions']} sessions × {report['turns_per_session']} turns · "
                 f"{report['turns_completed']} turns completed, {report['errors']} errors, "
                 f"{report['cross_talk']} cross-talk", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


SCHEDULER_COLORS = {"batched": "#1f77b4", "round-robin": "#ff7f0e"}


def plot_serve(result: dict, output) -> list[str]:
    """Three panels against concurrent sessions, one line per scheduler: aggregate tokens/s, each session's
    decode tokens/s, time to first token (p50 solid, p95 dashed). Saved beside `output` as a PNG of the same
    name; returns its path."""
    path = str(Path(output).with_suffix(".png"))
    cfg = result["config"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    for kind in cfg["schedulers"]:
        cells = [c for c in result["cells"] if c["scheduler"] == kind]
        xs = [c["sessions"] for c in cells]
        color = SCHEDULER_COLORS.get(kind)
        axes[0].plot(xs, [c["aggregate_tok_s"] for c in cells], marker="o", color=color, label=kind)
        axes[1].plot(xs, [c["per_session_tok_s"] for c in cells], marker="o", color=color, label=kind)
        axes[2].plot(xs, [c["ttft_p50_s"] for c in cells], marker="o", color=color, label=f"{kind} p50")
        axes[2].plot(xs, [c["ttft_p95_s"] for c in cells], marker="^", color=color, linestyle="--",
                     label=f"{kind} p95")
    for ax, label in zip(axes, ("aggregate tokens/s (all sessions)", "decode tokens/s per session (median)",
                                "time to first token (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg["sessions"], [str(s) for s in cfg["sessions"]])
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    single = result.get("single") or {}
    extra = (f" · single stream: engine {single['engine']['decode_tok_s']:.1f} vs generate "
             f"{single['generate']['decode_tok_s']:.1f} tok/s" if single else "")
    fig.suptitle(f"Serving · {cfg.get('model', '')} · {cfg['device_name']} · {cfg['dtype']} · "
                 f"{cfg['new_tokens']} tokens per reply{extra}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_dtype(result: dict, output) -> list[str]:
    """Decode step time per batch size and prefill speed, fp32 beside bf16. Saved beside `output` as a PNG of
    the same name; returns its path."""
    path = str(Path(output).with_suffix(".png"))
    dtypes = list(result["dtypes"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    sizes = list(next(iter(result["dtypes"].values()))["decode_ms"])
    width = 0.8 / len(dtypes)
    for i, d in enumerate(dtypes):
        data = result["dtypes"][d]
        xs = [j + i * width for j in range(len(sizes))]
        ppl = f" (dense PPL {data['ppl_dense']:.2f})" if data.get("ppl_dense") else ""
        axes[0].bar(xs, [data["decode_ms"][s] for s in sizes], width,
                    label=f"{d.split('-')[0]}, {data.get('attention', '?')} attention{ppl}")
        axes[1].bar([i], [data["prefill_tok_s"]], 0.6, label=d)
    axes[0].set_xticks([j + width * (len(dtypes) - 1) / 2 for j in range(len(sizes))],
                       [f"{s.split('x')[0]} rows\n{s.split('x')[1]} held" for s in sizes])
    axes[0].set_ylabel("ms per batched decode step (median)")
    axes[1].set_xticks(range(len(dtypes)), [f"{d.split('-')[0]}\n{result['dtypes'][d].get('attention', '')}"
                                            for d in dtypes])
    axes[1].set_ylabel("prefill tokens/s")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"fp32 vs bf16 · {cfg.get('model', '')} · {cfg['device_name']} · {cfg['torch_threads']} thread(s)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
