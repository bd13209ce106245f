"""The bench's verdict: one recipe to use, and a reason for every recipe it ran.

Rule (applied to the measured :class:`~mixprec.bench.runner.BenchResult`):

1. A recipe qualifies when it finished every step without diverging and its final metric
   is within the task's tolerance of fp32's (:meth:`Task.within_tolerance`).
2. It is *faster beyond the noise* when its speed-up over fp32 is at least ``FASTER``
   (5%) and its confidence interval (order statistics of the per-round speed-ups,
   :mod:`mixprec.bench.rounds`) has the asked-for coverage (``BenchConfig.confidence``;
   at least 6 timed rounds at 95%) and excludes fp32's 1.0. Among those, the fastest is
   recommended for speed when its interval excludes every other one's; when intervals
   overlap, the speed difference between them is within this machine's noise and the
   choice among them is made, and said to be made, on memory (the lowest measured peak, when
   at least ``MEMORY_MARGIN`` (5%) below the others') or else on simplicity
   (``SIMPLICITY``: fewer moving parts first).
3. Otherwise the one with the lowest measured peak memory wins if that is at least
   ``SMALLER`` (20%) below fp32's and it is not slower beyond the noise (interval reaching
   ``1 / FASTER``); otherwise fp32. A recipe that looked faster but whose interval holds
   1.0, or that ran too few rounds for the coverage, is named in the summary, saying which.

Each reason states the measured speed-up with its interval, the metric beside fp32's
and the tolerance, the peak-memory ratio when both were measured, and skipped steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mixprec.bench.rounds import min_rounds
from mixprec.recipes import get_recipe

__all__ = [
    "FASTER",
    "MEMORY_MARGIN",
    "SIMPLICITY",
    "SMALLER",
    "Recommendation",
    "pick_within_noise",
    "recommend",
    "speed_phrase",
]

FASTER = 1.05
SMALLER = 0.80
MEMORY_MARGIN = 0.95
# Fewer moving parts first: no loss scaler, no master copy, no fp8 scaling.
SIMPLICITY = (
    "fp32",
    "tf32",
    "bf16-mixed",
    "bf16-true",
    "fp16-mixed",
    "bf16-master",
    "fp16-master",
    "fp8-mixed",
)


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The recipe to use, a one-line summary and one reason per recipe run."""

    recipe: str
    summary: str
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "summary": self.summary, "reasons": list(self.reasons)}


def speed_phrase(speedup: float) -> str:
    """``"2.4x faster than fp32"``, ``"as fast as fp32 (1.02x)"`` or ``"150x slower ..."``.

    Example:
        >>> speed_phrase(1.7), speed_phrase(0.0066), speed_phrase(1.01)
        ('1.7x faster than fp32', '152x slower than fp32', 'as fast as fp32 (1.01x)')
    """
    if speedup >= FASTER:
        return f"{speedup:.1f}x faster than fp32"
    if speedup > 1 / FASTER:
        return f"as fast as fp32 ({speedup:.2f}x)"
    slower = 1 / speedup
    return f"{slower:.0f}x slower than fp32" if slower >= 10 else f"{slower:.1f}x slower than fp32"


def _hardware_note(result, r) -> str:
    """Why a low-precision recipe is slow on this CPU, when its flags say so (AMX units)."""
    recipe = get_recipe(r.recipe)
    speedup = result.speedup(r)
    units = result.device.get("matrix_units")
    if result.device["type"] != "cpu" or speedup is None or speedup >= 1 / FASTER or units is None:
        return ""
    if recipe.fp8 != "off" and "amx_fp8" not in units:
        return " on this CPU, which has no fp8 matrix unit"
    if recipe.compute_dtype == torch.float16 and "amx_fp16" not in units:
        return " on this CPU, which has no fp16 matrix unit"
    if recipe.compute_dtype == torch.bfloat16 and "amx_bf16" not in units:
        return " on this CPU, which has no bf16 matrix unit"
    return ""


