"""Per-step time of ``mixprec.Precision`` against hand-written torch loops (CPU).

For each model (an MLP and a small transformer block), recipe (fp32, bf16-mixed),
non-finite policy of ``Precision`` (``skip``: the default inf/NaN check and skip;
``ignore``: no check) and AdamW flavour (``foreach`` or ``fused``), three identical copies of
the model and optimizer are trained side by side:

* ``hand``: the plain loop, ``torch.autocast`` + ``loss.backward()`` + ``opt.step()`` +
  ``opt.zero_grad()``, no inf/NaN check;
* ``hand+check``: the same loop doing what ``nonfinite="skip"`` does, written as
  ``torch.amp.GradScaler`` does it at scale 1: ``found_inf`` from one
  ``torch._amp_foreach_non_finite_check_and_unscale_`` over the gradients, passed into a
  fused optimizer's kernel (``opt.found_inf``), read on the host otherwise;
* ``mixprec``: ``Precision(recipe, nonfinite=policy)``.

Steps are interleaved, the order of the loops rotating each repetition, so machine load
hits all alike.

Figures printed (per model, recipe, policy and optimizer):

* ``hand ms`` / ``+check ms`` / ``mixprec ms``: median over ``--reps`` repetitions of one
  training step (forward, backward, optimizer step, zero_grad), in milliseconds;
* ``ratio = mixprec ms / hand ms``: what Precision costs over the plain loop;
* ``same work = mixprec ms / +check ms`` for ``skip`` (``mixprec ms / hand ms`` for
  ``ignore``): Precision's own overhead over a hand-written loop doing the same work;
* ``check = +check ms / hand ms``: what the check itself costs, written by hand;
* ``min ratio = min mixprec ms / min hand ms``: the fastest step of each loop, the figure
  least disturbed by other processes on a shared machine (load adds time, never removes
  it).
* ``bf16 speed-up = hand ms (fp32) / hand ms (bf16-mixed)`` per model.
* ``--check-cost``: the non-finite check alone (``NonFiniteGuard.check`` + ``record`` on
  the model's gradients, what ``nonfinite="skip"`` adds to a step without loss scaling),
  timed in isolation, and ``check / step = check ms / hand-written step ms`` (minimum and
  median over ``--reps``). On a loaded machine the interleaved ratios above swing by more
  than the check costs; this figure does not.

Usage::

    .venv/bin/python benchmarks/bench_step.py [--reps 100] [--warmup 20] [--threads N]
        [--policies skip ignore] [--optimizers foreach fused] [--models mlp]
        [--recipes fp32 bf16-mixed]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import mixprec as mp
from mixprec.precision.nonfinite import NonFiniteGuard

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


def _backward(recipe: str):
    """Forward (under bf16 autocast for bf16-mixed) and backward, as written by hand."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe == "bf16-mixed")

    def backward(model, x, y):
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    return backward


def _hand_step(recipe: str):
    backward = _backward(recipe)

    def step(model, opt, x, y):
        backward(model, x, y)
        opt.step()
        opt.zero_grad()

    return step


def _hand_check_step(recipe: str):
    """The plain loop plus torch.amp's inf/NaN check at scale 1 (what ``skip`` does)."""
    backward = _backward(recipe)
    one = torch.ones(())

    def step(model, opt, x, y):
        backward(model, x, y)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        found_inf = torch.zeros(())
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, one)
        if opt.defaults.get("fused"):
            opt.grad_scale, opt.found_inf = None, found_inf
            opt.step()
            del opt.grad_scale, opt.found_inf
        elif not found_inf.item():
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


def _loops(build, recipe: str, policy: str = "skip", fused: bool = False):
    """Three identical (model, optimizer) pairs: hand, hand+check, mixprec; and a batch."""
    entries = []
    for kind in ("hand", "check", "mixprec"):
        torch.manual_seed(0)
        model, x, y = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        if kind == "mixprec":
            precision = mp.Precision(recipe, nonfinite=policy)
            model, opt = precision.setup(model, opt)
            step = _mixprec_step(precision)
        else:
            step = (_hand_step if kind == "hand" else _hand_check_step)(recipe)
        entries.append((step, model, opt))
    return entries, x, y


def _time(entry, x, y) -> float:
    step, model, opt = entry
    start = time.perf_counter()
    step(model, opt, x, y)
    return time.perf_counter() - start


