"""Rendering a :class:`~mixprec.numerics.Monitor`: verdicts, a rich table, JSON (plots: .plots).

Verdict rule (per module, per format ``F``, over every measured step merged):

* ``lost(F) = (overflow_F + flush_F) / numel`` for the module's activations (``output``)
  and, separately, its gradients (``grad_output`` and ``grad_input`` merged);
* the module *fits* ``F`` when both are at most ``loss_threshold`` (default 1%).

Formats are grouped by width (bits). A width *works* for a module when, for activations
and for gradients separately, its least lossy format of that width fits (so fp8 works
with e4m3 activations and e5m2 gradients). When the narrowest monitored width does not
work, the module gets a recommendation: keep it in the narrowest width that works (the
format names that fit), citing the loss of the narrowest width's best format, e.g.
``"keep head in bf16: 9.0% of its output gradients underflow in fp8_e5m2"``; ``fp32``
when no width works.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixprec.numerics.stats import HIST_LOW, TensorStats

__all__ = [
    "LayerVerdict",
    "print_table",
    "to_dict",
    "verdicts",
    "write_json",
    "write_report",
]

_WORDS = {"output": "outputs", "grad_output": "output gradients", "grad_input": "input gradients"}


@dataclass(frozen=True, slots=True)
class LayerVerdict:
    """Which monitored formats one module's activations and gradients fit in.

    Attributes:
        path: module path.
        fits: ``{format: True/False}`` under the threshold.
        lost: ``{format: {"activations": fraction, "gradients": fraction}}``.
        recommendation: a sentence, or ``None`` when the module fits every format.
    """

    path: str
    fits: dict[str, bool]
    lost: dict[str, dict[str, float]] = field(repr=False)
    recommendation: str | None

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "fits": self.fits,
            "lost": self.lost,
            "recommendation": self.recommendation,
        }


def _merged(monitor, path: str, kinds: tuple[str, ...]) -> TensorStats | None:
    """``kinds`` of ``path`` merged over every measured step of the run."""
    out = None
    for kind in kinds:
        s = monitor.totals.get((path, kind))
        if s is not None:
            out = s if out is None else out.merge(s)
    return out


def _loss_reason(stats: TensorStats, fmt: str, what: str) -> tuple[float, str]:
    over, flush = stats.overflow_fraction(fmt), stats.flush_fraction(fmt)
    verb = "overflow" if over >= flush else "underflow"
    return over + flush, f"{100 * (over + flush):.1f}% of its {what} {verb} in {fmt}"


def verdicts(monitor, loss_threshold: float = 0.01) -> list[LayerVerdict]:
    """Per-module verdicts (see the module docstring for the rule).

    Example:
        >>> v = monitor.verdicts()  # doctest: +SKIP
        >>> v[0].recommendation     # doctest: +SKIP
        "keep head in bf16: 9.0% of its output gradients underflow in fp8_e5m2"
    """
    monitor.readout()
    out = []
    for path in monitor.module_paths:
        groups = {
            "activations": _merged(monitor, path, ("output",)),
            "gradients": _merged(monitor, path, ("grad_output", "grad_input")),
        }
        groups = {g: s for g, s in groups.items() if s is not None}
        if groups:
            out.append(_verdict(monitor, path, groups, loss_threshold))
    return out


def _verdict(monitor, path: str, groups: dict, threshold: float) -> LayerVerdict:
    bits = {f.name: f.bits for f in monitor.formats}
    widths = sorted(set(bits.values()))
    lost = {f: {g: s.lost_fraction(f) for g, s in groups.items()} for f in bits}
    fits = {f: all(v <= threshold for v in lost[f].values()) for f in bits}

    def best(group: str, width: int) -> str:  # least lossy format of a width for a group
        return min((f for f in bits if bits[f] == width), key=lambda f: lost[f][group])

    def width_ok(width: int) -> bool:
        return all(lost[best(g, width)][g] <= threshold for g in groups)

    rec = None
    if not width_ok(widths[0]):
        # The narrowest width fails even with its best format per group: say why.
        group = max(groups, key=lambda g: lost[best(g, widths[0])][g])
        fmt = best(group, widths[0])
        kinds = ("output",) if group == "activations" else ("grad_output", "grad_input")
        reasons = [
            _loss_reason(s, fmt, _WORDS[k])
            for k in kinds
            if (s := _merged(monitor, path, (k,))) is not None
        ]
        keep_width = next((w for w in widths if width_ok(w)), None)
        keep = "fp32"
        if keep_width is not None:
            keep = " / ".join(sorted({best(g, keep_width) for g in groups}))
        rec = f"keep {path or 'the model'} in {keep}: {max(reasons)[1]}"
    return LayerVerdict(path, fits, lost, rec)


# -- JSON ----------------------------------------------------------------------------------
def _num(x: float) -> float | str:
    """Finite floats as they are; inf / nan as strings, so the JSON stays standard."""
    return x if math.isfinite(x) else str(x)


def _stats_dict(stats: TensorStats, names, *, histogram: bool) -> dict:
    d = {
        "numel": stats.numel,
        "max_abs": _num(stats.max_abs),
        "min_nonzero_abs": _num(stats.min_nonzero_abs),
        "zero_fraction": stats.zero_fraction,
        "nonfinite_fraction": stats.nonfinite_fraction,
        "formats": {
            f: {
                "overflow": stats.overflow_fraction(f),
                "subnormal": stats.subnormal_fraction(f),
                "flush": stats.flush_fraction(f),
            }
            for f in names
        },
    }
    if histogram:
        nz = np.flatnonzero(stats.histogram)
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        d["histogram"] = {
            "lowest_binade": HIST_LOW + lo,
            "counts": stats.histogram[lo:hi].tolist(),
            "zeros": stats.zeros,
            "nonfinite": stats.nonfinite,
        }
    return d


def to_dict(monitor) -> dict:
    """Everything measured as plain data (JSON-ready).

    Keys: ``formats``, ``every``, ``loss_threshold``, ``steps`` (per measured step: its loss
    scale, first non-finite and per-tensor statistics), ``summary`` (per ``(path, kind)``
    merged over steps, with a log2 histogram: ``counts[i]`` values in binade
    ``lowest_binade + i``), ``first_nonfinite`` and ``verdicts``. Fractions are of all
    values of the tensor; inf/nan numbers are written as the strings ``"inf"``/``"nan"``.
    """
    names = monitor.format_names
    steps = []
    for step in monitor.steps:
        first = monitor.first_nonfinite_in(step)
        steps.append(
            {
                "step": step,
                "scale": monitor.scales.get(step),
                "first_nonfinite": first.to_dict() if first else None,
                "tensors": [
                    {"path": p, "kind": k, **_stats_dict(s, names, histogram=False)}
                    for (p, k), s in monitor.results[step].items()
                ],
            }
        )
    summary = []
    for path, kind in monitor.keys():
        s = monitor.stats(path, kind)
        summary.append({"path": path, "kind": kind, **_stats_dict(s, names, histogram=True)})
    first = monitor.first_nonfinite
    return {
        "formats": list(names),
        "every": monitor.every,
        "track": list(monitor.track),
        "loss_threshold": monitor.loss_threshold,
        "steps": steps,
        "summary": summary,
        "first_nonfinite": first.to_dict() if first else None,
        "verdicts": [v.to_dict() for v in monitor.verdicts()],
    }


def write_json(monitor, path: str | Path) -> Path:
    """Write :func:`to_dict` as JSON; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(to_dict(monitor), indent=1, allow_nan=False))
    return path


