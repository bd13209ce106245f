"""Rendering a :class:`~mixprec.numerics.Monitor`: a rich table and JSON (plots: .plots).

The per-module format verdicts (judged under the scaling each format really gets: per-tensor
for fp8, the loss scale for fp16 gradients) are computed in :mod:`.verdicts` and re-exported
here.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from mixprec.numerics.stats import HIST_LOW, TensorStats
from mixprec.numerics.verdicts import LayerVerdict, verdicts

__all__ = [
    "LayerVerdict",
    "print_table",
    "to_dict",
    "verdicts",
    "write_json",
    "write_report",
]


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

    Keys: ``formats``, ``every``, ``track``, ``loss_threshold``, ``steps`` (per measured
    step kept, the last ``window``: its loss scale, first non-finite and per-tensor
    statistics), ``summary`` (per ``(path, kind)`` merged over every measured step, with a
    log2 histogram: ``counts[i]`` values in binade ``lowest_binade + i``),
    ``first_nonfinite`` and ``verdicts``. Fractions are of all
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
    from rich.table import Table
    from rich.text import Text

    console = console or _log_console()
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
        "module's activations or gradients overflow or flush to zero; fp8 judged after "
        "per-tensor scaling, on Linear layers):"
    )
    for rec in recs or ["every module fits every monitored format"]:
        console.print(Text(f"  - {rec}"))


# -- console and report folder -------------------------------------------------------------
TABLE_WIDTH = 200  # columns of the table when printed into a log (not a terminal)


def _log_console():
    """A terminal's own width, or ``TABLE_WIDTH`` columns when output goes to a log or pipe
    (rich would squeeze the table to 80 columns there)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=TABLE_WIDTH)


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
    print_table(monitor, console=console or _log_console())
    from mixprec.numerics.plots import plot_gradient_histogram, plot_underflow_heatmap

    files["histogram"] = plot_gradient_histogram(monitor, out / "gradient_histogram.png")
    files["heatmap"] = plot_underflow_heatmap(monitor, out / "underflow_heatmap.png")
    return files