def _quality(result, r) -> str:
    task = result.task
    mine, ref = result.metric(r), result.metric(result.reference) if result.reference else None
    if mine is None or ref is None:
        return f"{task.metric} not measured"
    same = result.same_quality(r)
    verdict = "same quality" if same else "outside the tolerance"
    return f"{verdict}: {task.metric} {mine:.4f} vs {ref:.4f} (tolerance {task.tolerance_text})"


def _memory(result, r) -> str:
    ref = result.reference
    if ref is None or not r.peak_memory_bytes or not ref.peak_memory_bytes or r is ref:
        return ""
    return f", peak memory {r.peak_memory_bytes / ref.peak_memory_bytes:.2f}x fp32's"


def reason(result, r) -> str:
    """One line on recipe ``r``: speed, quality, memory, skipped steps, or what went wrong."""
    name = r.recipe
    if r.status == "failed":
        return f"{name}: failed ({r.error})"
    if r.status == "diverged":
        return f"{name}: diverged at step {r.diverged_at} (non-finite loss or metric)"
    speedup = result.speedup(r)
    if r is result.reference:
        ips = result.items_per_s(r)
        text = f"{name}: the reference" + (f", {ips:,.0f} {result.task.item_unit}/s" if ips else "")
    elif speedup is None:
        text = f"{name}: speed not measured"
    else:
        text = f"{name}: {speed_phrase(speedup)}{_interval_text(result, r)}"
        text += _hardware_note(result, r)
    if r.status == "truncated":
        text += (
            f"; stopped after {r.steps_run} of {result.steps} steps (time budget "
            f"{r.budget_s:.0f} s), so its quality is not compared"
        )
    elif r is not result.reference:
        text += f", {_quality(result, r)}"
    text += _memory(result, r)
    if r.skipped_steps:
        text += f", {r.skipped_steps} skipped step(s) (non-finite gradients)"
    return text


def _interval_text(result, r) -> str:
    iv = result.speedup_interval(r)
    if iv is None:
        return ""
    if iv.rounds < 2:
        return " (1 timing round: no interval)"
    return f" ({iv.level:.0%} interval {iv.low:.2f}-{iv.high:.2f}x over {iv.rounds} rounds)"


def _covered(result, iv) -> bool:
    """The interval has the coverage the bench asked for (enough rounds for it)."""
    return iv is not None and iv.reaches(result.config.confidence)


def _beyond_noise(result, r) -> bool:
    """Faster than fp32 by ``FASTER``, with an interval of the asked-for coverage above 1.0."""
    iv = result.speedup_interval(r)
    return (result.speedup(r) or 0) >= FASTER and _covered(result, iv) and iv.low > 1.0


def _unclear(result, r) -> str:
    """Why a recipe that looked ``FASTER`` is not faster beyond the noise."""
    text = f"{r.recipe} ({result.speedup(r):.2f}x{_interval_text(result, r)}) looked faster, but "
    iv = result.speedup_interval(r)
    if _covered(result, iv):
        return text + "within the noise of this machine (interval holds 1.0x)"
    level = result.config.confidence
    return text + (
        f"{iv.rounds if iv else 0} timing round(s) are too few for a {level:.0%} interval, "
        f"which needs {min_rounds(level)} (run more --steps)"
    )


def _rank(name: str) -> int:
    return SIMPLICITY.index(name) if name in SIMPLICITY else len(SIMPLICITY)


