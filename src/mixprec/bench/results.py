"""What a bench runs (:class:`BenchConfig`) and what it measured (:class:`BenchResult`).

The derived figures are methods of :class:`BenchResult`, each with its formula; the
measuring is in :mod:`mixprec.bench.runner`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mixprec.bench.analysis import ShapeIssue, peak_flops
from mixprec.bench.cores import check_threads
from mixprec.bench.rounds import Interval, noise_report, paired_ratios, speedup_interval
from mixprec.bench.tasks import SIZES, Task
from mixprec.formats import get_format
from mixprec.formats.names import unknown
from mixprec.recipes import get_recipe, recipe_names

__all__ = ["DEFAULT_RECIPES", "BenchConfig", "BenchResult", "RecipeResult"]

DEFAULT_RECIPES: tuple[str, ...] = ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true", "fp8-mixed")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to run.

    Args:
        task: built-in task name or ``package.module:factory``.
        size: ``tiny``, ``small`` or ``base``.
        recipes: recipe names; fp32 is added first when missing (the reference).
        steps: training steps per recipe; None for the task's default.
        warmup: first steps left out of the step-time statistics (still trained).
        seed: seed of initial weights, data order and every recipe's RNG.
        device: ``"cpu"``, ``"cuda"``...; None picks cuda when available.
        max_grad_norm: gradient clipping passed to ``precision.step`` (None: off).
        recipe_budget_s: seconds of training after which a recipe other than fp32 stops
            (truncated).
        budget_vs_fp32: a recipe other than fp32 stops (truncated) once its training time
            passes this many times fp32's training time for all the steps, and at least
            ``budget_floor_s`` (so that a run of a few milliseconds is not cut by the
            one-off costs of a recipe's first step).
        budget_floor_s: the smallest relative budget, in seconds.
        evaluate: evaluate each finished recipe on the task's evaluation set.
        memory_steps: extra steps run by :func:`mixprec.memory.measure` for the peak
            memory (0: not measured).
        numerics_steps: fp32 steps watched by :class:`mixprec.numerics.Monitor` for the
            report's gradient histogram and format verdicts (0: none).
        round_steps: training steps of each recipe per timing round (after the first round,
            which runs the ``warmup`` steps); see :mod:`mixprec.bench.rounds`.
        offload: keep only the recipe being run on the device and the others' states
            (model, optimizer, precision, RNG) in host memory between rounds; None: on
            any device but the CPU (on a CPU host memory is the device's memory).
        confidence: least coverage of the speed-up intervals (order statistics of the
            per-round speed-ups; with too few rounds to reach it, the coverage they have).
        threads: CPU threads to time with: ``"auto"`` (the cores other processes leave
            free, less one, see :mod:`mixprec.bench.cores`), a positive int, or None
            (torch's setting, untouched). The command's default is ``"auto"``.
    """

    task: str = "gpt"
    size: str = "tiny"
    recipes: tuple[str, ...] = DEFAULT_RECIPES
    steps: int | None = None
    warmup: int = 2
    seed: int = 0
    device: str | None = None
    max_grad_norm: float | None = 1.0
    recipe_budget_s: float | None = None
    budget_vs_fp32: float | None = None
    budget_floor_s: float = 10.0
    evaluate: bool = True
    memory_steps: int = 2
    numerics_steps: int = 2
    round_steps: int = 2
    offload: bool | None = None
    confidence: float = 0.95
    threads: int | str | None = None

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(unknown("size", self.size, SIZES))
        if not self.recipes:
            raise ValueError(f"no recipes given; choose from {', '.join(recipe_names())}")
        for name in self.recipes:
            get_recipe(name)  # ValueError listing the recipes
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.numerics_steps < 0:
            raise ValueError(f"numerics_steps={self.numerics_steps} must be >= 0")
        if self.memory_steps < 0:
            raise ValueError(f"memory_steps={self.memory_steps} must be >= 0")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be >= 0")
        if self.recipe_budget_s is not None and not self.recipe_budget_s > 0:
            raise ValueError(f"recipe_budget_s={self.recipe_budget_s} must be positive")
        if self.budget_vs_fp32 is not None and not self.budget_vs_fp32 > 0:
            raise ValueError(f"budget_vs_fp32={self.budget_vs_fp32} must be positive")
        if not isinstance(self.round_steps, int) or self.round_steps < 1:
            raise ValueError(f"round_steps={self.round_steps!r} must be an integer >= 1")
        check_threads(self.threads)
        level = self.confidence
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
            raise ValueError(f"confidence={self.confidence!r} must be a number in (0, 1)")

    def round_plan(self, steps: int) -> list[int]:
        """Steps per round: the ``warmup`` steps first (untimed), then ``round_steps`` each.

        Example:
            >>> BenchConfig(warmup=2, round_steps=4).round_plan(12)
            [2, 4, 4, 2]
        """
        plan = [min(self.warmup, steps)] if self.warmup else []
        left = steps - sum(plan)
        while left > 0:
            plan.append(min(self.round_steps, left))
            left -= plan[-1]
        return plan

    def recipe_list(self) -> list[str]:
        """Recipe names in run order: fp32 first, duplicates dropped."""
        names = [str(get_recipe(r)) for r in self.recipes]
        return list(dict.fromkeys(["fp32", *names]))


