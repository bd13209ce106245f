"""What a monitor has measured: the readout from the device and the queries on it.

:class:`MonitorResults` is the half of :class:`~mixprec.numerics.monitor.Monitor` that
reads results; the other half (hooks, recording, ``step()``) lives in :mod:`.monitor`
and sets up the state used here: ``layout``, ``_pending`` (records not yet read out),
``_scales``, ``results``, ``_host_scales``, ``_first``, ``_last_readout_step``, ``_step``,
``module_paths``, ``param_names`` and ``loss_threshold``.
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

    # -- queries ------------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        """Measured steps with results, in order (reads out pending results)."""
        self.readout()
        return sorted(self.results)

    @property
    def scales(self) -> dict[int, float]:
        """``{step: loss scale}`` for the measured steps given a ``scale`` (reads out)."""
        self.readout()
        return dict(self._host_scales)

    @property
    def first_nonfinite(self) -> FirstNonFinite | None:
        """The earliest inf/NaN seen in any measured step, or ``None``."""
        self.readout()
        return self._first[min(self._first)] if self._first else None

    def first_nonfinite_in(self, step: int) -> FirstNonFinite | None:
        """The first inf/NaN of one step, or ``None`` (also when the step was not measured)."""
        self.readout()
        return self._first.get(step)

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
            step: one measured step; ``None`` merges all of them.

        Raises:
            KeyError: unknown path (with close matches), or no statistics of that kind.
            ValueError: unknown kind.
        """
        self._check_path(path)
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {', '.join(map(repr, KINDS))}")
        self.readout()
        steps = [step] if step is not None else sorted(self.results)
        found = [
            self.results[s][(path, kind)] for s in steps if (path, kind) in self.results.get(s, {})
        ]
        if not found:
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
        out = found[0]
        for s in found[1:]:
            out = out.merge(s)
        return out

    def keys(self) -> list[tuple[str, str]]:
        """Every ``(path, kind)`` with statistics, modules in model order."""
        self.readout()
        order = {p: i for i, p in enumerate(self.module_paths + self.param_names)}
        seen = {k for table in self.results.values() for k in table}
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