def pick_within_noise(candidates: list[tuple[str, int | None]]) -> tuple[str, str]:
    """Among recipes whose speeds differ only within the noise: ``(name, why)``.

    ``candidates``: ``(recipe, measured peak bytes or None)``. The lowest peak wins when it
    is at least ``MEMORY_MARGIN`` below every other measured one; else the simplest
    (``SIMPLICITY`` order).

    Example:
        >>> pick_within_noise([("fp8-mixed", 900), ("bf16-mixed", 1000)])
        ('fp8-mixed', 'lowest peak memory (0.90x the next)')
        >>> pick_within_noise([("fp8-mixed", 990), ("bf16-mixed", 1000)])
        ('bf16-mixed', 'simplest (fewer moving parts; memory within 5%)')
    """
    peaks = sorted((p, n) for n, p in candidates if p)
    if len(peaks) == len(candidates) and len(peaks) > 1:
        (low, name), (nxt, _) = peaks[0], peaks[1]
        if low <= MEMORY_MARGIN * nxt:
            return name, f"lowest peak memory ({low / nxt:.2f}x the next)"
    name = min((n for n, _ in candidates), key=_rank)
    return name, f"simplest (fewer moving parts; memory within {1 - MEMORY_MARGIN:.0%})"


def recommend(result) -> Recommendation:
    """Pick a recipe from a :class:`~mixprec.bench.runner.BenchResult` (rule in the module doc).

    Example:
        >>> from mixprec.bench.runner import BenchConfig, run_bench
        >>> res = run_bench(BenchConfig("mlp", "tiny", recipes=("bf16-mixed",), steps=3))
        >>> recommend(res).recipe in ("fp32", "bf16-mixed")
        True
    """
    reasons = tuple(reason(result, r) for r in result.recipes)
    ref = result.reference
    if ref is None or ref.status != "ok":
        return Recommendation("fp32", "no verdict: the fp32 reference did not finish", reasons)
    good = [
        r for r in result.recipes if r is not ref and r.status == "ok" and result.same_quality(r)
    ]
    fast = [r for r in good if _beyond_noise(result, r)]
    unclear = [r for r in good if r not in fast and (result.speedup(r) or 0) >= FASTER]
    unit = result.task.item_unit
    if fast:
        best = max(fast, key=lambda r: result.speedup(r))
        iv = result.speedup_interval(best)
        tied = [
            r
            for r in fast
            if r is not best
            and iv is not None
            and (other := result.speedup_interval(r)) is not None
            and other.overlaps(iv)
        ]
        if not tied:
            summary = (
                f"{best.recipe}: {result.speedup(best):.2f}x the {unit}/s of fp32"
                f"{_interval_text(result, best)} with the same {result.task.metric}"
                f"{_memory(result, best)}"
            )
            return Recommendation(best.recipe, summary, reasons)
        group = [best, *tied]
        name, why = pick_within_noise([(r.recipe, r.peak_memory_bytes) for r in group])
        pick = result.get(name)
        names = ", ".join(f"{r.recipe} {result.speedup(r):.2f}x" for r in group)
        summary = (
            f"{name}: faster than fp32 beyond this machine's noise"
            f"{_interval_text(result, pick)}; {names} differ only within the noise "
            f"(their intervals overlap), so chosen for being the {why}"
        )
        return Recommendation(name, summary, reasons)
    noise = "".join(f"; {_unclear(result, r)}" for r in unclear)
    lean = [
        r
        for r in good
        if r.peak_memory_bytes
        and ref.peak_memory_bytes
        and r.peak_memory_bytes <= SMALLER * ref.peak_memory_bytes
        and not _slower_beyond_noise(result, r)
    ]
    if lean:
        best = min(lean, key=lambda r: r.peak_memory_bytes)
        ratio = best.peak_memory_bytes / ref.peak_memory_bytes
        summary = (
            f"{best.recipe}: {ratio:.2f}x fp32's peak memory at the same quality, and not "
            f"slower beyond the noise (chosen on memory){noise}"
        )
        return Recommendation(best.recipe, summary, reasons)
    return Recommendation(
        "fp32",
        f"fp32: no recipe was both faster beyond the noise (>= {FASTER:g}x, interval above "
        f"1.0x) and within the tolerance here{noise}",
        reasons,
    )


def _slower_beyond_noise(result, r) -> bool:
    iv = result.speedup_interval(r)
    if iv is not None:
        return iv.high < 1 / FASTER
    return (result.speedup(r) or 0) < 1 / FASTER
