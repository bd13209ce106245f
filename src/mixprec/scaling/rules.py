"""Dynamic loss-scale rules: one parametrised state machine, four framework presets.

Every rule keeps three pieces of state, all 0-dim tensors on the scale's device:
``scale`` (fp32), ``growth_tracker`` (int32: clean steps counted toward the next growth)
and ``hysteresis_tracker`` (int32: overflows still tolerated before the scale backs off).
:func:`apply_rule_` advances them with tensor ops only (``torch.where``), so it never
reads a value back to the host.

The general rule, given one step's ``found_inf`` (non-zero when a gradient was inf/NaN)::

    if found_inf:
        growth_tracker = growth_tracker_start
        hysteresis_tracker = max(hysteresis_tracker - 1, 0)
        if hysteresis_tracker == 0:
            scale = max(scale * backoff_factor, min_scale)
    else:
        if consecutive_hysteresis:
            hysteresis_tracker = hysteresis
        growth_tracker += 1
        if growth_tracker == growth_interval:
            growth_tracker = 0
            hysteresis_tracker = hysteresis
            grown = scale * growth_factor
            if isfinite(grown):              # fp32: never grow to inf
                scale = min(grown, max_scale)

Products are taken in float64 and rounded once to fp32, as torch's C++ kernel does
(``float * double`` -> ``double`` -> stored as ``float``).

How each framework's published rule maps onto it (``PRESETS``):

``torch`` (``torch._amp_update_scale_``, torch.amp.GradScaler)::

    if found_inf: scale *= backoff_factor; growth_tracker = 0
    else:
        growth_tracker += 1
        if growth_tracker == growth_interval:
            if isfinite(scale * growth_factor): scale *= growth_factor
            growth_tracker = 0

  = the general rule with hysteresis 1, no floor, no ceiling, start 0. 2^16, x2, x0.5, 2000.

``apex`` (apex.amp ``LossScaler.update_scale``)::

    if overflow: scale = max(min_loss_scale, scale / 2) if min_loss_scale else scale / 2
                 unskipped = 0
    else:        unskipped += 1
    if unskipped == scale_window: scale = min(max_loss_scale, scale * 2); unskipped = 0

  = hysteresis 1, ceiling 2^24, no floor, start 0. 2^16, window 2000.

``deepspeed`` (``deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler.update_scale``)::

    if overflow:
        if delayed_shift == 1 or cur_hysteresis == 1:
            scale = max(scale / scale_factor, min_scale)   # raises if already at min
        else:
            cur_hysteresis -= 1
        last_overflow_iter = cur_iter
    else:
        if consecutive_hysteresis: cur_hysteresis = delayed_shift
        stable_interval = cur_iter - last_overflow_iter - 1
        if stable_interval > 0 and stable_interval % scale_window == 0:
            if not consecutive_hysteresis: cur_hysteresis = delayed_shift
            scale *= scale_factor
    cur_iter += 1

  ``stable_interval`` does not count the first clean step after an overflow (nor step 0),
  so growth needs ``scale_window + 1`` clean steps after an overflow and ``scale_window``
  between two growths: the general rule with ``growth_tracker_start = -1``. DeepSpeed's
  ``cur_hysteresis`` stays at 1 once spent, which is ``max(hysteresis_tracker, 1)`` here.
  Hysteresis is refilled on growth, or on every clean step with
  ``consecutive_hysteresis=True``. 2^16, window 1000, hysteresis (delayed_shift) 2, min 1.

``megatron`` (``megatron.core.optimizer.grad_scaler.DynamicGradScaler.update``)::

    if found_inf:
        growth_tracker = 0
        hysteresis_tracker -= 1
        if hysteresis_tracker <= 0: scale = max(scale * backoff_factor, min_scale)
    else:
        growth_tracker += 1
        if growth_tracker == growth_interval:
            growth_tracker = 0
            hysteresis_tracker = hysteresis        # refilled only on growth
            scale = scale * growth_factor

  = the general rule with start 0 (Megatron's tracker going below 0 acts as 0).
  2^32, window 1000, hysteresis 2, min 1.

Where this differs from a framework: scales are fp32 here, so a scale that would pass
2^127 stays put (torch's rule), where DeepSpeed's Python float would keep growing.

The safety mixprec adds on top (``framework_exact=False``, the default): the scale never
goes below ``SAFE_MIN_SCALE`` = 2^-126, the smallest normal fp32 number (so ``1/scale`` is
finite: torch's rule would otherwise halve a persistently overflowing scale to a
subnormal and then to exactly 0.0 after about 165 steps, and ``0 * (1/0)`` is NaN), and a
scale that sits at its floor while steps keep overflowing is an error
(:class:`~mixprec.scaling.ScaleFloorError`, see :class:`~mixprec.scaling.LossScaler`).
``framework_exact=True`` switches both off: the floor is the preset's ``min_scale`` alone
(0 for torch and apex) and no floor error is raised (the scale stays at ``min_scale``, as
Megatron and apex do; DeepSpeed's own ``raise_error_at_min_scale`` is not reproduced).
Either way a gradient whose unscaled value is not finite is reported as an overflow.

Versions reproduced (``PRESET_SOURCES`` gives the file each preset follows):
``deepspeed`` follows DeepSpeed >= 0.17.1 (``stable_interval``, commit e440506 "Improve
overflow handling in ZeRO"); ``deepspeed-legacy`` follows DeepSpeed <= 0.17.0, whose test
``(cur_iter - last_overflow_iter) % scale_window == 0`` grows one step earlier (growth
tracker restarting at 0, not -1); ``deepspeed-fp16-optimizer`` follows DeepSpeed's non-ZeRO
``FP16_Optimizer._update_scale`` (no hysteresis, ``stable_interval``, clamps at
``min_loss_scale`` without raising).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Literal, get_args

import torch

__all__ = [
    "PRESETS",
    "PRESET_SOURCES",
    "SAFE_MIN_SCALE",
    "PresetName",
    "ScalerConfig",
    "apply_rule_",
    "preset_config",
]

PresetName = Literal[
    "torch", "apex", "deepspeed", "deepspeed-legacy", "deepspeed-fp16-optimizer", "megatron"
]

# Smallest normal fp32 number: the lowest scale whose reciprocal is finite and exact.
SAFE_MIN_SCALE = float.fromhex("0x1p-126")


@dataclass(frozen=True, slots=True)
class ScalerConfig:
    """Settings of a loss scaler (see the module docstring for the rule they drive).

    Args:
        preset: name of the framework rule these settings started from (a label).
        dynamic: adjust the scale from overflows; ``False`` keeps ``init_scale`` fixed.
        init_scale: scale at the first step.
        growth_factor: scale multiplier after ``growth_interval`` clean steps (> 1).
        backoff_factor: scale multiplier when the hysteresis is spent (in (0, 1)).
        growth_interval: clean steps counted before the scale grows (>= 1).
        hysteresis: overflowing steps tolerated before the scale backs off (>= 1).
        min_scale: floor for the scale (0 = none).
        max_scale: ceiling for the scale (``inf`` = none).
        growth_tracker_start: growth-tracker value at the start and after an overflow;
            ``-1`` reproduces DeepSpeed's ``stable_interval`` arithmetic.
        consecutive_hysteresis: refill the hysteresis on every clean step (so only
            consecutive overflows count), instead of only when the scale grows.
        framework_exact: ``False`` (default) adds mixprec's safety: the scale never goes
            below ``SAFE_MIN_SCALE`` (2^-126) and a scale stuck at its floor while steps
            overflow raises :class:`~mixprec.scaling.ScaleFloorError`. ``True`` follows
            the framework's rule alone (torch's scale can then reach 0.0).

    Example:
        >>> preset_config("megatron").init_scale == 2.0**32
        True
    """

    preset: str = "torch"
    dynamic: bool = True
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    hysteresis: int = 1
    min_scale: float = 0.0
    max_scale: float = math.inf
    growth_tracker_start: int = 0
    consecutive_hysteresis: bool = False
    framework_exact: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS_NAMES:
            raise ValueError(f"preset={self.preset!r} is not one of {_names()}")
        for name in ("init_scale", "growth_factor", "backoff_factor", "min_scale", "max_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name}={value!r} must be a real number")
        for name in ("dynamic", "consecutive_hysteresis", "framework_exact"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if not (0.0 < self.init_scale < math.inf):
            raise ValueError(f"init_scale={self.init_scale!r} must be positive and finite")
        if not self.framework_exact and self.init_scale < SAFE_MIN_SCALE:
            raise ValueError(
                f"init_scale={self.init_scale!r} is below 2^-126, the smallest normal fp32 "
                "number (its reciprocal is not finite); pass framework_exact=True to allow it"
            )
        if not self.growth_factor > 1.0:
            raise ValueError(f"growth_factor={self.growth_factor!r} must be > 1.0")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor={self.backoff_factor!r} must be in (0, 1)")
        for name in ("growth_interval", "hysteresis"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.growth_tracker_start not in (0, -1):
            raise ValueError(
                f"growth_tracker_start={self.growth_tracker_start!r} must be 0 or -1 (DeepSpeed)"
            )
        if not 0.0 <= self.min_scale <= self.init_scale <= self.max_scale:
            raise ValueError(
                f"need 0 <= min_scale <= init_scale <= max_scale, got min_scale="
                f"{self.min_scale!r}, init_scale={self.init_scale!r}, max_scale={self.max_scale!r}"
            )

    @property
    def floor(self) -> float:
        """The lowest scale the rule can reach: ``min_scale``, raised to ``SAFE_MIN_SCALE``
        (2^-126) unless ``framework_exact``."""
        return self.min_scale if self.framework_exact else max(self.min_scale, SAFE_MIN_SCALE)

    @property
    def is_torch_rule(self) -> bool:
        """True when the settings reduce to ``torch._amp_update_scale_`` (followed by the
        clamp to :attr:`floor`; exactly torch's rule when ``framework_exact``)."""
        return (
            self.hysteresis == 1
            and self.min_scale == 0.0
            and self.max_scale == math.inf
            and self.growth_tracker_start == 0
        )

    def replace(self, **changes) -> ScalerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ScalerConfig] = {}