def measure(
    build, recipe: str, *, reps: int, warmup: int, policy: str = "skip", fused: bool = False
) -> tuple[list[float], list[float]]:
    """Seconds per step of (hand, hand+check, mixprec), the order rotating each repetition:
    the three medians, then the three minima."""
    entries, x, y = _loops(build, recipe, policy, fused)
    for _ in range(warmup):
        for entry in entries:
            _time(entry, x, y)
    times: list[list[float]] = [[], [], []]
    for i in range(reps):
        for k in range(3):
            j = (i + k) % 3
            times[j].append(_time(entries[j], x, y))
    return [statistics.median(t) for t in times], [min(t) for t in times]


def _times(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def check_cost(build, recipe: str, *, reps: int, warmup: int) -> tuple[float, ...]:
    """(check min, check median, step min, step median) in seconds, for one model."""
    torch.manual_seed(0)
    model, x, y = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = _hand_step(recipe)
    keep = lambda: None  # noqa: E731
    opt.zero_grad = keep  # keep the gradients for the check below
    for _ in range(warmup):
        step(model, opt, x, y)
    grads = [p.grad for p in model.parameters()]
    guard = NonFiniteGuard("skip", check_grads=True)

    def check():
        guard.record(guard.check(grads))

    for _ in range(warmup):
        check()
    del opt.zero_grad
    step_times = _times(lambda: step(model, opt, x, y), reps)
    check_times = _times(check, reps)
    return (min(check_times), statistics.median(check_times),
            min(step_times), statistics.median(step_times))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=100, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per loop")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--policies", nargs="+", default=["skip", "ignore"],
                        choices=["skip", "raise", "ignore"], help="Precision(nonfinite=...)")
    parser.add_argument("--optimizers", nargs="+", default=["foreach", "fused"],
                        choices=["foreach", "fused"], help="AdamW implementation")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--check-cost", action="store_true",
                        help="time the non-finite check alone instead of the two loops")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, AdamW")
    if args.check_cost:
        print(f"{args.reps} timed runs of each after {args.warmup} warm-up runs\n")
        print(f"{'model':<18} {'recipe':<11} {'check ms':>14} {'step ms':>14} {'check/step':>11}")
        print(f"{'':<30} {'min / median':>14} {'min / median':>14} {'min / median':>11}")
        for model_name in args.models:
            for recipe in args.recipes:
                c_min, c_med, s_min, s_med = check_cost(
                    MODELS[model_name], recipe, reps=args.reps, warmup=args.warmup
                )
                print(
                    f"{model_name:<18} {recipe:<11} {c_min * 1e3:>6.3f} / {c_med * 1e3:<6.3f}"
                    f"{s_min * 1e3:>7.2f} / {s_med * 1e3:<6.2f}"
                    f"{c_min / s_min:>6.2%} / {c_med / s_med:.2%}"
                )
        return
    print(f"median of {args.reps} interleaved steps after {args.warmup} warm-up steps\n")
    header = (
        f"{'model':<18} {'recipe':<11} {'nonfinite':<9} {'AdamW':<8} {'hand ms':>8} "
        f"{'+check ms':>9} {'mixprec ms':>10} {'ratio':>6} {'same work':>9} {'check':>6} "
        f"{'min ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    hand_times: dict[tuple[str, str], list[float]] = {}
    for model_name in args.models:
        build = MODELS[model_name]
        for recipe in args.recipes:
            for optimizer in args.optimizers:
                for policy in args.policies:
                    (hand, check, ours), (hand_min, _, ours_min) = measure(
                        build, recipe, reps=args.reps, warmup=args.warmup, policy=policy,
                        fused=optimizer == "fused",
                    )  # fmt: skip
                    hand_times.setdefault((model_name, recipe), []).append(hand)
                    same = ours / (hand if policy == "ignore" else check)
                    print(
                        f"{model_name:<18} {recipe:<11} {policy:<9} {optimizer:<8} "
                        f"{hand * 1e3:>8.2f} {check * 1e3:>9.2f} {ours * 1e3:>10.2f} "
                        f"{ours / hand:>6.3f} {same:>9.3f} {check / hand:>6.3f} "
                        f"{ours_min / hand_min:>9.3f}"
                    )
    print("\nbf16-mixed speed-up over fp32 (hand-written loop, fp32 ms / bf16-mixed ms,")
    print("medians over the rows above):")
    for model_name in args.models if set(args.recipes) == set(RECIPES) else ():
        fp32 = statistics.median(hand_times[model_name, "fp32"])
        bf16 = statistics.median(hand_times[model_name, "bf16-mixed"])
        print(f"  {model_name:<18} {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
