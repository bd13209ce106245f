"""Per-step time of ``mixprec.Precision`` against a hand-written torch.amp loop (CPU).

For each model (an MLP and a small transformer block) and recipe (fp32, bf16-mixed), two
identical copies of the model and optimizer are trained side by side: one with the
hand-written loop (``torch.autocast`` + ``loss.backward()`` + ``opt.step()`` +
``opt.zero_grad()``), one with ``Precision``. Steps are interleaved, alternating which
loop goes first each repetition, so machine load hits both alike.

Figures printed (per model and recipe):

* ``hand ms`` / ``mixprec ms``: median over ``--reps`` repetitions of one training step
  (forward, backward, optimizer step, zero_grad), in milliseconds.
* ``ratio = mixprec ms / hand ms`` (target: at most 1.03).
* ``bf16 speed-up = hand ms (fp32) / hand ms (bf16-mixed)`` per model.

Usage::

    .venv/bin/python benchmarks/bench_step.py [--reps 100] [--warmup 20] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import mixprec as mp

RECIPES = ("fp32", "bf16-mixed")


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10)
    )  # fmt: skip
    x = torch.randn(64, 512)  # (B, in)
    y = torch.randint(0, 10, (64,))
    return model, x, y


class _Block(nn.Module):
    """One pre-norm transformer block and a classification head: (B, T, C) -> (B, 10)."""

    def __init__(self, d: int = 256, heads: int = 4, ff: int = 1024) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d, heads, ff, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        self.head = nn.Linear(d, 10)

    def forward(self, x):  # x: (B, T, C)
        return self.head(self.layer(x).mean(1))  # (B, 10)


def _block() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x = torch.randn(8, 64, 256)  # (B, T, C)
    y = torch.randint(0, 10, (8,))
    return _Block(), x, y


MODELS = {"mlp": _mlp, "transformer block": _block}


def _hand_step(recipe: str):
    dtype = torch.bfloat16 if recipe == "bf16-mixed" else None

    def step(model, opt, x, y):
        if dtype is None:
            loss = F.cross_entropy(model(x), y)
        else:
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def _mixprec_step(precision: mp.Precision):
    def step(model, opt, x, y):
        with precision.autocast():
            loss = F.cross_entropy(model(x), y)
        precision.backward(loss)
        precision.step(opt)

    return step


def _pair(build, recipe: str):
    """Two identical (model, optimizer) pairs and the step function of each loop."""
    torch.manual_seed(0)
    model_a, x, y = build()
    torch.manual_seed(0)
    model_b, _, _ = build()
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-4)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-4)
    precision = mp.Precision(recipe)
    model_b, opt_b = precision.setup(model_b, opt_b)
    hand = (_hand_step(recipe), model_a, opt_a)
    ours = (_mixprec_step(precision), model_b, opt_b)
    return hand, ours, x, y


def _time(entry, x, y) -> float:
    step, model, opt = entry
    start = time.perf_counter()
    step(model, opt, x, y)
    return time.perf_counter() - start


def measure(build, recipe: str, *, reps: int, warmup: int) -> tuple[float, float]:
    """Median seconds per step of (hand-written, mixprec), interleaved A/B then B/A."""
    hand, ours, x, y = _pair(build, recipe)
    for _ in range(warmup):
        _time(hand, x, y)
        _time(ours, x, y)
    times_hand, times_ours = [], []
    for i in range(reps):
        if i % 2 == 0:
            times_hand.append(_time(hand, x, y))
            times_ours.append(_time(ours, x, y))
        else:
            times_ours.append(_time(ours, x, y))
            times_hand.append(_time(hand, x, y))
    return statistics.median(times_hand), statistics.median(times_ours)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=100, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per loop")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, AdamW")
    print(f"median of {args.reps} interleaved steps after {args.warmup} warm-up steps\n")
    header = f"{'model':<18} {'recipe':<11} {'hand ms':>9} {'mixprec ms':>11} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    hand_times: dict[tuple[str, str], float] = {}
    for model_name, build in MODELS.items():
        for recipe in RECIPES:
            hand, ours = measure(build, recipe, reps=args.reps, warmup=args.warmup)
            hand_times[model_name, recipe] = hand
            print(
                f"{model_name:<18} {recipe:<11} {hand * 1e3:>9.2f} {ours * 1e3:>11.2f} "
                f"{ours / hand:>7.3f}"
            )
    print("\nbf16-mixed speed-up over fp32 (hand-written loop, fp32 ms / bf16-mixed ms):")
    for model_name in MODELS:
        speedup = hand_times[model_name, "fp32"] / hand_times[model_name, "bf16-mixed"]
        print(f"  {model_name:<18} {speedup:.2f}x")


if __name__ == "__main__":
    main()