PRESETS_NAMES: tuple[str, ...] = get_args(PresetName)


def _names() -> str:
    return ", ".join(repr(n) for n in PRESETS_NAMES)


PRESETS.update(
    torch=ScalerConfig("torch"),
    apex=ScalerConfig("apex", max_scale=2.0**24),
    deepspeed=ScalerConfig(
        "deepspeed", growth_interval=1000, hysteresis=2, min_scale=1.0, growth_tracker_start=-1
    ),
    megatron=ScalerConfig(
        "megatron", init_scale=2.0**32, growth_interval=1000, hysteresis=2, min_scale=1.0
    ),
)
PRESETS["deepspeed-legacy"] = ScalerConfig(
    "deepspeed-legacy", growth_interval=1000, hysteresis=2, min_scale=1.0
)
PRESETS["deepspeed-fp16-optimizer"] = ScalerConfig(
    "deepspeed-fp16-optimizer", growth_interval=1000, min_scale=1.0, growth_tracker_start=-1
)

# The framework code each preset reproduces (tests/data/scaler_trajectories.json holds
# trajectories recorded by running that code).
PRESET_SOURCES: dict[str, str] = {
    "torch": "torch.amp.GradScaler / torch._amp_update_scale_ (torch 2.x)",
    "apex": "apex/amp/scaler.py LossScaler.update_scale (last in apex at e13873de, 2025-04)",
    "deepspeed": "deepspeed/runtime/fp16/loss_scaler.py DynamicLossScaler.update_scale, "
    "DeepSpeed >= 0.17.1 (stable_interval; checked against 0.19.6)",
    "deepspeed-legacy": "deepspeed/runtime/fp16/loss_scaler.py DynamicLossScaler.update_scale, "
    "DeepSpeed <= 0.17.0",
    "deepspeed-fp16-optimizer": "deepspeed/runtime/fp16/fused_optimizer.py "
    "FP16_Optimizer._update_scale (non-ZeRO fp16, no hysteresis), DeepSpeed >= 0.17.1",
    "megatron": "megatron/core/optimizer/grad_scaler.py DynamicGradScaler.update "
    "(Megatron-LM core 0.20)",
}


