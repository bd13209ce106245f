"""``mixprec formats``: the table of every format, ``explain`` a value, ``plot`` layouts.

Examples::

    mixprec formats                        # layout and limits of every format
    mixprec formats -f fp16 -f bf16        # only these
    mixprec formats explain 0.001          # what 0.001 becomes in fp32, fp16, bf16, fp8
    mixprec formats plot --out DIR         # PNG bit layouts and a rounding-error chart
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from mixprec.bench.console import wide_console
from mixprec.cli.checks import CliError, check_out_dir
from mixprec.cli.options import Command, format_choices, names

__all__ = ["COMMAND", "EXPLAIN_DEFAULT"]

EXPLAIN_DEFAULT = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")


def _arguments(p: argparse.ArgumentParser) -> None:
    _format_option(p, "only these formats (repeatable)")
    actions = p.add_subparsers(dest="formats_action", metavar="ACTION")
    for action in (EXPLAIN, PLOT):
        action.add_to(actions)


def _format_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--format", "-f", dest="formats", action="append", metavar="F",
                   help=f"{what}: {format_choices()}")  # fmt: skip


def _explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("value", help="a number: 0.001, 1e-8, inf, nan, 0x1p-14")
    _format_option(p, f"format to explain in (repeatable; default {names(EXPLAIN_DEFAULT)})")


def _plot_arguments(p: argparse.ArgumentParser) -> None:
    from mixprec.formats.report import DEFAULT_PLOT_FORMATS

    p.add_argument("--out", required=True, help="directory to write the PNG files to")
    _format_option(p, f"formats to draw (repeatable; default {names(DEFAULT_PLOT_FORMATS)})")


def _format_list(given: list[str] | None, default: Sequence[str]) -> list:
    from mixprec.formats import get_format

    return [get_format(n) for n in (given or default)]  # ValueError names the formats


def _table(args: argparse.Namespace) -> int:
    from mixprec.formats import FORMATS
    from mixprec.formats.report import format_table

    wide_console().print(format_table(_format_list(args.formats, list(FORMATS))))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from mixprec.formats.report import explain_table

    text = args.value.strip()
    try:
        value = float.fromhex(text) if "0x" in text.lower() else float(text)
    except (ValueError, OverflowError):
        raise CliError(
            f"value {args.value!r} is not a number (e.g. 0.001, 1e-8, 0x1p-14, inf, nan)"
        ) from None
    word = text.lower().lstrip("+-")
    if math.isinf(value) and word not in ("inf", "infinity"):
        _note(f"{args.value} is beyond float64's largest value (1.8e308) and is read as {value}")
    elif value == 0 and _nonzero_digits(text):
        _note(f"{args.value} is below float64's smallest value (4.9e-324) and is read as {value}")
    fmts = _format_list(args.formats, EXPLAIN_DEFAULT)
    wide_console().print(explain_table(value, fmts))
    if math.isnan(value):
        for f in fmts:
            if not f.has_nan:
                _note(f"{f.name} has no NaN (every bit pattern is a number); a NaN cannot be "
                      "stored in it")  # fmt: skip
    return 0


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _nonzero_digits(text: str) -> bool:
    """Whether the digits of a decimal or hex number (before its exponent) are not all 0."""
    low = text.lower()
    if "0x" in low:
        return any(c in "123456789abcdef" for c in low.split("0x", 1)[1].split("p")[0])
    return any(c in "123456789" for c in low.split("e")[0])


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mixprec.formats.report import DEFAULT_PLOT_FORMATS, plot_layouts, plot_rounding_error

    fmts = _format_list(args.formats, DEFAULT_PLOT_FORMATS)
    out = Path(check_out_dir(args.out))
    paths = plot_layouts(fmts, out)
    paths.append(plot_rounding_error(fmts, out / "rounding_error.png"))
    for path in paths:
        print(path)
    return 0


EXPLAIN = Command(
    "explain", _explain_arguments, _explain, help="what one value becomes in each format"
)
PLOT = Command("plot", _plot_arguments, _plot, help="PNG bit layouts and a rounding-error chart")
COMMAND = Command(
    "formats", _arguments, _table, help="number formats: table, explain a value, plots",
    description="Without an action: a table of every format's layout and limits.",
)  # fmt: skip
