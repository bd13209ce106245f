"""One recipe inside the bench: its model, optimizer, precision and RNG state between
rounds, its timed steps, and the memory probe (see :mod:`mixprec.bench.runner`).

``RecipeRun.run_round`` resumes the recipe (rebuilding it from host copies when
offloaded), runs its next steps with the clock around each (on a GPU the device is
synchronised before the clock stops), and parks it again.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any

import torch

from mixprec.bench.analysis import tensor_core_share
from mixprec.bench.probes import (
    estimate_memory,
    measure_memory,
    profile_kernels,
)
from mixprec.bench.results import BenchConfig, RecipeResult
from mixprec.bench.user import call_model, to_device
from mixprec.recipes import get_recipe

__all__ = ["RecipeRun", "budget_for"]


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


def budget_for(name: str, config: BenchConfig, reference_seconds: float | None) -> float | None:
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


class RecipeRun:
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
