"""Throughput of mixprec.quantize beside ml_dtypes' and torch's own round trips.

For each format, on the same fp32 tensor (16M elements by default, standard normal), times
the round trip x -> format -> fp32 three ways and prints a markdown table of elements per
second (median of --repeats runs; throughput = numel / median seconds):

* mixprec: ``mixprec.quantize(x, fmt)`` (round to nearest even, the format's overflow rule)
* ml_dtypes: ``x.numpy().astype(ml_type).astype(np.float32)``
* torch: ``x.to(dtype).to(torch.float32)`` where torch has the dtype (fp4 has only the packed
  ``float4_e2m1fn_x2``, which has no cast)

Before timing, the first million results of mixprec and ml_dtypes are checked bit for bit.

    .venv/bin/python benchmarks/bench_quantize.py [--numel N] [--repeats R] [--threads T]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ml_dtypes
import numpy as np
import torch

import mixprec as mp

FORMATS = {  # name -> (ml_dtypes type, torch dtype or None)
    "bf16": (ml_dtypes.bfloat16, torch.bfloat16),
    "fp16": (np.float16, torch.float16),
    "fp8_e4m3fn": (ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn),
    "fp8_e5m2": (ml_dtypes.float8_e5m2, torch.float8_e5m2),
    "fp4_e2m1fn": (ml_dtypes.float4_e2m1fn, None),
}


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=16 * 2**20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    rows = []
    for name, (ml_type, dtype) in FORMATS.items():
        check = mp.quantize(x[: 2**20], name).numpy().view(np.uint32)
        ref = xn[: 2**20].astype(ml_type).astype(np.float32).view(np.uint32)
        if not np.array_equal(check, ref):
            raise SystemExit(f"{name}: mixprec and ml_dtypes disagree; not timing")
        t_mp = median_seconds(lambda n=name: mp.quantize(x, n), args.repeats)
        t_ml = median_seconds(lambda t=ml_type: xn.astype(t).astype(np.float32), args.repeats)
        t_pt = (
            median_seconds(lambda d=dtype: x.to(d).to(torch.float32), args.repeats)
            if dtype is not None
            else None
        )
        rows.append((name, t_mp, t_ml, t_pt))

    def rate(t: float | None) -> str:
        return "–" if t is None else f"{args.numel / t / 1e6:,.0f}"

    print(f"quantize round trip, {args.numel:,} fp32 elements, torch threads = "
          f"{torch.get_num_threads()}, median of {args.repeats}; million elements/s")  # fmt: skip
    print()
    print("| format | mixprec | ml_dtypes | torch .to() | mixprec / ml_dtypes | "
          "mixprec / faster of the two |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, t_mp, t_ml, t_pt in rows:
        best = min(t for t in (t_ml, t_pt) if t is not None)
        print(f"| {name} | {rate(t_mp)} | {rate(t_ml)} | {rate(t_pt)} | "
              f"{t_ml / t_mp:.1f}x | {best / t_mp:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
