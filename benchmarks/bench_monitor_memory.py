"""Resident memory (RSS) of a training loop with the numerics monitor, over long runs.

An MLP (16 wide, ``--blocks`` Linear + ReLU blocks and a Linear head; 2 blocks by default,
561 parameters, so 100,000 steps finish in minutes) trains with SGD on one fixed batch of
32 under ``Monitor(model, every=1)`` (all default formats and tensor kinds, default
``window``), so every step is measured. The process's resident
set size is read from ``/proc/self/status`` (``VmRSS``) at the steps given by ``--at``
(default 1,000, 10,000 and 100,000), after a ``gc.collect()``.

Figures printed, per checkpoint: ``RSS MiB`` and the growth since the first checkpoint,
``growth / step = (RSS(step) - RSS(first)) / (step - first)`` in bytes, the per-step
results the monitor holds (``len(monitor.results)``, at most ``window``) and the steps
per second of the run so far (noisy on a shared machine; only for orientation).

A monitor that kept every step's statistics (before issue 14) grew by about 2.4 KB per
module and tensor kind and step; a bounded one stays flat after its window fills.

Usage::

    .venv/bin/python benchmarks/bench_monitor_memory.py [--at 1000 10000 100000]
        [--blocks 2] [--window 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from torch import nn

from mixprec.numerics import Monitor


def rss_bytes() -> int:
    """VmRSS of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--at", type=int, nargs="+", default=[1_000, 10_000, 100_000],
                        help="steps at which RSS is read (default 1000 10000 100000)")  # fmt: skip
    parser.add_argument("--blocks", type=int, default=2, help="Linear + ReLU blocks (default 2)")
    parser.add_argument("--window", type=int, default=None, help="Monitor window (default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    width = 16
    layers = [m for _ in range(args.blocks) for m in (nn.Linear(width, width), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, width), torch.randn(32, 1)
    kwargs = {} if args.window is None else {"window": args.window}
    checkpoints = sorted(args.at)
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, "
          f"{len(list(model.modules()))} modules; torch {torch.__version__}, "
          f"{args.threads} thread(s)")  # fmt: skip
    print(f"{'step':>8} {'RSS MiB':>9} {'growth MiB':>11} {'B/step':>8} {'kept':>5} {'steps/s':>8}")
    first = None
    t0 = time.perf_counter()
    with Monitor(model, every=1, **kwargs) as monitor:
        for step in range(1, checkpoints[-1] + 1):
            loss = (model(x) - y).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            monitor.step()
            if step in checkpoints:
                monitor.readout()
                gc.collect()
                rss = rss_bytes()
                if first is None:
                    first = (step, rss)
                grow = rss - first[1]
                per = grow / (step - first[0]) if step > first[0] else 0.0
                rate = step / (time.perf_counter() - t0)
                print(f"{step:>8,} {rss / 2**20:>9.1f} {grow / 2**20:>11.1f} {per:>8.1f} "
                      f"{len(monitor.results):>5} {rate:>8.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
