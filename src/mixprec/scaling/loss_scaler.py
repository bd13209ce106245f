"""LossScaler: none / static / dynamic loss scaling behind one interface, sync-free between
periodic floor checks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mixprec.scaling.kernels import NONE_INDEX, GradChecker, LocateMethod
from mixprec.scaling.rules import ScalerConfig, apply_rule_, preset_config
from mixprec.scaling.state import (
    check_scale,
    load_state_dict_into,
    pickle_state_of,
    state_dict_of,
)
from mixprec.scaling.telemetry import ScalerRecord, StepLog

__all__ = ["LossScaler"]

_OVERRIDABLE = (
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


class LossScaler(ScalerRecord):
    """Scales the loss, unscales and checks gradients, and moves the scale.

    Host syncs: none in :meth:`scale_loss`, :meth:`unscale_` and :meth:`check_`; in
    :meth:`update` one every ``check_interval`` calls (default 100: the floor check copies
    the record to the host), none in between; :meth:`get_scale`, :meth:`state_dict`,
    :meth:`telemetry` and a tensor given to :meth:`set_scale` one each.

    One interface for no scaling (``enabled=False``: every method is a no-op), a static
    scale (``dynamic=False``) and dynamic scaling following one of the framework rules in
    :mod:`mixprec.scaling.rules` (``preset``: ``"torch"``, ``"apex"``, ``"deepspeed"``,
    ``"deepspeed-legacy"``, ``"deepspeed-fp16-optimizer"``, ``"megatron"``; each setting
    left as ``None`` takes the preset's value).

    Between those checks the hot path reads nothing back to the host: the inf/NaN check
    and unscaling run as ``torch._amp_foreach_non_finite_check_and_unscale_`` per
    (device, dtype) group, and the scale state machine runs as tensor ops.

    What the step applies is what is checked: while the scale may be below 1, unscaling
    can turn a finite gradient into inf, so the check then also covers the unscaled values
    (one extra max-abs read of the gradients, see :mod:`mixprec.scaling.kernels`). Whether
    it may be is known on the host without a sync (a lower bound, refreshed from a host
    copy of the scale that :meth:`update` starts).

    Telemetry is recorded on the device and read out by :meth:`telemetry` (one sync).
    With ``locate_nonfinite=True`` (default) each :meth:`unscale_` also records, on the
    device, which gradient was the first non-finite one; its name is looked up only when
    read. Cost (see :mod:`mixprec.scaling.kernels`): on CPU one kernel dispatch per
    gradient instead of one per (device, dtype) group, and no extra pass over the data;
    on accelerators one extra fused read of the gradients (a foreach max-abs). Plus ~4
    tiny kernels either way. ``locate_nonfinite=False`` removes it.

    Floor (mixprec's safety, see :mod:`mixprec.scaling.rules`): the scale never goes below
    ``config.floor`` = ``max(min_scale, 2^-126)``, and when ``floor_patience`` consecutive
    steps overflow with the scale already at that floor, :meth:`check` raises
    :class:`ScaleFloorError` naming the first non-finite gradient and how many steps in a
    row overflowed. It costs nothing per step: :meth:`check` scans the on-device record on
    the host, and :meth:`update` calls it every ``check_interval`` steps (one copy of the
    record to the host each time; ``0`` turns the periodic check off), as does
    :meth:`telemetry`. ``framework_exact=True`` removes both (the preset's rule alone).

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
        given = dict(
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            hysteresis=hysteresis,
            min_scale=min_scale,
            max_scale=max_scale,
            consecutive_hysteresis=consecutive_hysteresis,
            framework_exact=framework_exact,
        )
        overrides = {k: v for k, v in given.items() if v is not None}
        if not dynamic and "min_scale" not in overrides:
            overrides["min_scale"] = 0.0  # a static scale has no floor
        if not dynamic and "max_scale" not in overrides:
            overrides["max_scale"] = math.inf
        self.config: ScalerConfig = preset_config(preset, dynamic=dynamic, **overrides)
        for name, value in (("floor_patience", floor_patience), ("history_len", history_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if check_interval is None:
            check_interval = min(100, history_len) if isinstance(history_len, int) else 100
        if isinstance(check_interval, bool) or not isinstance(check_interval, int):
            raise ValueError(f"check_interval={check_interval!r} must be an integer >= 0")
        if not 0 <= check_interval <= history_len:
            raise ValueError(
                f"check_interval={check_interval!r} must be in [0, history_len={history_len}] "
                "(the floor check reads the steps kept in the record)"
            )
        self.enabled = bool(enabled)
        self.locate_nonfinite = bool(locate_nonfinite)
        self.floor_patience = floor_patience
        self.check_interval = check_interval
        self.history_len = history_len
        self._device = torch.device(device) if device is not None else None
        # State is created lazily on the device of the first loss / gradients.
        self._scale: torch.Tensor | None = None
        self._growth_tracker: torch.Tensor | None = None
        self._hysteresis_tracker: torch.Tensor | None = None
        # Floor check, on the host: steps before _floor_scanned have been scanned, and the
        # last _floor_streak of them overflowed at the floor.
        self._floor_scanned = 0
        self._floor_streak = 0
        self._overflow_run = 0
        # A lower bound on the current scale, known on the host without a sync (unscaling
        # can only overflow below 1): exact after set_scale / load_state_dict, lowered by one
        # backoff per update(), and exact again once the host copy that update() starts of
        # the new scale has landed (at once on CPU; on CUDA when its event says so).
        self._low = self.config.init_scale
        self._mirror: torch.Tensor | None = None  # host copy of the scale (pinned on CUDA)
        self._mirror_event = None
        self._mirror_fresh = False
        self._log: StepLog | None = None
        self._init_state = (
            self.config.init_scale,
            self.config.growth_tracker_start,
            self.config.hysteresis,
        )
        self._init_skipped = 0
        self._steps = 0
        self._pending: list[tuple[torch.Tensor, Sequence[str] | None, int]] = []
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

    # -- state ------------------------------------------------------------------------------
    def _ensure_state(self, device: torch.device | None) -> torch.Tensor:
        if self._scale is None:
            dev = self._device or device or torch.device("cpu")
            scale, growth, hyst = self._init_state
            self._scale = torch.full((), scale, dtype=torch.float32, device=dev)
            self._growth_tracker = torch.full((), growth, dtype=torch.int32, device=dev)
            self._hysteresis_tracker = torch.full((), hyst, dtype=torch.int32, device=dev)
            self._log = StepLog(self.history_len, dev)
            self._log.skipped.fill_(self._init_skipped)
            self._log.origin = self._steps
            if dev.type in ("cpu", "cuda"):
                self._mirror = torch.empty((), dtype=torch.float32, pin_memory=dev.type == "cuda")
        return self._scale

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
        return self._growth_tracker

    @property
    def hysteresis_tracker(self) -> torch.Tensor:
        """Overflows still tolerated before the scale backs off (int32 0-dim tensor)."""
        self._ensure_state(None)
        return self._hysteresis_tracker

    def get_scale(self) -> float:
        """The current scale as a float (1.0 if disabled).

        .. warning:: Syncs with the device once the state exists; not for the hot path.
        """
        if not self.enabled:
            return 1.0
        return self._init_state[0] if self._scale is None else float(self._scale.item())

    def set_scale(self, value: float | torch.Tensor) -> None:
        """Overwrite the scale (trackers untouched).

        .. warning:: A tensor is read to the host to be checked (one sync).

        Raises:
            ValueError: for a NaN, inf, zero, negative or subnormal scale (see
                :func:`~mixprec.scaling.validate.check_scale`).
        """
        number = check_scale(value, exact=self.config.framework_exact)
        scale = self._ensure_state(value.device if isinstance(value, torch.Tensor) else None)
        scale.fill_(number)
        self._low = number
        self._mirror_fresh = False  # the host copy holds an older scale

    def _amplifies(self) -> bool:
        """Whether the scale may be below 1, so that unscaling can overflow (no sync)."""
        if self._mirror_fresh and (self._mirror_event is None or self._mirror_event.query()):
            self._low = float(self._mirror.numpy())  # host memory: no device read
            self._mirror_fresh = False
        return self._low < 1.0

    # -- hot path -------------------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` (``loss`` itself when disabled)."""
        if not self.enabled:
            return loss
        scale = self._ensure_state(loss.device)
        return loss * scale.to(device=loss.device, non_blocking=True)

    @torch.no_grad()
    def unscale_(
        self,
        grads: Sequence[torch.Tensor | None],
        names: Sequence[str] | None = None,
        *,
        locate: bool | None = None,
    ) -> torch.Tensor:
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
    def check_(
        self,
        grads: Sequence[torch.Tensor | None],
        names: Sequence[str] | None = None,
        *,
        locate: bool | None = None,
    ) -> torch.Tensor:
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
            amplifies=self._amplifies(),
        )
        if first is not None:
            self._pending.append((first, names, len(grads)))
        return found_inf

    @torch.no_grad()
    def update(
        self,
        found_inf: torch.Tensor | float | bool,
        *,
        new_scale: float | torch.Tensor | None = None,
    ) -> None:
        """Record the step and move the scale by the preset's rule. No host sync, except
        one every ``check_interval`` calls (the floor check copies the record to the host).

        Args:
            found_inf: non-zero if the step's gradients overflowed (the sum of what
                :meth:`unscale_` / :meth:`check_` returned this step).
            new_scale: set this scale instead of applying the rule (trackers untouched);
                checked as by :meth:`set_scale` (a tensor is read: one sync).

        Raises:
            ValueError: for a ``new_scale`` that is not a usable scale (NaN, inf, <= 0,
                subnormal), before anything is recorded.
            ScaleFloorError: on a periodic check (every ``check_interval`` steps) when the
                scale sat at ``min_scale`` for ``floor_patience`` overflowing steps.
        """
        if not self.enabled:
            self._pending.clear()
            return
        if new_scale is not None:
            exact = self.config.framework_exact
            new_scale = check_scale(new_scale, exact=exact, what="new_scale")
        if isinstance(found_inf, torch.Tensor):
            scale = self._ensure_state(found_inf.device)
            found = found_inf.detach().reshape(()).to(scale.device, torch.float32, True)
        else:
            scale = self._ensure_state(None)
            found = torch.full((), float(found_inf), dtype=torch.float32, device=scale.device)
        overflow = found != 0
        self._log.write(self._steps, scale, overflow, *self._take_pending(scale.device))
        if new_scale is not None:
            self.set_scale(new_scale)
        else:
            apply_rule_(scale, self._growth_tracker, self._hysteresis_tracker, found, self.config)
        self._steps += 1
        if new_scale is not None:
            self._low = new_scale
        elif self.config.dynamic:  # the most the rule can lower the scale by in one step
            self._low = max(self.config.floor, self._low * self.config.backoff_factor)
            if self._mirror is not None:  # learn the new scale without waiting for it
                self._mirror.copy_(scale, non_blocking=True)
                if scale.device.type == "cuda":
                    self._mirror_event = torch.cuda.Event()
                    self._mirror_event.record()
                self._mirror_fresh = True
        if self.check_interval and self._steps % self.check_interval == 0:
            self.check()

    def _take_pending(self, device: torch.device):
        pending, self._pending = self._pending, []
        if not pending:
            return torch.full((), NONE_INDEX, dtype=torch.int64, device=device), None
        first, segments, offset = None, [], 0
        for call, (candidate, names, count) in enumerate(pending):
            shifted = candidate + offset if offset else candidate
            first = shifted if first is None else torch.minimum(first, shifted)
            segments.append((offset, names, call))
            offset += count
        return first, tuple(segments)

    # -- checkpoints and pickling (bodies in mixprec.scaling.state) ----------------------------
    def state_dict(self) -> dict:
        """Settings, scale state and counters as plain Python values (syncs)."""
        return state_dict_of(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (no-op when disabled).

        ``config``, ``steps`` and ``steps_skipped`` are optional: absent, they stay as they are.
        Everything is checked before anything changes.

        Raises:
            RuntimeError: for the state of a disabled scaler.
            ValueError: for a missing key, a bad setting, a NaN / inf / zero / negative /
                subnormal scale or a tracker out of its range (the value is named).
        """
        load_state_dict_into(self, state)

    def __getstate__(self) -> dict:
        """Settings and scale state as plain Python values: no tensors, no telemetry ring
        buffers (the record restarts after unpickling, as after :meth:`load_state_dict`),
        so the pickle is small and loads on a machine without the scale's device.

        Raises:
            RuntimeError: between :meth:`unscale_` / :meth:`check_` and :meth:`update`
                (the iteration's pending record would be lost).
        """
        return pickle_state_of(self)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

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
