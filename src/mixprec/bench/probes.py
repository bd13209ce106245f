"""Side measurements of a bench recipe: memory (measured and estimated) and GPU kernel time.

They run apart from the timed training steps, so that their instrumentation does not
slow the steps being timed:

* measured peak memory: :func:`mixprec.memory.measure` runs ``steps`` extra training steps
  on a copy of the model (CUDA allocator on a GPU, live-storage tracker on a CPU);
* estimated memory: :func:`mixprec.memory.estimate` for the model, recipe and batch;
* tensor-core share: ``torch.profiler`` over a few training steps on a GPU (see
  :func:`mixprec.bench.analysis.tensor_core_share`).
"""

from __future__ import annotations

import contextlib
import copy
import platform
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "NUMERICS_FORMATS",
    "PROBE_ERRORS",
    "device_info",
    "estimate_memory",
    "measure_memory",
    "profile_kernels",
    "watch_numerics",
    "why_failed",
]

NUMERICS_FORMATS = ("fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")

PROBE_ERRORS: tuple[type[Exception], ...] = (RuntimeError, ValueError, TypeError)
"""What a side measurement may fail with and the bench goes on without its figure: torch's
errors (RuntimeError and its subclasses NotImplementedError and OutOfMemoryError) and
mixprec's refusals of a model it does not cover (ValueError, TypeError). The reason goes
into the report in the figure's place. Anything else is a defect and propagates."""

# torch.profiler asserts (AssertionError) when none of its activities can record, e.g.
# CUDA without CUPTI; starting a second profiler is a RuntimeError.
_PROFILER_ERRORS: tuple[type[Exception], ...] = (RuntimeError, AssertionError)


def why_failed(what: str, exc: BaseException) -> str:
    """``"<what> failed (<type>: <message>)"``: the reason a report prints for a missing figure."""
    return f"{what} failed ({type(exc).__name__}: {exc})"


def measure_memory(
    model: nn.Module, optimizer: torch.optim.Optimizer, recipe: str, batch, loss_fn, steps: int = 2
) -> dict[str, Any]:
    """Peak bytes of ``steps`` training steps by :func:`mixprec.memory.measure`.

    ``model`` and ``optimizer`` are set up by the measurement (pass copies). Returns
    ``{"peak": bytes, "source": ..., "breakdown": {part: bytes}}``, or ``{"error": why}``
    when the measurement cannot run this model (one of :data:`PROBE_ERRORS`): the bench
    goes on and the report says why.
    """
    from mixprec.memory.measure import measure

    try:
        m = measure(model, optimizer, recipe, batch, steps=steps, loss_fn=loss_fn)
    except PROBE_ERRORS as exc:
        return {"error": why_failed("measure", exc)}
    return {"peak": int(m.peak), "source": m.source, "breakdown": dict(m.breakdown)}


def estimate_memory(model: nn.Module, recipe: str, batch, loss_fn) -> dict[str, Any]:
    """The :func:`mixprec.memory.estimate` peak for ``model``, ``recipe`` and ``batch``.

    The estimate traces one forward and backward pass of a copy of ``model`` on ``batch``
    for the activations. Returns ``{"peak": bytes, "parts": {part: bytes}}``, or
    ``{"error": why}`` when the estimate does not cover this model (one of
    :data:`PROBE_ERRORS`).
    """
    from mixprec.memory import estimate

    try:
        e = estimate(copy.deepcopy(model), recipe, batch=batch, loss_fn=loss_fn)
    except PROBE_ERRORS as exc:
        return {"error": why_failed("estimate", exc)}
    return {"peak": int(e.total), "parts": dict(e.parts)}


@contextlib.contextmanager
def profile_kernels(kernel_times: dict[str, float], missing: dict[str, str]) -> Iterator[None]:
    """Record GPU kernel time by kernel name into ``kernel_times`` (microseconds).

    When the profiler cannot start (no CUPTI, another profiler running) or its trace cannot
    be read, ``kernel_times`` stays empty, ``missing["tensor_core_share"]`` says why, and
    the steps inside still run.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        prof = profile(activities=[ProfilerActivity.CUDA])
        prof.__enter__()
    except _PROFILER_ERRORS as exc:
        missing["tensor_core_share"] = why_failed("the CUDA profiler", exc)
        yield
        return
    try:
        yield
    finally:
        try:
            prof.__exit__(None, None, None)
            torch.cuda.synchronize()
            for event in prof.key_averages():
                total = getattr(event, "device_time_total", None)
                if total is None:
                    total = getattr(event, "cuda_time_total", 0.0)
                cuda = getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
                if total and cuda:
                    kernel_times[event.key] = kernel_times.get(event.key, 0.0) + float(total)
        except _PROFILER_ERRORS as exc:  # unreadable trace: no tensor-core share
            kernel_times.clear()
            missing["tensor_core_share"] = why_failed("reading the CUDA profile", exc)


DEFAULT_LOSS_SCALE = 2.0**16  # the dynamic loss scaler's initial scale (torch's default)


def watch_numerics(
    model: nn.Module,
    task,
    batches: list,
    device: torch.device,
    loss_scales: dict[str, float] | None = None,
):
    """fp32 training steps of ``model`` on ``batches`` under :class:`mixprec.numerics.Monitor`.

    The verdicts judge each format as it is used (:mod:`mixprec.numerics.verdicts`): fp8
    after per-tensor scaling, on Linear layers; fp16 gradients after the loss scale of the
    bench's fp16 run (``loss_scales["fp16-mixed"]``, else the first fp16 recipe's, else
    the dynamic scaler's initial ``DEFAULT_LOSS_SCALE``).

    Returns ``(monitor, summary)`` (summary: formats, the loss scale assumed and, per
    module, which formats its activations and gradients fit in).

    Raises:
        RuntimeError, ValueError, TypeError: the monitor cannot watch this model (the
            runner reports why, see :data:`PROBE_ERRORS`).
    """
    scales = loss_scales or {}
    fp16 = [n for n in ("fp16-mixed", *sorted(scales)) if n in scales and "fp16" in n]
    loss_scale, scale_from = (
        (scales[fp16[0]], f"final loss scale of the {fp16[0]} run")
        if fp16
        else (DEFAULT_LOSS_SCALE, "the dynamic loss scaler's initial scale (no fp16 run)")
    )
    from mixprec.bench.user import call_model, to_device
    from mixprec.numerics import Monitor

    opt = task.build_optimizer(model)
    with Monitor(model, formats=NUMERICS_FORMATS) as monitor:
        for x, y in batches:
            x, y = to_device(x, device), to_device(y, device)
            task.loss(call_model(model, x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            monitor.step()
    monitor.readout()
    summary = {
        "source": "mixprec.numerics.Monitor (fp32 steps)",
        "steps": len(batches),
        "formats": list(NUMERICS_FORMATS),
        "loss_scale": loss_scale,
        "loss_scale_from": scale_from,
        "verdicts": [v.to_dict() for v in monitor.verdicts(loss_scale=loss_scale)],
    }
    return monitor, summary


def device_info(device: torch.device) -> dict[str, Any]:
    """type, name, threads, torch version; on a CPU its capability and AMX flags."""
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
