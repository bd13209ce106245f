"""The bench's acceptance figures: the gpt task at small size (3.3 M parameters, sequence 256).

Prints, for every recipe trained through ``mixprec.Precision`` from the same weights on the
same batches: tokens/s (median step), speed-up over fp32, final validation loss and its gap
to fp32 against the task's tolerance (0.10 nats). Then the two targets:

* bf16-mixed tokens/s >= 2x fp32's;
* every recipe's val_loss within the tolerance of fp32's.

For comparison it also times a plain ``torch.autocast`` loop (no mixprec) in fp32 and bf16
on the same model and batches (``--plain-steps``, 0 to skip).

    .venv/bin/python benchmarks/bench_gpt.py                       # 100 steps per recipe
    .venv/bin/python benchmarks/bench_gpt.py --steps 30 --recipes fp32,bf16-mixed

The full report (tables, plots, results.json) goes to ``--out``
(default ``benchmarks/results/local/gpt-small``, not committed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from mixprec.bench.recommend import recommend
from mixprec.bench.report import write_report
from mixprec.bench.runner import DEFAULT_RECIPES, BenchConfig, run_bench
from mixprec.bench.tasks import get_task


def plain_loop(task, steps: int, dtype: torch.dtype | None) -> float:
    """Median step seconds of a plain AdamW loop, under torch.autocast(dtype) when given."""
    model = task.build_model()
    opt = task.build_optimizer(model)
    times = []
    for x, y in task.train_batches(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = task.loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:] or times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES))
    p.add_argument("--size", default="small")
    p.add_argument("--plain-steps", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/local/gpt-small")
    args = p.parse_args()

    task = get_task("gpt", args.size)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    config = BenchConfig(
        "gpt", args.size, recipes=tuple(args.recipes.split(",")), steps=args.steps, memory_steps=1
    )
    result = run_bench(config, task=copy.copy(task))
    verdict = recommend(result)
    unit = task.item_unit
    print(
        f"gpt {args.size}: {result.parameters:,} parameters, {task.items_per_batch} {unit}/step, "
        f"{result.steps} steps per recipe, tolerance {task.tolerance_text} nats"
    )
    print(
        f"{'recipe':12s} {'status':10s} {unit + '/s':>10s} {'speed-up':>9s} "
        f"{'val_loss':>9s} {'gap':>8s}  within tolerance"
    )
    for r in result.recipes:
        ips, s, m, g = (
            result.items_per_s(r),
            result.speedup(r),
            result.metric(r),
            result.metric_gap(r),
        )
        print(
            f"{r.recipe:12s} {r.status:10s} {ips:10,.0f} {s:8.2f}x {m:9.4f} {g:+8.4f}  "
            f"{result.same_quality(r)}"
        )
    bf16 = result.get("bf16-mixed")
    speedup = result.speedup(bf16) if bf16 else None
    if speedup is not None:
        print(
            f"target bf16-mixed >= 2x fp32 tokens/s: {speedup:.2f}x -> "
            f"{'PASS' if speedup >= 2 else 'FAIL'}"
        )
    quality = [result.same_quality(r) for r in result.recipes]
    print(
        f"target every recipe within {task.tolerance_text} of fp32's val_loss: "
        f"{'PASS' if all(q is True for q in quality) else 'FAIL'} "
        f"({sum(q is True for q in quality)}/{len(quality)})"
    )
    print(f"recommended: {verdict.summary}")
    if args.plain_steps:
        fp32 = plain_loop(task, args.plain_steps, None)
        bf16_plain = plain_loop(task, args.plain_steps, torch.bfloat16)
        print(
            f"plain torch.autocast loop ({args.plain_steps} steps): fp32 "
            f"{task.items_per_batch / fp32:,.0f} {unit}/s, bf16 "
            f"{task.items_per_batch / bf16_plain:,.0f} {unit}/s, {fp32 / bf16_plain:.2f}x"
        )
    print(f"report: {write_report(result, args.out)['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
