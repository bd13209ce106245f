"""Forward+backward time of ``Float8Linear`` against a bf16 ``nn.Linear``.

For each shape (M tokens, K = in_features, N = out_features) it times one training
iteration of a single layer: ``out = layer(x); out.backward(g)``, i.e. the three GEMMs
output = x·Wᵀ, grad_input = g·W, grad_weight = gᵀ·x plus, for fp8, the amax reductions and
scaled casts. Parameters, x and g are bf16 in both layers (so the baseline is a plain
bf16 Linear and fp8 differs only in its GEMMs). Variants are interleaved round by round
so that machine load hits them alike.

Figures printed per shape and variant:

* ``ms``: median over ``--iters`` rounds of one forward+backward, in milliseconds
  (``torch.cuda.synchronize()`` around each on CUDA).
* ``TFLOP/s = 6·M·K·N / time`` (three GEMMs of 2·M·K·N flops each).
* ``speed-up = ms(bf16 nn.Linear) / ms(variant)``; above 1 means fp8 is faster.

* ``SQNR out/gx/gw`` (dB) of the output, grad_input and grad_weight against the float64
  product of the same bf16 operands: ``10·log10(Σ ref² / Σ (ref - got)²)``. With
  ``--outliers F`` the first M/16 rows of x are multiplied by F and the output SQNR is
  taken over the other rows (what an outlier token costs the ordinary ones).

Variants: ``bf16`` (nn.Linear) and ``fp8-<scaling>-<backend>`` for each scaling
(current, delayed) and backend; with ``--recipes`` (a comma list of
``Float8Config.from_recipe_name`` names: tensorwise, rowwise, rowwise_with_gw_hp, mxfp8)
``fp8-<recipe>-<backend>`` instead, which compares rowwise and MX scales with tensorwise.
MX runs the block-scaled ``torch._scaled_mm`` where it exists (CUDA capability 10.0+);
elsewhere ``auto`` emulates it (the script says so and why) and ``scaled_mm`` is skipped.
Backend ``auto`` is ``_scaled_mm`` on CUDA and the
emulation on CPU, whose ``torch._scaled_mm`` is a reference kernel (about 0.1 GFLOP/s
measured: a 1024³ forward+backward takes about a minute); ask for ``--backend scaled_mm``
on CPU only with small ``--shapes``.

Usage::

    .venv/bin/python benchmarks/bench_fp8.py --quick                  # CPU, two shapes
    .venv/bin/python benchmarks/bench_fp8.py                          # CPU default shapes
    .venv/bin/python benchmarks/bench_fp8.py --device cuda --shapes all --out benchmarks/results
    .venv/bin/python benchmarks/bench_fp8.py --shapes 256x512x512 --backend scaled_mm
    .venv/bin/python benchmarks/bench_fp8.py --quick --recipes tensorwise,rowwise,mxfp8 \
        --outliers 1e4                       # finer scales against tensorwise
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mixprec.float8 import Float8Config, Float8Linear
from mixprec.float8.mx_gemm import mx_scaled_mm_support

# (label, M, K, N). LLM-like: 4096 tokens through the projections of a 4096-wide model
# (grouped-query qkv 4096 -> 6144, MLP 4096 -> 8192 -> 4096).
SQUARE = [(f"square-{n}", n, n, n) for n in (1024, 2048, 4096, 8192)]
LLM = [
    ("llm-qkv", 4096, 4096, 6144),
    ("llm-attn-out", 4096, 4096, 4096),
    ("llm-mlp-up", 4096, 4096, 8192),
    ("llm-mlp-down", 4096, 8192, 4096),
]
PRESETS = {
    "quick": SQUARE[:2],
    "cpu": SQUARE[:3] + LLM[:1],
    "all": SQUARE + LLM,
}


def parse_shapes(text: str) -> list[tuple[str, int, int, int]]:
    """``"all"``, ``"quick"``, ``"cpu"`` or a comma list of ``MxKxN``."""
    if text in PRESETS:
        return PRESETS[text]
    shapes = []
    for item in text.split(","):
        try:
            m, k, n = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not MxKxN (e.g. 1024x1024x1024)") from None
        shapes.append((f"{m}x{k}x{n}", m, k, n))
    return shapes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _make_step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    def step():
        layer.weight.grad = None
        if layer.bias is not None:
            layer.bias.grad = None
        x.grad = None
        layer(x).backward(g)

    return step


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    """10·log10(Σ ref² / Σ (ref - got)²) in dB (inf when equal)."""
    err = (ref - got.double()).pow(2).sum().item()
    return math.inf if err == 0 else 10 * math.log10(ref.pow(2).sum().item() / err)


def bench_shape(m, k, n, variants, device, iters, warmup, outliers=1.0):
    """(median ms of one forward+backward, SQNRs) per variant (interleaved rounds)."""
    torch.manual_seed(0)
    base = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    rows = max(m // 16, 1) if outliers != 1.0 else 0
    x[:rows] *= outliers
    x.requires_grad_(True)
    g = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    xd, gd, wd = x.detach().double(), g.double(), base.weight.detach().double()
    exact = (xd @ wd.t(), gd @ wd, gd.t() @ xd)  # out (without bias), grad_input, grad_weight
    layers = {"bf16": base}
    layers.update({name: Float8Linear.from_linear(base, cfg) for name, cfg in variants.items()})
    steps = {name: _make_step(layer, x, g) for name, layer in layers.items()}
    sqnr = {}
    for name, step in steps.items():
        step()
        out = torch.nn.functional.linear(x, base.weight) if name == "bf16" else None
        if out is None:
            with torch.no_grad():
                out = layers[name](x) - base.bias
        got = (out.detach(), x.grad, base.weight.grad)
        sqnr[name] = (
            _sqnr(exact[0][rows:], got[0][rows:]),
            _sqnr(exact[1], got[1]),
            _sqnr(exact[2], got[2]),
        )
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + iters):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(t), sqnr[name]) for name, t in times.items()}


def render_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Float8Linear vs bf16 nn.Linear, forward+backward ({meta['device_name']})",
        "",
        f"torch {meta['torch']}, {meta['iters']} timed rounds (median), "
        f"{meta['warmup']} warm-up. TFLOP/s = 6·M·K·N / time; speed-up = bf16 ms / ms.",
        "",
        "| shape | M | K | N | variant | ms | TFLOP/s | speed-up | SQNR out/gx/gw dB |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        sq = "/".join(f"{v:.1f}" for v in r["sqnr_db"])
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['K']} | {r['N']} | {r['variant']} | "
            f"{r['ms']:.2f} | {r['tflops']:.3f} | {r['speedup']:.2f}x | {sq} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--shapes",
        default=None,
        help="quick | cpu | all | MxKxN,... (default: cpu on CPU, all on CUDA)",
    )
    parser.add_argument("--quick", action="store_true", help="same as --shapes quick")
    parser.add_argument("--scaling", default="current,delayed", help="comma list")
    parser.add_argument(
        "--backend",
        action="append",
        choices=["auto", "scaled_mm", "emulate"],
        help="repeatable; default auto",
    )
    parser.add_argument(
        "--recipes",
        default=None,
        help="comma list of Float8Config.from_recipe_name names (current scaling); "
        "replaces --scaling",
    )
    parser.add_argument(
        "--outliers", type=float, default=1.0, help="scale the first M/16 rows of x by this"
    )
    parser.add_argument("--iters", type=int, default=None, help="default 3 on CPU, 20 on CUDA")
    parser.add_argument("--warmup", type=int, default=None, help="default 1 on CPU, 5 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write fp8_<device>.json/.md here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = parse_shapes("quick" if args.quick else args.shapes or ("all" if cuda else "cpu"))
    iters = args.iters or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    backends = args.backend or ["auto"]
    if args.recipes:
        try:
            variants = {
                f"fp8-{r}-{b}": Float8Config.from_recipe_name(r, backend=b)
                for r in args.recipes.split(",")
                for b in backends
            }
        except ValueError as err:
            raise SystemExit(f"--recipes: {err}") from None
    else:
        variants = {
            f"fp8-{s}-{b}": Float8Config(scaling=s, backend=b)
            for s in args.scaling.split(",")
            for b in backends
        }
    for name, cfg in list(variants.items()):  # MX: the block-scaled kernel, or why not
        if cfg.granularity != "mx" or cfg.backend == "emulate":
            continue
        pairs = [(cfg.forward_dtype, cfg.forward_dtype), (cfg.backward_dtype, cfg.forward_dtype)]
        refusals = [
            why for a, b in pairs for ok, why in [mx_scaled_mm_support(device, a, b)] if not ok
        ]
        if refusals and cfg.backend == "scaled_mm":
            print(f"skipping {name}: {refusals[0]}")
            del variants[name]
        elif refusals:
            print(f"{name}: MX products emulated ({refusals[0]})")
    device_name = (
        torch.cuda.get_device_name(device)
        if cuda
        else (
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
    )
    rows = []
    header = (
        f"{'shape':<14}{'M':>6}{'K':>6}{'N':>6}  {'variant':<24}"
        f"{'ms':>10}{'TFLOP/s':>9}{'speed-up':>9}  SQNR out/gx/gw dB"
    )
    print(f"Float8Linear vs bf16 nn.Linear, forward+backward on {device_name}")
    print(header)
    for label, m, k, n in shapes:
        ms = bench_shape(m, k, n, variants, device, iters, warmup, args.outliers)
        for variant, (t, sq) in ms.items():
            row = {
                "shape": label,
                "M": m,
                "K": k,
                "N": n,
                "variant": variant,
                "ms": t,
                "tflops": 6 * m * k * n / (t * 1e-3) / 1e12,
                "speedup": ms["bf16"][0] / t,
                "sqnr_db": sq,
            }
            rows.append(row)
            print(
                f"{label:<14}{m:>6}{k:>6}{n:>6}  {variant:<24}{t:>10.2f}"
                f"{row['tflops']:>9.3f}{row['speedup']:>8.2f}x  "
                + "/".join(f"{v:.1f}" for v in sq),
                flush=True,
            )
    meta = {
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "iters": iters,
        "warmup": warmup,
        "outliers": args.outliers,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"fp8_{device.type}"
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        stem.with_suffix(".md").write_text(render_markdown(rows, meta))
        print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
