"""Checks on the values a loss scaler is given from outside: a scale set by hand, a
checkpoint's state. Each refusal names the bad value and what would be valid.

A scale must be a finite number >= ``SAFE_MIN_SCALE`` (2^-126, the smallest normal fp32
number): at 0 the unscale computes ``0 * (1/0) = NaN``, a negative scale flips every
gradient (training goes uphill), NaN/inf poison every step, and a subnormal scale has an
inexact or infinite reciprocal. With ``framework_exact`` any positive finite scale is taken.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from mixprec.scaling.rules import SAFE_MIN_SCALE, ScalerConfig

__all__ = ["check_loss_scaler_state", "check_scale"]


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
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
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
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key}={value!r} in the loss-scaler state must be an integer in "
                         f"[{low}, {high}]")
    return value


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
    growth = _integer(state, "growth_tracker", config.growth_tracker_start,
                      config.growth_interval - 1)
    hyst = _integer(state, "hysteresis_tracker", 0, config.hysteresis)
    if "steps" in state:
        steps = _integer(state, "steps", 0, 2**62)
        if "steps_skipped" in state:
            _integer(state, "steps_skipped", 0, steps)
    return scale, growth, hyst
