"""Measured training memory: real steps through :class:`mixprec.Precision`, peak and breakdown.

On CUDA the numbers come from the caching allocator (``torch.cuda.max_memory_allocated``);
on a CPU from the allocator's own events as the profiler records them
(``torch.profiler.profile(profile_memory=True)``: one event per allocation and free, with
its size), so the same comparison with :func:`~mixprec.memory.estimate` runs on a CPU.
Nothing intercepts the ops of the measured run (no ``TorchDispatchMode``: under one,
autograd accumulates gradients out of place and the run would hold more than it does)::

    live(t) = live(phase start) + sum of event sizes up to t     peak = max over t

Each step is split into three phases: ``forward`` (model and loss under the recipe's
autocast), ``backward`` and ``step`` (unscale, check, optimizer step, zero grads). At the
start of each phase the live memory is split by owner; the breakdown of the peak is that
split at the start of the peak's phase plus what the phase added::

    peak = weights + gradients + optimizer (states and masters) + activations + other
           + phase transient
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixprec.memory.calls import call_model, default_loss, loss_of
from mixprec.memory.fp8 import prepare_fp8
from mixprec.memory.tracker import storages_of
from mixprec.recipes import Recipe, get_recipe

__all__ = ["MeasuredMemory", "default_loss", "measure"]

PHASES = ("forward", "backward", "step")


@dataclass(frozen=True, slots=True)
class MeasuredMemory:
    """What a few real training steps held at their peak.

    Args:
        peak: largest live tensor memory during the training steps, in bytes.
        peak_phase: ``"forward"``, ``"backward"`` or ``"step"``, where the peak happened.
        breakdown: ``(part, bytes)`` pairs summing to ``peak``: weights, gradients,
            optimizer (states and master copies), activations (what the forward pass
            left for backward, when the peak is in backward), other (the batch, loss
            scaler, compensation buffers, ...) and ``"<phase> transient"``.
        phase_peaks: ``(phase, bytes)``, the peak of each phase over all steps.
        setup: live bytes right after ``Precision.setup`` (before the first step).
        device: the device the model ran on.
        steps: training steps run.
        source: ``"cuda-allocator"`` or ``"cpu-profiler-memory-events"``.
    """

    peak: int
    peak_phase: str
    breakdown: tuple[tuple[str, int], ...]
    phase_peaks: tuple[tuple[str, int], ...]
    setup: int
    device: str
    steps: int
    source: str

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "peak": self.peak,
            "peak_phase": self.peak_phase,
            "breakdown": dict(self.breakdown),
            "phase_peaks": dict(self.phase_peaks),
            "setup": self.setup,
            "device": self.device,
            "steps": self.steps,
            "source": self.source,
        }


def _optimizer_tensors(optimizer) -> tuple[list, list]:
    """(states, params) reachable from a torch optimizer or a wrapper holding one."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if hasattr(optimizer, "param_groups") and hasattr(optimizer, "state"):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            return list(optimizer.state.values()), params
        optimizer = getattr(optimizer, "optimizer", None)
    return [], []


def _owners(model: nn.Module, optimizer) -> dict[str, list[torch.UntypedStorage]]:
    params = list(model.parameters())
    states, opt_params = _optimizer_tensors(optimizer)
    model_ids = {id(p) for p in params}
    masters = [p for p in opt_params if id(p) not in model_ids]
    grads = [p.grad for p in params + masters if p.grad is not None]
    return {
        "weights": storages_of(params),
        "gradients": storages_of(grads),
        "optimizer": storages_of([states, masters]),
    }


