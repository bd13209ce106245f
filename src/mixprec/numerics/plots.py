"""PNG plots of a :class:`~mixprec.numerics.Monitor`: gradient histogram and underflow heat map."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mixprec.numerics.stats import HIST_LOW

__all__ = ["plot_gradient_histogram", "plot_underflow_heatmap"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_gradient_histogram(monitor, path: str | Path, *, kind: str = "grad_output") -> Path:
    """Histogram of gradient magnitudes in the style of Micikevicius et al. (2017), fig. 3.

    x: ``log2 |g|`` (one bar per binade, all modules and steps merged), y: percent of the
    values (the share of zeros is given in the title). Below it, each monitored format's
    subnormal range (light) and normal range (dark). When a loss scale ``S`` was recorded,
    the histogram of the unscaled values is outlined ``log2 S`` binades to the left and
    the shift is marked with an arrow.
    """
    plt = _pyplot()
    merged = None
    for p, k in monitor.keys():
        if k == kind:
            s = monitor.stats(p, k)
            merged = s if merged is None else merged.merge(s)
    fig, (ax, band) = plt.subplots(
        2, 1, figsize=(9, 5), sharex=True, gridspec_kw={"height_ratios": [4, 1.2]}
    )
    binades = np.arange(HIST_LOW, HIST_LOW + len(merged.histogram)) if merged else np.array([])
    lo, hi = 0, 0
    if merged is not None and merged.numel:
        pct = 100.0 * merged.histogram / merged.numel
        nz = np.flatnonzero(pct)
        ax.bar(binades[nz] + 0.5, pct[nz], width=1.0, color="tab:blue", label="measured")
        scales = [v for v in monitor.scales.values() if v and v > 0]
        if scales:
            shift = float(np.median(np.log2(scales)))
            if shift:
                ax.step(
                    binades[nz] + 0.5 - shift,
                    pct[nz],
                    where="mid",
                    color="tab:gray",
                    linestyle="--",
                    label=f"unscaled (÷ 2^{shift:g})",
                )
                peak = binades[nz][np.argmax(pct[nz])] + 0.5
                top = pct[nz].max()
                ax.annotate(
                    "",
                    xy=(peak, top * 1.1),
                    xytext=(peak - shift, top * 1.1),
                    arrowprops={"arrowstyle": "->", "color": "tab:red"},
                )
                ax.text(
                    peak - shift / 2,
                    top * 1.2,
                    f"loss scale 2^{shift:g}",
                    ha="center",
                    color="tab:red",
                    fontsize=8,
                )
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        if len(nz):
            lo, hi = binades[nz].min() - 4, binades[nz].max() + 5
            if scales and shift:
                lo = min(lo, lo - shift)
    # Show the data and the narrow formats' ranges around it, not all of bf16's range.
    lo, hi = min(lo, -30), max(hi, 20)
    ax.set_ylabel("% of values")
    zeros = merged.zero_fraction if merged else 0.0
    ax.set_title(f"{kind} magnitudes, all modules and measured steps ({100 * zeros:.2g}% zeros)")
    for i, fmt in enumerate(monitor.formats):
        sub_lo, norm_lo, top = (
            math.log2(fmt.min_subnormal),
            math.log2(fmt.min_normal),
            math.log2(fmt.max),
        )
        band.broken_barh(
            [(sub_lo, norm_lo - sub_lo)], (i - 0.4, 0.8), color="tab:orange", alpha=0.35
        )
        band.broken_barh([(norm_lo, top - norm_lo)], (i - 0.4, 0.8), color="tab:orange", alpha=0.8)
        ax.axvline(sub_lo - 1, color="tab:orange", linewidth=0.5, alpha=0.4)  # flushes below
    band.set_yticks(range(len(monitor.formats)), monitor.format_names, fontsize=8)
    band.set_xlabel(
        "log2 |value|  (light: subnormal range, dark: normal range; thin lines: flush to zero "
        "below)"
    )
    band.set_xlim(max(lo, -150), min(hi, 130))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_underflow_heatmap(monitor, path: str | Path, *, kind: str = "grad_output") -> Path:
    """Heat map per format: rows = modules, columns = measured steps, colour = flush fraction.

    The value is ``flush_F / numel`` of the module's ``kind`` tensor at that step (blank
    where the module has no such tensor).
    """
    plt = _pyplot()
    steps = monitor.steps
    paths = [p for p, k in monitor.keys() if k == kind]
    n = len(monitor.formats)
    fig, axes = plt.subplots(
        1, n, figsize=(3.2 * n + 1, 0.22 * max(len(paths), 4) + 1.8), squeeze=False, sharey=True
    )
    for ax, fmt in zip(axes[0], monitor.format_names):
        grid = np.full((len(paths), len(steps)), np.nan)
        for j, step in enumerate(steps):
            table = monitor.results[step]
            for i, p in enumerate(paths):
                s = table.get((p, kind))
                if s is not None:
                    grid[i, j] = s.flush_fraction(fmt)
        im = ax.imshow(
            grid,
            aspect="auto",
            interpolation="nearest",
            vmin=0.0,
            vmax=max(
                1e-6, float(np.nanmax(grid)) if grid.size and not np.isnan(grid).all() else 1.0
            ),
            cmap="viridis",
        )
        ax.set_title(f"{fmt}", fontsize=9)
        ax.set_xlabel("step")
        if steps:
            ticks = np.linspace(0, len(steps) - 1, min(len(steps), 6)).astype(int)
            ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    axes[0][0].set_yticks(range(len(paths)), [p or "(model)" for p in paths], fontsize=6)
    fig.suptitle(f"fraction of each module's {kind} that flushes to zero", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
