"""Run recipes side by side on one task and measure them (rendering lives in :mod:`.report`).

Every recipe starts from the same initial weights (the model is built once and deep-copied),
reads the same batches in the same order (materialised once) and is seeded the same way;
fp32 always runs first, as the reference. A training step is::

    with precision.autocast():
        loss = task.loss(model(x), y)
    precision.backward(loss)
    stepped = precision.step(optimizer, max_grad_norm=config.max_grad_norm)
    loss.item()                        # also the end of the step for the timer

Measured per recipe (formulas; see also :mod:`.analysis`):

* step time: wall clock of each step after the first ``warmup`` steps (on a GPU the device
  is synchronised before the clock stops); reported as median and IQR = q3 - q1.
* items/s = ``task.items_per_batch`` / median step time (samples or tokens).
* skipped steps: steps where ``precision.step`` returned False (non-finite gradients).
* peak memory: the largest memory in use during the recipe's steps, measured by
  :mod:`mixprec.memory` where it is available, else ``torch.cuda.max_memory_allocated``
  on a GPU; the :mod:`mixprec.memory` estimate for the model and recipe beside it.
* diverged: the first step (1-based) whose loss is not finite; the recipe stops there.
* truncated: the recipe's training time passed its budget and it stopped: the smaller of
  ``config.recipe_budget_s`` seconds and ``config.budget_vs_fp32`` times the training
  time fp32 took for all the steps, but not less than ``config.budget_floor_s`` (a relative
  budget holds on a machine whose load slows every recipe alike). Its speed is measured
  on the steps it ran; its quality is not compared (not evaluated). The fp32 reference
  is exempt: it always runs every step.

A ``KeyboardInterrupt`` stops the bench: the result holds every recipe that finished and
``interrupted`` names the one that was running.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mixprec.bench.analysis import (
    ShapeIssue,
    count_flops,
    peak_flops,
    shape_check,
    tensor_core_share,
)
from mixprec.bench.probes import (
    estimate_memory,
    measure_memory,
    profile_kernels,
    watch_numerics,
)
from mixprec.bench.tasks import SIZES, Task, get_task
from mixprec.bench.user import call_model, to_device
from mixprec.recipes import get_recipe, recipe_names

__all__ = ["DEFAULT_RECIPES", "BenchConfig", "BenchResult", "RecipeResult", "run_bench"]

DEFAULT_RECIPES: tuple[str, ...] = ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true", "fp8-mixed")
Event = Callable[[str, dict[str, Any]], None]


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
            report's gradient histogram (0: none).
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

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose one of {', '.join(SIZES)}")
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

    @property
    def timed(self) -> list[float]:
        return self.step_times[self.timed_from :] or self.step_times

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
    monitor: Any = None  # the numerics Monitor behind ``numerics`` (plots), not serialised

    def get(self, name: str) -> RecipeResult | None:
        return next((r for r in self.recipes if r.recipe == name), None)

    @property
    def reference(self) -> RecipeResult | None:
        return self.get("fp32")

    def items_per_s(self, r: RecipeResult) -> float | None:
        """items/s = items per batch / median step time."""
        stats = r.step_time_stats()
        return self.task.items_per_batch / stats["median"] if stats else None

    def speedup(self, r: RecipeResult) -> float | None:
        """items/s of ``r`` / items/s of fp32."""
        ref = self.reference
        mine, base = self.items_per_s(r), (self.items_per_s(ref) if ref else None)
        return mine / base if mine and base else None

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
            else _dtype_name(recipe.compute_dtype or recipe.param_dtype)
        )
        if compute == "fp32" and recipe.allow_tf32:
            compute = "tf32"
        peak = peak_flops(torch.device(self.device["type"]), compute)
        return achieved / peak if achieved and peak else None


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["name"] = _cpu_name()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["matrix_units"] = _cpu_matrix_units()
    info["torch"] = torch.__version__
    return info


def _cpu_matrix_units() -> list[str] | None:
    """The CPU's AMX flags (e.g. ``amx_bf16``), from /proc/cpuinfo; None where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(x for x in line.split(":", 1)[1].split() if x.startswith("amx"))
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _probe_memory(name, base_model, task, batch, config, device, result) -> None:
    model = copy.deepcopy(base_model).to(device)
    batch = to_device(batch, device)
    estimated = estimate_memory(model, name, batch, task.loss)  # traces a copy of model
    if estimated:
        result.estimated_memory_bytes = estimated["peak"]
    steps = config.memory_steps
    measured = measure_memory(model, task.build_optimizer(model), name, batch, task.loss, steps)
    if measured:
        result.peak_memory_bytes, result.memory_source = measured["peak"], measured["source"]


def _budget(name: str, config: BenchConfig, reference_seconds: float | None) -> float | None:
    """Training seconds recipe ``name`` may take: min(absolute, factor x fp32's); None: no cap."""
    if name == "fp32":
        return None  # the reference always finishes
    limits = [config.recipe_budget_s] if config.recipe_budget_s else []
    if config.budget_vs_fp32 and reference_seconds:
        limits.append(max(config.budget_vs_fp32 * reference_seconds, config.budget_floor_s))
    return min(limits) if limits else None


