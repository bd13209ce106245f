"""Loss scaling: :class:`LossScaler` (none / static / dynamic, framework presets, sync-free
between periodic floor checks) and :class:`GradScaler` (a drop-in for
``torch.amp.GradScaler`` built on it).

Modules: ``rules`` (the scale state machine and presets, with each framework's rule as
pseudocode), ``kernels`` (the grouped foreach check / unscale / locate pass over the
gradients), ``loss_scaler`` (LossScaler, which holds the parts below), ``scale_state``
(the scale tensors and the host's bound on the scale), ``record`` (steps, the on-device
log and the floor check), ``telemetry`` (what is read out of the record), ``checks``
(a scale or a checkpoint given from outside), ``grad_scaler`` (GradScaler, which holds a
LossScaler and an ``optimizer_checks.OptimizerChecks``: each optimizer's stage and
``found_inf`` this iteration) and ``torch_face`` (what torch code sees of it: private
attributes, checkpoint format, errors).
"""

from mixprec.scaling.grad_scaler import GradScaler
from mixprec.scaling.loss_scaler import LossScaler
from mixprec.scaling.rules import (
    PRESET_SOURCES,
    PRESETS,
    SAFE_MIN_SCALE,
    ScalerConfig,
    apply_rule_,
    preset_config,
)
from mixprec.scaling.telemetry import ScaleFloorError, ScalerTelemetry, SkippedStep
from mixprec.scaling.torch_face import GradScalerRuntimeError, GradScalerValueError

__all__ = [
    "PRESETS",
    "PRESET_SOURCES",
    "SAFE_MIN_SCALE",
    "GradScaler",
    "GradScalerRuntimeError",
    "GradScalerValueError",
    "LossScaler",
    "ScaleFloorError",
    "ScalerConfig",
    "ScalerTelemetry",
    "SkippedStep",
    "apply_rule_",
    "preset_config",
]
