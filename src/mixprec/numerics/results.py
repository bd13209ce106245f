"""What a monitor has measured: the readout from the device and the queries on it.

:class:`MonitorResults` owns every measurement of a run: the records still on the device
(added by the :class:`~mixprec.numerics.recorder.Recorder`), the loss scales given to
``Monitor.step``, and, once read out, the statistics per measured step and merged over the
run and the first inf/NaN. A :class:`~mixprec.numerics.Monitor` holds one and delegates
its queries (``stats``, ``steps``, ``first_nonfinite``, ...) to it.

Memory is bounded: per-step statistics (``per_step``, scales, first non-finite of a step)
are kept for the last ``window`` measured steps; ``totals`` (every step merged, the
merge being exact: counts add, extremes take max/min) and the first inf/NaN of the run
are kept for the whole run.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from mixprec.numerics.records import KINDS, PHASE, FirstNonFinite, Record, describe
from mixprec.numerics.stats import StatsLayout, TensorStats

__all__ = ["MonitorResults"]

Key = tuple[str, str]  # (module path or parameter name, kind)


def _to_host(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """Tensors of one shape stacked on the host, in order: one stack and one copy per device.

    A copy from an accelerator synchronises with it; copying each vector on its own would
    do that once per measured tensor.
    """
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    parts = {dev: torch.stack([tensors[i] for i in idx]).cpu() for dev, idx in by_device.items()}
    if len(parts) == 1:
        return next(iter(parts.values())).numpy()
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype)
    for dev, idx in by_device.items():
        out[idx] = parts[dev]
    return out.numpy()


class MonitorResults:
    """The measurements of one monitor: pending on the device, then read out and filed.

    Args:
        layout: the :class:`~mixprec.numerics.stats.StatsLayout` the records' vectors were
            computed with (it turns a vector into :class:`TensorStats`).
        names: the model's module paths then its parameter names, in model order (checked
            by :meth:`stats`, the order of :meth:`keys`).
        window: measured steps whose per-step statistics are kept (the last ``window``).

    Attributes:
        per_step: ``{step: {(path, kind): TensorStats}}`` for the last ``window`` measured
            steps read out (read it after :meth:`readout`; do not change it).
        totals: ``{(path, kind): TensorStats}`` merged over every measured step read out.
    """

    def __init__(self, layout: StatsLayout, names: Iterable[str], *, window: int) -> None:
        self.layout = layout
        self.names = tuple(names)
        self.window = window
        self.per_step: dict[int, dict[Key, TensorStats]] = {}
        self.totals: dict[Key, TensorStats] = {}
        self._pending: list[Record] = []  # measured, still on the device
        self._device_scales: dict[int, torch.Tensor] = {}  # loss scales still on the device
        self._scales: dict[int, float] = {}  # steps in the window
        self._first: dict[int, FirstNonFinite] = {}  # steps in the window
        self._first_ever: FirstNonFinite | None = None

    # -- filling ------------------------------------------------------------------------
    def add(self, record: Record) -> None:
        """Keep a measurement (on its device) until the next :meth:`readout`."""
        self._pending.append(record)

    def add_scale(self, step: int, scale: float | torch.Tensor) -> None:
        """Record the loss scale of a step (a 0-dim tensor stays on its device until read)."""
        if isinstance(scale, torch.Tensor):
            self._device_scales[step] = scale.detach().clone()
        else:
            self._scales[step] = float(scale)

    def readout(self) -> None:
        """Copy every pending measurement to the host (one copy per device) and file it."""
        if self._device_scales:
            steps = list(self._device_scales)
            values = _to_host([self._device_scales[s].double().reshape(()) for s in steps])
            self._scales.update(zip(steps, values.tolist()))
            self._device_scales = {}
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for rec, vec in zip(pending, _to_host([r.vec for r in pending])):
            self._file(rec, self.layout.summarize(vec, rec.dtype))
        self._trim()

    def _file(self, rec: Record, stats: TensorStats) -> None:
        """File one read-out measurement under each of its keys; note a first inf/NaN."""
        table = self.per_step.setdefault(rec.step, {})
        for key in rec.keys:
            old = table.get(key)
            table[key] = stats if old is None else old.merge(stats)
            total = self.totals.get(key)
            self.totals[key] = stats if total is None else total.merge(stats)
        if not stats.nonfinite or rec.step in self._first:
            return
        infs = stats.nonfinite - stats.nans
        kinds = [w for w, c in (("inf", infs), ("nan", stats.nans)) if c]
        # A gradient is best explained by the module whose backward produced it: the one
        # that received the tensor (its "grad_input"), when there is one.
        keys = sorted(rec.keys, key=lambda k: k[1] != "grad_input")
        path, kind = keys[0]
        self._first[rec.step] = FirstNonFinite(
            step=rec.step,
            phase=PHASE[kind],
            path=path,
            kind=kind,
            what=" and ".join(kinds),
            fraction=stats.nonfinite_fraction,
            also=tuple(keys[1:]),
        )
        if self._first_ever is None:  # records are read out in the order they were measured
            self._first_ever = self._first[rec.step]

    def _trim(self) -> None:
        """Forget the per-step results of all but the last ``window`` measured steps."""
        if len(self.per_step) <= self.window:
            return
        kept = sorted(self.per_step)[-self.window :]
        cutoff = kept[0]
        self.per_step = {s: self.per_step[s] for s in kept}
        self._scales = {s: v for s, v in self._scales.items() if s >= cutoff}
        self._first = {s: v for s, v in self._first.items() if s >= cutoff}

    # -- queries ------------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        """Measured steps with per-step results, in order: the last ``window`` of them
        (reads out pending results)."""
        self.readout()
        return sorted(self.per_step)

    @property
    def scales(self) -> dict[int, float]:
        """``{step: loss scale}`` for the measured steps given a ``scale`` (reads out)."""
        self.readout()
        return dict(self._scales)

    @property
    def first_nonfinite(self) -> FirstNonFinite | None:
        """The earliest inf/NaN seen in any measured step of the run, or ``None``."""
        self.readout()
        return self._first_ever

    def first_nonfinite_in(self, step: int) -> FirstNonFinite | None:
        """The first inf/NaN of one step, or ``None`` (also when the step was not measured,
        or is older than the last ``window`` measured steps and not the run's first)."""
        self.readout()
        first = self._first.get(step)
        if first is None and self._first_ever is not None and self._first_ever.step == step:
            return self._first_ever
        return first

    def explain_step(self, step: int) -> str | None:
        """Why a step went non-finite, e.g. for a skipped loss-scaled step.

        Returns ``"first inf in the gradient of blocks.3.fc's output (backward)"`` or
        ``None`` when the step was not measured or had no inf/NaN. ``Precision`` can print
        ``f"step {step} skipped: {monitor.explain_step(step)}"``.
        """
        first = self.first_nonfinite_in(step)
        if first is None:
            return None
        return f"first {first.what} in {describe(first.path, first.kind)} ({first.phase})"

    def _check_path(self, path: str) -> None:
        if path not in self.names:
            close = difflib.get_close_matches(path, self.names, n=5, cutoff=0.5)
            hint = f"; close matches: {', '.join(map(repr, close))}" if close else ""
            raise KeyError(f"no module or parameter {path!r} in the model{hint}")

    def stats(self, path: str, kind: str = "output", step: int | None = None) -> TensorStats:
        """Statistics of one module's (or parameter's) tensor, merged over measured steps.

        Args:
            path: module path as in ``named_modules()`` (``""`` for the model) or a
                parameter name as in ``named_parameters()``.
            kind: one of :data:`KINDS`.
            step: one of the last ``window`` measured steps; ``None`` merges every
                measured step of the run.

        Raises:
            KeyError: unknown path (with close matches), no statistics of that kind, or a
                step older than the kept window.
            ValueError: unknown kind.
        """
        self._check_path(path)
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {', '.join(map(repr, KINDS))}")
        self.readout()
        if step is None:
            found = self.totals.get((path, kind))
        else:
            if step not in self.per_step and self.per_step and step < min(self.per_step):
                raise KeyError(
                    f"step {step} is no longer kept: the monitor keeps the last "
                    f"{self.window} measured steps ({min(self.per_step)} to "
                    f"{max(self.per_step)}; Monitor(window=...)); step=None merges every step"
                )
            found = self.per_step.get(step, {}).get((path, kind))
        if found is None:
            hint = ""
            if not self.per_step:
                hint = (
                    "; nothing was measured: the monitor records forward and backward passes "
                    "run with gradients enabled while it is attached (from construction until "
                    "detach() or the end of `with`), one step per monitor.step()"
                )
            raise KeyError(
                f"no {kind} statistics for {path!r} (measured steps: {self.steps}){hint}"
            )
        return found

    def keys(self) -> list[Key]:
        """Every ``(path, kind)`` with statistics, modules in model order."""
        self.readout()
        order = {p: i for i, p in enumerate(self.names)}
        return sorted(self.totals, key=lambda k: (order.get(k[0], math.inf), KINDS.index(k[1])))
