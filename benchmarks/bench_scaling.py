"""Per-step cost of loss scaling: torch.amp.GradScaler against mixprec's scalers.

Times the scaler's whole per-step work apart from the optimizer on the gradients of a
stack of Linear layers: ``step + update`` for the GradScalers (with an optimizer whose
``step`` does nothing, so ``step`` = unscale, inf check, one host read), and
``update(unscale_(grads))`` for LossScaler. The variants are interleaved round by round so
that machine load hits them alike. Figures are medians over rounds, in microseconds per
step; ``overhead = median(variant) / median(torch.amp.GradScaler) - 1``.

The scale is held at 2.0 (``--scale``) with growth out of reach, and the gradients are refilled
with 1e-3 before each round (20 unscalings by 2 keep them normal); the work done is the
same as at any other scale >= 2.

When the scale may be below 1, unscaling can overflow a finite gradient, so mixprec then
also checks the unscaled values (one extra max-abs read of the gradients). At scale 2 it
knows without a sync that the scale is >= 1 (each update starts a host copy of the new
scale), so none of these variants pays that read; ``--scale 0.5`` times the case that does.

Run: ``.venv/bin/python benchmarks/bench_scaling.py [--layers 24 --width 512 --threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mixprec
from mixprec.scaling import LossScaler


def _model(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    model(torch.randn(4, width)).sum().backward()
    return model


class _NullOptimizer(torch.optim.Optimizer):
    """An optimizer whose step does nothing, to time the scaler alone."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def _grad_scaler_step(scaler, opt):
    scaler.scale(torch.ones(()))  # creates the scale, as the first scaled loss does

    def step():
        scaler.step(opt)
        scaler.update()

    return step


def _loss_scaler_step(scaler, grads):
    def step():
        scaler.update(scaler.unscale_(grads))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20, help="steps timed per round")
    parser.add_argument("--scale", type=float, default=2.0, help="the loss scale held")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = _model(args.layers, args.width)
    opt = _NullOptimizer(model.parameters())
    grads = [p.grad for p in model.parameters()]
    common = dict(init_scale=args.scale, growth_interval=10**9)
    ds = dict(common, min_scale=min(1.0, args.scale))  # deepspeed's floor is 1
    variants = {
        "torch.amp.GradScaler": _grad_scaler_step(torch.amp.GradScaler("cpu", **common), opt),
        "mixprec.GradScaler": _grad_scaler_step(mixprec.GradScaler("cpu", **common), opt),
        "mixprec.GradScaler locate off": _grad_scaler_step(
            mixprec.GradScaler("cpu", locate_nonfinite=False, **common), opt
        ),
        "LossScaler torch": _loss_scaler_step(LossScaler(**common), grads),
        "LossScaler deepspeed": _loss_scaler_step(
            LossScaler.from_preset("deepspeed", **ds), grads
        ),
        "LossScaler deepspeed locate off": _loss_scaler_step(
            LossScaler.from_preset("deepspeed", locate_nonfinite=False, **ds), grads
        ),
    }
    for scaler_step in variants.values():  # warm up and create lazy state
        for _ in range(3):
            model.zero_grad(set_to_none=False)
            scaler_step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, scaler_step in variants.items():
            for g in grads:
                g.fill_(1e-3 * args.scale / 2)  # stays normal over the round's unscalings
            start = time.perf_counter()
            for _ in range(args.steps):
                scaler_step()
            times[name].append((time.perf_counter() - start) / args.steps * 1e6)

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{len(grads)} gradient tensors, {n_params / 1e6:.2f} M fp32 values, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    base = statistics.median(times["torch.amp.GradScaler"])
    print(f"{'variant':34s} {'us/step':>10s} {'overhead':>9s}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:34s} {median:10.1f} {median / base - 1:+9.1%}")


if __name__ == "__main__":
    main()
