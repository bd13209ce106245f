"""PNG plots of a bench: loss curves overlaid, throughput bars, memory bars, numerics histogram."""

from __future__ import annotations

import math
from pathlib import Path

from mixprec.bench.probes import why_failed
from mixprec.bench.results import BenchResult

__all__ = ["write_plots"]


def _figure(width: float = 7.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _loss_curves(result: BenchResult, path: Path) -> Path:
    plt, fig, ax = _figure()
    for r in result.recipes:
        steps = range(1, len(r.losses) + 1)
        finite = [v if math.isfinite(v) else float("nan") for v in r.losses]
        (line,) = ax.plot(steps, finite, label=r.recipe, linewidth=1.2)
        if r.status == "diverged" and r.diverged_at:
            last = next((v for v in reversed(finite) if math.isfinite(v)), 0.0)
            ax.plot([r.diverged_at], [last], "x", color=line.get_color(), markersize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{result.task.name} ({result.task.size}): loss per step (x = diverged)")
    if result.recipes:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _throughput(result: BenchResult, path: Path) -> Path:
    """Speed-up over fp32 per recipe (median of per-round ratios) with its interval as error
    bars; the label gives items/s (median step)."""
    plt, fig, ax = _figure()
    names = [r.recipe for r in result.recipes]
    values, low, high = [], [], []
    for r in result.recipes:
        s = result.speedup(r) or 0.0
        iv = result.speedup_interval(r)
        values.append(s)
        low.append(s - iv.low if iv else 0.0)
        high.append(iv.high - s if iv else 0.0)
    bars = ax.bar(names, values, color="tab:blue", yerr=[low, high], capsize=4)
    for bar, r in zip(bars, result.recipes):
        ips = result.items_per_s(r)
        if ips:
            ax.annotate(
                f"{ips:,.0f}",
                (bar.get_x() + bar.get_width() / 2, 0),
                ha="center",
                va="bottom",
                fontsize=7,
                color="white",
            )
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_ylabel("speed-up over fp32")
    ax.set_title(
        f"speed-up over fp32 (interval of at least {result.config.confidence:.0%} over rounds; "
        f"label: {result.task.item_unit}/s)",
        fontsize=9,
    )
    ax.tick_params(axis="x", rotation=30)
    return _save(plt, fig, path)


def _memory(result: BenchResult, path: Path) -> Path:
    plt, fig, ax = _figure()
    names = [r.recipe for r in result.recipes]
    x = range(len(names))
    mib = 2**20
    measured = [(r.peak_memory_bytes or 0) / mib for r in result.recipes]
    estimated = [(r.estimated_memory_bytes or 0) / mib for r in result.recipes]
    ax.bar([i - 0.2 for i in x], measured, width=0.4, label="measured peak")
    ax.bar([i + 0.2 for i in x], estimated, width=0.4, label="estimated", alpha=0.7)
    ax.set_xticks(list(x), names, rotation=30)
    ax.set_ylabel("MiB")
    ax.set_title("peak training memory (0 = not available)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _numerics(result: BenchResult, path: Path, missing: dict[str, str]) -> Path | None:
    from mixprec.numerics.plots import plot_gradient_histogram

    if result.monitor is None:
        return None
    try:
        return plot_gradient_histogram(result.monitor, path)
    except (RuntimeError, ValueError, TypeError, OSError) as exc:
        # matplotlib's and torch's errors, or the file that cannot be written: the report
        # and results.json still get written, and say why this plot is missing
        missing["numerics_plot"] = why_failed("plotting", exc)
        return None


def write_plots(result: BenchResult, out: Path, missing: dict[str, str]) -> dict[str, Path]:
    """Write the plots into ``out``; returns ``{name: path}`` (numerics only when measured).

    A plot that could not be drawn is left out and ``missing[name]`` says why.
    """
    files = {
        "loss_curves": _loss_curves(result, out / "loss_curves.png"),
        "throughput": _throughput(result, out / "throughput.png"),
        "memory": _memory(result, out / "memory.png"),
    }
    numerics = _numerics(result, out / "numerics.png", missing)
    if numerics is not None:
        files["numerics"] = numerics
    return files
