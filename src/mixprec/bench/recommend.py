"""The bench's verdict: one recipe to use, and a reason for every recipe it ran.

Rule (applied to the measured :class:`~mixprec.bench.runner.BenchResult`):

1. A recipe qualifies when it finished every step without diverging and its final metric
   is within the task's tolerance of fp32's (:meth:`Task.within_tolerance`).
2. Among those, the fastest by items/s wins if it is at least ``FASTER`` (5%) faster than
   fp32; otherwise the one with the lowest measured peak memory wins if that is at least
   ``SMALLER`` (20%) below fp32's without being more than 5% slower; otherwise fp32.

Each reason states the measured speed-up (items/s over fp32's), the metric beside fp32's
and the tolerance, the peak-memory ratio when both were measured, and skipped steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mixprec.recipes import get_recipe

__all__ = ["FASTER", "SMALLER", "Recommendation", "recommend", "speed_phrase"]

FASTER = 1.05
SMALLER = 0.80


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
        text = f"{name}: {speed_phrase(speedup)}{_hardware_note(result, r)}"
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
    fast = [r for r in good if (result.speedup(r) or 0) >= FASTER]
    unit = result.task.item_unit
    if fast:
        best = max(fast, key=lambda r: result.speedup(r))
        summary = (
            f"{best.recipe}: {result.speedup(best):.2f}x the {unit}/s of fp32 "
            f"with the same {result.task.metric}{_memory(result, best)}"
        )
        return Recommendation(best.recipe, summary, reasons)
    lean = [
        r
        for r in good
        if r.peak_memory_bytes
        and ref.peak_memory_bytes
        and r.peak_memory_bytes <= SMALLER * ref.peak_memory_bytes
        and (result.speedup(r) or 0) >= 1 / FASTER
    ]
    if lean:
        best = min(lean, key=lambda r: r.peak_memory_bytes)
        ratio = best.peak_memory_bytes / ref.peak_memory_bytes
        summary = f"{best.recipe}: {ratio:.2f}x fp32's peak memory at the same speed and quality"
        return Recommendation(best.recipe, summary, reasons)
    return Recommendation(
        "fp32",
        f"fp32: no recipe was both faster (>= {FASTER:g}x) and within the tolerance here",
        reasons,
    )
