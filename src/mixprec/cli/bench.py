"""``mixprec bench``: arguments and the command (``mixprec.cli`` only wires it in).

Examples::

    mixprec bench                                   # gpt, small, default recipes -> bench-report/
    mixprec bench --task gpt --recipes fp32,bf16-mixed,fp16-mixed,bf16-true,fp8-mixed \\
        --steps 100 --size small --out DIR
    mixprec bench --model mypkg.mymodel:factory     # your model (protocol: mixprec.bench.user)
    mixprec bench --suite seeds                     # MLP, UNet and BERT, fp32 vs bf16-mixed
    mixprec bench --list                            # tasks and recipes

``--budget`` caps the training time of each recipe but fp32: ``4x`` (the default) stops a
recipe once it has trained four times as long as fp32 took for all the steps (and at
least 10 s), ``120``
after 120 seconds, ``0`` never. A recipe that passes it stops (marked truncated) with its
speed measured over the steps it ran and its quality not compared. This keeps recipes that
are very slow on the machine at hand (fp16 or fp8 on a CPU without a matrix unit for
them) in a bounded run while still showing how slow they are; a budget relative to fp32
holds when the machine's load slows every recipe alike.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixprec.bench.output import replace_folder
from mixprec.cli.checks import MAX_STEPS, check_run_options, non_negative_int, positive_int
from mixprec.cli.options import Command, add_source_options, recipe_names, size_names
from mixprec.cli.suite import config_from_args, reference_finished, run_suite

__all__ = ["COMMAND", "MAX_STEPS", "add_arguments", "parse_budget", "run"]

DEFAULT_BUDGET = "4x"
LONG_RUN_S = 24 * 3600.0  # a projected run longer than this gets a warning


def parse_budget(text: str) -> tuple[float | None, float | None]:
    """``"4x"`` -> (None, 4.0) times fp32's; ``"120"`` -> (120.0, None) seconds; ``"0"``: none.

    Example:
        >>> parse_budget("4x"), parse_budget("90"), parse_budget("0")
        ((None, 4.0), (90.0, None), (None, None))
    """
    raw = text.strip().lower()
    try:
        value = float(raw[:-1] if raw.endswith("x") else raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(
            f"--budget {text!r} must be seconds (e.g. 120), a multiple of fp32's time "
            "(e.g. 4x) or 0 for no limit"
        )
    if value == 0:
        return None, None
    return (None, value) if raw.endswith("x") else (value, None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``mixprec bench`` options to ``p``."""
    from mixprec.bench.results import DEFAULT_RECIPES

    add_source_options(
        p,
        model_help="your model instead of a task: factory() returns "
        "(model, optimizer_factory, batches, loss_fn)",
    )
    p.add_argument(
        "--recipes",
        default=None,
        help=f"comma-separated recipes (default {','.join(DEFAULT_RECIPES)}): {recipe_names()}",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"training steps per recipe (default: the task's; at most {MAX_STEPS:,})",
    )
    p.add_argument(
        "--warmup", type=non_negative_int, default=2, help="first steps not timed (default 2)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the weights and data order (default 0)"
    )
    p.add_argument(
        "--device",
        default=None,
        help="torch device: cpu, cuda, cuda:N, mps (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--budget",
        default=DEFAULT_BUDGET,
        metavar="SECONDS|Nx",
        help="training time per recipe (but fp32) before it stops: seconds, a multiple of "
        f"fp32's time (4x) or 0 for no limit (default {DEFAULT_BUDGET})",
    )
    p.add_argument(
        "--memory-steps",
        type=non_negative_int,
        default=2,
        help="steps of the memory measurement (default 2; 0: skip)",
    )
    p.add_argument(
        "--threads",
        type=_threads,
        default="auto",
        metavar="N|auto",
        help="CPU threads to time with; auto (default): the cores that other processes "
        "leave free, measured before the bench starts, less one kept for them",
    )
    p.add_argument("--out", default="bench-report", help="report folder (default bench-report)")
    p.add_argument(
        "--suite", choices=["seeds"], help="seeds: MLP, UNet and BERT with and without bf16"
    )
    p.add_argument("--list", action="store_true", help="list tasks and recipes, then exit")


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'auto' or a positive integer")
    return n


