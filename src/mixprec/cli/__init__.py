"""The `mixprec` command: formats, estimate, diagnose, bench.

One module per command (:mod:`~mixprec.cli.formats`, :mod:`~mixprec.cli.estimate`,
:mod:`~mixprec.cli.diagnose`, :mod:`~mixprec.cli.bench`) adds its parser and runs it on the
library; the pieces they share are in :mod:`~mixprec.cli.options` (parsing) and
:mod:`~mixprec.cli.checks` (input checks). Rendering lives beside the data it renders (e.g.
``mixprec.bench.report``). This module builds the parser and turns errors into exit codes.

Errors: an expected failure (a bad name or number, a path that cannot be read or written,
a device this machine does not have, a user factory that fails) is printed as one line on
stderr, ``mixprec COMMAND: error: ...`` naming the bad value and what is accepted, and the
exit status is 2. Ctrl-C prints one line and exits with 130. Anything else is a bug: one
line and exit status 1. ``--debug`` (or ``MIXPREC_DEBUG=1``) prints the traceback too.

torch's profiler (which ``memory.measure`` and the bench use for allocator events) prints
two ``USDT: ... profiler_start / profiler_stop`` lines per use through its kineto library;
the command sets ``KINETO_LOG_LEVEL=6`` (kineto logs nothing) before running, unless the
variable is already set or ``--debug`` is given, so the command's output is its own.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from mixprec.cli import bench, diagnose, estimate, formats
from mixprec.cli.checks import CliError
from mixprec.cli.options import DEBUG_ENV, OneLineParser, add_debug

__all__ = ["DEBUG_ENV", "CliError", "build_parser", "main"]

KINETO_LOG_ENV = "KINETO_LOG_LEVEL"  # read once, when torch's profiler first starts

# Exceptions that mean "the input cannot be used": one line, exit status 2.
_EXPECTED = (ValueError, TypeError, LookupError, OSError, ImportError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    """The ``mixprec`` parser: ``--debug`` and one subcommand per command module."""
    parser = OneLineParser(
        prog="mixprec",
        description="Mixed-precision training for PyTorch: formats, memory, numerics, bench.",
    )
    add_debug(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (formats.COMMAND, estimate.COMMAND, diagnose.COMMAND, bench.COMMAND):
        command.add_to(sub)
    return parser


def _debug_requested(args: argparse.Namespace) -> bool:
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return bool(getattr(args, "debug", False)) or env in ("1", "true", "yes", "on")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (CliError, ValueError)):
        return text
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename!r}"
    return f"{type(exc).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 130 Ctrl-C, 1 bug)."""
    parser = build_parser()
    args = None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help (0) or a usage error, already printed (2)
            return exc.code if isinstance(exc.code, int) else 2
        if not _debug_requested(args):  # unless set: no profiler log lines (module doc)
            os.environ.setdefault(KINETO_LOG_ENV, "6")
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        name = f"mixprec {args.command}" if args is not None else "mixprec"
        if args is not None and _debug_requested(args):
            traceback.print_exc()
        print(f"{name}: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mixprec bench --list | head`: the reader has gone, quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, as a shell reports it
    except (CliError, *_EXPECTED) as exc:
        if _debug_requested(args):
            traceback.print_exc()
        print(f"mixprec {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if _debug_requested(args):
            traceback.print_exc()
        print(
            f"mixprec {args.command}: internal error: {_one_line(exc)} (run with --debug or "
            f"{DEBUG_ENV}=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
