"""``mixprec bench --suite seeds``: the classic mixed-precision comparison on this machine.

A feedforward network (``mlp``), a UNet (``unet``) and a BERT-style encoder (``bert``),
each trained with and without mixed precision: fp32 and bf16-mixed, plus fp16-mixed at
``--size tiny`` (fp16 is kept to the tiny size because it can be very slow on CPUs
without an fp16 matrix unit). Every model gets its own full bench report in
``OUT/<task>/``; ``OUT/report.md`` holds one table across the three and
``OUT/results.json`` the three result documents::

    {"schema": "mixprec.cli.suite/1", "suite": "seeds", "size": str,
     "interrupted": bool, "benches": [results.json document of each task]}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixprec.bench.output import replace_folder
from mixprec.bench.runner import BenchResult, run_bench

__all__ = [
    "SEEDS_TASKS",
    "config_from_args",
    "reference_finished",
    "run_suite",
    "seeds_recipes",
    "suite_rows",
]

SEEDS_TASKS = ("mlp", "unet", "bert")


def seeds_recipes(size: str) -> tuple[str, ...]:
    """fp32 and bf16-mixed, plus fp16-mixed at tiny size."""
    return ("fp32", "bf16-mixed", "fp16-mixed") if size == "tiny" else ("fp32", "bf16-mixed")


def suite_rows(results: list[BenchResult]) -> tuple[list[str], list[list[str]]]:
    """One row per (model, recipe): step time, samples/s, speed-up [interval], metric, gap,
    memory."""
    from mixprec.bench.report import _bytes, _seconds, _speedup_cell

    headers = [
        "model",
        "recipe",
        "status",
        "step time",
        "samples/s",
        "speed-up [CI]",
        "metric",
        "gap to fp32",
        "peak memory",
    ]
    rows = []
    for res in results:
        for r in res.recipes:
            stats, ips = r.step_time_stats(), res.items_per_s(r)
            metric, gap = res.metric(r), res.metric_gap(r)
            same = res.same_quality(r)
            mark = "" if same is None or r is res.reference else (" ✓" if same else " ✗")
            rows.append(
                [
                    res.task.name,
                    r.recipe,
                    r.status if r.status != "diverged" else f"diverged at {r.diverged_at}",
                    _seconds(stats["median"]) if stats else "–",
                    f"{ips:,.0f}" if ips else "–",
                    _speedup_cell(res, r),
                    f"{res.task.metric} {metric:.4f}" if metric is not None else "–",
                    (f"{gap:+.4f}" if gap is not None else "–") + mark,
                    _bytes(r.peak_memory_bytes),
                ]
            )
    return headers, rows


def run_suite(args: argparse.Namespace) -> int:
    """Run the seeds suite with the bench options in ``args``; write ``args.out``."""
    from mixprec.bench.console import BenchProgress, wide_console

    console = wide_console()
    results: list[BenchResult] = []
    interrupted = False
    for name in SEEDS_TASKS:
        config = config_from_args(args, name, seeds_recipes(args.size))
        console.print(f"{name} ({args.size})", style="bold")
        with BenchProgress(len(config.recipe_list()), console=console) as progress:
            result = run_bench(config, on_event=progress)
        if result.recipes:
            results.append(result)
        if result.interrupted:
            interrupted = True
            break
    with replace_folder(args.out) as tmp:  # the previous report stays until this one is whole
        _write_suite(args, results, interrupted, tmp, console)
    console.print(f"report: {Path(args.out) / 'report.md'}")
    ok = all(reference_finished(res, console) for res in results) and bool(results)
    return 130 if interrupted else (0 if ok else 1)


def _write_suite(args, results: list[BenchResult], interrupted: bool, out: Path, console) -> None:
    from rich.table import Table

    from mixprec.bench.recommend import recommend
    from mixprec.bench.report import _markdown_table, to_json, write_report

    for res in results:
        write_report(res, out / res.task.name)
    headers, rows = suite_rows(results)
    table = Table(
        title=f"seeds suite ({args.size}) on {results[0].device['name'] if results else '?'}"
    )
    for h in headers:
        table.add_column(h)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    lines = [f"# mixprec bench --suite seeds ({args.size})", ""]
    if interrupted:
        lines += ["> Interrupted (Ctrl-C): the table holds what finished.", ""]
    lines += [_markdown_table(headers, rows), ""]
    for res in results:
        verdict = recommend(res)
        lines.append(
            f"- [{res.task.name}]({res.task.name}/report.md): recommended "
            f"**{verdict.recipe}** — {verdict.summary}"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    doc = {
        "schema": "mixprec.cli.suite/1",
        "suite": "seeds",
        "size": args.size,
        "interrupted": interrupted,
        "benches": [to_json(res) for res in results],
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


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
        threads=args.threads,
    )


def reference_finished(result, console) -> bool:
    """False (and one line saying why) when the fp32 reference, and so the comparison,
    did not finish: nothing is recommended then and the command exits with status 1."""
    from rich.text import Text

    ref = result.reference
    if ref is not None and ref.status == "ok":
        return True
    failed = [r for r in result.recipes if r.status == "failed"]
    if ref is None:
        why = "the fp32 reference did not run"
    elif ref.status == "failed":
        why = f"the fp32 reference failed ({ref.error})"
    else:
        why = f"the fp32 reference {ref.status}"
    if failed and len(failed) == len(result.recipes):
        why = f"every recipe failed; {why}"
    console.print(Text(f"No recommendation: {why}.", style="bold red"))
    return False
