"""A loss scaler's state from and to the outside: checks on a scale set by hand and on a
checkpoint (each refusal names the bad value and what would be valid), and the bodies of
:class:`~mixprec.scaling.LossScaler`'s ``state_dict`` / ``load_state_dict`` / pickling.

A scale must be a finite number >= ``SAFE_MIN_SCALE`` (2^-126, the smallest normal fp32
number): at 0 the unscale computes ``0 * (1/0) = NaN``, a negative scale flips every
gradient (training goes uphill), NaN/inf poison every step, and a subnormal scale has an
inexact or infinite reciprocal. With ``framework_exact`` any positive finite scale is taken.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from mixprec.scaling.rules import SAFE_MIN_SCALE, ScalerConfig

if TYPE_CHECKING:
    from mixprec.scaling.loss_scaler import LossScaler

__all__ = [
    "check_loss_scaler_state",
    "check_scale",
    "load_state_dict_into",
    "pickle_state_of",
    "state_dict_of",
]


def check_scale(value: float | torch.Tensor, *, exact: bool = False, what: str = "scale") -> float:
    """Return ``value`` as a float after checking it is a usable loss scale.

    A tensor must have one element and no ``requires_grad``; it is read to the host
    (one sync).

    Raises:
        ValueError: naming ``what`` and the value, for a non-number, NaN, inf, zero,
            negative or (unless ``exact``) subnormal scale.

    Example:
        >>> check_scale(1024)
        1024.0
        >>> check_scale(0.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: scale=0.0 is not a usable loss scale: it must be finite and >= 2^-126 ...
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.requires_grad:
            raise ValueError(
                f"{what} must be a float or a 1-element tensor with requires_grad=False, got "
                f"a tensor of shape {tuple(value.shape)} (requires_grad={value.requires_grad})"
            )
        number = float(value.detach().reshape(()).item())
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what}={value!r} must be a real number, not {type(value).__name__}")
    else:
        number = float(value)
    lowest = 0.0 if exact else SAFE_MIN_SCALE
    if not (math.isfinite(number) and number > 0.0 and number >= lowest):
        bound = "> 0" if exact else ">= 2^-126 (the smallest normal fp32 number)"
        raise ValueError(
            f"{what}={number!r} is not a usable loss scale: it must be finite and {bound}; "
            "at 0 the unscale writes NaN, a negative scale flips the gradients, and NaN/inf "
            "poison every step"
        )
    return number


def _integer(state: Mapping, key: str, low: int, high: int) -> int:
    value = state[key]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integer or not low <= value <= high:
        raise ValueError(
            f"{key}={value!r} in the loss-scaler state must be an integer in [{low}, {high}]"
        )
    return int(value)


def check_loss_scaler_state(state: Mapping, config: ScalerConfig) -> tuple[float, int, int]:
    """Check a :meth:`LossScaler.state_dict` against the settings it will run with.

    Returns ``(scale, growth_tracker, hysteresis_tracker)``; nothing is changed here, so a
    refused state leaves the scaler as it was.

    Raises:
        ValueError: naming the missing key or the bad value and its valid range.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"a loss-scaler state must be a dict, got {type(state).__name__}")
    missing = [k for k in ("scale", "growth_tracker", "hysteresis_tracker") if k not in state]
    if missing:
        raise ValueError(
            f"the loss-scaler state lacks {', '.join(map(repr, missing))}; it has "
            f"{sorted(map(str, state))} (was it saved by LossScaler.state_dict()?)"
        )
    scale = state["scale"]
    scale = check_scale(scale, exact=config.framework_exact, what="scale")
    growth = _integer(
        state, "growth_tracker", config.growth_tracker_start, config.growth_interval - 1
    )
    hyst = _integer(state, "hysteresis_tracker", 0, config.hysteresis)
    if "steps" in state:
        steps = _integer(state, "steps", 0, 2**62)
        if "steps_skipped" in state:
            _integer(state, "steps_skipped", 0, steps)
    return scale, growth, hyst


def state_dict_of(scaler: LossScaler) -> dict:
    """``scaler.state_dict()``: settings, scale state and counters as Python values (syncs)."""
    if not scaler.enabled:
        return {"enabled": False}
    if scaler._scale is None:
        scale, growth, hyst = scaler._init_state
        skipped = scaler._init_skipped
    else:
        scale = float(scaler._scale.item())
        growth = int(scaler._growth_tracker.item())
        hyst = int(scaler._hysteresis_tracker.item())
        skipped = int(scaler._log.skipped.item())
    return {
        "enabled": True,
        "config": dataclasses.asdict(scaler.config),
        "scale": scale,
        "growth_tracker": growth,
        "hysteresis_tracker": hyst,
        "steps": scaler._steps,
        "steps_skipped": skipped,
    }


def load_state_dict_into(scaler: LossScaler, state: dict) -> None:
    """``scaler.load_state_dict(state)``: everything is checked before anything changes."""
    if not scaler.enabled:
        return
    if not isinstance(state, Mapping):
        raise ValueError(f"a loss-scaler state must be a dict, got {type(state).__name__}")
    if not state.get("enabled", True):
        raise RuntimeError("the state dict was saved from a disabled LossScaler; it holds no scale")
    config = scaler.config
    if "config" in state:
        saved = state["config"]
        if not isinstance(saved, Mapping):
            raise ValueError(f"config={saved!r} in the loss-scaler state must be a dict")
        known = {f.name for f in dataclasses.fields(ScalerConfig)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise ValueError(
                f"config in the loss-scaler state has unknown keys {unknown}; "
                f"valid keys are {sorted(known)}"
            )
        config = ScalerConfig(**saved)
    values = check_loss_scaler_state(state, config)
    scaler.config = config
    scaler._init_state = values
    scaler._low = values[0]
    scaler._mirror_fresh = False  # the host copy holds an older scale
    scaler._steps = int(state.get("steps", scaler._steps))
    if "steps_skipped" in state:
        scaler._init_skipped = int(state["steps_skipped"])
    elif scaler._scale is not None:
        scaler._init_skipped = int(scaler._log.skipped.item())
    if scaler._scale is not None:
        scaler._scale.fill_(values[0])
        scaler._growth_tracker.fill_(values[1])
        scaler._hysteresis_tracker.fill_(values[2])
        scaler._log.skipped.fill_(scaler._init_skipped)
        scaler._log.origin = scaler._steps  # steps before the checkpoint are not in the log


def pickle_state_of(scaler: LossScaler) -> dict:
    """``scaler.__getstate__()``: the instance dict with every tensor replaced by Python
    values (the state is rebuilt lazily on the device of the next loss) and no record."""
    if scaler._pending:
        raise RuntimeError(
            "a LossScaler may only be pickled between iterations: unscale_() or check_() "
            "was called since the last update(); call update() first"
        )
    state = scaler.__dict__.copy()
    if scaler._scale is not None:
        state["_init_state"] = (
            float(scaler._scale.item()),
            int(scaler._growth_tracker.item()),
            int(scaler._hysteresis_tracker.item()),
        )
        state["_init_skipped"] = int(scaler._log.skipped.item())
        state["_low"] = state["_init_state"][0]
    state.update(
        _scale=None,
        _growth_tracker=None,
        _hysteresis_tracker=None,
        _log=None,
        _mirror=None,
        _mirror_event=None,
        _mirror_fresh=False,
        _floor_scanned=scaler._steps,
        _floor_streak=0,
        _overflow_run=0,
    )
    return state
