"""What a loss scaler did: steps, skipped steps, scale history, first non-finite gradient.

The scaler records these on the device as it runs (see :class:`StepLog`) and turns them
into a :class:`ScalerTelemetry` only when asked, which is the one host read.
:class:`ScalerRecord` holds the scaler's queries on that record and its floor check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixprec.scaling.kernels import NONE_INDEX

__all__ = ["ScaleFloorError", "ScalerRecord", "ScalerTelemetry", "SkippedStep", "StepLog"]


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


class ScalerRecord:
    """The queries on a :class:`~mixprec.scaling.LossScaler`'s record and its floor check.

    The half of ``LossScaler`` that reads what it recorded; ``LossScaler`` (which extends
    it) sets up the state used here: ``enabled``, ``config``, ``floor_patience``, ``_scale``,
    ``_log`` (a :class:`StepLog`), ``_steps``, ``_floor_scanned``, ``_floor_streak`` and
    ``_overflow_run``,
    and provides ``_ensure_state`` and ``get_scale``.
    """

    @property
    def steps(self) -> int:
        """Number of :meth:`update` calls (known on the host)."""
        return self._steps

    @property
    def steps_skipped(self) -> torch.Tensor:
        """Steps whose gradients overflowed (int64 0-dim tensor, no sync)."""
        self._ensure_state(None)
        return self._log.skipped.clone()

    @property
    def steps_taken(self) -> torch.Tensor:
        """Steps whose optimizer update ran: ``steps - steps_skipped`` (tensor, no sync)."""
        return self._steps - self.steps_skipped

    def check(self) -> None:
        """Raise :class:`ScaleFloorError` if, among the steps not yet checked,
        ``floor_patience`` consecutive ones overflowed with the scale at its floor
        (``config.floor`` = ``max(min_scale, 2^-126)``). Off with ``framework_exact``.

        Scans the on-device record of those steps on the host (one copy of the record,
        so one sync). Steps that left the record (more than ``history_len`` since the
        last check) are not seen. One error covers all steps recorded so far.
        """
        config = self.config
        if not self.enabled or self._scale is None or config.framework_exact:
            return
        if not config.dynamic:
            return
        log = self._log
        start = max(self._floor_scanned, log.origin, self._steps - log.capacity)
        if start > self._floor_scanned:
            self._floor_streak = self._overflow_run = 0  # unseen steps: count afresh
        if start >= self._steps:
            return
        scales, overflowed = torch.stack([log.scale, log.overflow.float()]).tolist()
        for step in range(start, self._steps):
            slot = step % log.capacity
            at_floor = overflowed[slot] and scales[slot] <= config.floor
            self._floor_streak = self._floor_streak + 1 if at_floor else 0
            self._overflow_run = self._overflow_run + 1 if overflowed[slot] else 0
            if self._floor_streak >= self.floor_patience:
                # Report once for everything recorded so far; a caller that catches the
                # error and trains on is told again after floor_patience more such steps.
                last = step
                while last + 1 < self._steps and overflowed[(last + 1) % log.capacity]:
                    last += 1  # the run goes on past `step`
                first = last + 1 - (self._overflow_run + last - step)
                self._floor_scanned, self._floor_streak, self._overflow_run = self._steps, 0, 0
                self._raise_floor_error(first, last)
        self._floor_scanned = self._steps

    def _raise_floor_error(self, first: int, last: int) -> None:
        named = max(first, self._log.origin, self._steps - self._log.capacity)
        name = self._log.name_at(named, self._steps)
        where = (
            f"the first non-finite gradient of step {named} was {name!r}"
            if name
            else (
                "the first non-finite gradient was not recorded (locate_nonfinite=False or "
                "found_inf came from outside unscale_)"
            )
        )
        raise ScaleFloorError(
            f"{last - first + 1} steps in a row overflowed (steps {first} to {last}), the last "
            f"{self.floor_patience} or more with the loss scale at its floor "
            f"{self.config.floor:g}; {where}. "
            "Lowering the scale cannot help: the gradients are inf/NaN at the smallest scale. "
            "Look for an overflow in the forward pass (fp16 activations past 65504, log(0), "
            "division by zero), lower the learning rate, or train in bf16 "
            "(framework_exact=True turns this check off)."
        )

    def telemetry(self) -> ScalerTelemetry:
        """Read the record to the host (syncs) after running the floor check.

        Example:
            >>> from mixprec.scaling import LossScaler
            >>> LossScaler().telemetry().steps
            0
        """
        if not self.enabled:
            return ScalerTelemetry(0, 0, 1.0, (), 0, ())
        self._ensure_state(None)
        self.check()
        return self._log.read(self._steps, self.get_scale())

    def first_nonfinite(self, step: int) -> str | None:
        """Name of the first non-finite gradient of ``step`` (syncs), if recorded."""
        if not self.enabled or self._log is None:
            return None
        return self._log.name_at(step, self._steps)


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
