"""Interleaved timing: rounds in a fresh random order, and what the rounds say about speed.

A load that comes and goes on a shared machine must not decide which recipe looks fast.
So no recipe is timed in one block: the bench runs in *rounds*, and each round runs a few
steps of every recipe still running, in an order drawn afresh for the round
(:func:`interleave`). A burst of load then lands on every recipe alike, and because the
speed-up is computed per round (the recipes of one round ran within seconds of each
other) it cancels in the ratio.

Formulas (``t_R(r)``: mean step time of recipe ``R`` in round ``r``, timed rounds only):

* per-round speed-up ``s_R(r) = t_fp32(r) / t_R(r)`` over the rounds both ran;
* speed-up ``s_R = median_r s_R(r)``;
* its confidence interval: the distribution-free interval for a median, between two order
  statistics of the ``n`` per-round speed-ups (:func:`speedup_interval`). With
  ``B ~ Binomial(n, 1/2)``, the interval ``[s_(j), s_(n+1-j)]`` (``s_(k)`` the k-th smallest)
  holds the true median with probability ``1 - 2 P(B <= j - 1)`` whatever the distribution
  of the rounds; ``j`` is the largest rank whose coverage is still at least ``level``, and
  ``Interval.level`` is that coverage (0.987 for 14 rounds at 95%). Where no rank reaches
  ``level`` (fewer than 6 rounds at 95%) the interval is the whole range, whose coverage
  ``1 - 2^(1-n)`` is below ``level``, and ``Interval.level`` says so. A percentile bootstrap
  of the median, this module's first method, holds the median of iid log-normal rounds
  only 92.5-93.5% of the time at 8-20 rounds (``tests/test_bench.py`` measures both);
* load factor of round ``r``: ``L(r) = geometric mean over recipes of t_R(r) / median_r t_R``
  (1.0 where a round ran at the run's typical speed); drift ``= max L / min L``
  (:func:`load_factors`). A run is flagged *noisy* when the drift passes ``NOISY_DRIFT`` or
  a recipe's per-round speed-ups spread (IQR / median) by more than ``NOISY_SPREAD``.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "NOISY_DRIFT",
    "NOISY_SPREAD",
    "Interval",
    "RoundRunner",
    "interleave",
    "load_factors",
    "median_ranks",
    "min_rounds",
    "noise_report",
    "paired_ratios",
    "speedup_interval",
]

NOISY_DRIFT = 1.5  # the slowest round ran 1.5x slower than the fastest (common load factor)
NOISY_SPREAD = 0.25  # IQR of a recipe's per-round speed-ups over their median


class RoundRunner(Protocol):
    """One recipe as the rounds see it: runs its next steps, says when it is done."""

    name: str

    @property
    def running(self) -> bool: ...

    def run_round(self, round_index: int, steps: int) -> None: ...


def interleave(
    runners: Sequence[RoundRunner],
    plan: Sequence[int],
    *,
    seed: int = 0,
    after_round: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """Run ``plan[r]`` steps of every running runner in round ``r``, in a fresh random order.

    Args:
        runners: the recipes (each keeps its own state between rounds).
        plan: steps per round, e.g. ``[2, 2, 2]``.
        seed: seed of the order (a ``random.Random`` of its own: the training RNG is untouched).
        after_round: called with the round's index after it (e.g. to stop recipes over budget).

    Returns:
        The order each round ran in (names), for the report.

    Example:
        >>> class R:
        ...     def __init__(self, name): self.name, self.steps = name, 0
        ...     running = property(lambda self: self.steps < 4)
        ...     def run_round(self, r, k): self.steps += k
        >>> runners = [R("a"), R("b")]
        >>> order = interleave(runners, [2, 2, 2], seed=1)
        >>> [r.steps for r in runners], len(order)
        ([4, 4], 2)
    """
    rng = random.Random(seed)
    orders: list[list[str]] = []
    for r, steps in enumerate(plan):
        todo = [x for x in runners if x.running]
        if not todo:
            break
        rng.shuffle(todo)
        orders.append([x.name for x in todo])
        for x in todo:
            if x.running:  # an earlier runner of this round cannot stop it, but be safe
                x.run_round(r, steps)
        if after_round is not None:
            after_round(r)
    return orders


def paired_ratios(ref: dict[int, float], mine: dict[int, float]) -> list[float]:
    """``ref[r] / mine[r]`` for every round ``r`` both timed (a speed-up per round)."""
    return [ref[r] / mine[r] for r in sorted(ref) if r in mine and mine[r] > 0 and ref[r] > 0]


@dataclass(frozen=True, slots=True)
class Interval:
    """A speed-up with its confidence interval over ``rounds`` rounds; ``level``: its coverage."""

    point: float
    low: float
    high: float
    rounds: int
    level: float

    def excludes(self, value: float) -> bool:
        return value < self.low or value > self.high

    def reaches(self, level: float) -> bool:
        """Its coverage is at least ``level`` (enough rounds for an interval that sure)."""
        return self.level >= level

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __str__(self) -> str:
        return f"{self.point:.2f}x [{self.low:.2f}, {self.high:.2f}]"


def median_ranks(n: int, level: float = 0.95) -> tuple[int, float]:
    """Rank ``j`` of the median interval ``[s_(j), s_(n+1-j)]`` of ``n`` values, and its
    coverage ``1 - 2 P(B <= j - 1)``, ``B ~ Binomial(n, 1/2)`` (module doc).

    Example:
        >>> median_ranks(14)  # the 3rd smallest to the 3rd largest of 14
        (3, 0.98706...)
        >>> j, coverage = median_ranks(4)  # too few for 95%: the whole range, and its coverage
        >>> j, round(coverage, 6)
        (1, 0.875)
    """
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    # P(B = i) in log space: 2^-n underflows past 1074 rounds, and exact integers of n bits
    # would make a long bench's interval cost seconds. One pass, O(j).
    log_all = math.lgamma(n + 1) - n * math.log(2.0)

    def pmf(i: int) -> float:
        return math.exp(log_all - math.lgamma(i + 1) - math.lgamma(n - i + 1))

    j, tail = 1, pmf(0)  # tail = P(B <= j - 1); the coverage of rank j is 1 - 2 tail
    while j + 1 <= (n + 1) // 2:
        wider = tail + pmf(j)  # P(B <= j): the tail of rank j + 1
        if 1.0 - 2.0 * wider < level:
            break
        j, tail = j + 1, wider
    return j, 1.0 - 2.0 * tail


def min_rounds(level: float = 0.95) -> int:
    """The fewest rounds whose interval reaches ``level``: the smallest ``n`` with
    ``1 - 2^(1-n) >= level``.

    Example:
        >>> min_rounds(0.95), min_rounds(0.99)
        (6, 8)
    """
    n = 1
    while median_ranks(n, level)[1] < level:
        n += 1
    return n


def speedup_interval(ratios: Sequence[float], *, level: float = 0.95) -> Interval | None:
    """Median of the per-round speed-ups and its distribution-free interval (module doc).

    With one round the interval is that round's value, with coverage 0 (the report says
    so through ``rounds``). None without any round.

    Example:
        >>> iv = speedup_interval([2.0, 2.1, 1.9, 2.0, 2.05, 1.95, 2.02, 1.98, 2.01, 1.99])
        >>> iv.point, (iv.low, iv.high), round(iv.level, 3)  # 2nd smallest to 2nd largest
        (2.0, (1.95, 2.05), 0.979)
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    values = sorted(v for v in ratios if math.isfinite(v))
    if not values:
        return None
    point = statistics.median(values)
    j, coverage = median_ranks(len(values), level)
    return Interval(point, values[j - 1], values[-j], len(values), coverage)


