"""Loss scaling: :class:`LossScaler` (none / static / dynamic, framework presets, sync-free)
and :class:`GradScaler` (a drop-in for ``torch.amp.GradScaler`` built on it).

Modules: ``rules`` (the scale state machine and presets, with each framework's rule as
pseudocode), ``kernels`` (the grouped foreach check / unscale / locate pass over the
gradients), ``loss_scaler`` (LossScaler), ``telemetry`` (what a scaler records),
``grad_scaler`` (GradScaler).
"""

from mixprec.scaling.grad_scaler import GradScaler
from mixprec.scaling.loss_scaler import LossScaler
from mixprec.scaling.rules import PRESETS, ScalerConfig, apply_rule_, preset_config
from mixprec.scaling.telemetry import ScaleFloorError, ScalerTelemetry, SkippedStep

__all__ = [
    "PRESETS",
    "GradScaler",
    "LossScaler",
    "ScaleFloorError",
    "ScalerConfig",
    "ScalerTelemetry",
    "SkippedStep",
    "apply_rule_",
    "preset_config",
]
