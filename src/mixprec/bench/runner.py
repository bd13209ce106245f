"""Run recipes side by side on one task and measure them (rendering lives in :mod:`.report`).

Every recipe starts from the same initial weights (the model is built once and deep-copied),
reads the same batches in the same order (produced as training consumes them, see
:class:`~mixprec.bench.tasks.Batches`) and is seeded the same way;
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
import time
from collections.abc import Callable
from typing import Any

import torch

from mixprec.bench.analysis import count_flops, shape_check, tensor_core_share
from mixprec.bench.probes import (
    device_info,
    estimate_memory,
    measure_memory,
    profile_kernels,
    watch_numerics,
)
from mixprec.bench.results import DEFAULT_RECIPES, BenchConfig, BenchResult, RecipeResult
from mixprec.bench.tasks import Batches, Task, get_task
from mixprec.bench.user import call_model, to_device
from mixprec.recipes import get_recipe

__all__ = ["DEFAULT_RECIPES", "BenchConfig", "BenchResult", "RecipeResult", "run_bench"]

Event = Callable[[str, dict[str, Any]], None]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _probe_memory(name, base_model, task, batch, config, device, result) -> None:
    model = copy.deepcopy(base_model).to(device)
    batch = to_device(batch, device)
    estimated = estimate_memory(model, name, batch, task.loss)  # traces a copy of model
    result.estimated_memory_bytes = estimated.get("peak")
    steps = config.memory_steps
    measured = measure_memory(model, task.build_optimizer(model), name, batch, task.loss, steps)
    result.peak_memory_bytes = measured.get("peak")
    # the source, or why a figure is missing (the report prints it in the figure's place)
    errors = [d["error"] for d in (measured, estimated) if "error" in d]
    result.memory_source = "; ".join(errors) if errors else measured["source"]


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
    batches = Batches(task, steps)  # produced as consumed, the same for every recipe
    base_model = task.build_model()
    names = config.recipe_list()
    multiples = sorted({16 if get_recipe(n).fp8 != "off" else 8 for n in names})
    flops = _flops_per_step(base_model, task, batches[0])
    result = BenchResult(
        config=config,
        task=task,
        device=device_info(device),
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
        try:
            result.monitor, result.numerics = watch_numerics(
                model, task, batches[: config.numerics_steps], device
            )
        except KeyboardInterrupt:  # every recipe finished: keep them, skip the histogram
            result.interrupted = "numerics monitor"
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