@dataclass(slots=True)
class RecipeResult:
    """Measurements of one recipe (see the module docstring for each formula)."""

    recipe: str
    status: str = "ok"  # ok | diverged | truncated | failed
    steps_run: int = 0
    diverged_at: int | None = None
    error: str | None = None
    step_times: list[float] = field(default_factory=list)
    timed_from: int = 0
    round_times: dict[int, float] = field(default_factory=dict)  # round -> mean step time
    warmup_times: list[float] = field(default_factory=list)  # untimed round's step times
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    loss_scale: float | None = None
    peak_memory_bytes: int | None = None
    memory_source: str | None = None
    estimated_memory_bytes: int | None = None
    tensor_core_share: float | None = None
    train_seconds: float = 0.0
    budget_s: float | None = None
    # figure -> why it is missing (a side measurement that failed), e.g. tensor_core_share
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def timed(self) -> list[float]:
        """Step times of the timed rounds; the warmup's where none was timed (truncated)."""
        return self.step_times[self.timed_from :] or self.step_times or self.warmup_times

    def step_time_stats(self) -> dict[str, float] | None:
        """median, q1, q3 and iqr of the timed steps, in seconds."""
        t = self.timed
        if not t:
            return None
        q1, q3 = (
            (statistics.quantiles(t, n=4, method="inclusive")[i] for i in (0, 2))
            if (len(t) > 1)
            else (t[0], t[0])
        )
        return {"median": statistics.median(t), "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(t)}


@dataclass(slots=True)
class BenchResult:
    """Everything one bench measured: the input of the report and of results.json."""

    config: BenchConfig
    task: Task
    device: dict[str, Any]
    parameters: int
    flops_per_step: int | None
    shape_issues: dict[int, list[ShapeIssue]]
    recipes: list[RecipeResult] = field(default_factory=list)
    steps: int = 0
    interrupted: str | None = None
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    numerics: dict[str, Any] | None = None
    round_orders: list[list[str]] = field(default_factory=list)
    offloaded: bool = False
    monitor: Any = None  # the numerics Monitor behind ``numerics`` (plots), not serialised
    # figure -> why it is missing (flops_per_step, numerics): the report prints the reason
    missing: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> RecipeResult | None:
        return next((r for r in self.recipes if r.recipe == name), None)

    @property
    def reference(self) -> RecipeResult | None:
        return self.get("fp32")

    def items_per_s(self, r: RecipeResult) -> float | None:
        """items/s = items per batch / median step time."""
        stats = r.step_time_stats()
        return self.task.items_per_batch / stats["median"] if stats else None

    def speedup_interval(self, r: RecipeResult) -> Interval | None:
        """Median over rounds of fp32's step time / ``r``'s in the same round, with its
        distribution-free interval (:func:`mixprec.bench.rounds.speedup_interval`); None
        when no round timed both."""
        ref = self.reference
        if ref is None:
            return None
        ratios = paired_ratios(ref.round_times, r.round_times)
        return speedup_interval(ratios, level=self.config.confidence)

    def speedup(self, r: RecipeResult) -> float | None:
        """The median per-round speed-up over fp32 (:meth:`speedup_interval`); where no
        round timed both, items/s of ``r`` / items/s of fp32."""
        interval = self.speedup_interval(r)
        if interval is not None:
            return interval.point
        ref = self.reference
        mine, base = self.items_per_s(r), (self.items_per_s(ref) if ref else None)
        return mine / base if mine and base else None

    def noise(self) -> dict[str, Any]:
        """Drift across rounds and spread of the speed-ups (:func:`~.rounds.noise_report`)."""
        ref = self.reference
        times = {r.recipe: r.round_times for r in self.recipes if r.round_times}
        ratios = {
            r.recipe: paired_ratios(ref.round_times, r.round_times)
            for r in self.recipes
            if ref is not None and r is not ref
        }
        return noise_report(times, ratios)

    def loss_scales(self) -> dict[str, float]:
        """The final loss scale of every recipe that used loss scaling, by recipe name."""
        return {r.recipe: r.loss_scale for r in self.recipes if r.loss_scale is not None}

    def metric(self, r: RecipeResult) -> float | None:
        value = r.metrics.get(self.task.metric)
        return value if value is not None and math.isfinite(value) else None

    def metric_gap(self, r: RecipeResult) -> float | None:
        """metric of ``r`` - metric of fp32."""
        ref = self.reference
        mine, base = self.metric(r), (self.metric(ref) if ref else None)
        return mine - base if mine is not None and base is not None else None

    def same_quality(self, r: RecipeResult) -> bool | None:
        """Whether ``r``'s metric is within the task's tolerance of fp32's (None: unknown)."""
        ref = self.reference
        mine, base = self.metric(r), (self.metric(ref) if ref else None)
        if r.status in ("diverged", "failed"):
            return False
        if mine is None or base is None:
            return None
        return self.task.within_tolerance(mine, base)

    def achieved_flops(self, r: RecipeResult) -> float | None:
        """FLOPs per step / median step time."""
        stats = r.step_time_stats()
        return self.flops_per_step / stats["median"] if stats and self.flops_per_step else None

    def mfu(self, r: RecipeResult) -> float | None:
        """achieved FLOP/s / peak FLOP/s of the device in the recipe's compute dtype."""
        achieved = self.achieved_flops(r)
        recipe = get_recipe(r.recipe)
        compute = (
            "fp8"
            if recipe.fp8 != "off"
            else get_format(recipe.compute_dtype or recipe.param_dtype).name
        )
        if compute == "fp32" and recipe.allow_tf32:
            compute = "tf32"
        peak = peak_flops(torch.device(self.device["type"]), compute)
        return achieved / peak if achieved and peak else None
