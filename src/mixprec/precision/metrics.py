"""What a training loop logs about its precision: one plain ``{name: number}`` dict per step.

:func:`precision_metrics` reads a :class:`~mixprec.precision.Precision` (and optionally a
numerics monitor) into scalars a logger takes as they are (TensorBoard, Lightning's
``self.log_dict``, the Hugging Face Trainer's ``log``). Names use ``/`` so loggers group them:

========================================  ===============================================
name                                      value
========================================  ===============================================
``precision/loss_scale``                  the loss scale the next step runs with (1.0
                                          when the recipe does not scale the loss)
``precision/steps``                       optimizer iterations the scaler has seen
``precision/skipped_steps``               of those, steps skipped because a gradient
                                          was inf/NaN (total so far)
``precision/skip_rate``                   ``skipped_steps / steps`` (0.0 before a step)
``precision/grad_norm``                   total 2-norm of the unscaled gradients, before
                                          clipping, of the last step that clipped
                                          (``step(opt, max_grad_norm=...)``); absent
                                          otherwise
``numerics/step``                         the monitor's last measured step
``numerics/nonfinite_tensors``            ``(path, kind)`` entries of that step holding
                                          inf/NaN
``numerics/<path>/<kind>/max_abs``        ``max |x|`` of that tensor (inf with an inf/NaN)
``numerics/<path>/<kind>/zero_fraction``  ``zeros / numel``
``numerics/<path>/<kind>/nonfinite_fraction``  ``(inf + NaN) / numel``
``numerics/<path>/<kind>/lost_<format>``  ``(overflow + flush to zero) / numel`` if cast
                                          to ``<format>`` (see :mod:`mixprec.numerics`)
========================================  ===============================================

The ``numerics/...`` entries come from the monitor's most recent measured step, one set per
``(module path, kind)`` it measured (``kind`` as in :data:`mixprec.numerics.KINDS`).

.. warning:: Reading the metrics copies a few scalars from the device (a host sync): call it
    when logging (every N steps), not inside the hot loop.
"""

from __future__ import annotations

__all__ = ["monitor_metrics", "precision_metrics"]


def precision_metrics(precision, monitor=None, *, layers: bool = True) -> dict[str, float]:
    """The scalars of the table in this module's docstring.

    Args:
        precision: a :class:`~mixprec.precision.Precision` (after ``setup``).
        monitor: an optional :class:`mixprec.numerics.Monitor`; its last measured step's
            summaries are added.
        layers: include the per-layer ``numerics/<path>/<kind>/...`` entries (four or more
            per measured tensor); ``False`` keeps ``numerics/step`` and
            ``numerics/nonfinite_tensors`` only.

    Example:
        >>> import torch
        >>> from mixprec import Precision
        >>> p = Precision("fp16-mixed")
        >>> m = precision_metrics(p)
        >>> m["precision/loss_scale"], m["precision/skipped_steps"]
        (65536.0, 0)
    """
    scaler = precision.scaler
    out: dict[str, float] = {}
    if getattr(scaler, "enabled", True):
        steps = int(scaler.steps)
        skipped = int(scaler.steps_skipped.item()) if steps else 0  # host sync
        out["precision/loss_scale"] = float(scaler.get_scale())
    else:
        steps, skipped = 0, 0
        out["precision/loss_scale"] = 1.0
    out["precision/steps"] = steps
    out["precision/skipped_steps"] = skipped
    out["precision/skip_rate"] = skipped / steps if steps else 0.0
    if precision.last_grad_norm is not None:
        out["precision/grad_norm"] = float(precision.last_grad_norm.item())  # host sync
    if monitor is not None:
        out.update(monitor_metrics(monitor, layers=layers))
    return out


def monitor_metrics(monitor, *, layers: bool = True) -> dict[str, float]:
    """The ``numerics/...`` entries of the table, from the monitor's last measured step."""
    steps = monitor.steps  # reads out what is pending (one transfer)
    if not steps:
        return {}
    step = steps[-1]
    table = monitor.results[step]
    out: dict[str, float] = {"numerics/step": step}
    out["numerics/nonfinite_tensors"] = sum(1 for s in table.values() if s.nonfinite)
    if not layers:
        return out
    for (path, kind), stats in table.items():
        base = f"numerics/{path or '<model>'}/{kind}"
        out[f"{base}/max_abs"] = stats.max_abs
        out[f"{base}/zero_fraction"] = stats.zero_fraction
        out[f"{base}/nonfinite_fraction"] = stats.nonfinite_fraction
        for fmt in stats.formats:
            out[f"{base}/lost_{fmt}"] = stats.lost_fraction(fmt)
    return out
