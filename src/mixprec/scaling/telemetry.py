"""What a loss scaler did: steps, skipped steps, scale history, first non-finite gradient.

A scaler's :class:`~mixprec.scaling.record.ScalerRecord` writes these on the device as it
runs (into a :class:`StepLog`) and turns them into a :class:`ScalerTelemetry` only when
asked: that read-out copies the record to the host (it syncs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixprec.scaling.kernels import NONE_INDEX

__all__ = ["ScaleFloorError", "ScalerTelemetry", "SkippedStep", "StepLog"]


class ScaleFloorError(RuntimeError):
    """The scale sits at its floor and steps keep overflowing: scaling cannot fix it."""


@dataclass(frozen=True, slots=True)
class SkippedStep:
    """One step whose gradients held an inf or NaN (the optimizer step was skipped).

    Args:
        step: 0-based index of the step (count of ``update`` calls before it).
        scale: the loss scale that step ran with.
        first_nonfinite: name of the first gradient (in the order given to ``unscale_``)
            that held an inf/NaN, or ``None`` when it was not located.
    """

    step: int
    scale: float
    first_nonfinite: str | None


@dataclass(frozen=True, slots=True)
class ScalerTelemetry:
    """A read-out of a scaler's record.

    Args:
        steps: ``update`` calls so far.
        steps_skipped: steps whose gradients overflowed.
        scale: the current scale.
        scale_history: the scale each of the last ``len(scale_history)`` steps ran with,
            oldest first (the record keeps the last ``history_len`` steps).
        history_start: step index of ``scale_history[0]``.
        skipped: the skipped steps among those recorded.

    ``steps_taken = steps - steps_skipped``; ``skip_rate = steps_skipped / steps``.
    """

    steps: int
    steps_skipped: int
    scale: float
    scale_history: tuple[float, ...]
    history_start: int
    skipped: tuple[SkippedStep, ...]

    @property
    def steps_taken(self) -> int:
        """Steps whose optimizer update ran: ``steps - steps_skipped``."""
        return self.steps - self.steps_skipped

    @property
    def skip_rate(self) -> float:
        """``steps_skipped / steps`` (0.0 before the first step)."""
        return self.steps_skipped / self.steps if self.steps else 0.0


class StepLog:
    """Ring buffers on the scale's device, written once per step with no host read.

    Per step ``i`` (slot ``i % capacity``): the scale the step ran with, whether it
    overflowed, and the index of the first non-finite gradient (``NONE_INDEX`` if none or
    not located). Gradient names stay on the host as references to the sequences the
    caller passed, resolved only when read.
    """

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.origin = 0  # first recorded step (later than 0 after a checkpoint is loaded)
        self.scale = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.overflow = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.first = torch.full((capacity,), NONE_INDEX, dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        # Per slot: tuple of (offset, names or None, call number) segments.
        self.names: list[tuple | None] = [None] * capacity

    def write(self, step: int, scale, overflow, first, segments) -> None:
        slot = step % self.capacity
        self.scale[slot].copy_(scale)
        self.overflow[slot].copy_(overflow)
        self.first[slot].copy_(first)
        self.names[slot] = segments
        self.skipped.add_(overflow)

    def name_at(self, step: int, steps: int, index: int | None = None) -> str | None:
        """Name of the first non-finite gradient of ``step`` (syncs), or None."""
        if step < max(self.origin, steps - self.capacity) or step >= steps:
            return None
        slot = step % self.capacity
        if index is None:
            index = int(self.first[slot].item())
        return _resolve(self.names[slot], index)

    def read(self, steps: int, current_scale: float) -> ScalerTelemetry:
        """Copy the record to the host (syncs) and assemble a :class:`ScalerTelemetry`."""
        count = min(steps - self.origin, self.capacity)
        start = steps - count
        order = [(start + k) % self.capacity for k in range(count)]
        scales = self.scale.tolist()
        overflow = self.overflow.tolist()
        first = self.first.tolist()
        skipped = tuple(
            SkippedStep(
                step=start + k,
                scale=scales[slot],
                first_nonfinite=_resolve(self.names[slot], first[slot]),
            )
            for k, slot in enumerate(order)
            if overflow[slot]
        )
        return ScalerTelemetry(
            steps=steps,
            steps_skipped=int(self.skipped.item()),
            scale=current_scale,
            scale_history=tuple(scales[slot] for slot in order),
            history_start=start,
            skipped=skipped,
        )


def _resolve(segments, index: int) -> str | None:
    if segments is None or index < 0 or index >= NONE_INDEX:
        return None
    for offset, names, call in reversed(segments):
        if index >= offset:
            local = index - offset
            if names is not None:
                return str(names[local])
            return f"grads[{local}]" if len(segments) == 1 else f"call {call}: grads[{local}]"
    return None
