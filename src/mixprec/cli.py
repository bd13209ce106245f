"""The `mixprec` command: formats, estimate, diagnose, bench.

Each subcommand parses its arguments here and calls the library; rendering lives beside
the data it renders (e.g. ``mixprec.bench.report``), so this module stays a thin shell.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _add_formats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("formats", help="number formats: table, explain a value, plots")
    p.set_defaults(func=_not_yet, command_name="formats")


def _add_estimate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="predict training memory for a model and recipe")
    p.set_defaults(func=_not_yet, command_name="estimate")


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="train with the numerics monitor and report")
    p.set_defaults(func=_not_yet, command_name="diagnose")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run recipes side by side, recommend one, write a report")
    p.set_defaults(func=_not_yet, command_name="bench")


def _not_yet(args: argparse.Namespace) -> int:
    raise CliError(f"`mixprec {args.command_name}` is not available in this version")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixprec",
        description="Mixed-precision training for PyTorch: formats, memory, numerics, bench.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_formats, _add_estimate, _add_diagnose, _add_bench):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"mixprec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
