"""What a monitor has measured: the readout from the device and the queries on it.

:class:`MonitorResults` is the half of :class:`~mixprec.numerics.monitor.Monitor` that
reads results; the other half (hooks, recording, ``step()``) lives in :mod:`.monitor`
and sets up the state used here: ``layout``, ``_pending`` (records not yet read out),
``_scales``, ``results``, ``totals``, ``_host_scales``, ``_first``, ``_first_ever``,
``_last_readout_step``, ``_step``, ``window``, ``module_paths``, ``param_names`` and
``loss_threshold``.

Memory is bounded: per-step statistics (``results``, scales, first non-finite of a step)
are kept for the last ``window`` measured steps; ``totals`` (every step merged, the
merge being exact: counts add, extremes take max/min) and the first inf/NaN of the run
are kept for the whole run.
"""

from __future__ import annotations

import difflib
import math

import torch

from mixprec.numerics.records import KINDS, PHASE, FirstNonFinite, describe
from mixprec.numerics.stats import TensorStats

__all__ = ["MonitorResults"]


class MonitorResults:
    """Readout and queries of :class:`~mixprec.numerics.monitor.Monitor` (not used alone)."""

    # -- readout ------------------------------------------------------------------------
    def readout(self) -> None:
        """Copy every pending measurement to the host (one transfer) and file it."""
        self._last_readout_step = self._step
        if self._scales:
            for s, v in self._scales.items():
                self._host_scales[s] = float(v.item() if isinstance(v, torch.Tensor) else v)
            self._scales = {}
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        vecs = torch.stack([r.vec.to("cpu", non_blocking=False) for r in pending]).numpy()
        for rec, vec in zip(pending, vecs):
            stats = self.layout.summarize(vec, rec.dtype)
            table = self.results.setdefault(rec.step, {})
            for key in rec.keys:
                old = table.get(key)
                table[key] = stats if old is None else old.merge(stats)
                total = self.totals.get(key)
                self.totals[key] = stats if total is None else total.merge(stats)
            if stats.nonfinite and rec.step not in self._first:
                infs = stats.nonfinite - stats.nans
                kinds = [w for w, c in (("inf", infs), ("nan", stats.nans)) if c]
                # A gradient is best explained by the module whose backward produced it:
                # the one that received the tensor (its "grad_input"), when there is one.
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
                if self._first_ever is None:  # steps are read out in order
                    self._first_ever = self._first[rec.step]
        self._trim()

    def _trim(self) -> None:
        """Forget the per-step results of all but the last ``window`` measured steps."""
        if len(self.results) <= self.window:
            return
        kept = sorted(self.results)[-self.window :]
        cutoff = kept[0]
        self.results = {s: self.results[s] for s in kept}
        self._host_scales = {s: v for s, v in self._host_scales.items() if s >= cutoff}
        self._first = {s: v for s, v in self._first.items() if s >= cutoff}

    # -- queries ------------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        """Measured steps with per-step results, in order: the last ``window`` of them
        (reads out pending results)."""
        self.readout()
        return sorted(self.results)

    @property
    def scales(self) -> dict[int, float]:
        """``{step: loss scale}`` for the measured steps given a ``scale`` (reads out)."""
        self.readout()
        return dict(self._host_scales)

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
        names = self.module_paths + self.param_names
        if path not in names:
            close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
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
            if step not in self.results and self.results and step < min(self.results):
                raise KeyError(
                    f"step {step} is no longer kept: the monitor keeps the last "
                    f"{self.window} measured steps ({min(self.results)} to "
                    f"{max(self.results)}; Monitor(window=...)); step=None merges every step"
                )
            found = self.results.get(step, {}).get((path, kind))
        if found is None:
            hint = ""
            if not self.results:
                hint = (
                    "; nothing was measured: the monitor records forward and backward passes "
                    "run with gradients enabled while it is attached (from construction until "
                    "detach() or the end of `with`), one step per monitor.step()"
                )
            raise KeyError(
                f"no {kind} statistics for {path!r} (measured steps: {self.steps}){hint}"
            )
        return found

    def keys(self) -> list[tuple[str, str]]:
        """Every ``(path, kind)`` with statistics, modules in model order."""
        self.readout()
        order = {p: i for i, p in enumerate(self.module_paths + self.param_names)}
        seen = set(self.totals)
        return sorted(seen, key=lambda k: (order.get(k[0], math.inf), KINDS.index(k[1])))

    # -- reports (rendering lives in .report) -------------------------------------------
    def verdicts(self, loss_threshold: float | None = None, *, loss_scale: float | None = None):
        """Per-module format verdicts under each format's scaling; see
        :func:`mixprec.numerics.verdicts.verdicts` (``loss_scale``: fp16 gradients' scale)."""
        from mixprec.numerics.verdicts import verdicts

        threshold = self.loss_threshold if loss_threshold is None else loss_threshold
        return verdicts(self, threshold, loss_scale=loss_scale)

    def to_dict(self) -> dict:
        """Everything measured, JSON-ready; see :func:`mixprec.numerics.report.to_dict`."""
        from mixprec.numerics.report import to_dict

        return to_dict(self)
