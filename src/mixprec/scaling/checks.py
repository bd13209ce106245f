"""Checks on what a loss scaler is given from the outside: a scale set by hand and a
checkpoint. Each refusal names the bad value and what would be valid.

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

import torch

from mixprec.scaling.rules import SAFE_MIN_SCALE, ScalerConfig, preset_config

__all__ = [
    "OVERRIDABLE",
    "check_loss_scaler_state",
    "check_record_settings",
    "check_scale",
    "read_loss_scaler_state",
    "scaler_config",
]

# The ScalerConfig fields a LossScaler / GradScaler argument overrides (None = the preset's).
OVERRIDABLE = (
    "init_scale",
    "growth_factor",
    "backoff_factor",
    "growth_interval",
    "hysteresis",
    "min_scale",
    "max_scale",
    "consecutive_hysteresis",
    "framework_exact",
)


def scaler_config(preset: str, dynamic: bool, overrides: Mapping) -> ScalerConfig:
    """The :class:`ScalerConfig` of ``preset`` with ``overrides`` (fields of
    :data:`OVERRIDABLE`); a static scale (``dynamic=False``) has no floor nor ceiling
    unless given one.

    Raises:
        ValueError: for an unknown preset or a bad setting (named, with the choices).
    """
    overrides = dict(overrides)
    if not dynamic:
        overrides.setdefault("min_scale", 0.0)
        overrides.setdefault("max_scale", math.inf)
    return preset_config(preset, dynamic=dynamic, **overrides)


def check_record_settings(floor_patience: int, history_len: int, check_interval: int | None) -> int:
    """Check a LossScaler's record settings; return ``check_interval`` (``None``:
    ``min(100, history_len)``).

    Raises:
        ValueError: for a ``floor_patience`` or ``history_len`` that is not an integer
            >= 1, or a ``check_interval`` not in ``[0, history_len]``.
    """
    for name, value in (("floor_patience", floor_patience), ("history_len", history_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if check_interval is None:
        check_interval = min(100, history_len)
    if isinstance(check_interval, bool) or not isinstance(check_interval, int):
        raise ValueError(f"check_interval={check_interval!r} must be an integer >= 0")
    if not 0 <= check_interval <= history_len:
        raise ValueError(
            f"check_interval={check_interval!r} must be in [0, history_len={history_len}] "
            "(the floor check reads the steps kept in the record)"
        )
    return check_interval


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


def read_loss_scaler_state(
    state: Mapping, config: ScalerConfig
) -> tuple[ScalerConfig, tuple[float, int, int], int | None, int | None]:
    """Check a :meth:`LossScaler.state_dict` for a scaler running with ``config``.

    Returns ``(config, (scale, growth_tracker, hysteresis_tracker), steps, steps_skipped)``:
    the saved config if the state has one (else ``config``), and ``None`` for a counter the
    state lacks. Nothing is changed here, so a refused state leaves the scaler as it was.

    Raises:
        RuntimeError: for the state of a disabled scaler.
        ValueError: naming the missing key, an unknown config key or the bad value.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"a loss-scaler state must be a dict, got {type(state).__name__}")
    if not state.get("enabled", True):
        raise RuntimeError("the state dict was saved from a disabled LossScaler; it holds no scale")
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
    steps = int(state["steps"]) if "steps" in state else None
    skipped = int(state["steps_skipped"]) if "steps_skipped" in state else None
    return config, values, steps, skipped
