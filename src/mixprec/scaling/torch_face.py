"""What code written for ``torch.amp.GradScaler`` sees of a :class:`~mixprec.scaling.GradScaler`,
as pieces the class uses: the exception types that are also the ``AssertionError`` torch
raises, read-only properties for torch's private attributes, and conversion between torch's
checkpoint format and a :class:`~mixprec.scaling.LossScaler`'s. Each piece reads the
LossScaler through its public API."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from mixprec.scaling.checks import OVERRIDABLE, check_scale
from mixprec.scaling.loss_scaler import LossScaler
from mixprec.scaling.rules import preset_config

__all__ = [
    "GradScalerRuntimeError",
    "GradScalerValueError",
    "loss_scaler_state_of",
    "torch_attribute",
    "torch_state_dict",
]


class GradScalerRuntimeError(RuntimeError, AssertionError):
    """Misuse of a :class:`GradScaler` where ``torch.amp.GradScaler`` raises
    ``AssertionError``: catchable as either type."""


class GradScalerValueError(ValueError, AssertionError):
    """A bad argument where ``torch.amp.GradScaler`` raises ``AssertionError``: catchable
    as ``ValueError`` or ``AssertionError``."""


def torch_attribute(name: str, read: Callable[[LossScaler], Any], doc: str) -> property:
    """A read-only property named like torch's private attribute ``name``, whose value is
    ``read(scaler.loss_scaler)``; assigning it raises ``AttributeError`` naming the public
    way to change the state."""

    def fget(self) -> Any:
        return read(self.loss_scaler)

    def fset(self, value) -> None:
        raise AttributeError(
            f"mixprec.GradScaler.{name} is read-only (the state lives in its LossScaler, "
            "scaler.loss_scaler): use update(new_scale=...), load_state_dict(...) or the "
            "set_growth_factor / set_backoff_factor / set_growth_interval setters"
        )

    return property(fget, fset, doc=doc)


_FACTORS = ("growth_factor", "backoff_factor", "growth_interval")  # torch's settings
_TORCH_KEYS = ("scale", *_FACTORS, "_growth_tracker")  # torch's state_dict
# What a rule other than torch's adds (with "_hysteresis_tracker").
_EXTRA = ("preset", "hysteresis", "min_scale", "max_scale", "consecutive_hysteresis",
          "framework_exact")


def torch_state_dict(scaler: LossScaler) -> dict[str, Any]:
    """``scaler``'s state in torch's format: torch's five entries (``scale``,
    ``growth_factor``, ``backoff_factor``, ``growth_interval``, ``_growth_tracker``) plus,
    when the rule is not torch's, ``preset``, ``hysteresis``, ``min_scale``, ``max_scale``,
    ``consecutive_hysteresis``, ``framework_exact`` and ``_hysteresis_tracker``. Syncs.

    Example:
        >>> sorted(torch_state_dict(LossScaler()))
        ['_growth_tracker', 'backoff_factor', 'growth_factor', 'growth_interval', 'scale']
    """
    config = scaler.config
    scale, growth, hyst = scaler.scale_state.values()
    state = {"scale": scale, **{k: getattr(config, k) for k in _FACTORS}, "_growth_tracker": growth}
    if config.preset != "torch" or not config.is_torch_rule or config.framework_exact:
        state.update({k: getattr(config, k) for k in _EXTRA}, _hysteresis_tracker=hyst)
    return state


def loss_scaler_state_of(state_dict: Mapping[str, Any], scaler: LossScaler) -> dict[str, Any]:
    """A state saved by :func:`torch_state_dict` or by ``torch.amp.GradScaler``, as a
    :meth:`LossScaler.state_dict <mixprec.scaling.LossScaler.state_dict>` for ``scaler``
    (settings absent from it keep ``scaler``'s). Checked further by the load.

    Raises:
        RuntimeError: for an empty state (saved from a disabled scaler), as torch.
        ValueError: for a missing key or a NaN / inf / zero / negative / subnormal scale.
    """
    if len(state_dict) == 0:
        raise RuntimeError(
            "The source state dict is empty, possibly because it was saved "
            "from a disabled instance of GradScaler."
        )
    missing = [key for key in _TORCH_KEYS if key not in state_dict]
    if missing:
        raise ValueError(
            f"the GradScaler state lacks {', '.join(map(repr, missing))}; it has "
            f"{sorted(map(str, state_dict))}"
        )
    config = scaler.config
    if "preset" in state_dict and state_dict["preset"] != config.preset:
        config = preset_config(state_dict["preset"])
    changes = {k: state_dict[k] for k in OVERRIDABLE if k != "init_scale" and k in state_dict}
    exact = changes.get("framework_exact", config.framework_exact)
    scale = check_scale(state_dict["scale"], exact=exact is True, what="scale")
    config = config.replace(init_scale=scale, **changes)
    return {
        "config": dataclasses.asdict(config),
        "scale": scale,
        "growth_tracker": state_dict["_growth_tracker"],
        "hysteresis_tracker": state_dict.get("_hysteresis_tracker", config.hysteresis),
    }
