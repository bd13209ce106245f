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

Design: every recipe trains on the same steps in *interleaved rounds*
(:mod:`mixprec.bench.rounds`): round 0 runs the ``warmup`` steps of every recipe (not
timed), each later round ``round_steps`` steps of every recipe still running, in a fresh
random order. Each recipe keeps its own model, optimizer, precision state and RNG state
between rounds, so its training is exactly the one it would have in one block (same
weights, batches, order and random numbers; tested bit for bit). With ``offload`` (the
default on a GPU) only the recipe being run is on the device: at the end of its round its
state dicts are copied to host memory and the model freed, and the next round rebuilds it
from them, so the device holds one model's memory at a time, never N.

Measured per recipe (formulas; see also :mod:`.analysis` and :mod:`.rounds`):

* step time: wall clock of each step of the timed rounds (on a GPU the device is
  synchronised before the clock stops); reported as median and IQR = q3 - q1.
* round time: mean step time of the recipe in one round; speed-up over fp32 = median over
  rounds of fp32's round time / the recipe's in the same round, with a distribution-free
  interval for that median.
* items/s = ``task.items_per_batch`` / median step time (samples or tokens).
* skipped steps: steps where ``precision.step`` returned False (non-finite gradients).
* peak memory: the largest memory in use during the recipe's steps, measured by
  :mod:`mixprec.memory` where it is available, else ``torch.cuda.max_memory_allocated``
  on a GPU; the :mod:`mixprec.memory` estimate for the model and recipe beside it.
* diverged: the first step (1-based) whose loss is not finite; the recipe stops there.
* truncated: after a round, a recipe whose training time passed its budget stops: the
  smaller of ``config.recipe_budget_s`` seconds and ``config.budget_vs_fp32`` times fp32's
  training time for all the steps (projected from its steps so far: seconds so far x
  steps / steps run), but not less than ``config.budget_floor_s``. Its speed is measured on
  the rounds it ran; its quality is not compared (not evaluated). fp32 always finishes.

A ``KeyboardInterrupt`` stops the bench: the result holds every recipe that had finished
(rounds interleave, so often none but fp32 or none at all) and ``interrupted`` names the
recipe that was running.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch

from mixprec.bench.analysis import count_flops, shape_check
from mixprec.bench.cores import choose_threads
from mixprec.bench.probes import (
    PROBE_ERRORS,
    device_info,
    watch_numerics,
    why_failed,
)
from mixprec.bench.recipe_run import RecipeRun, budget_for
from mixprec.bench.results import DEFAULT_RECIPES, BenchConfig, BenchResult, RecipeResult
from mixprec.bench.rounds import interleave
from mixprec.bench.tasks import Batches, Task, get_task
from mixprec.bench.user import call_model
from mixprec.recipes import get_recipe

__all__ = ["DEFAULT_RECIPES", "BenchConfig", "BenchResult", "RecipeResult", "run_bench"]

Event = Callable[[str, dict[str, Any]], None]


def _check_budgets(runs: list[RecipeRun], config: BenchConfig, n: int) -> None:
    """After a round: stop (truncate) every recipe whose training time passed its budget."""
    ref = runs[0].result  # fp32
    projected = ref.train_seconds * n / ref.steps_run if ref.steps_run else None
    for run in runs[1:]:
        budget = budget_for(run.name, config, projected)
        run.result.budget_s = budget
        if run.running and budget is not None and run.result.train_seconds > budget:
            run.result.status = "truncated"
            run.finish()


