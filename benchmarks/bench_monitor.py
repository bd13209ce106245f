"""Step-time overhead of the numerics monitor on the small transformer (``gpt``, ``small``).

Three copies of the same model and optimizer train on the same batches, steps interleaved
(each round runs every copy once, in a fresh random order, so machine load, and whatever a
copy leaves in the caches for the one after it, falls on all alike):

* ``none``: no monitor;
* ``every=1``: a monitor measuring every step (all default formats and tensor kinds);
* ``idle``: a monitor attached but not measuring (``every`` larger than the run), i.e. the
  cost of an attached monitor on the steps ``every=N`` skips (it registers no hooks
  there, so this should be the noise floor).
* with ``--control``, a second unmonitored copy ``none-2``: its "overhead" is how much two
  identical copies differ on this machine (memory placement, cache, load), the scale
  against which ``idle`` and ``every=100`` are read.

Figures printed (medians over ``--reps`` steps per copy, after ``--warmup``):

* ``ms/step`` of each copy;
* ``overhead(every=1) = t(every=1) / t(none) - 1`` (target <= 25%);
* ``overhead(every=N) = ((N - 1) * t(idle) + t(every=1)) / N / t(none) - 1`` for N = 100
  (target <= 2%): one measured step in N, the others idle;
* with ``--direct``, a fourth copy runs ``every=100`` and its mean step time over whole
  windows of 100 steps is compared to ``none``'s mean (needs ``--reps`` >= 100);
* with ``--breakdown``, where the every=1 time goes: the time inside
  ``StatsLayout.compute`` per step of the every=1 copy (its calls are timed), and a copy
  ``stub`` whose monitor measures every step with a statistics function that returns a
  zero vector at once, i.e. the cost of the hooks, records and parameter snapshot alone.

The monitor reads its results out every 50 steps (``report_every``), as in real use; the
readout happens inside the timed step it falls on.

Usage::

    .venv/bin/python benchmarks/bench_monitor.py [--reps 30] [--warmup 3] [--recipe fp32]
        [--threads 2] [--direct --reps 100] [--control] [--breakdown]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch

from mixprec import Precision
from mixprec.bench.tasks import get_task
from mixprec.numerics import Monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed steps per copy")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per copy")
    parser.add_argument("--recipe", default="fp32", help="training recipe (default fp32)")
    parser.add_argument("--size", default="small", help="gpt task size (default small)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--direct", action="store_true", help="also time every=100 directly")
    parser.add_argument("--control", action="store_true", help="add a second unmonitored copy")
    parser.add_argument(
        "--breakdown", action="store_true", help="time the statistics; add a stub-kernel copy"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task("gpt", args.size)
    base = task.build_model()
    batches = list(task.train_batches(4))
    configs = {"none": None, "every=1": 1, "idle": 10**9}
    if args.direct:
        configs["every=100"] = 100
    if args.control:
        configs["none-2"] = None
    if args.breakdown:
        configs["stub"] = 1
    runs = {}
    stats_time = [0.0, 0]  # seconds inside StatsLayout.compute of the every=1 copy, values
    for name, every in configs.items():
        precision = Precision(args.recipe)
        model = copy.deepcopy(base)
        model, opt = precision.setup(model, task.build_optimizer(model))
        monitor = None
        if every is not None:  # each monitor hooks only its own copy of the model
            monitor = Monitor(model, every=every)
            if every == 10**9:
                monitor.step()  # step 0 is measured by every N: move past it
            if name == "stub":
                zeros = torch.zeros(monitor.layout.vector_len, dtype=torch.int64)
                monitor.layout.compute = lambda x, zeros=zeros: zeros
            elif name == "every=1" and args.breakdown:
                monitor.layout.compute = _timed(monitor.layout.compute, stats_time)
            monitor.attach()
        runs[name] = (model, opt, precision, monitor, [])

    def one_step(name: str, i: int) -> float:
        model, opt, precision, monitor, _ = runs[name]
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        with precision.autocast():
            loss = task.loss(model(x), y)
        precision.backward(loss)
        precision.step(opt)
        if monitor is not None:
            monitor.step()
        return time.perf_counter() - t0

    names = list(configs)
    rng = random.Random(0)
    stats_per_step = []  # (seconds, values) of statistics in each timed step of every=1
    for i in range(args.warmup + args.reps):
        order = rng.sample(names, len(names))
        for name in order:
            before = list(stats_time)
            dt = one_step(name, i)
            if i >= args.warmup:
                runs[name][4].append(dt)
                if name == "every=1":
                    stats_per_step.append([a - b for a, b in zip(stats_time, before)])
    med = {name: statistics.median(runs[name][4]) for name in names}
    base_t = med["none"]
    print(f"numerics monitor overhead: gpt/{args.size}, recipe {args.recipe}, "
          f"{torch.get_num_threads()} threads, {args.reps} steps per copy (medians)")  # fmt: skip
    print(f"{'copy':<10} {'ms/step':>9} {'overhead':>9}")
    for name in names:
        print(f"{name:<10} {1e3 * med[name]:9.1f} {100 * (med[name] / base_t - 1):8.1f}%")
    n = 100
    amortized = ((n - 1) * med["idle"] + med["every=1"]) / n
    print(f"overhead every=1:   {100 * (med['every=1'] / base_t - 1):6.1f}%  (target <= 25%)")
    print(f"overhead every=100: {100 * (amortized / base_t - 1):6.1f}%  (target <= 2%; "
          "from idle and measured step times)")  # fmt: skip
    if args.direct:
        w = len(runs["every=100"][4]) // n * n
        if w:
            direct = statistics.mean(runs["every=100"][4][:w]) / statistics.mean(
                runs["none"][4][:w]
            )
            print(f"overhead every=100 (direct, mean of {w} steps): {100 * (direct - 1):6.1f}%")
            if args.control:
                ctrl = statistics.mean(runs["none-2"][4][:w]) / statistics.mean(runs["none"][4][:w])
                print(f"  noise floor: none-2 vs none, mean of {w} steps: {100 * (ctrl - 1):6.1f}%")
    if args.breakdown:
        extra = med["every=1"] - base_t
        stats_ms = 1e3 * statistics.median(t for t, _ in stats_per_step)
        values = statistics.median(v for _, v in stats_per_step)
        print(f"every=1 breakdown: {1e3 * extra:.1f} ms/step over none, of which "
              f"{stats_ms:.1f} ms inside StatsLayout.compute (median per step, "
              f"{values / 1e6:.1f} M values); "
              f"stub-kernel monitor: {100 * (med['stub'] / base_t - 1):.1f}%")  # fmt: skip


def _timed(fn, total: list[float]):
    """``fn`` that adds the seconds it takes to ``total[0]``, the values it sees to ``total[1]``."""

    def timed(x):
        t0 = time.perf_counter()
        out = fn(x)
        total[0] += time.perf_counter() - t0
        total[1] += x.numel()
        return out

    return timed


if __name__ == "__main__":
    main()
