"""The numerics monitor over one training run, as a framework callback drives it.

The Lightning callback (:class:`~mixprec.integrations.lightning.NumericsMonitor`) and the
Hugging Face one (:class:`~mixprec.integrations.transformers.NumericsMonitorCallback`) do
the same three things at their framework's hooks; each holds a :class:`MonitorSession`
that does them:

1. training starts: a :class:`mixprec.numerics.Monitor` on the model (hooks attached);
2. after each optimizer step: ``monitor.step(scale=...)``, with the loss scale of the
   :class:`mixprec.Precision` that trains (when its scaler is on), so the monitor can say
   which gradients the scale pushed out of range;
3. training ends: ``numerics.json`` (:func:`mixprec.numerics.report.write_json`) written by
   the main process, and the hooks removed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from mixprec.numerics.monitor import DEFAULT_FORMATS, TRACK, Monitor
from mixprec.precision import Precision

__all__ = ["REPORT_NAME", "MonitorSession"]

REPORT_NAME = "numerics.json"


@dataclass(slots=True)
class MonitorSession:
    """What a monitor callback measures with, and the monitor of the run once it started.

    Args:
        formats, every, track: passed to :class:`mixprec.numerics.Monitor`.
        out_dir: where ``numerics.json`` goes; ``None``: the folder :meth:`finish` is given
            (the framework's output folder).

    Attributes:
        monitor: the running :class:`~mixprec.numerics.Monitor` (None before training starts).
        report_path: the ``numerics.json`` written at the end (None before, and on every
            process but the main one).
    """

    formats: Iterable[str] = DEFAULT_FORMATS
    every: int = 1
    track: Iterable[str] = TRACK
    out_dir: str | Path | None = None
    monitor: Monitor | None = field(default=None, init=False)
    report_path: Path | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # any iterables of names (a list, a generator) are kept as tuples
        self.formats, self.track = tuple(self.formats), tuple(self.track)

    def start(self, model: nn.Module) -> None:
        """Training starts: a monitor on ``model``, its hooks attached."""
        self.monitor = Monitor(model, formats=self.formats, every=self.every, track=self.track)

    def step(self, precision: Precision | None) -> None:
        """An optimizer step ended: the monitor closes the step, with ``precision``'s loss
        scale when its scaler is on (None: the model trains without a mixprec Precision)."""
        if self.monitor is None:
            return
        scaled = precision is not None and precision.scaler.enabled
        self.monitor.step(scale=precision.scaler.scale if scaled else None)

    def metrics(self, precision: Precision | None, *, layers: bool = True) -> dict[str, float]:
        """What a logger gets: ``precision.metrics(monitor)``, or only the monitor's
        ``numerics/...`` entries without a Precision (names and formulas in
        :mod:`mixprec.precision.metrics`)."""
        from mixprec.precision.metrics import monitor_metrics

        if precision is not None:
            return precision.metrics(self.monitor, layers=layers)
        return monitor_metrics(self.monitor, layers=layers) if self.monitor is not None else {}

    def finish(self, default_dir: str | Path, *, main_process: bool) -> None:
        """Training ended: the main process writes ``numerics.json`` into ``out_dir`` (or
        ``default_dir``); every process removes the monitor's hooks."""
        if self.monitor is None:
            return
        from mixprec.numerics.report import write_json

        if main_process:
            out = Path(self.out_dir or default_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.report_path = write_json(self.monitor, out / REPORT_NAME)
        self.monitor.detach()
