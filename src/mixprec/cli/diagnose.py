"""``mixprec diagnose``: train a task (or your model) under the numerics monitor and report.

Examples::

    mixprec diagnose                                  # gpt, small, fp16-mixed, 50 steps
    mixprec diagnose --recipe bf16-true --format fp8_e4m3fn --out DIR
    mixprec diagnose --model mypkg.mymodel:factory    # your model (protocol: mixprec.bench.user)
"""

from __future__ import annotations

import argparse

from mixprec.cli.checks import MAX_STEPS, check_run_options, positive_int
from mixprec.cli.options import Command, add_source_options, format_choices, names, recipe_names

__all__ = ["COMMAND"]


def _arguments(p: argparse.ArgumentParser) -> None:
    from mixprec.numerics.monitor import DEFAULT_FORMATS

    add_source_options(
        p, model_help="your model instead of a task (protocol: mixprec.bench.user)", exclusive=True
    )
    p.add_argument(
        "--recipe", default="fp16-mixed", help=f"recipe (default fp16-mixed): {recipe_names()}"
    )
    p.add_argument(
        "--steps", type=positive_int, default=50,
        help=f"training steps (default 50; at most {MAX_STEPS:,})",
    )  # fmt: skip
    p.add_argument(
        "--every", type=positive_int, default=1, help="measure one step in N (default 1)"
    )
    default = names(DEFAULT_FORMATS)
    p.add_argument("--format", dest="formats", action="append",
                   help=f"target format (repeatable; default {default}): "
                   + format_choices())  # fmt: skip
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the weights and data order (default 0)"
    )
    p.add_argument("--device", default="cpu", help="torch device to train on (default cpu): "
                   "cpu, cuda, cuda:N, mps")  # fmt: skip
    p.add_argument(
        "--out", default="diagnose-report", help="output folder (default diagnose-report)"
    )


def _run(args: argparse.Namespace) -> int:
    from mixprec.bench.console import wide_console
    from mixprec.bench.diagnose import diagnose
    from mixprec.numerics.monitor import DEFAULT_FORMATS

    check_run_options(args)
    if args.steps > MAX_STEPS:  # a loss is kept per step for the report
        raise ValueError(
            f"--steps {args.steps:,} is more than a diagnose run reports: at most {MAX_STEPS:,}; "
            "watch a long run with mixprec.numerics.Monitor in your own loop"
        )
    diagnose(
        args.model or args.task,
        recipe=args.recipe,
        steps=args.steps,
        out=args.out,
        size=args.size,
        formats=args.formats or DEFAULT_FORMATS,
        every=args.every,
        seed=args.seed,
        device=args.device,
        console=wide_console(),
    )
    return 0


COMMAND = Command(
    "diagnose", _arguments, _run, help="train with the numerics monitor and report",
    description="Train a task (or a user model) with a recipe under the numerics monitor; "
    "print the per-layer table and write numerics.json, table.txt and PNG plots.",
)  # fmt: skip