def _listing() -> str:
    from mixprec.bench.tasks import task_descriptions
    from mixprec.recipes import recipe_names as all_recipes

    lines = [f"tasks (--task, sizes {size_names()}):"]
    lines += [f"  {name:6s} {text}" for name, text in task_descriptions().items()]
    lines += [
        "  or --model package.module:factory (see mixprec.bench.user)",
        "recipes (--recipes):",
    ]
    lines += [f"  {name}" for name in all_recipes()]
    return "\n".join(lines)


def _recipes(text: str | None) -> tuple[str, ...]:
    from mixprec.bench.results import DEFAULT_RECIPES

    if text is None:
        return DEFAULT_RECIPES
    names = tuple(r.strip() for r in text.split(",") if r.strip())
    if not names:
        raise ValueError("--recipes is empty")
    return names


def run(args: argparse.Namespace) -> int:
    """Run the bench described by ``args``; ValueError for bad input (a one-line message)."""
    check_run_options(args)
    if args.list:
        print(_listing())
        return 0
    from mixprec.bench.console import BenchProgress, print_summary, wide_console
    from mixprec.bench.recommend import recommend
    from mixprec.bench.report import write_report
    from mixprec.bench.runner import run_bench
    from mixprec.bench.tasks import get_task

    args.budget_s, args.budget_x = parse_budget(args.budget)
    if args.steps is not None and args.steps > MAX_STEPS:
        raise ValueError(
            f"--steps {args.steps:,} is more than a bench can hold: at most {MAX_STEPS:,} "
            "(the bench keeps one loss and one step time per step and recipe); a bench "
            "compares recipes over a short run, train long runs with mixprec.Precision"
        )
    if args.suite:
        return run_suite(args)
    task_name = args.model or args.task
    config = config_from_args(args, task_name, _recipes(args.recipes))
    task = get_task(task_name, args.size, seed=args.seed)  # ValueError names the tasks
    console = wide_console()
    names = config.recipe_list()
    steps = config.steps or task.default_steps
    with BenchProgress(len(names), console=console) as progress:
        on_event = _warn_long_runs(progress, steps, len(names), console)
        result = run_bench(config, task=task, on_event=on_event)
    verdict = recommend(result)
    print_summary(result, verdict, console)
    with replace_folder(args.out) as tmp:
        files = write_report(result, tmp)
    out = Path(args.out)
    console.print(f"report: {out / files['report'].name}  results: {out / files['results'].name}")
    if result.interrupted:
        return 130
    return 0 if reference_finished(result, console) else 1


def _warn_long_runs(progress, steps: int, recipes: int, console):
    """``progress`` plus one warning, after the first recipe's first 5 steps, when the run
    will take longer than :data:`LONG_RUN_S`: projected time = mean step time so far x
    steps x recipes (a lower bound: other recipes may be slower than fp32)."""
    import time

    from rich.text import Text

    state = {"t0": None, "warned": False}

    def on_event(kind, info):
        progress(kind, info)
        if state["warned"] or kind != "step":
            return
        if state["t0"] is None:  # the clock starts after the first (warm-up) step
            state["t0"] = time.perf_counter()
            return
        if info["step"] == 6:
            state["warned"] = True
            per_step = (time.perf_counter() - state["t0"]) / 5
            total = per_step * steps * recipes
            if total > LONG_RUN_S:
                console.print(
                    Text(
                        f"warning: at {per_step:.3g} s a step, {steps:,} steps x {recipes} "
                        f"recipes take about {_duration(total)}; Ctrl-C stops the bench and "
                        "keeps the recipes that finished, or rerun with fewer --steps or a "
                        "--budget",
                        style="yellow",
                    )
                )

    return on_event


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.0f} s"


COMMAND = Command(
    "bench", add_arguments, run, help="run recipes side by side, recommend one, write a report",
    description="Train a task (or your model) with several recipes from the same weights on "
    "the same batches; compare speed, memory and quality; recommend one; write OUT/report.md, "
    "OUT/results.json and PNG plots.",
)  # fmt: skip