def load_factors(round_times: dict[str, dict[int, float]]) -> dict[int, float]:
    """``L(r)``: the geometric mean over recipes of ``t_R(r) / median_r t_R`` (module doc)."""
    logs: dict[int, list[float]] = {}
    for times in round_times.values():
        if not times:
            continue
        typical = statistics.median(times.values())
        for r, t in times.items():
            if t > 0 and typical > 0:
                logs.setdefault(r, []).append(math.log(t / typical))
    return {r: math.exp(statistics.fmean(v)) for r, v in sorted(logs.items())}


def noise_report(
    round_times: dict[str, dict[int, float]], ratios: dict[str, list[float]]
) -> dict[str, Any]:
    """Drift and spread of a run, and whether it is noisy (thresholds in the module doc).

    Returns ``{"load_factors": {round: L}, "drift": max L / min L, "spread": {recipe:
    IQR / median of its per-round speed-ups}, "noisy": bool, "why": [sentences]}``.
    """
    factors = load_factors(round_times)
    drift = max(factors.values()) / min(factors.values()) if factors else 1.0
    spread = {}
    for name, values in ratios.items():
        if len(values) >= 4:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
            spread[name] = (q3 - q1) / statistics.median(values)
    why = []
    if drift > NOISY_DRIFT:
        slow = max(factors, key=factors.get)
        fast = min(factors, key=factors.get)
        why.append(
            f"the machine's load drifted: round {slow} ran {drift:.2f}x slower than round "
            f"{fast} (threshold {NOISY_DRIFT:g}x)"
        )
    wide = {n: s for n, s in spread.items() if s > NOISY_SPREAD}
    if wide:
        text = ", ".join(f"{n} {s:.0%}" for n, s in wide.items())
        why.append(
            f"per-round speed-ups spread widely (IQR / median: {text}; threshold "
            f"{NOISY_SPREAD:.0%})"
        )
    return {
        "load_factors": factors,
        "drift": drift,
        "spread": spread,
        "noisy": bool(why),
        "why": why,
    }
