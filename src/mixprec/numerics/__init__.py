"""Numerics monitor: per-module, format-aware statistics forward and backward.

``Monitor`` (in :mod:`.monitor`) hooks a model and measures, per tensor and step, on the
device: max |x|, smallest non-zero |x|, the zero and non-finite fractions, and for each
target format the fractions that would overflow, be subnormal or flush to zero if cast to
it, plus a log2 histogram (:mod:`.stats`, one-pass C kernel on the CPU in
:mod:`._cpu_kernel`). It holds a :class:`~.recorder.Recorder` (the hooks) that measures
into a :class:`~.results.MonitorResults` (the readout and the queries: statistics, the
first inf/NaN in execution order, why a step went non-finite; :mod:`.records`).
:mod:`.verdicts` judges which format each module fits; :mod:`.report` renders a rich table
and JSON, :mod:`.plots` the PNGs. ``mixprec diagnose`` (:mod:`mixprec.bench.diagnose`)
trains a task under a monitor.

Example:
    >>> import torch
    >>> from mixprec.numerics import Monitor
    >>> model = torch.nn.Linear(4, 4)
    >>> with Monitor(model, formats=["fp8_e4m3fn"]) as monitor:
    ...     _ = model(torch.randn(2, 4) * 1e3)
    ...     monitor.step()
    >>> monitor.stats("", "output").overflow_fraction("fp8_e4m3fn") > 0
    True
"""

from mixprec.numerics.monitor import (
    KINDS,
    TRACK,
    FirstNonFinite,
    Monitor,
    NonFiniteError,
)
from mixprec.numerics.stats import FormatCounts, StatsLayout, TensorStats

__all__ = [
    "KINDS",
    "TRACK",
    "FirstNonFinite",
    "FormatCounts",
    "Monitor",
    "NonFiniteError",
    "StatsLayout",
    "TensorStats",
]