def run_bench(
    config: BenchConfig, *, task: Task | None = None, on_event: Event | None = None
) -> BenchResult:
    """Train every recipe of ``config`` on the task in interleaved rounds and measure it.

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
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    choice = choose_threads(config.threads)  # host threads, on a GPU too; ValueError if bad
    restore = torch.get_num_threads()
    torch.set_num_threads(choice.threads)
    try:
        result = _run_bench(config, task, on_event, device)
    finally:
        torch.set_num_threads(restore)
    result.device.update(threads_note=choice.note, threads_before=choice.before)
    return result


def _run_bench(
    config: BenchConfig, task: Task | None, on_event: Event | None, device: torch.device
) -> BenchResult:
    emit = on_event or (lambda kind, info: None)
    task = task or get_task(config.task, config.size, seed=config.seed)
    offload = config.offload if config.offload is not None else device.type != "cpu"
    steps = config.steps or task.default_steps
    batches = Batches(task, steps)  # produced as consumed, the same for every recipe
    base_model = task.build_model()
    names = config.recipe_list()
    multiples = sorted({16 if get_recipe(n).fp8 != "off" else 8 for n in names})
    missing: dict[str, str] = {}
    flops = _flops_per_step(base_model, task, batches[0], missing)
    result = BenchResult(
        config=config,
        task=task,
        device=device_info(device),
        parameters=sum(p.numel() for p in base_model.parameters()),
        flops_per_step=flops,
        shape_issues={m: shape_check(base_model, m, convs=m == 8) for m in multiples},
        steps=steps,
        offloaded=offload,
        missing=missing,
    )
    plan = config.round_plan(steps)
    timed = list(range(1 if config.warmup and len(plan) > 1 else 0, len(plan)))
    t0 = time.perf_counter()
    runs: list[RecipeRun] = []
    results: dict[str, RecipeResult] = {}
    current = {"name": None}
    try:
        for name in names:
            current["name"] = name
            try:
                run = RecipeRun(
                    name, base_model, task, batches, config, device, emit, offload, timed
                )
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                # Boundary, broad on purpose: setup copies and converts the user's model
                # and builds its optimizer. Reported as failed with type and message.
                results[name] = RecipeResult(
                    recipe=name, status="failed", error=f"{type(exc).__name__}: {exc}"
                )
                emit("recipe_end", {"recipe": name, "result": results[name]})
                continue
            runs.append(run)
            results[name] = run.result
        tracked = [_Tracked(run, current) for run in runs]
        result.round_orders = interleave(
            tracked,
            plan,
            seed=config.seed,
            after_round=lambda r: _check_budgets(runs, config, steps) if runs else None,
        )
        for run in runs:
            run.finish()
    except KeyboardInterrupt:
        result.interrupted = current["name"]
        results = {n: r for n, r in results.items() if _finished(runs, n, r)}
    result.recipes = [results[n] for n in names if n in results]
    if config.numerics_steps and not result.interrupted:
        model = copy.deepcopy(base_model).to(device)
        try:
            result.monitor, result.numerics = watch_numerics(
                model, task, batches[: config.numerics_steps], device, result.loss_scales()
            )
        except KeyboardInterrupt:  # every recipe finished: keep them, skip the histogram
            result.interrupted = "numerics monitor"
        except PROBE_ERRORS as exc:  # the report says why it has no numerics section
            result.missing["numerics"] = why_failed("the numerics monitor", exc)
    result.seconds = time.perf_counter() - t0
    return result


class _Tracked:
    """A run that notes its name as the one running (for ``interrupted``)."""

    def __init__(self, run: RecipeRun, current: dict) -> None:
        self.run, self.current, self.name = run, current, run.name

    @property
    def running(self) -> bool:
        return self.run.running

    def run_round(self, round_index: int, steps: int) -> None:
        self.current["name"] = self.name
        self.run.run_round(round_index, steps)


def _finished(runs: list[RecipeRun], name: str, r: RecipeResult) -> bool:
    run = next((x for x in runs if x.name == name), None)
    return run is None or run.done


def _flops_per_step(
    model: torch.nn.Module, task: Task, batch, missing: dict[str, str]
) -> int | None:
    """FLOPs of one forward and backward (FlopCounterMode); None, with
    ``missing["flops_per_step"]`` saying why, when the counter cannot run the model."""
    x, y = batch
    try:
        return count_flops(
            copy.deepcopy(model), lambda m: task.loss(call_model(m, x), y).backward()
        )
    except PROBE_ERRORS as exc:
        missing["flops_per_step"] = why_failed("FLOP counting", exc)
        return None
