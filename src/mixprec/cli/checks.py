"""The command line's input checks: one-line usage errors, counts, devices, output folders.

Everything here raises :class:`CliError` (or makes argparse exit with status 2) with a
message that names the bad value and what is accepted; :mod:`mixprec.cli` prints it as one
line on stderr.
"""

from __future__ import annotations

import argparse
import os

from mixprec.cli.options import names

__all__ = [
    "MAX_STEPS",
    "CliError",
    "check_device",
    "check_out_dir",
    "check_run_options",
    "non_negative_int",
    "positive_int",
]

MAX_STEPS = 1_000_000  # bench and diagnose keep a loss (and a time) per step: bounded memory


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
    return value


def check_device(text: str | None) -> str | None:
    """``text`` if torch can run on that device here, else a :class:`CliError` naming the
    devices this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``); None passes through."""
    if text is None:
        return None
    import torch

    from mixprec.formats.names import did_you_mean

    available = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        available += ["cuda"] + [f"cuda:{i}" for i in range(n)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        available.append("mps")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        known = ["cpu", "cuda", "cuda:0", "mps", "xpu", "meta"]
        raise CliError(
            f"--device {text!r} is not a device{did_you_mean(text, known)}; "
            f"this machine has: {names(available)}"
        ) from None
    if str(device) not in available and device.type not in available:
        why = (
            "CUDA is not available (no GPU, or torch was built without CUDA)"
            if device.type == "cuda" and "cuda" not in available
            else f"{device} is not available"
        )
        raise CliError(f"--device {text!r}: {why}; this machine has: {names(available)}")
    if device.type == "cuda" and device.index is not None and str(device) not in available:
        raise CliError(f"--device {text!r}: no such GPU; this machine has: {names(available)}")
    return text


def check_run_options(args: argparse.Namespace) -> None:
    """``--device`` and ``--out`` of a command that trains (diagnose, bench), checked before
    anything is built or trained."""
    check_device(args.device)
    check_out_dir(args.out)


def check_out_dir(text: str) -> str:
    """``text`` if it can be an output folder: not a file and not under a file."""
    from pathlib import Path

    path = Path(text)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            what = "is a file" if part == path else f"lies under {str(part)!r}, which is a file"
            raise CliError(f"--out {text!r} {what}; give a folder path")
        if part.exists():
            if not os.access(part, os.W_OK | os.X_OK):
                raise CliError(f"--out {text!r}: folder {str(part)!r} is not writable")
            break
    return text
