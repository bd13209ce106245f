"""LossScaler: none / static / dynamic loss scaling behind one interface, sync-free between
periodic floor checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from mixprec.scaling.checks import (
    OVERRIDABLE,
    check_record_settings,
    check_scale,
    read_loss_scaler_state,
    scaler_config,
)
from mixprec.scaling.kernels import GradChecker, LocateMethod
from mixprec.scaling.record import ScalerRecord
from mixprec.scaling.rules import ScalerConfig
from mixprec.scaling.scale_state import ScaleState
from mixprec.scaling.telemetry import ScalerTelemetry

__all__ = ["LossScaler"]

Grads = Sequence[Tensor | None]  # gradients to check (None entries are skipped)
Names = Sequence[str] | None  # their names, for the telemetry and the floor error


class LossScaler:
    """Scales the loss, unscales and checks gradients, and moves the scale.

    One interface for no scaling (``enabled=False``: every method is a no-op), a static
    scale (``dynamic=False``) and dynamic scaling by one of the framework rules in
    :mod:`mixprec.scaling.rules` (``preset``; each setting left as ``None`` takes the
    preset's value). It holds three parts, each owning its data: a
    :class:`~mixprec.scaling.scale_state.ScaleState` (the scale tensors), a
    :class:`~mixprec.scaling.record.ScalerRecord` (steps, on-device log, floor check) and
    a :class:`~mixprec.scaling.kernels.GradChecker` (the grouped pass over the gradients).

    Host syncs: none in :meth:`scale_loss`, :meth:`unscale_` and :meth:`check_`; none in
    :meth:`update` (the rule runs as tensor ops) except on every ``check_interval``-th
    call, whose floor check copies the record to the host. :meth:`get_scale`,
    :meth:`state_dict`, :meth:`check`, :meth:`telemetry`, pickling and a tensor given to
    :meth:`set_scale` read the device (they sync). A pickle holds Python values only (no
    tensors, no record) and is refused between :meth:`unscale_` and :meth:`update`.

    What the step applies is what is checked: while the scale may be below 1 (known on the
    host without a sync), the check also covers the unscaled values. ``locate_nonfinite``
    records which gradient was the first non-finite one (cost: :mod:`~.kernels`).

    Floor (mixprec's safety): the rule never lowers the scale below ``config.floor`` =
    ``max(min_scale, 2^-126)`` (one set by hand need only be >= 2^-126); :meth:`check`
    raises :class:`ScaleFloorError` when ``floor_patience`` consecutive steps overflowed
    at that floor, naming the first non-finite gradient. :meth:`update` runs it every
    ``check_interval`` steps, :meth:`telemetry` too. ``framework_exact=True`` removes both.

    Args:
        enabled: ``False`` makes every method a no-op (``unscale_`` returns zeros).
        dynamic: adjust the scale; ``False`` keeps ``init_scale`` (static scaling).
        init_scale, growth_factor, backoff_factor, growth_interval, hysteresis,
        min_scale, max_scale, consecutive_hysteresis, framework_exact: see
            :class:`~mixprec.scaling.rules.ScalerConfig`; ``None`` = the preset's value.
        preset: framework rule to follow.
        device: device of the scale state; ``None`` = that of the first loss or grads.
        locate_nonfinite: record the first non-finite gradient of each step.
        locate_method: ``"flags"``, ``"amax"`` or ``"auto"`` (flags on CPU, amax elsewhere).
        floor_patience: consecutive overflowing steps at the floor before the error.
        check_interval: steps between periodic floor checks (0 = only when asked;
            default 100, at most ``history_len``).
        history_len: steps kept in the scale/skip record (a ring buffer).

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scaler = LossScaler.from_preset("torch")
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> scaler.scale_loss(loss).backward()
        >>> found_inf = scaler.unscale_([p.grad for p in model.parameters()])
        >>> opt.step()  # or skip it: fused optimizers take found_inf themselves
        >>> scaler.update(found_inf)
        >>> scaler.get_scale()
        65536.0
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        dynamic: bool = True,
        init_scale: float | None = None,
        growth_factor: float | None = None,
        backoff_factor: float | None = None,
        growth_interval: int | None = None,
        hysteresis: int | None = None,
        min_scale: float | None = None,
        max_scale: float | None = None,
        consecutive_hysteresis: bool | None = None,
        framework_exact: bool | None = None,
        preset: str = "torch",
        device: torch.device | str | None = None,
        locate_nonfinite: bool = True,
        locate_method: LocateMethod = "auto",
        floor_patience: int = 10,
        check_interval: int | None = None,
        history_len: int = 4096,
    ) -> None:
        given = locals()
        overrides = {k: given[k] for k in OVERRIDABLE if given[k] is not None}
        self.config: ScalerConfig = scaler_config(preset, dynamic, overrides)
        check_interval = check_record_settings(floor_patience, history_len, check_interval)
        self.enabled = bool(enabled)
        self.locate_nonfinite = bool(locate_nonfinite)
        self.floor_patience = floor_patience
        self.check_interval = check_interval
        self._device = torch.device(device) if device is not None else None
        # The parts, each owning its data; their tensors are made on first use (materialize).
        self._scale_state = ScaleState.start_of(self.config)
        self._record = ScalerRecord(history_len)
        self._checker = GradChecker(locate_method)

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> LossScaler:
        """Dynamic scaling with framework ``name``'s rule and defaults.

        Example:
            >>> LossScaler.from_preset("megatron").get_scale() == 2.0**32
            True
        """
        return cls(preset=name, **overrides)

    @classmethod
    def static(cls, scale: float, **kwargs) -> LossScaler:
        """A fixed scale (gradients are still unscaled and checked for inf/NaN).

        Example:
            >>> LossScaler.static(128.0).get_scale()
            128.0
        """
        return cls(dynamic=False, init_scale=scale, **kwargs)

    @classmethod
    def disabled(cls) -> LossScaler:
        """A no-op scaler, so a loop need not branch on whether scaling is on.

        Example:
            >>> LossScaler.disabled().scale_loss(torch.tensor(2.0))
            tensor(2.)
        """
        return cls(enabled=False)

    # -- state (held in self._scale_state) -------------------------------------------------
    def _ensure_state(self, device: torch.device | None) -> torch.Tensor:
        if not self._scale_state.created:
            dev = self._device or device or torch.device("cpu")
            self._scale_state.create(dev)
            self._record.create(dev)
        return self._scale_state.scale

    def materialize(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Create the scale tensors and the record now, as the first use would (on the
        constructor's ``device``, else ``device``, else the CPU); return the scale. No sync.
        A disabled scaler creates nothing and returns :attr:`scale` (1.0).

        Example:
            >>> scaler = LossScaler()
            >>> scaler.scale_state.created, scaler.materialize("cpu").item()
            (False, 65536.0)
        """
        if not self.enabled:
            return self.scale
        return self._ensure_state(torch.device(device) if device is not None else None)

    @property
    def scale_state(self) -> ScaleState:
        """The scale, its trackers (``None`` until created) and their start (read it only)."""
        return self._scale_state

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the scaler's tensors take (0 before they exist):
        ``numel * element_size`` summed over the scale (fp32), the two trackers (int32)
        and the record (``history_len`` x (4 B scale + 1 B overflow flag + 8 B index) +
        8 B skipped counter), so ``12 + 13 * history_len + 8`` (53,268 B by default).

        Example:
            >>> scaler = LossScaler(history_len=10)
            >>> scaler.nbytes, scaler.materialize("cpu").item(), scaler.nbytes
            (0, 65536.0, 150)
        """
        tensors = (*self._scale_state.tensors(), *self._record.tensors())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def history_len(self) -> int:
        """Steps kept in the scale/skip record (a ring buffer)."""
        return self._record.capacity

    @property
    def scale(self) -> torch.Tensor:
        """The current scale: an fp32 0-dim tensor on the scale's device (1.0 if disabled)."""
        if not self.enabled:
            return torch.ones((), dtype=torch.float32, device=self._device)
        return self._ensure_state(None)

    @property
    def growth_tracker(self) -> torch.Tensor:
        """Clean steps counted toward the next growth (int32 0-dim tensor)."""
        self._ensure_state(None)
        return self._scale_state.growth_tracker

    @property
    def hysteresis_tracker(self) -> torch.Tensor:
        """Overflows still tolerated before the scale backs off (int32 0-dim tensor)."""
        self._ensure_state(None)
        return self._scale_state.hysteresis_tracker

    def get_scale(self) -> float:
        """The current scale as a float (1.0 if disabled).

        .. warning:: Syncs with the device once the state exists; not for the hot path.
        """
        return self._scale_state.values()[0] if self.enabled else 1.0

    def set_scale(self, value: float | torch.Tensor) -> None:
        """Overwrite the scale (trackers untouched).

        .. warning:: A tensor is read to the host to be checked (one sync).

        Raises:
            ValueError: for a NaN, inf, zero, negative or subnormal scale (see
                :func:`~mixprec.scaling.checks.check_scale`).
        """
        number = check_scale(value, exact=self.config.framework_exact)
        self._ensure_state(value.device if isinstance(value, torch.Tensor) else None)
        self._scale_state.set_scale(number)

    # -- the record (held in self._record) ------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of :meth:`update` calls (known on the host)."""
        return self._record.steps

    @property
    def steps_skipped(self) -> torch.Tensor:
        """Steps whose gradients overflowed (int64 0-dim tensor, no sync)."""
        self._ensure_state(None)
        return self._record.skipped.clone()

    @property
    def steps_taken(self) -> torch.Tensor:
        """Steps whose optimizer update ran: ``steps - steps_skipped`` (tensor, no sync)."""
        return self.steps - self.steps_skipped

    def check(self) -> None:
        """Raise :class:`ScaleFloorError` if ``floor_patience`` consecutive steps not checked
        yet overflowed at ``config.floor`` (see ``ScalerRecord.check``; syncs). Off with
        ``framework_exact`` and for a static scale."""
        config = self.config
        if self.enabled and config.dynamic and not config.framework_exact:
            self._record.check(config.floor, self.floor_patience)

    def telemetry(self) -> ScalerTelemetry:
        """Run the floor check, then read the record to the host (syncs).

        Example:
            >>> LossScaler().telemetry().steps
            0
        """
        if not self.enabled:
            return ScalerTelemetry(0, 0, 1.0, (), 0, ())
        self._ensure_state(None)
        self.check()
        return self._record.read(self.get_scale())

    def first_nonfinite(self, step: int) -> str | None:
        """Name of the first non-finite gradient of ``step`` (syncs), if recorded."""
        return self._record.first_nonfinite(step) if self.enabled else None

    # -- hot path -------------------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` (``loss`` itself when disabled)."""
        if not self.enabled:
            return loss
        scale = self._ensure_state(loss.device)
        return loss * scale.to(device=loss.device, non_blocking=True)

    @torch.no_grad()
    def unscale_(self, grads: Grads, names: Names = None, *, locate: bool | None = None) -> Tensor:
        """Divide ``grads`` by the scale in place and check them for inf/NaN.

        Args:
            grads: gradient tensors (``None`` entries are skipped), any devices and dtypes.
            names: names for ``grads`` (same length), used by telemetry and the floor
                error; default ``grads[i]``.
            locate: record the first non-finite gradient (default: ``locate_nonfinite``).

        Returns:
            found_inf: fp32 0-dim tensor on the scale's device, non-zero if any gradient
            held an inf or NaN. Pass it to :meth:`update` (and to a fused optimizer).
        """
        return self._check_and_unscale(grads, names, unscale=True, locate=locate)

    @torch.no_grad()
    def check_(self, grads: Grads, names: Names = None, *, locate: bool | None = None) -> Tensor:
        """Check ``grads`` for inf/NaN without unscaling them (for fused optimizers, which
        take ``grad_scale=scaler.scale`` and ``found_inf`` and unscale inside their kernel).
        """
        return self._check_and_unscale(grads, names, unscale=False, locate=locate)

    def _check_and_unscale(self, grads, names, *, unscale: bool, locate) -> torch.Tensor:
        device = next((g.device for g in grads if g is not None), None)
        if not self.enabled:
            return torch.zeros((), dtype=torch.float32, device=device or self._device)
        scale = self._ensure_state(device)
        found_inf, first = self._checker(
            grads,
            scale,
            unscale=unscale,
            locate=self.locate_nonfinite if locate is None else locate,
            amplifies=self._scale_state.may_be_below_one(),
        )
        if first is not None:
            self._record.note(first, names, len(grads))
        return found_inf

    @torch.no_grad()
    def update(
        self, found_inf: Tensor | float | bool, *, new_scale: float | Tensor | None = None
    ) -> None:
        """Record the step and move the scale by the preset's rule. No host sync, except on
        every ``check_interval``-th call (the floor check copies the record to the host).

        Args:
            found_inf: non-zero if the step's gradients overflowed (the sum of what
                :meth:`unscale_` / :meth:`check_` returned this step).
            new_scale: set this scale instead of applying the rule (trackers untouched);
                checked as by :meth:`set_scale` (a tensor is read: one sync).

        Raises:
            ValueError: for a NaN, inf, <= 0 or subnormal ``new_scale``, before anything
                is recorded.
            ScaleFloorError: from the periodic floor check (see :meth:`check`).
        """
        if not self.enabled:
            self._record.discard_pending()
            return
        if new_scale is not None:
            new_scale = check_scale(new_scale, exact=self.config.framework_exact, what="new_scale")
        if isinstance(found_inf, torch.Tensor):
            scale = self._ensure_state(found_inf.device)
            found = found_inf.detach().reshape(()).to(scale.device, torch.float32, True)
        else:
            scale = self._ensure_state(None)
            found = torch.full((), float(found_inf), dtype=torch.float32, device=scale.device)
        self._record.write(scale, found != 0)
        self._scale_state.step(found, self.config, new_scale)
        if self.check_interval and self.steps % self.check_interval == 0:
            self.check()

    # -- checkpoints (pickles: each part pickles itself as Python values) --------------------
    def state_dict(self) -> dict:
        """Settings, scale state and counters as plain Python values (syncs)."""
        if not self.enabled:
            return {"enabled": False}
        parts = {**self._scale_state.as_dict(), **self._record.counters()}
        return {"enabled": True, "config": dataclasses.asdict(self.config), **parts}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (no-op when disabled).

        ``config``, ``steps`` and ``steps_skipped`` are optional: absent, they stay as they are.
        Everything is checked before anything changes. The record restarts at the loaded
        step (earlier steps are not in the telemetry's history).

        Raises:
            RuntimeError: for the state of a disabled scaler.
            ValueError: for a missing key, a bad setting, a NaN / inf / zero / negative /
                subnormal scale or a tracker out of its range (the value is named).
        """
        if not self.enabled:
            return
        config, values, steps, skipped = read_loss_scaler_state(state, self.config)
        self.config = config
        self._scale_state.load(values)
        self._record.restart(self._record.steps if steps is None else steps, skipped)

    def __repr__(self) -> str:
        if not self.enabled:
            return "LossScaler(enabled=False)"
        c = self.config
        kind = "dynamic" if c.dynamic else "static"
        return (
            f"LossScaler({kind}, preset={c.preset!r}, init_scale={c.init_scale:g}, "
            f"growth_interval={c.growth_interval}, hysteresis={c.hysteresis}, "
            f"min_scale={c.min_scale:g}, max_scale={c.max_scale:g})"
        )
