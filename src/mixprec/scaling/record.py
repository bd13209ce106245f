"""What a loss scaler has done, owned by one object: the step counter, the on-device step log
(scale, overflow and first non-finite gradient of each recent step), the candidates for the
first non-finite gradient of the iteration under way, and the floor check that scans the log.

A :class:`~mixprec.scaling.LossScaler` holds one :class:`ScalerRecord` and delegates its
``steps``, ``steps_skipped``, ``check``, ``telemetry`` and ``first_nonfinite`` to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixprec.scaling.kernels import NONE_INDEX
from mixprec.scaling.telemetry import ScaleFloorError, ScalerTelemetry, StepLog

__all__ = ["ScalerRecord"]


class ScalerRecord:
    """The steps a scaler took, a ring buffer of the last ``capacity`` of them on the
    device, and the floor check on it.

    Everything the record holds is its own: the host step counter, the :class:`StepLog`
    (created by :meth:`create` on the scale's device), the skipped-step count it starts
    from, the pending first-non-finite candidates of the current iteration and the floor
    check's position in the log. Writing a step (:meth:`write`) reads nothing back to the
    host; :meth:`check`, :meth:`read`, :meth:`skipped_count` and :meth:`first_nonfinite`
    copy from the device (they sync).

    Args:
        capacity: steps kept in the ring buffer (``history_len`` of the scaler).
        steps: steps taken before this record starts (a loaded checkpoint's).
        skipped: of those, the skipped ones.

    Example:
        >>> record = ScalerRecord(4)
        >>> record.create(torch.device("cpu"))
        >>> record.write(torch.tensor(8.0), torch.tensor(True))
        >>> record.steps, record.skipped_count(), record.read(8.0).scale_history
        (1, 1, (8.0,))
    """

    def __init__(self, capacity: int, *, steps: int = 0, skipped: int = 0) -> None:
        self.capacity = capacity
        self.steps = steps  # update() calls, known on the host
        self._start_skipped = skipped  # the log's skipped counter starts here when created
        self._log: StepLog | None = None
        # (first non-finite index, names, gradient count) of each unscale_/check_ call of
        # the iteration under way; write() folds them into that step's log entry.
        self._pending: list[tuple[torch.Tensor, Sequence[str] | None, int]] = []
        # Floor check, on the host: steps before _scanned have been scanned, the last
        # _streak of them overflowed at the floor and the last _run of them overflowed.
        self._scanned = steps
        self._streak = 0
        self._run = 0

    # -- creation and writing (no host read) ------------------------------------------------
    @property
    def created(self) -> bool:
        """Whether the on-device log exists (it is made on the scale's device)."""
        return self._log is not None

    def create(self, device: torch.device) -> None:
        """Make the on-device log on ``device`` (no-op if it exists)."""
        if self._log is None:
            self._log = StepLog(self.capacity, device)
            self._log.skipped.fill_(self._start_skipped)
            self._log.origin = self.steps

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The log's tensors (none before :meth:`create`)."""
        log = self._log
        return () if log is None else (log.scale, log.overflow, log.first, log.skipped)

    @property
    def pending(self) -> bool:
        """Whether a gradient check of the iteration under way awaits :meth:`write`."""
        return bool(self._pending)

    def note(self, first: torch.Tensor, names: Sequence[str] | None, count: int) -> None:
        """Keep one check's first non-finite index (of ``count`` gradients named ``names``)
        for the step being recorded."""
        self._pending.append((first, names, count))

    def discard_pending(self) -> None:
        """Forget the iteration's candidates (a disabled scaler's update)."""
        self._pending.clear()

    def write(self, scale: torch.Tensor, overflow: torch.Tensor) -> None:
        """Record step ``steps`` (its scale and whether it overflowed) and count it."""
        device = scale.device
        pending, self._pending = self._pending, []
        first, segments, offset = None, [], 0
        for call, (candidate, names, count) in enumerate(pending):
            shifted = candidate + offset if offset else candidate
            first = shifted if first is None else torch.minimum(first, shifted)
            segments.append((offset, names, call))
            offset += count
        if first is None:
            first = torch.full((), NONE_INDEX, dtype=torch.int64, device=device)
        self._log.write(self.steps, scale, overflow, first, tuple(segments) or None)
        self.steps += 1

    def restart(self, steps: int, skipped: int | None) -> None:
        """Continue from a checkpoint: ``steps`` taken, ``skipped`` of them skipped (``None``:
        the count so far). Steps before it are not in the log; the floor check starts there."""
        if skipped is None:
            skipped = self.skipped_count()
        self.steps = steps
        self._start_skipped = skipped
        self._scanned, self._streak, self._run = steps, 0, 0
        if self._log is not None:
            self._log.skipped.fill_(skipped)
            self._log.origin = steps

    # -- reading (syncs) ----------------------------------------------------------------------
    @property
    def skipped(self) -> torch.Tensor:
        """Skipped steps: the log's int64 0-dim counter (no sync; needs :meth:`create`)."""
        return self._log.skipped

    def skipped_count(self) -> int:
        """Skipped steps as an int (syncs once the log exists)."""
        return self._start_skipped if self._log is None else int(self._log.skipped.item())

    def counters(self) -> dict[str, int]:
        """``steps`` and ``steps_skipped`` as in a state dict (syncs)."""
        return {"steps": self.steps, "steps_skipped": self.skipped_count()}

    def read(self, current_scale: float) -> ScalerTelemetry:
        """The record as a :class:`ScalerTelemetry` (copies it to the host: syncs)."""
        if self._log is None:
            return ScalerTelemetry(self.steps, self._start_skipped, current_scale, (), 0, ())
        return self._log.read(self.steps, current_scale)

    def first_nonfinite(self, step: int) -> str | None:
        """Name of the first non-finite gradient of ``step`` (syncs), if recorded."""
        return None if self._log is None else self._log.name_at(step, self.steps)

    def check(self, floor: float, patience: int) -> None:
        """Raise :class:`ScaleFloorError` if, among the steps not yet checked, ``patience``
        consecutive ones overflowed with the scale at ``floor`` or below.

        Scans the log of those steps on the host (one copy of it: a sync). Steps that left
        the log (more than ``capacity`` since the last check) are not seen. One error covers
        all steps recorded so far.
        """
        log = self._log
        if log is None:
            return
        start = max(self._scanned, log.origin, self.steps - log.capacity)
        if start > self._scanned:
            self._streak = self._run = 0  # unseen steps: count afresh
        if start >= self.steps:
            return
        scales, overflowed = torch.stack([log.scale, log.overflow.float()]).tolist()
        for step in range(start, self.steps):
            slot = step % log.capacity
            at_floor = overflowed[slot] and scales[slot] <= floor
            self._streak = self._streak + 1 if at_floor else 0
            self._run = self._run + 1 if overflowed[slot] else 0
            if self._streak >= patience:
                # Report once for everything recorded so far; a caller that catches the
                # error and trains on is told again after `patience` more such steps.
                last = step
                while last + 1 < self.steps and overflowed[(last + 1) % log.capacity]:
                    last += 1  # the run goes on past `step`
                first = last + 1 - (self._run + last - step)
                self._scanned, self._streak, self._run = self.steps, 0, 0
                raise self._floor_error(first, last, floor, patience)
        self._scanned = self.steps

    def _floor_error(self, first: int, last: int, floor: float, patience: int) -> ScaleFloorError:
        named = max(first, self._log.origin, self.steps - self._log.capacity)
        name = self._log.name_at(named, self.steps)
        where = (
            f"the first non-finite gradient of step {named} was {name!r}"
            if name
            else (
                "the first non-finite gradient was not recorded (locate_nonfinite=False or "
                "found_inf came from outside unscale_)"
            )
        )
        return ScaleFloorError(
            f"{last - first + 1} steps in a row overflowed (steps {first} to {last}), the last "
            f"{patience} or more with the loss scale at its floor {floor:g}; {where}. "
            "Lowering the scale cannot help: the gradients are inf/NaN at the smallest scale. "
            "Look for an overflow in the forward pass (fp16 activations past 65504, log(0), "
            "division by zero), lower the learning rate, or train in bf16 "
            "(framework_exact=True turns this check off)."
        )

    # -- pickling ------------------------------------------------------------------------------
    def __getstate__(self) -> tuple[int, int, int]:
        """``(capacity, steps, skipped)``: no log (it restarts after unpickling, on the
        device of the next use), so the pickle is small and device-free. Syncs.

        Raises:
            RuntimeError: while a gradient check awaits :meth:`write` (it would be lost).
        """
        if self._pending:
            raise RuntimeError(
                "a LossScaler may only be pickled between iterations: unscale_() or check_() "
                "was called since the last update(); call update() first"
            )
        return self.capacity, self.steps, self.skipped_count()

    def __setstate__(self, state: tuple[int, int, int]) -> None:
        capacity, steps, skipped = state
        self.__init__(capacity, steps=steps, skipped=skipped)
