"""Compiled (``torch.compile``, inductor) against eager step time, per recipe (CPU or GPU).

For each recipe a nanoGPT-style model (:class:`mixprec.bench.models.GPT`) is trained twice
from the same initial weights on the same batches: once eagerly, once with the forward pass
``torch.compile(model)``-d (default inductor backend; backward through AOTAutograd). Steps
are interleaved (eager, compiled, eager, ...) so machine load hits both alike.

Figures printed per recipe:

* ``compile s``: wall time of the first compiled step (tracing and code generation).
* ``eager ms`` / ``compiled ms``: median over ``--reps`` repetitions of one training step
  (autocast forward, ``Precision.backward``, ``Precision.step``), after ``--warmup`` steps.
* ``speed-up = eager ms / compiled ms``.
* ``|d loss|``: ``max_i |loss_eager_i - loss_compiled_i|`` over the timed steps (the two
  runs see the same batches; compiled kernels round differently, so it is not 0).

Usage::

    .venv/bin/python benchmarks/bench_compile.py [--recipes fp32 bf16-mixed] [--reps 20]
        [--warmup 3] [--layers 2] [--d-model 128] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import mixprec as mp
from mixprec.bench.models import GPT, TransformerConfig


def _setup(recipe: str, cfg: TransformerConfig, device: str):
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    precision = mp.Precision(recipe)
    model, opt = precision.setup(model, opt)
    return model, opt, precision


def _step(forward, opt, precision, idx) -> float:
    with precision.autocast():
        logits = forward(idx)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten())
    precision.backward(loss)
    precision.step(opt)
    return loss.item()  # a sync, so the timing covers the whole step


def run(recipe: str, args, device: str) -> dict:
    cfg = TransformerConfig(
        vocab_size=256, seq_len=64, n_layer=args.layers, n_head=4, d_model=args.d_model
    )
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (8, 64), generator=g).to(device) for _ in range(4)]
    eager = _setup(recipe, cfg, device)
    model, opt, precision = _setup(recipe, cfg, device)
    compiled = (torch.compile(model), opt, precision)
    start = time.perf_counter()
    _step(*compiled, batches[0])
    compile_s = time.perf_counter() - start
    _step(*eager, batches[0])
    times = {"eager": [], "compiled": []}
    losses = {"eager": [], "compiled": []}
    for i in range(args.warmup + args.reps):
        idx = batches[i % len(batches)]
        for name, run_ in (("eager", eager), ("compiled", compiled)):
            start = time.perf_counter()
            loss = _step(*run_, idx)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
                losses[name].append(loss)
    eager_ms = 1e3 * statistics.median(times["eager"])
    compiled_ms = 1e3 * statistics.median(times["compiled"])
    d_loss = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"], strict=True))
    return {
        "recipe": recipe,
        "compile_s": compile_s,
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "speedup": eager_ms / compiled_ms,
        "d_loss": d_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=mp.recipe_names())
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"GPT n_layer={args.layers} d_model={args.d_model}, batch 8 x 64 tokens")  # fmt: skip
    header = f"{'recipe':<12} {'compile s':>9} {'eager ms':>9} {'compiled ms':>11} "
    print(header + f"{'speed-up':>8} {'|d loss|':>9}")
    for recipe in args.recipes:
        r = run(recipe, args, device)
        print(
            f"{r['recipe']:<12} {r['compile_s']:>9.1f} {r['eager_ms']:>9.1f} "
            f"{r['compiled_ms']:>11.1f} {r['speedup']:>8.2f} {r['d_loss']:>9.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
