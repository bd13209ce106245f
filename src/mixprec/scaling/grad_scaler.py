"""GradScaler: torch.amp.GradScaler's API and state machine over a :class:`LossScaler`."""

from __future__ import annotations

import warnings
from collections import abc
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from mixprec.scaling.checks import check_scale
from mixprec.scaling.loss_scaler import LossScaler
from mixprec.scaling.optimizer_checks import OptimizerChecks
from mixprec.scaling.torch_face import (
    GradScalerRuntimeError,
    GradScalerValueError,
    loss_scaler_state_of,
    torch_attribute,
    torch_state_dict,
)

__all__ = ["GradScaler", "GradScalerRuntimeError", "GradScalerValueError", "OptState"]


class GradScaler(torch.amp.GradScaler):
    """Drop-in for ``torch.amp.GradScaler``: a subclass with the same methods and state
    machine (``isinstance(scaler, torch.amp.GradScaler)`` is True).

    Errors: where torch raises ``RuntimeError`` or ``ValueError`` so does this class; where
    torch raises ``AssertionError`` (misuse, a bad ``new_scale``, factors out of range,
    pickling mid-iteration) this class raises :class:`GradScalerRuntimeError` /
    :class:`GradScalerValueError`, which are both ``AssertionError`` and the
    ``RuntimeError`` / ``ValueError`` the house style asks for. Messages differ from torch's.
    Added refusals torch does not have: a NaN / inf / zero / negative / subnormal scale in
    :meth:`update` or :meth:`load_state_dict` (``ValueError``).

    Private attributes that code outside torch reads: ``_scale`` and ``_growth_tracker``
    (the 0-dim tensors, ``None`` before the first :meth:`scale`), ``_per_optimizer_states``
    (torch's layout), ``_enabled``, ``_device``, ``_init_scale``, ``_growth_factor``,
    ``_backoff_factor``, ``_growth_interval``, ``_init_growth_tracker`` read as in torch;
    assigning any of the properties raises ``AttributeError`` naming the public way.
    ``_unscale_grads_`` is torch's own (it checks before unscaling, as torch does);
    ``_check_inf_per_device`` runs this class's check.

    It holds a :class:`LossScaler` (:attr:`loss_scaler`: the scale, rule and telemetry) and
    an :class:`~mixprec.scaling.optimizer_checks.OptimizerChecks` (each optimizer's stage
    and ``found_inf`` this iteration), and delegates to them; torch's ``__init__`` is not
    run. Pickling (as torch): only between iterations, else :class:`GradScalerRuntimeError`;
    the pickle holds plain Python values (no tensors, no telemetry record), so it is small
    and loads on a machine without the device it was made on.

    With ``preset="torch"`` (default) the scale sequence, skipped steps and parameters
    are exactly torch's. ``preset="apex" | "deepspeed" | "megatron"`` follows that
    framework's rule instead (arguments left ``None`` take the preset's values; see
    :mod:`mixprec.scaling.rules`). Extras over torch: :meth:`telemetry` (steps, skips,
    scale history, first non-finite parameter of each skipped step) and the floor error
    of :class:`LossScaler` (for presets with a ``min_scale``). Parameters are named by
    the optimizer's ``param_names`` (an optimizer built from ``model.named_parameters()``)
    or else as ``param_groups[g]['params'][i]``.

    Per optimizer, each iteration moves READY -> (UNSCALED) -> STEPPED -> READY (on
    :meth:`update`); calling out of order raises ``RuntimeError``. ``enabled=False``
    makes :meth:`step` call ``optimizer.step()`` and every other method a no-op.

    Host syncs: :meth:`unscale_` none; :meth:`update` none except on every
    ``check_interval``-th call (the floor check of :class:`LossScaler` copies its record
    to the host); :meth:`step` one (reading ``found_inf``), none for optimizers with
    ``_step_supports_amp_scaling`` (torch's fused Adam/AdamW/SGD), which receive
    ``grad_scale`` / ``found_inf`` tensors instead.

    Locating the first non-finite parameter (``locate_nonfinite=True``, default) costs
    nothing extra when :meth:`step` unscales itself and then reads ``found_inf``: the
    gradients are located only on a step that overflowed. After an explicit
    :meth:`unscale_` (gradients may be clipped before :meth:`step`) and for fused
    optimizers it is done eagerly, at the cost described in :class:`LossScaler`.

    Args:
        device: device type of the scale ("cuda" as in torch, or "cpu", ...). A "cuda"
            scaler with no CUDA available is disabled with a warning, as torch does.
        init_scale, growth_factor, backoff_factor, growth_interval: as in torch
            (defaults 2**16, 2.0, 0.5, 2000 for ``preset="torch"``).
        enabled: ``False`` turns every method into a no-op.
        preset: framework rule to follow.
        **options: more :class:`LossScaler` settings (``hysteresis``, ``min_scale``,
            ``max_scale``, ``locate_nonfinite``, ``floor_patience``, ...).

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scaler = GradScaler("cpu")
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     loss = model(torch.randn(8, 4)).float().pow(2).mean()
        >>> scaler.scale(loss).backward()
        >>> scaler.step(opt)
        >>> scaler.update()
        >>> scaler.get_scale()
        65536.0
    """

    def __init__(  # noqa: PLR0913 - torch's signature
        self,
        device: str = "cuda",
        init_scale: float | None = None,
        growth_factor: float | None = None,
        backoff_factor: float | None = None,
        growth_interval: int | None = None,
        enabled: bool = True,
        *,
        preset: str = "torch",
        **options: Any,
    ) -> None:
        self._device = device
        self._enabled = enabled
        if device == "cuda" and enabled and not torch.cuda.is_available():
            warnings.warn(
                "mixprec.GradScaler is enabled, but CUDA is not available.  Disabling.",
                stacklevel=2,
            )
            self._enabled = False
        try:
            self._scaler = LossScaler(
                enabled=self._enabled,
                init_scale=init_scale,
                growth_factor=growth_factor,
                backoff_factor=backoff_factor,
                growth_interval=growth_interval,
                preset=preset,
                **options,
            )
        except ValueError as error:  # torch raises AssertionError for bad factors
            raise GradScalerValueError(str(error)) from None
        self._checks = OptimizerChecks(self._scaler)

    @property
    def loss_scaler(self) -> LossScaler:
        """The :class:`LossScaler` holding the scale, rule and telemetry."""
        return self._scaler

    # -- torch.amp.GradScaler's private attributes, read from the parts ----------------------
    _scale = torch_attribute("_scale", lambda s: s.scale_state.scale, "The scale tensor.")
    _growth_tracker = torch_attribute(
        "_growth_tracker", lambda s: s.scale_state.growth_tracker, "Clean steps (int32)."
    )
    _init_scale = torch_attribute("_init_scale", lambda s: s.scale_state.initial[0], "Start.")
    _init_growth_tracker = torch_attribute(
        "_init_growth_tracker", lambda s: s.scale_state.initial[1], "Tracker start."
    )
    _growth_factor = torch_attribute("_growth_factor", lambda s: s.config.growth_factor, "x")
    _backoff_factor = torch_attribute("_backoff_factor", lambda s: s.config.backoff_factor, "x")
    _growth_interval = torch_attribute(
        "_growth_interval", lambda s: s.config.growth_interval, "Steps between growths."
    )

    @property
    def _per_optimizer_states(self) -> dict[int, dict[str, Any]]:
        """torch's layout: ``{id(optimizer): {"stage": OptState, "found_inf_per_device":
        {device: tensor}}}`` for this iteration."""
        return self._checks.states

    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        self._scaler.materialize(dev)

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        self._require_scale("_check_inf_per_device")
        self._checks.run(optimizer, unscale=False)
        return self._checks[optimizer]["found_inf_per_device"]

    def _require_scale(self, funcname: str) -> torch.Tensor:
        scale = self._scaler.scale_state.scale
        if scale is None:
            raise GradScalerRuntimeError(
                f"{funcname}() was called before the scale exists: call "
                "scaler.scale(loss).backward() earlier in the iteration."
            )
        return scale

    def _get_scale_async(self) -> torch.Tensor | None:
        return self._scaler.scale_state.scale

    # -- scale -----------------------------------------------------------------------------
    def scale(self, outputs):
        """Multiply a tensor or a (nested) iterable of tensors by the scale.

        Returns ``outputs`` unchanged when disabled.
        """
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            return self._scaler.scale_loss(outputs)
        copies: dict[torch.device, torch.Tensor] = {}

        def apply_scale(val):
            if isinstance(val, torch.Tensor):
                scale = self._scaler.materialize(val.device)
                if val.device not in copies:
                    copies[val.device] = scale.to(val.device, non_blocking=True, copy=True)
                return val * copies[val.device]
            if isinstance(val, abc.Iterable):
                mapped = map(apply_scale, val)
                return type(val)(mapped) if isinstance(val, (list, tuple)) else mapped
            raise ValueError("outputs must be a Tensor or an iterable of Tensors")

        return apply_scale(outputs)

    # -- unscale_ / step / update -----------------------------------------------------------
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients by the scale in place (no sync).

        Raises:
            RuntimeError: if called twice for ``optimizer`` before :meth:`update`, or
                after :meth:`step`.
        """
        if not self._enabled:
            return
        self._require_scale("unscale_")
        state = self._checks[optimizer]
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update()."
            )
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        self._checks.run(optimizer, unscale=True)
        state["stage"] = OptState.UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any):
        """Unscale (unless done) and call ``optimizer.step(*args, **kwargs)`` unless the
        gradients hold an inf/NaN. Returns what ``optimizer.step`` returned, or None.

        Raises:
            RuntimeError: if called twice before :meth:`update`, with a closure, or with
                no gradients to check.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._require_scale("step")
        state = self._checks[optimizer]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")

        if getattr(optimizer, "_step_supports_amp_scaling", False):
            return self._checks.fused_step(optimizer, self, args, kwargs)

        if state["stage"] is OptState.READY:
            # Nothing can touch the gradients between this unscale and the read below, so
            # the first non-finite one is located only if the step overflowed.
            self._checks.run(optimizer, unscale=True, locate=False)
            state["stage"] = OptState.UNSCALED
        if not state["found_inf_per_device"]:
            raise GradScalerRuntimeError(
                "No inf checks were recorded for this optimizer: none of its parameters "
                "has a gradient. Call backward() on the scaled loss before step()."
            )
        retval = None
        if not self._checks.found_inf(optimizer).item():
            retval = optimizer.step(*args, **kwargs)
        else:
            self._checks.locate(optimizer)
        state["unlocated"] = None
        state["stage"] = OptState.STEPPED
        return retval

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Move the scale by the preset's rule, or set it to ``new_scale``. No sync except
        the floor check's every ``check_interval`` updates and a ``new_scale`` tensor's read.

        Raises:
            GradScalerRuntimeError: if no optimizer was unscaled or stepped since the last
                update (and no ``new_scale`` is given), or before the first :meth:`scale`.
            GradScalerValueError: for a ``new_scale`` tensor that is not a 1-element tensor
                on this scaler's device type with ``requires_grad=False``.
            ValueError: for a NaN, inf, zero, negative or subnormal ``new_scale`` (read to
                the host when a tensor: one sync).
            ScaleFloorError: from the periodic floor check (see :class:`LossScaler`).
        """
        if not self._enabled:
            return
        self._require_scale("update")
        found_infs = self._checks.all_found()
        if new_scale is not None:
            if isinstance(new_scale, torch.Tensor):
                if (
                    new_scale.device.type != self._device
                    or new_scale.numel() != 1
                    or new_scale.requires_grad
                ):
                    raise GradScalerValueError(
                        "new_scale should be a float or a 1-element torch.cuda.FloatTensor or "
                        "torch.FloatTensor with requires_grad=False."
                    )
            exact = self._scaler.config.framework_exact
            new_scale = check_scale(new_scale, exact=exact, what="new_scale")
        elif not found_infs:
            raise GradScalerRuntimeError(
                "No inf checks were recorded prior to update(): call step() (or unscale_()) "
                "for each optimizer before update()."
            )
        # Clear the iteration's records first, so a floor error leaves a usable scaler.
        self._checks.reset()
        if found_infs:
            combined = found_infs[0]
            for extra in found_infs[1:]:
                combined = combined + extra
            self._scaler.update(combined, new_scale=new_scale)
        else:
            self._scaler.set_scale(new_scale)

    def telemetry(self):
        """Steps, skipped steps, scale history and first non-finite parameters (syncs)."""
        return self._scaler.telemetry()

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
        return self._scaler.scale_state.values()[1] if self._enabled else 0

    def is_enabled(self) -> bool:
        """Whether this scaler is enabled."""
        return self._enabled

    # -- checkpoints and pickling (as torch) ---------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's format (:func:`~mixprec.scaling.torch_face.torch_state_dict`); empty
        when disabled. Syncs."""
        return torch_state_dict(self._scaler) if self._enabled else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by this class or by ``torch.amp.GradScaler``. Everything is
        checked before anything changes.

        Raises:
            RuntimeError: for an empty state (saved from a disabled scaler), as torch.
            ValueError: for a missing key, a NaN / inf / zero / negative / subnormal scale,
                a factor or interval out of range or a tracker out of its range.
        """
        if self._enabled:
            self._scaler.load_state_dict(loss_scaler_state_of(state_dict, self._scaler))

    def __getstate__(self) -> dict[str, Any]:
        if self._enabled and self._checks.pending:
            raise GradScalerRuntimeError(
                "A GradScaler instance may only be pickled at the beginning "
                "of an iteration, or at the end after scaler.update()."
            )
        state = self.__dict__.copy()
        del state["_checks"]  # empty between iterations; made again on loading
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._checks = OptimizerChecks(self._scaler)
