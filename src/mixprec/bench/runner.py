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
  rounds of fp32's round time / the recipe's in the same round, with a bootstrap interval.
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

import contextlib
import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from mixprec.bench.analysis import count_flops, shape_check, tensor_core_share
from mixprec.bench.cores import choose_threads
from mixprec.bench.probes import (
    PROBE_ERRORS,
    device_info,
    estimate_memory,
    measure_memory,
    profile_kernels,
    watch_numerics,
    why_failed,
)
from mixprec.bench.results import DEFAULT_RECIPES, BenchConfig, BenchResult, RecipeResult
from mixprec.bench.rounds import interleave
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


def _to_host(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor in host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


class _RecipeRun:
    """One recipe's training, a round at a time; its state is kept between rounds."""

    def __init__(self, name, base_model, task, batches, config, device, emit, offload, timed):
        self.name, self.task, self.batches, self.config = name, task, batches, config
        self.device, self.emit, self.offload, self.timed = device, emit, offload, timed
        self.base_model = base_model
        self.result = RecipeResult(recipe=name, timed_from=0)
        self.next = 0
        self._batch_iter = iter(batches)  # produced as consumed (Batches)
        self.done = False
        self.model = self.precision = self.opt = None
        self.saved: dict[str, Any] | None = None
        self.kernel_times: dict[str, float] = {}
        emit("recipe_start", {"recipe": name, "steps": len(batches)})
        if config.memory_steps:
            _probe_memory(name, base_model, task, batches[0], config, device, self.result)
        torch.manual_seed(config.seed)
        self._build()
        self.rng = self._get_rng()
        if offload:
            self._park()

    # -- state kept between rounds ---------------------------------------------------------
    def _build(self) -> None:
        from mixprec.precision import Precision

        model = copy.deepcopy(self.base_model).to(self.device)
        self.precision = Precision(self.name)
        self.model, self.opt = self.precision.setup(model, self.task.build_optimizer(model))

    def _get_rng(self) -> dict[str, torch.Tensor]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _set_rng(self) -> None:
        torch.set_rng_state(self.rng["cpu"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state(self.rng["cuda"], self.device)

    def _park(self) -> None:
        """Copy model, optimizer and precision state to host memory; free the device copy."""
        self.saved = {
            "model": _to_host(self.model.state_dict()),
            "optimizer": _to_host(self.opt.state_dict()),
            "precision": _to_host(self.precision.state_dict()),
        }
        self.model = self.precision = self.opt = None

    def _resume(self) -> None:
        if self.saved is None:
            return
        self._build()
        self.model.load_state_dict(self.saved["model"])
        self.opt.load_state_dict(self.saved["optimizer"])
        self.precision.load_state_dict(self.saved["precision"])
        self.saved = None

    # -- the rounds ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return not self.done and self.result.status == "ok" and self.next < len(self.batches)

    def run_round(self, round_index: int, steps: int) -> None:
        """Train the next ``steps`` steps; time them when the round is a timed one."""
        try:
            self._resume()
            self._set_rng()
            timed = round_index in self.timed
            profile = timed and round_index == self.timed[-1] and self.device.type == "cuda"
            profile = profile and len(self.timed) >= 4  # last round profiled, not timed
            context = (
                profile_kernels(self.kernel_times, self.result.missing)
                if profile
                else contextlib.nullcontext()
            )
            with context:
                times = self._steps(steps)
            if timed and not profile and times:
                self.result.step_times.extend(times)
                self.result.round_times[round_index] = sum(times) / len(times)
            elif not timed:
                self.result.warmup_times.extend(times)
            if not self.running:
                self.finish()
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            # Boundary, broad on purpose: the recipe runs the user's model, which may raise
            # anything. The recipe is marked failed with the exception's type and message
            # (the reasons under the recommendation, results.json "error"); the bench goes on.
            self.result.status, self.result.error = "failed", f"{type(exc).__name__}: {exc}"
            self.finish()
            return
        self.rng = self._get_rng()
        if self.offload and not self.done:
            self._park()

    def _steps(self, steps: int) -> list[float]:
        r, times = self.result, []
        for _ in range(steps):
            if self.next >= len(self.batches):
                break
            x, y = next(self._batch_iter)  # in order: one pass over the batches
            t0 = time.perf_counter()
            x, y = to_device(x, self.device), to_device(y, self.device)
            with self.precision.autocast():
                loss = self.task.loss(call_model(self.model, x), y)
            self.precision.backward(loss)
            stepped = self.precision.step(self.opt, max_grad_norm=self.config.max_grad_norm)
            value = float(loss.item())
            _synchronize(self.device)
            dt = time.perf_counter() - t0
            times.append(dt)
            r.train_seconds += dt
            self.next += 1
            r.steps_run, r.skipped_steps = self.next, r.skipped_steps + (not stepped)
            r.losses.append(value)
            self.emit("step", {"recipe": self.name, "step": self.next, "loss": value})
            if not math.isfinite(value):
                r.status, r.diverged_at = "diverged", self.next
                break
        return times

    def finish(self) -> None:
        """Loss scale, evaluation (finished recipes), then free the model; emits recipe_end."""
        if self.done:
            return
        self.done = True
        r = self.result
        try:
            if r.status != "failed":
                self._resume()
                r.tensor_core_share = tensor_core_share(self.kernel_times)
                if get_recipe(self.name).loss_scaling != "none":
                    r.loss_scale = float(self.precision.scaler.get_scale())
                if r.status == "ok" and self.config.evaluate:
                    with self.precision.autocast():
                        r.metrics = self.task.evaluate(self.model)
                    value = r.metrics.get(self.task.metric)
                    if value is None or not math.isfinite(value):
                        r.status, r.diverged_at = "diverged", r.steps_run
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            # Boundary, broad on purpose: evaluation runs the user's model (and a task's
            # evaluate). Reported as failed with type and message; the bench goes on.
            r.status, r.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            self.model = self.precision = self.opt = self.saved = None
        self.emit("recipe_end", {"recipe": self.name, "result": r})


def _check_budgets(runs: list[_RecipeRun], config: BenchConfig, n: int) -> None:
    """After a round: stop (truncate) every recipe whose training time passed its budget."""
    ref = runs[0].result  # fp32
    projected = ref.train_seconds * n / ref.steps_run if ref.steps_run else None
    for run in runs[1:]:
        budget = _budget(run.name, config, projected)
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
    if device.type != "cpu":
        return _run_bench(config, task, on_event, device)
    choice = choose_threads(config.threads)  # ValueError for a bad count
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
    runs: list[_RecipeRun] = []
    results: dict[str, RecipeResult] = {}
    current = {"name": None}
    try:
        for name in names:
            current["name"] = name
            try:
                run = _RecipeRun(
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

    def __init__(self, run: _RecipeRun, current: dict) -> None:
        self.run, self.current, self.name = run, current, run.name

    @property
    def running(self) -> bool:
        return self.run.running

    def run_round(self, round_index: int, steps: int) -> None:
        self.current["name"] = self.name
        self.run.run_round(round_index, steps)


def _finished(runs: list[_RecipeRun], name: str, r: RecipeResult) -> bool:
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
