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

__all__ = ["add_arguments", "parse_budget", "run"]

DEFAULT_BUDGET = "4x"


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
    p.add_argument(
        "--task", default="gpt", help="built-in task: mlp, unet, gpt, bert (default gpt)"
    )
    p.add_argument(
        "--model",
        metavar="PACKAGE.MODULE:FACTORY",
        help="your model instead of a task: factory() returns "
        "(model, optimizer_factory, batches, loss_fn)",
    )
    p.add_argument("--size", default="small", help="tiny | small | base (default small)")
    p.add_argument(
        "--recipes",
        default=None,
        help="comma-separated recipes (default fp32,bf16-mixed,fp16-mixed,bf16-true,fp8-mixed)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per recipe (default: the task's)"
    )
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument(
        "--budget",
        default=DEFAULT_BUDGET,
        metavar="SECONDS|Nx",
        help="training time per recipe (but fp32) before it stops: seconds, a multiple of "
        f"fp32's time (4x) or 0 for no limit (default {DEFAULT_BUDGET})",
    )
    p.add_argument(
        "--memory-steps", type=int, default=2, help="steps of the memory measurement (0: skip)"
    )
    p.add_argument("--out", default="bench-report", help="report folder (default bench-report)")
    p.add_argument(
        "--suite", choices=["seeds"], help="seeds: MLP, UNet and BERT with and without bf16"
    )
    p.add_argument("--list", action="store_true", help="list tasks and recipes, then exit")


def _listing() -> str:
    from mixprec.bench.tasks import _TASK_CLASSES, SIZES
    from mixprec.recipes import RECIPES

    lines = ["tasks (--task, sizes " + " | ".join(SIZES) + "):"]
    lines += [f"  {name:6s} {cls.description}" for name, cls in _TASK_CLASSES.items()]
    lines += [
        "  or --model package.module:factory (see mixprec.bench.user)",
        "recipes (--recipes):",
    ]
    lines += [f"  {name}" for name in RECIPES]
    return "\n".join(lines)


def _recipes(text: str | None) -> tuple[str, ...]:
    from mixprec.bench.runner import DEFAULT_RECIPES

    if text is None:
        return DEFAULT_RECIPES
    names = tuple(r.strip() for r in text.split(",") if r.strip())
    if not names:
        raise ValueError("--recipes is empty")
    return names


def config_from_args(args: argparse.Namespace, task: str, recipes: tuple[str, ...]):
    """The :class:`~mixprec.bench.runner.BenchConfig` the command-line options describe."""
    from mixprec.bench.runner import BenchConfig

    return BenchConfig(
        task=task,
        size=args.size,
        recipes=recipes,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        device=args.device,
        recipe_budget_s=args.budget_s,
        budget_vs_fp32=args.budget_x,
        memory_steps=args.memory_steps,
    )


def run(args: argparse.Namespace) -> int:
    """Run the bench described by ``args``; ValueError for bad input (a one-line message)."""
    if args.list:
        print(_listing())
        return 0
    from mixprec.bench.console import BenchProgress, print_summary
    from mixprec.bench.recommend import recommend
    from mixprec.bench.report import write_report
    from mixprec.bench.runner import run_bench
    from mixprec.bench.tasks import TASKS, get_task
    from mixprec.cli import wide_console

    args.budget_s, args.budget_x = parse_budget(args.budget)
    if args.suite:
        from mixprec.bench.suite import run_suite

        return run_suite(args)
    task_name = args.model or args.task
    if not args.model and args.task not in TASKS:
        raise ValueError(
            f"unknown task {args.task!r}; choose one of {', '.join(TASKS)} "
            "or pass --model package.module:factory"
        )
    config = config_from_args(args, task_name, _recipes(args.recipes))
    task = get_task(task_name, args.size, seed=args.seed)
    console = wide_console()
    with BenchProgress(len(config.recipe_list()), console=console) as progress:
        result = run_bench(config, task=task, on_event=progress)
    verdict = recommend(result)
    print_summary(result, verdict, console)
    files = write_report(result, args.out)
    console.print(f"report: {files['report']}  results: {files['results']}")
    return 130 if result.interrupted else 0
