"""The numerics monitor: hooks that measure every module's tensors, forward and backward.

What is measured, and where:

============  ==============  ===================================================  ===========
phase         kind            tensor                                               hook
============  ==============  ===================================================  ===========
forward       ``output``      every floating tensor a module returns               forward
backward      ``grad_output`` gradient of a module's output                        tensor hook
backward      ``grad_input``  gradient of the tensor a module received              tensor hook
backward      ``param_grad``  a parameter's ``.grad`` after it is accumulated      post-accum.
update        ``weight``      a parameter after the step                           ``step()``
update        ``update``      ``parameter after - parameter before`` the step      ``step()``
============  ==============  ===================================================  ===========

Gradient hooks are tensor hooks registered in the forward pass, not
``register_full_backward_hook`` (which breaks modules whose output is later changed in
place). A hook registered on the input before the module runs sees the gradient of that
version of the tensor, so in-place activations (``ReLU(inplace=True)``) are measured
correctly. ``grad_input`` is the gradient autograd computes for that tensor: the sum over
all its uses, as in ``tensor.grad``. A tensor seen by several modules (a module's output is
the next one's input, or a container returns its child's output) is measured once and
filed under every ``(module, kind)`` it belongs to; so is a gradient autograd hands to
several tensors (``x + f(x)`` passes one gradient on to ``f``'s output unchanged).

Each measurement is one int64 vector on the tensor's device (:mod:`.stats`); the vectors
are read out in one transfer per device per reporting interval (every ``report_every``
steps, or when a result is asked for). Under loss scaling the gradients are the scaled
ones; pass the scale to :meth:`Monitor.step` and it is recorded with the step.

The :class:`Monitor` holds the parts and keeps the step count: a
:class:`~mixprec.numerics.recorder.Recorder` (the hooks) that measures into a
:class:`~mixprec.numerics.results.MonitorResults` (the measurements and the queries on them).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mixprec.numerics.recorder import Recorder
from mixprec.numerics.records import KINDS, FirstNonFinite, NonFiniteError
from mixprec.numerics.results import MonitorResults
from mixprec.numerics.stats import StatsLayout, TensorStats

__all__ = ["DEFAULT_FORMATS", "KINDS", "TRACK", "FirstNonFinite", "Monitor", "NonFiniteError"]

TRACK = ("activations", "gradients", "weights", "updates")
_KINDS_OF_TRACK = {
    "activations": ("output",),
    "gradients": ("grad_output", "grad_input", "param_grad"),
    "weights": ("weight",),
    "updates": ("update",),
}
DEFAULT_FORMATS = ("fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")


class Monitor:
    """Per-module, per-format statistics of activations, gradients, weights and updates.

    Args:
        model: the module to watch (every submodule and parameter is watched).
        formats: target format names; for each, the fractions of every tensor that would
            overflow, be subnormal or flush to zero if cast to it.
        every: measure one step in ``every`` (steps ``0, every, 2 * every, ...``).
        track: any of ``"activations"``, ``"gradients"``, ``"weights"``, ``"updates"``.
        report_every: read the device-side results out every this many steps.
        raise_on_nonfinite: raise :class:`NonFiniteError` at the first inf/NaN (this
            synchronises with the device after every measured tensor).
        loss_threshold: the lost fraction (overflow + flush) a format may have and still
            "fit" a module in :meth:`verdicts`.
        window: measured steps whose per-step statistics are kept (the last ``window``);
            the statistics merged over every step, the first inf/NaN ever seen and the
            step count are kept for the whole run, so memory stays flat however long it is.

    Call :meth:`step` once per training step, after the optimizer step (it measures weights
    and updates and advances the step count). With a loss scaler pass ``scale=``.

    The monitor watches from construction (``Monitor(model)`` alone records); ``with`` or
    :meth:`detach` removes its hooks at the end. Forward passes run without gradients
    (evaluation under ``torch.no_grad()`` or ``torch.inference_mode()``) are not training
    steps: they are skipped, not merged into the step, and counted in ``skipped_forwards``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Monitor(model, formats=["fp16", "fp8_e5m2"]) as monitor:
        ...     for _ in range(2):
        ...         model(torch.randn(8, 4)).square().mean().backward()
        ...         opt.step(); opt.zero_grad(); monitor.step()
        >>> monitor.stats("0", "output").numel
        64
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        formats: Iterable[str] = DEFAULT_FORMATS,
        every: int = 1,
        track: Iterable[str] = TRACK,
        report_every: int = 50,
        raise_on_nonfinite: bool = False,
        loss_threshold: float = 0.01,
        window: int = 100,
    ) -> None:
        from mixprec.formats import get_format

        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Monitor(model): model must be a torch.nn.Module, got {type(model).__name__} "
                f"{model!r:.60}"
            )
        if isinstance(formats, str):
            formats = (formats,)
        self.formats = tuple(get_format(f) for f in formats)  # ValueError lists the names
        self.format_names = tuple(f.name for f in self.formats)
        if not self.formats:
            raise ValueError("formats is empty; give at least one format name")
        if isinstance(track, str):
            track = (track,)
        track = tuple(track)
        for t in track:
            if t not in TRACK:
                raise ValueError(f"track={t!r} is not one of {', '.join(map(repr, TRACK))}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be a positive integer")
        if isinstance(report_every, bool) or not isinstance(report_every, int) or report_every < 1:
            raise ValueError(f"report_every={report_every!r} must be a positive integer")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} must be a positive integer")
        if not 0.0 <= loss_threshold < 1.0:
            raise ValueError(f"loss_threshold={loss_threshold!r} must be in [0, 1)")
        self.model = model
        self.every = every
        self.track = track
        self.kinds = tuple(k for t in track for k in _KINDS_OF_TRACK[t])
        self.report_every = report_every
        self.raise_on_nonfinite = raise_on_nonfinite
        self.loss_threshold = loss_threshold
        self.window = window
        self.layout = StatsLayout(self.formats)
        self.module_paths = [name for name, _ in model.named_modules()]
        self.param_names = [name for name, _ in model.named_parameters()]
        self._results = MonitorResults(
            self.layout, self.module_paths + self.param_names, window=window
        )
        self._recorder = Recorder(
            model, self.kinds, self.layout, self._results, raise_on_nonfinite=raise_on_nonfinite
        )
        self._step = 0
        self._attached = False
        self.attach()  # Monitor(model) without `with` must not silently record nothing

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """The current step: the number of :meth:`step` calls so far (measured when
        :attr:`sampling`)."""
        return self._step

    @property
    def sampling(self) -> bool:
        """Whether the current step is measured."""
        return self._attached and self._step % self.every == 0

    def attach(self) -> Monitor:
        """Start watching the model (idempotent). Returns ``self``.

        Hooks are registered only for the steps that are measured: at the start of a
        measured step (here, or in :meth:`step`) and removed when it ends, so the steps
        ``every=N`` skips run the model exactly as without a monitor.
        """
        if not self._attached:
            self._attached = True
            self._recorder.begin(self._step, measure=self.sampling)
        return self

    def detach(self) -> None:
        """Remove every hook (module, parameter and pending tensor hooks)."""
        self._recorder.stop()
        self._attached = False

    def __enter__(self) -> Monitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def step(self, *, scale: float | torch.Tensor | None = None) -> None:
        """End the current step: measure weights and updates, then advance the step count.

        Every ``report_every`` steps the measurements are read out (:meth:`readout`).

        Args:
            scale: the loss scale this step's backward used (a float or a 0-dim tensor,
                kept on the device until the readout); recorded with the step's statistics.
        """
        if self.sampling and scale is not None:
            self._results.add_scale(self._step, scale)
        self._recorder.end()
        self._step += 1
        self._recorder.begin(self._step, measure=self.sampling)
        if self._step % self.report_every == 0:
            self.readout()

    # -- results (held in a MonitorResults; see .results) -----------------------------
    @property
    def skipped_forwards(self) -> int:
        """Forwards of the model run without gradients (evaluation): not recorded."""
        return self._recorder.skipped_forwards

    @property
    def results(self) -> dict[int, dict[tuple[str, str], TensorStats]]:
        """``{step: {(path, kind): TensorStats}}`` of the last ``window`` measured steps
        read out (call :meth:`readout` or :attr:`steps` first; read only)."""
        return self._results.per_step

    @property
    def totals(self) -> dict[tuple[str, str], TensorStats]:
        """``{(path, kind): TensorStats}`` merged over every measured step read out."""
        return self._results.totals

    def readout(self) -> None:
        """Copy every pending measurement to the host (one copy per device) and file it."""
        self._results.readout()

    @property
    def steps(self) -> list[int]:
        """Measured steps with per-step results, in order (the last ``window``; reads out)."""
        return self._results.steps

    @property
    def scales(self) -> dict[int, float]:
        """``{step: loss scale}`` for the measured steps given a ``scale`` (reads out)."""
        return self._results.scales

    @property
    def first_nonfinite(self) -> FirstNonFinite | None:
        """The earliest inf/NaN seen in any measured step of the run, or ``None``."""
        return self._results.first_nonfinite

    def first_nonfinite_in(self, step: int) -> FirstNonFinite | None:
        """The first inf/NaN of one step; see :meth:`MonitorResults.first_nonfinite_in`."""
        return self._results.first_nonfinite_in(step)

    def explain_step(self, step: int) -> str | None:
        """Why a step went non-finite; see :meth:`MonitorResults.explain_step`."""
        return self._results.explain_step(step)

    def stats(self, path: str, kind: str = "output", step: int | None = None) -> TensorStats:
        """Statistics of one module's (or parameter's) tensor; see
        :meth:`MonitorResults.stats` (``step=None`` merges every measured step)."""
        return self._results.stats(path, kind, step)

    def keys(self) -> list[tuple[str, str]]:
        """Every ``(path, kind)`` with statistics, modules in model order."""
        return self._results.keys()

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