def preset_config(name: str, **overrides) -> ScalerConfig:
    """The settings of preset ``name`` with some fields overridden.

    Raises:
        ValueError: for an unknown preset (listing the presets) or a bad override.

    Example:
        >>> preset_config("deepspeed", hysteresis=4).hysteresis
        4
    """
    if name not in PRESETS:
        raise ValueError(f"unknown loss-scaler preset {name!r}; choose one of {_names()}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


@torch.no_grad()
def apply_rule_(
    scale: torch.Tensor,
    growth_tracker: torch.Tensor,
    hysteresis_tracker: torch.Tensor,
    found_inf: torch.Tensor,
    config: ScalerConfig,
    *,
    use_torch_kernel: bool = True,
) -> None:
    """Advance the scale state in place by one step, without a host sync.

    Args:
        scale: fp32 0-dim tensor.
        growth_tracker: int32 0-dim tensor on the same device.
        hysteresis_tracker: int32 0-dim tensor on the same device.
        found_inf: fp32 tensor with one element, non-zero when the step overflowed.
        config: the rule's settings.
        use_torch_kernel: build on ``torch._amp_update_scale_`` (for torch's settings it
            is the whole rule, one fused kernel); ``False`` runs the general rule as
            written in the module docstring (the reference the fast path is tested against).

    Example:
        >>> s, g, h = torch.tensor(8.0), torch.tensor(0, dtype=torch.int32), torch.tensor(
        ...     1, dtype=torch.int32)
        >>> apply_rule_(s, g, h, torch.tensor(1.0), preset_config("torch"))
        >>> s.item()
        4.0
    """
    if not config.dynamic:
        return
    if not use_torch_kernel:
        _general_rule_(scale, growth_tracker, hysteresis_tracker, found_inf, config)
        return
    torch_args = (config.growth_factor, config.backoff_factor, config.growth_interval)
    if config.is_torch_rule:
        torch._amp_update_scale_(scale, growth_tracker, found_inf, *torch_args)
        if config.floor > 0.0:
            scale.clamp_(min=config.floor)
        return
    # torch's kernel does the tracker and the finite-guarded growth/backoff; the rest is
    # corrected around it (about 15 small ops instead of about 45 for the general path).
    overflow = found_inf.reshape(()) != 0
    grows = (growth_tracker == config.growth_interval - 1) & ~overflow
    hyst = torch.where(overflow, (hysteresis_tracker - 1).clamp_(min=0), hysteresis_tracker)
    before = scale.clone()
    torch._amp_update_scale_(scale, growth_tracker, found_inf, *torch_args)
    tolerated = overflow & (hyst > 0)  # hysteresis not spent: undo the backoff
    torch.where(tolerated, before, scale, out=scale)
    scale.clamp_(min=config.floor, max=config.max_scale)
    if config.growth_tracker_start:
        growth_tracker.masked_fill_(overflow, config.growth_tracker_start)
    refill = (grows | ~overflow) if config.consecutive_hysteresis else grows
    hysteresis_tracker.copy_(hyst.masked_fill_(refill, config.hysteresis))


def _general_rule_(scale, growth_tracker, hysteresis_tracker, found_inf, config) -> None:
    """The rule of the module docstring, written out with ``torch.where``."""
    overflow = found_inf.reshape(()) != 0
    clean = ~overflow
    spent = (hysteresis_tracker - 1).clamp_(min=0)
    hyst = torch.where(overflow, spent, hysteresis_tracker)
    back_off = overflow & (hyst == 0)
    counted = growth_tracker + 1
    grow = clean & (counted == config.growth_interval)

    wide = scale.double()
    backed = (wide * config.backoff_factor).float().clamp_(min=config.floor)
    grown = (wide * config.growth_factor).float()
    grown = torch.where(torch.isfinite(grown), grown, scale).clamp_(max=config.max_scale)
    new_scale = torch.where(back_off, backed, torch.where(grow, grown, scale))

    new_tracker = torch.where(overflow, config.growth_tracker_start, torch.where(grow, 0, counted))
    refill = (grow | clean) if config.consecutive_hysteresis else grow
    new_hyst = torch.where(refill, config.hysteresis, hyst)

    scale.copy_(new_scale)
    growth_tracker.copy_(new_tracker)
    hysteresis_tracker.copy_(new_hyst)