def _train_recipe(
    name: str,
    base_model: torch.nn.Module,
    task: Task,
    batches: list,
    config: BenchConfig,
    device: torch.device,
    emit: Event,
    reference_seconds: float | None = None,
) -> RecipeResult:
    from mixprec.precision import Precision

    result = RecipeResult(recipe=name, timed_from=config.warmup)
    result.budget_s = _budget(name, config, reference_seconds)
    emit("recipe_start", {"recipe": name, "steps": len(batches)})
    if config.memory_steps:
        _probe_memory(name, base_model, task, batches[0], config, device, result)
    torch.manual_seed(config.seed)
    model = copy.deepcopy(base_model).to(device)
    precision = Precision(name)
    model, opt = precision.setup(model, task.build_optimizer(model))
    n = len(batches)
    profile_at = n - 3 if device.type == "cuda" and n - config.warmup >= 6 else n
    kernel_times: dict[str, float] = {}
    profiler = contextlib.nullcontext()
    start = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        if i == profile_at:
            profiler = profile_kernels(kernel_times)
            profiler.__enter__()
        t0 = time.perf_counter()
        x, y = to_device(x, device), to_device(y, device)
        with precision.autocast():
            loss = task.loss(call_model(model, x), y)
        precision.backward(loss)
        stepped = precision.step(opt, max_grad_norm=config.max_grad_norm)
        value = float(loss.item())
        _synchronize(device)
        if i < profile_at:  # profiled steps are not timed
            result.step_times.append(time.perf_counter() - t0)
        result.steps_run, result.skipped_steps = i + 1, result.skipped_steps + (not stepped)
        result.losses.append(value)
        emit("step", {"recipe": name, "step": i + 1, "loss": value})
        if not math.isfinite(value):
            result.status, result.diverged_at = "diverged", i + 1
            break
        budget = result.budget_s
        if budget is not None and time.perf_counter() - start > budget and i + 1 < n:
            result.status = "truncated"
            break
    result.train_seconds = time.perf_counter() - start
    profiler.__exit__(None, None, None)
    result.tensor_core_share = tensor_core_share(kernel_times)
    if get_recipe(name).loss_scaling != "none":
        result.loss_scale = float(precision.scaler.get_scale())
    if result.status == "ok" and config.evaluate:
        with precision.autocast():
            result.metrics = task.evaluate(model)
        value = result.metrics.get(task.metric)
        if value is None or not math.isfinite(value):
            result.status, result.diverged_at = "diverged", result.steps_run
    return result


def run_bench(
    config: BenchConfig, *, task: Task | None = None, on_event: Event | None = None
) -> BenchResult:
    """Train every recipe of ``config`` on the task and measure it.

    Args:
        config: what to run.
        task: a ready task (else ``get_task(config.task, config.size, seed=config.seed)``).
        on_event: called as ``on_event(kind, info)`` with kind ``"recipe_start"`` (recipe,
            steps), ``"step"`` (recipe, step, loss) and ``"recipe_end"`` (recipe, result);
            progress bars hang on it. An exception it raises stops the bench like Ctrl-C
            when it is a KeyboardInterrupt, and propagates otherwise.

    Example:
        >>> result = run_bench(BenchConfig("mlp", "tiny", recipes=("bf16-mixed",), steps=3))
        >>> [r.recipe for r in result.recipes], result.recipes[1].status
        (['fp32', 'bf16-mixed'], 'ok')
    """
    emit = on_event or (lambda kind, info: None)
    task = task or get_task(config.task, config.size, seed=config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = config.steps or task.default_steps
    batches = list(task.train_batches(steps))
    base_model = task.build_model()
    names = config.recipe_list()
    multiples = sorted({16 if get_recipe(n).fp8 != "off" else 8 for n in names})
    flops = _flops_per_step(base_model, task, batches[0])
    result = BenchResult(
        config=config,
        task=task,
        device=_device_info(device),
        parameters=sum(p.numel() for p in base_model.parameters()),
        flops_per_step=flops,
        shape_issues={m: shape_check(base_model, m, convs=m == 8) for m in multiples},
        steps=steps,
    )
    t0 = time.perf_counter()
    for name in names:
        try:
            ref = result.reference
            ref_s = ref.train_seconds if ref is not None and ref.status == "ok" else None
            r = _train_recipe(name, base_model, task, batches, config, device, emit, ref_s)
        except KeyboardInterrupt:
            result.interrupted = name
            break
        except Exception as exc:  # a recipe that cannot run is reported; the bench goes on
            r = RecipeResult(recipe=name, status="failed", error=f"{type(exc).__name__}: {exc}")
        result.recipes.append(r)
        try:
            emit("recipe_end", {"recipe": name, "result": r})
        except KeyboardInterrupt:
            result.interrupted = name
            break
    if config.numerics_steps and not result.interrupted:
        model = copy.deepcopy(base_model).to(device)
        result.monitor, result.numerics = watch_numerics(
            model, task, batches[: config.numerics_steps], device
        )
    result.seconds = time.perf_counter() - t0
    return result


def _flops_per_step(model: torch.nn.Module, task: Task, batch) -> int | None:
    x, y = batch
    try:
        return count_flops(
            copy.deepcopy(model), lambda m: task.loss(call_model(m, x), y).backward()
        )
    except Exception:  # counting is best effort: an op the counter cannot trace
        return None
