"""Time per value of the numerics monitor's statistics (``StatsLayout.compute``) on this CPU.

For fp32, bf16 and fp16 tensors of standard-normal values times 1e-3 (the monitor's four
default formats), prints a markdown table of nanoseconds per value, for 1 and for
``--threads`` torch threads:

* ``hot``: the same tensor again and again (it stays in the caches);
* ``cold``: a round over ``--tensors`` tensors of 64 MB in all, so each is read back from
  memory, as the tensors a training step produces are.

Each figure is the median over ``--repeats`` timed rounds. Before timing, each dtype's result
is checked against the torch-ops path (``StatsLayout(kernel="torch")``).

    .venv/bin/python benchmarks/bench_stats.py [--numel N] [--repeats R] [--threads T]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mixprec.formats import get_format
from mixprec.numerics import StatsLayout, _cpu_kernel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = ("fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")


def _ns_per_value(layout: StatsLayout, tensors: list[torch.Tensor], repeats: int) -> float:
    layout.compute(tensors[0])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in tensors:
            layout.compute(x)
        times.append((time.perf_counter() - t0) / len(tensors))
    return statistics.median(times) / tensors[0].numel() * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 20, help="values per tensor")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per figure")
    parser.add_argument("--threads", type=int, default=2, help="the second thread count")
    args = parser.parse_args()
    if _cpu_kernel.load() is None:
        print("no C compiler: timing the torch-ops path")
    fmts = [get_format(f) for f in FORMATS]
    layout, ref = StatsLayout(fmts), StatsLayout(fmts, kernel="torch")
    g = torch.Generator().manual_seed(0)
    print(f"statistics time per value, {args.numel:,} values a tensor, formats {FORMATS}")
    print("| dtype | threads | hot (ns/value) | cold (ns/value) |")
    print("|---|---:|---:|---:|")
    for name, dtype in DTYPES.items():
        count = max(2, (64 << 20) // (args.numel * torch.finfo(dtype).bits // 8))
        cold = [(torch.randn(args.numel, generator=g) * 1e-3).to(dtype) for _ in range(count)]
        if not torch.equal(layout.compute(cold[0]), ref.compute(cold[0])):
            raise SystemExit(f"{name}: the kernel's result differs from the torch-ops path")
        for threads in sorted({1, args.threads}):
            torch.set_num_threads(threads)
            hot = _ns_per_value(layout, cold[:1], args.repeats * 4)
            far = _ns_per_value(layout, cold, args.repeats)
            print(f"| {name} | {threads} | {hot:.2f} | {far:.2f} |")


if __name__ == "__main__":
    main()
