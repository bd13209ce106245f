"""The side of :class:`~mixprec.scaling.GradScaler` that torch code sees: torch's private
attributes, its getters and setters, ``state_dict`` / ``load_state_dict``, pickling, and the
exception types that are also the ``AssertionError`` torch raises."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from mixprec.scaling.checks import OVERRIDABLE, check_loss_scaler_state, check_scale
from mixprec.scaling.rules import preset_config

__all__ = [
    "GradScalerRuntimeError",
    "GradScalerValueError",
    "TorchGradScalerFace",
]


class GradScalerRuntimeError(RuntimeError, AssertionError):
    """Misuse of a :class:`GradScaler` where ``torch.amp.GradScaler`` raises
    ``AssertionError``: catchable as either type."""


class GradScalerValueError(ValueError, AssertionError):
    """A bad argument where ``torch.amp.GradScaler`` raises ``AssertionError``: catchable
    as ``ValueError`` or ``AssertionError``."""


def _torch_attribute(name: str, read, doc: str) -> property:
    def fset(self, value) -> None:
        raise AttributeError(
            f"mixprec.GradScaler.{name} is read-only (the state lives in its LossScaler, "
            "scaler.loss_scaler): use update(new_scale=...), load_state_dict(...) or the "
            "set_growth_factor / set_backoff_factor / set_growth_interval setters"
        )

    return property(read, fset, doc=doc)


def _refresh_per_optimizer_state() -> dict[str, Any]:
    return {"stage": OptState.READY, "found_inf_per_device": {}}


class TorchGradScalerFace(torch.amp.GradScaler):
    """What :class:`~mixprec.scaling.GradScaler` shows to code written for
    ``torch.amp.GradScaler``: its private attributes (read from the LossScaler; torch's
    ``__init__`` is not run), getters and setters, checkpoints and pickling.

    ``GradScaler`` (which extends it) sets ``_scaler`` (a LossScaler), ``_enabled``,
    ``_device`` and ``_per_optimizer_states``, and provides ``_require_scale`` and
    ``_record``.
    """

    # torch.amp.GradScaler's private attributes, read from the LossScaler (torch's __init__
    # is not run: every public method is this class's own).
    _scale = _torch_attribute(
        "_scale", lambda self: self._scaler.scale_state.scale, "The scale tensor."
    )
    _growth_tracker = _torch_attribute(
        "_growth_tracker",
        lambda self: self._scaler.scale_state.growth_tracker,
        "Clean steps counted toward the next growth (int32 tensor).",
    )
    _init_scale = _torch_attribute(
        "_init_scale", lambda self: self._scaler.scale_state.initial[0], "The scale to start from."
    )
    _init_growth_tracker = _torch_attribute(
        "_init_growth_tracker", lambda self: self._scaler.scale_state.initial[1], "Tracker start."
    )
    _growth_factor = _torch_attribute(
        "_growth_factor", lambda self: self._scaler.config.growth_factor, "Growth factor."
    )
    _backoff_factor = _torch_attribute(
        "_backoff_factor", lambda self: self._scaler.config.backoff_factor, "Backoff factor."
    )
    _growth_interval = _torch_attribute(
        "_growth_interval", lambda self: self._scaler.config.growth_interval, "Interval."
    )

    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        self._scaler.materialize(dev)

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        self._require_scale("_check_inf_per_device")
        self._record(optimizer, unscale=False)
        return self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]

    # -- getters / setters (as torch) --------------------------------------------------------
    def get_scale(self) -> float:
        """The current scale as a float; 1.0 when disabled.

        .. warning:: Syncs with the device.
        """
        return self._scaler.get_scale()

    def get_growth_factor(self) -> float:
        """The scale growth factor."""
        return self._scaler.config.growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        """Set the scale growth factor."""
        self._scaler.config = self._scaler.config.replace(growth_factor=new_factor)

    def get_backoff_factor(self) -> float:
        """The scale backoff factor."""
        return self._scaler.config.backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        """Set the scale backoff factor."""
        self._scaler.config = self._scaler.config.replace(backoff_factor=new_factor)

    def get_growth_interval(self) -> int:
        """The growth interval."""
        return self._scaler.config.growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        """Set the growth interval."""
        self._scaler.config = self._scaler.config.replace(growth_interval=new_interval)

    def _get_growth_tracker(self) -> int:
        if not self._enabled:
            return 0
        return self._scaler.scale_state.values()[1]

    def is_enabled(self) -> bool:
        """Whether this scaler is enabled."""
        return self._enabled

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's five entries (``scale``, ``growth_factor``, ``backoff_factor``,
        ``growth_interval``, ``_growth_tracker``) plus, when the rule is not torch's,
        ``preset``, ``hysteresis``, ``min_scale``, ``max_scale``,
        ``consecutive_hysteresis``, ``framework_exact`` and ``_hysteresis_tracker``.
        Empty when disabled.
        Syncs.
        """
        if not self._enabled:
            return {}
        config = self._scaler.config
        state = {
            "scale": self.get_scale(),
            "growth_factor": config.growth_factor,
            "backoff_factor": config.backoff_factor,
            "growth_interval": config.growth_interval,
            "_growth_tracker": self._get_growth_tracker(),
        }
        if config.preset != "torch" or not config.is_torch_rule or config.framework_exact:
            hyst = self._scaler.scale_state.values()[2]
            state.update(
                preset=config.preset,
                hysteresis=config.hysteresis,
                min_scale=config.min_scale,
                max_scale=config.max_scale,
                consecutive_hysteresis=config.consecutive_hysteresis,
                framework_exact=config.framework_exact,
                _hysteresis_tracker=hyst,
            )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by this class or by ``torch.amp.GradScaler``.

        Everything is checked before anything changes.

        Raises:
            RuntimeError: for an empty state (saved from a disabled scaler), as torch.
            ValueError: for a missing key, a NaN / inf / zero / negative / subnormal scale,
                a factor or interval out of range or a tracker out of its range.
        """
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError(
                "The source state dict is empty, possibly because it was saved "
                "from a disabled instance of GradScaler."
            )
        required = ("scale", "growth_factor", "backoff_factor", "growth_interval",
                    "_growth_tracker")
        missing = [key for key in required if key not in state_dict]
        if missing:
            raise ValueError(
                f"the GradScaler state lacks {', '.join(map(repr, missing))}; it has "
                f"{sorted(map(str, state_dict))}"
            )
        config = self._scaler.config
        if "preset" in state_dict and state_dict["preset"] != config.preset:
            config = preset_config(state_dict["preset"])
        changes = {
            key: state_dict[key]
            for key in OVERRIDABLE
            if key != "init_scale" and key in state_dict
        }
        exact = changes.get("framework_exact", config.framework_exact)
        scale = check_scale(state_dict["scale"], exact=exact is True, what="scale")
        config = config.replace(init_scale=scale, **changes)
        state = {
            "config": dataclasses.asdict(config),
            "scale": scale,
            "growth_tracker": state_dict["_growth_tracker"],
            "hysteresis_tracker": state_dict.get("_hysteresis_tracker", config.hysteresis),
        }
        check_loss_scaler_state(state, config)
        self._scaler.load_state_dict(state)

    # -- pickling (as torch: only between iterations) --------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        if self._enabled and len(self._per_optimizer_states) != 0:
            raise GradScalerRuntimeError(
                "A GradScaler instance may only be pickled at the beginning "
                "of an iteration, or at the end after scaler.update()."
            )
        state = self.__dict__.copy()
        state["_per_optimizer_states"] = None  # a defaultdict of a local function
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)