def measure(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    recipe: str | Recipe,
    batch: tuple[Any, Any],
    steps: int = 3,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    fp8_config=None,
) -> MeasuredMemory:
    """Run ``steps`` training steps with ``recipe`` and report the peak memory.

    The model and optimizer are set up by ``Precision(recipe).setup`` (changed in place).
    Setup is tracked too, but the reported peak covers the training steps only.

    Args:
        model: an fp32 model on its device.
        optimizer: its optimizer (e.g. AdamW over ``model.parameters()``).
        recipe: recipe name or :class:`~mixprec.Recipe`.
        batch: ``(inputs, targets)`` on the model's device, reused for every step;
            ``inputs`` a tensor, tuple or dict, the output a tensor, tuple, dict or
            ModelOutput (see :mod:`mixprec.memory.calls`); ``targets`` may be None when
            the model computes its own loss.
        steps: training steps (the first creates the optimizer states; later ones show
            the steady state).
        loss_fn: ``loss_fn(outputs, targets)``; default: the model's own loss, else
            :func:`default_loss`.
        fp8_config: for fp8 recipes, the :class:`~mixprec.float8.Float8Config` the model
            is converted with before setup (default: the recipe's; a model already
            converted keeps its layers, and a different ``fp8_config`` is a ValueError).

    Returns:
        :class:`MeasuredMemory`.

    Example:
        >>> m = nn.Linear(64, 8); opt = torch.optim.AdamW(m.parameters())
        >>> r = measure(m, opt, "fp32", (torch.randn(4, 64), torch.randint(8, (4,))))
        >>> r.peak > 16 * (64 * 8 + 8)  # weights, grads and two Adam states at 4 B
        True
    """
    from mixprec.precision import Precision

    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    recipe = get_recipe(recipe)
    prepare_fp8(model, recipe, fp8_config)  # setup keeps this conversion
    inputs, targets = batch
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    cuda = device.type == "cuda"
    precision = Precision(recipe)

    baseline = [list(model.parameters()), list(model.buffers()), batch]
    baseline += list(_optimizer_tensors(optimizer))
    storages = storages_of(baseline)
    live = sum(st.nbytes() for st in storages)
    meter = _CudaMeter(device, live) if cuda else _ProfilerMeter(live, storages)
    # drop the references: setup replaces the parameters, and a list here would keep the
    # old ones alive (a measurement artefact of 4 B per parameter under bf16 recipes)
    del baseline, storages, first
    best = (-1, "", ())
    peaks = dict.fromkeys(PHASES, 0)
    with meter.phase():
        model, optimizer = precision.setup(model, optimizer)
    setup_bytes = meter.live
    for _ in range(steps):
        holder: dict = {}
        for phase in PHASES:
            start = meter.live
            owners = {k: sum(s.nbytes() for s in v) for k, v in _owners(model, optimizer).items()}
            rest = start - sum(owners.values())
            if phase == "forward":
                other_before = rest  # the batch, scaler, buffers: alive across steps
            # What the forward pass left for backward is its activations (and loss).
            owners["activations"] = max(rest - other_before, 0) if phase == "backward" else 0
            owners["other"] = rest - owners["activations"]
            with meter.phase():
                if phase == "forward":
                    with precision.autocast():
                        holder["loss"] = loss_of(call_model(model, inputs), targets, loss_fn)
                elif phase == "backward":
                    precision.backward(holder.pop("loss"))
                else:
                    precision.step(optimizer)
            peak = meter.peak
            peaks[phase] = max(peaks[phase], peak)
            if peak >= best[0]:
                parts = (*owners.items(), (f"{phase} transient", peak - start))
                best = (peak, phase, parts)
    peak, peak_phase, parts = best
    return MeasuredMemory(
        peak=peak,
        peak_phase=peak_phase,
        breakdown=tuple(parts),
        phase_peaks=tuple(peaks.items()),
        setup=setup_bytes,
        device=str(device),
        steps=steps,
        source=meter.source,
    )


def _storage_bytes(obj) -> int:
    return sum(s.nbytes() for s in storages_of(obj))


def allocation_events(prof) -> list[tuple[int, int, int]]:
    """``(time ns, address, bytes)`` of every CPU allocation (+) and free (-) the profiler
    recorded, in time order (from its event tree, which keeps the block's address)."""
    from torch._C._profiler import _EventType

    out, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            if str(f.device).startswith("cpu"):
                out.append((node.start_time_ns, f.ptr, f.alloc_size))
    out.sort()
    return out


class AllocationReplay:
    """Live bytes replayed from allocator events, by address.

    A free counts only for a block whose allocation was seen (its size is the one seen
    then): the allocator's size table can hold stale entries for reused addresses of
    blocks allocated while no profiler ran, and reports their frees with a wrong size.
    """

    def __init__(self, live: int) -> None:
        self.live = live
        self.known: dict[int, int] = {}

    def apply(self, events, lo: int | None = None, hi: int | None = None) -> int:
        """Apply events (only those in ``[lo, hi]`` ns when given); return the peak."""
        peak = self.live
        for t, ptr, nbytes in events:
            if (lo is not None and t < lo) or (hi is not None and t > hi):
                continue
            if nbytes > 0:
                self.known[ptr] = nbytes
                self.live += nbytes
                peak = max(peak, self.live)
            elif ptr in self.known:
                self.live -= self.known.pop(ptr)
        return peak


class _ProfilerMeter:
    """Live and peak bytes on a CPU from the profiler's allocator events, phase by phase.

    ``live`` starts at the bytes alive before measuring; each :meth:`phase` replays that
    phase's allocations and frees in time order (:class:`AllocationReplay`): ``peak`` is
    the largest running sum, ``live`` its end. The storages alive before measuring (the
    parameters that setup replaces) are counted out when they are released.
    """

    source = "cpu-profiler-memory-events"

    def __init__(self, live: int, storages: list[torch.UntypedStorage]) -> None:
        self.replay = AllocationReplay(live)
        self.live = self.peak = live
        self._freed_before: list[int] = []
        for st in storages:
            weakref.finalize(st, self._freed_before.append, st.nbytes())

    @contextlib.contextmanager
    def phase(self):
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with prof:
            yield
        self.peak = self.replay.apply(allocation_events(prof))
        self.replay.live -= sum(self._freed_before)
        self._freed_before.clear()
        self.live = self.replay.live


class _CudaMeter:
    """Live and peak bytes from the CUDA caching allocator, relative to the start."""

    source = "cuda-allocator"

    def __init__(self, device: torch.device, live: int) -> None:
        self.device = device
        torch.cuda.synchronize(device)
        # memory that is not this model's (another model on the device) is left out
        self._offset = torch.cuda.memory_allocated(device) - live
        self.live = self.peak = live

    @contextlib.contextmanager
    def phase(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        torch.cuda.synchronize(self.device)
        self.live = torch.cuda.memory_allocated(self.device) - self._offset
        self.peak = torch.cuda.max_memory_allocated(self.device) - self._offset
