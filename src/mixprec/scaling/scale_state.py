"""The scale a loss scaler multiplies by, owned by one object: the scale and its two
trackers as 0-dim tensors on the scale's device (made on first use), the values they start
from, and a lower bound on the scale that the host knows without reading the device.

A :class:`~mixprec.scaling.LossScaler` holds one :class:`ScaleState`; the update rule
(:func:`~mixprec.scaling.rules.apply_rule_`) moves its tensors in place.
"""

from __future__ import annotations

import torch

from mixprec.scaling.rules import ScalerConfig, apply_rule_

__all__ = ["ScaleState"]

Values = tuple[float, int, int]  # (scale, growth_tracker, hysteresis_tracker)


class ScaleState:
    """``scale`` (fp32), ``growth_tracker`` and ``hysteresis_tracker`` (int32), each a 0-dim
    tensor once :meth:`create` ran (``None`` before), and the host's lower bound on the scale.

    Why a lower bound: unscaling can turn a finite gradient into inf only when the scale is
    below 1, and checking for that costs an extra read of the gradients, so the scaler asks
    :meth:`may_be_below_one` on the hot path, which must not sync. The bound is exact after
    :meth:`set_scale` / :meth:`load`, lowered by one backoff per rule step
    (:meth:`step`), and exact again once the host copy of the new scale that
    :meth:`step` starts has landed (at once on CPU; on CUDA when its event says so;
    other devices keep the lowered bound).

    Args:
        initial: ``(scale, growth_tracker, hysteresis_tracker)`` the tensors start from.

    Example:
        >>> state = ScaleState((4.0, 0, 1))
        >>> state.create(torch.device("cpu")).item(), state.values()
        (4.0, (4.0, 0, 1))
        >>> state.set_scale(0.5); state.may_be_below_one()
        True
    """

    def __init__(self, initial: Values) -> None:
        self.initial: Values = initial
        self.scale: torch.Tensor | None = None
        self.growth_tracker: torch.Tensor | None = None
        self.hysteresis_tracker: torch.Tensor | None = None
        self._low = initial[0]
        self._mirror: torch.Tensor | None = None  # host copy of the scale (pinned on CUDA)
        self._mirror_event = None
        self._mirror_fresh = False

    @classmethod
    def start_of(cls, config: ScalerConfig) -> ScaleState:
        """The state a scaler with ``config`` starts from (``init_scale``, the growth
        tracker's start, ``hysteresis``)."""
        return cls((config.init_scale, config.growth_tracker_start, config.hysteresis))

    @property
    def created(self) -> bool:
        """Whether the tensors exist."""
        return self.scale is not None

    def create(self, device: torch.device) -> torch.Tensor:
        """Make the tensors on ``device`` from :attr:`initial` (no-op if they exist);
        return the scale."""
        if self.scale is None:
            scale, growth, hyst = self.initial
            self.scale = torch.full((), scale, dtype=torch.float32, device=device)
            self.growth_tracker = torch.full((), growth, dtype=torch.int32, device=device)
            self.hysteresis_tracker = torch.full((), hyst, dtype=torch.int32, device=device)
            if device.type in ("cpu", "cuda"):
                pinned = device.type == "cuda"
                self._mirror = torch.empty((), dtype=torch.float32, pin_memory=pinned)
        return self.scale

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The three tensors (none before :meth:`create`)."""
        if self.scale is None:
            return ()
        return self.scale, self.growth_tracker, self.hysteresis_tracker

    def values(self) -> Values:
        """``(scale, growth_tracker, hysteresis_tracker)`` as Python values (syncs once the
        tensors exist; before, :attr:`initial`)."""
        if self.scale is None:
            return self.initial
        return (
            float(self.scale.item()),
            int(self.growth_tracker.item()),
            int(self.hysteresis_tracker.item()),
        )

    def as_dict(self) -> dict[str, float | int]:
        """``scale``, ``growth_tracker`` and ``hysteresis_tracker`` as in a state dict (syncs)."""
        return dict(zip(("scale", "growth_tracker", "hysteresis_tracker"), self.values()))

    def load(self, values: Values) -> None:
        """Start from ``values`` (checked by the caller): the tensors if they exist, and
        :attr:`initial` for when they are made again."""
        self.initial = values
        if self.scale is not None:
            self.scale.fill_(values[0])
            self.growth_tracker.fill_(values[1])
            self.hysteresis_tracker.fill_(values[2])
        self._know(values[0])

    def set_scale(self, number: float) -> None:
        """Overwrite the scale (trackers untouched; needs :meth:`create`)."""
        self.scale.fill_(number)
        self._know(number)

    def _know(self, number: float) -> None:
        self._low = number
        self._mirror_fresh = False  # the host copy holds an older scale

    # -- the host's lower bound (no sync) ------------------------------------------------------
    @property
    def lower_bound(self) -> float:
        """The host's lower bound on the scale (no sync)."""
        return self._low

    def may_be_below_one(self) -> bool:
        """Whether the scale may be below 1, so that unscaling can overflow (no sync: takes
        in the host copy of the scale if it has landed)."""
        if self._mirror_fresh and (self._mirror_event is None or self._mirror_event.query()):
            self._low = float(self._mirror.numpy())  # host memory: no device read
            self._mirror_fresh = False
        return self._low < 1.0

    def step(
        self, found_inf: torch.Tensor, config: ScalerConfig, new_scale: float | None = None
    ) -> None:
        """Move the scale one step by ``config``'s rule (:func:`apply_rule_`, no sync), or set
        it to ``new_scale`` (checked by the caller); then update the host's lower bound."""
        if new_scale is not None:
            self.set_scale(new_scale)
            return
        apply_rule_(self.scale, self.growth_tracker, self.hysteresis_tracker, found_inf, config)
        if not config.dynamic:
            return
        # The most one rule step can lower the scale by; then learn the new scale from a
        # host copy started now, without waiting for it.
        self._low = max(config.floor, self._low * config.backoff_factor)
        if self._mirror is not None:
            self._mirror.copy_(self.scale, non_blocking=True)
            if self.scale.device.type == "cuda":
                self._mirror_event = torch.cuda.Event()
                self._mirror_event.record()
            self._mirror_fresh = True

    # -- pickling --------------------------------------------------------------------------------
    def __getstate__(self) -> Values:
        """The current values as Python numbers (no tensors: they are made again on the
        device of the next use). Syncs."""
        return self.values()

    def __setstate__(self, state: Values) -> None:
        self.__init__(tuple(state))