# -- terminal table ------------------------------------------------------------------------
_SHORT = {
    "output": "out",
    "grad_output": "d out",
    "grad_input": "d in",
    "param_grad": "d param",
    "weight": "param",
    "update": "update",
}


def _pct(x: float) -> str:
    return "0" if x == 0 else f"{100 * x:.2g}%"


def print_table(monitor, *, console=None, kinds=("output", "grad_output", "param_grad")) -> None:
    """Print a rich table: one row per (module, kind), lost fraction per format, verdicts.

    Tensor: ``out`` (output), ``d out`` / ``d in`` (gradient of output / input), ``d param``
    (parameter gradient). Columns: ``max|x|``, ``min|x|>0``, ``zeros`` (fraction),
    ``inf/nan`` (fraction) and per format ``overflow / subnormal / flush`` fractions (``%`` of
    the tensor's values).
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    table = Table(title=f"numerics over steps {monitor.steps} (every {monitor.every})")
    for col in ("module", "tensor", "max|x|", "min|x|>0", "zeros", "inf/nan"):
        left = col in ("module", "tensor")
        table.add_column(
            col, justify="left" if left else "right", overflow="fold" if left else "ellipsis"
        )
    for f in monitor.format_names:
        table.add_column(f"{f}\novf/sub/ftz", justify="right")
    for path, kind in monitor.keys():
        if kind not in kinds:
            continue
        s = monitor.stats(path, kind)
        row = [
            Text(path or "(model)"),  # a module name is printed as written, never as markup
            _SHORT[kind],
            f"{s.max_abs:.2g}",
            f"{s.min_nonzero_abs:.2g}",
            _pct(s.zero_fraction),
            _pct(s.nonfinite_fraction),
        ]
        for f in monitor.format_names:
            cells = [
                _pct(s.overflow_fraction(f)),
                _pct(s.subnormal_fraction(f)),
                _pct(s.flush_fraction(f)),
            ]
            bad = s.lost_fraction(f) > monitor.loss_threshold
            text = "/".join(cells)
            row.append(Text(text, style="red" if bad else ""))
        table.add_row(*row)
    console.print(table)
    first = monitor.first_nonfinite
    if first is not None:
        console.print(Text(first.message(), style="bold red"))
    recs = [v.recommendation for v in monitor.verdicts() if v.recommendation]
    console.print(
        f"verdicts (a format fits when at most {100 * monitor.loss_threshold:g}% of a "
        "module's activations or gradients overflow or flush to zero):"
    )
    for rec in recs or ["every module fits every monitored format"]:
        console.print(Text(f"  - {rec}"))


# -- plots ---------------------------------------------------------------------------------
def write_report(monitor, out: str | Path, *, console=None) -> dict[str, Path]:
    """Table (printed and saved as ``table.txt``), ``numerics.json`` and the two PNGs."""
    from rich.console import Console

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": write_json(monitor, out / "numerics.json")}
    recorder = Console(record=True, width=200, file=io.StringIO(), markup=False, emoji=False)
    print_table(monitor, console=recorder)
    (out / "table.txt").write_text(recorder.export_text())
    files["table"] = out / "table.txt"
    print_table(monitor, console=console or Console())
    from mixprec.numerics.plots import plot_gradient_histogram, plot_underflow_heatmap

    files["histogram"] = plot_gradient_histogram(monitor, out / "gradient_histogram.png")
    files["heatmap"] = plot_underflow_heatmap(monitor, out / "underflow_heatmap.png")
    return files
