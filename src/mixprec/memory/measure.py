"""Measured training memory: real steps through :class:`mixprec.Precision`, peak and breakdown.

On CUDA the numbers come from the caching allocator (``torch.cuda.max_memory_allocated``);
on any other device from :class:`~mixprec.memory.tracker.StorageTracker`, which counts live
tensor storage op by op, so the same comparison with :func:`~mixprec.memory.estimate` runs
on a CPU.

Each step is split into three phases: ``forward`` (model and loss under the recipe's
autocast), ``backward`` and ``step`` (unscale, check, optimizer step, zero grads). At the
start of each phase the live memory is split by owner; the breakdown of the peak is that
split at the start of the peak's phase plus what the phase added::

    peak = weights + gradients + optimizer (states and masters) + activations + other
           + phase transient
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.memory.tracker import StorageTracker, storages_of
from mixprec.recipes import Recipe, get_recipe

__all__ = ["MeasuredMemory", "measure"]

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
        source: ``"cuda-allocator"`` or ``"storage-tracker"``.
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


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer targets (logits on the last dim), else mean squared error."""
    if not targets.is_floating_point():
        return F.cross_entropy(outputs.float().flatten(0, -2), targets.flatten())
    return F.mse_loss(outputs.float(), targets.float())


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
    batch: tuple[torch.Tensor, torch.Tensor],
    steps: int = 3,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> MeasuredMemory:
    """Run ``steps`` training steps with ``recipe`` and report the peak memory.

    The model and optimizer are set up by ``Precision(recipe).setup`` (changed in place).
    Setup is tracked too, but the reported peak covers the training steps only.

    Args:
        model: an fp32 model on its device.
        optimizer: its optimizer (e.g. AdamW over ``model.parameters()``).
        recipe: recipe name or :class:`~mixprec.Recipe`.
        batch: ``(inputs, targets)`` on the model's device, reused for every step.
        steps: training steps (the first creates the optimizer states; later ones show
            the steady state).
        loss_fn: ``loss_fn(outputs, targets)``; default :func:`default_loss`.

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
    loss_fn = loss_fn or default_loss
    inputs, targets = batch
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    cuda = device.type == "cuda"
    precision = Precision(recipe)

    tracker = StorageTracker()
    baseline = [list(model.parameters()), list(model.buffers()), batch]
    baseline += list(_optimizer_tensors(optimizer))
    tracker.track(baseline)
    offset = 0
    if cuda:
        torch.cuda.synchronize(device)
        offset = torch.cuda.memory_allocated(device) - tracker.live

    def live() -> int:
        return torch.cuda.memory_allocated(device) - offset if cuda else tracker.live

    def phase_peak() -> int:
        if cuda:
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - offset
        return tracker.peak

    def reset() -> None:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            tracker.reset_peak()

    best = (-1, "", ())
    peaks = dict.fromkeys(PHASES, 0)
    mode = tracker if not cuda else _Null()
    with mode:
        model, optimizer = precision.setup(model, optimizer)
        setup_bytes = live()
        for _ in range(steps):
            holder: dict = {}
            for phase in PHASES:
                start = live()
                owners = {
                    k: sum(s.nbytes() for s in v) for k, v in _owners(model, optimizer).items()
                }
                rest = start - sum(owners.values())
                if phase == "forward":
                    other_before = rest  # the batch, scaler, buffers: alive across steps
                # What the forward pass left for backward is its activations (and loss).
                owners["activations"] = max(rest - other_before, 0) if phase == "backward" else 0
                owners["other"] = rest - owners["activations"]
                reset()
                if phase == "forward":
                    with precision.autocast():
                        holder["loss"] = loss_fn(model(inputs), targets)
                elif phase == "backward":
                    precision.backward(holder.pop("loss"))
                else:
                    precision.step(optimizer)
                peak = phase_peak()
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
        source="cuda-allocator" if cuda else "storage-tracker",
    )


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
