"""Rendering for number formats: rich tables and matplotlib pictures (imported lazily).

Kept apart from the numerics so that ``import mixprec`` never pulls in rich or
matplotlib; the numbers shown all come from :class:`~mixprec.formats.FloatFormat`'s derived
properties and :func:`~mixprec.formats.explain`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mixprec.formats import FORMATS, FloatFormat, explain, get_format, quantize

__all__ = [
    "DEFAULT_PLOT_FORMATS",
    "explain_table",
    "format_table",
    "num",
    "plot_layouts",
    "plot_rounding_error",
]

# Formats drawn in the rounding-error chart when none are named (fp64/fp32 would stretch
# the magnitude axis over 600 binades).
DEFAULT_PLOT_FORMATS = ("fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", "fp6_e3m2fn", "fp4_e2m1fn")


def num(v: float) -> str:
    """A short exact-enough rendering: ``2^-14`` for powers of two beyond 1024, else %.6g.

    Example:
        >>> num(6.103515625e-05), num(448.0), num(float("inf"))
        ('2^-14', '448', 'inf')
    """
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v == 0:
        return "-0" if math.copysign(1.0, v) < 0 else "0"
    mant, exp = math.frexp(abs(v))
    if mant == 0.5 and not (-10 <= exp - 1 <= 10):
        return f"{'-' if v < 0 else ''}2^{exp - 1}"
    return f"{v:.6g}"


def format_table(formats: Sequence[str | FloatFormat] | None = None):
    """A rich Table of every format's layout and derived limits (what torch.finfo shows).

    Columns: bits; layout; bias; max; min normal ``2^emin``; min subnormal ``2^(emin-m)``;
    eps ``2^-m``; decimal digits ``floor(m log10 2)``; range ``log2(max/min_subnormal)``;
    inf/NaN encoding; torch dtype.
    """
    from rich.table import Table

    fmts = [get_format(f) for f in (formats or FORMATS.values())]
    t = Table(title="Number formats (every value derived from the bit layout)")
    for col in ("format", "bits", "layout", "bias", "max", "min normal", "min subnormal",
                "eps", "digits", "binades", "inf/NaN", "torch dtype"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("format", "layout", "inf/NaN") else "right")
    for f in fmts:
        specials = f"{'inf, ' if f.has_inf else ''}NaN: {f.nan}"
        dtype = str(f.torch_dtype).removeprefix("torch.") if f.torch_dtype else "-"
        t.add_row(
            f.name, str(f.bits), f.layout, str(f.bias), num(f.max), num(f.min_normal),
            num(f.min_subnormal) if f.has_zero else "(none)", num(f.eps),
            str(f.decimal_digits), f"{f.dynamic_range_binades:.1f}", specials, dtype,
        )  # fmt: skip
    return t


def explain_table(value: float, formats: Sequence[str | FloatFormat]):
    """A rich Table of :func:`~mixprec.formats.explain` for one value and several formats."""
    from rich.table import Table

    rows = explain(value, list(formats))
    t = Table(title=f"{value!r} in each format")
    for col in ("format", "nearest", "abs error", "rel error", "below", "above", "gap",
                "status", "bits", "class"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("format", "status", "bits") else "right")
    for r in rows:
        t.add_row(
            r.format, f"{r.nearest:.9g}", f"{r.abs_error:.3g}", f"{r.rel_error:.3g}",
            f"{r.below:.9g}", f"{r.above:.9g}", num(r.gap), r.status,
            r.decoded.bit_string, r.decoded.value_class,
        )  # fmt: skip
    return t


_FIELD_COLOURS = {"sign": "#e07b7b", "exponent": "#7ba7e0", "mantissa": "#8fd18f"}


def plot_layouts(formats: Sequence[str | FloatFormat], out_dir: str | Path) -> list[Path]:
    """Write ``layout_<name>.png``: one box per bit, coloured and labelled by field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in map(get_format, formats):
        fields = ([("sign", 1)] if f.signed else []) + [("exponent", f.exponent_bits)]
        if f.mantissa_bits:
            fields.append(("mantissa", f.mantissa_bits))
        fig, ax = plt.subplots(figsize=(max(4.0, 0.28 * f.bits + 1.5), 1.9))
        pos = 0
        for field, width in fields:
            for i in range(width):
                ax.add_patch(Rectangle((pos + i, 0), 1, 1, facecolor=_FIELD_COLOURS[field],
                                       edgecolor="black", linewidth=0.6))  # fmt: skip
            ax.text(pos + width / 2, 1.15, f"{field} ({width})", ha="center", va="bottom",
                    fontsize=8)  # fmt: skip
            pos += width
        ax.text(0, -0.35, f"bit {f.bits - 1}", ha="left", va="top", fontsize=7)
        ax.text(f.bits, -0.35, "bit 0", ha="right", va="top", fontsize=7)
        ax.set_xlim(-0.2, f.bits + 0.2)
        ax.set_ylim(-0.9, 1.9)
        ax.axis("off")
        ax.set_title(f"{f.name}: {f.layout}, bias {f.bias}, max {num(f.max)}, "
                     f"NaN: {f.nan}", fontsize=9)  # fmt: skip
        path = out / f"layout_{f.name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def plot_rounding_error(
    formats: Sequence[str | FloatFormat], path: str | Path, *, points: int = 4000
) -> Path:
    """Chart relative rounding error ``|q(x) - x| / x`` against magnitude ``x`` (log-log).

    Per format: the error curve for round-to-nearest, its unit roundoff ``2^-(m+1)`` as a
    dashed line, and in a panel below a bar marking the subnormal range
    ``[min_subnormal, min_normal)`` (light) and the normal range ``[min_normal, max]`` (dark).
    Exact results (error 0) sit at the bottom of the plot (2^-30).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    fmts = [get_format(f) for f in formats]
    lo = min(math.log2(f.min_subnormal) for f in fmts) - 2
    hi = max(math.log2(f.max) for f in fmts) + 1
    lo, hi = max(lo, -1070.0), min(hi, 1023.0)
    # A jittered log grid, so points do not all land on representable values.
    g = torch.Generator().manual_seed(0)
    e = torch.linspace(lo, hi, points, dtype=torch.float64)
    x = torch.exp2(e + torch.rand(points, generator=g, dtype=torch.float64) * (hi - lo) / points)
    fig, (ax, bars) = plt.subplots(
        2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [4, 1.3]}
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    floor = 2.0**-30  # exact results (error 0) are drawn at this floor
    for i, f in enumerate(fmts):
        c = colours[i % len(colours)]
        q = quantize(x, f)
        rel = ((q - x).abs() / x).clamp(min=floor)
        ok = torch.isfinite(rel) & (x <= f.max) & (x >= f.min_subnormal / 4)
        ax.plot(x[ok].numpy(), rel[ok].numpy(), lw=0.7, color=c, label=f.name)
        ax.axhline(2.0 ** -(f.mantissa_bits + 1), color=c, ls="--", lw=0.7)
        if f.has_zero:
            bars.plot([f.min_subnormal, f.min_normal], [i, i], color=c, lw=7, alpha=0.35,
                      solid_capstyle="butt")  # fmt: skip
        bars.plot([f.min_normal, f.max], [i, i], color=c, lw=7, solid_capstyle="butt")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_ylim(bottom=floor / 2, top=2.0)
    ax.set_ylabel("relative error |q(x) - x| / |x|")
    ax.set_title("Round-to-nearest error by magnitude (dashed: unit roundoff 2^-(m+1))",
                 fontsize=10)  # fmt: skip
    ax.legend(loc="lower left", fontsize=8, ncol=2)
    ax.grid(True, which="major", alpha=0.3)
    bars.set_yticks(range(len(fmts)), [f.name for f in fmts], fontsize=7)
    bars.set_ylim(len(fmts) - 0.5, -0.5)
    bars.set_xlabel("|x| (log2 scale); bars: subnormal range (light), normal range (dark)")
    bars.grid(True, axis="x", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
