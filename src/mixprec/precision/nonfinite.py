"""What ``Precision.step`` does with an inf / NaN gradient: skip, raise or ignore.

The policy applies to every recipe. With loss scaling the loss scaler finds the non-finite
gradients while unscaling (:meth:`mixprec.scaling.LossScaler.unscale_`) and its own
floor check raises on persistent overflow; without loss scaling :class:`NonFiniteGuard`
checks the gradients itself, exactly as ``torch.amp`` does, with one
``torch._amp_foreach_non_finite_check_and_unscale_`` kernel per (device, dtype) group (the
scale is 1.0, so the gradients are left bit for bit as they were)::

    found_inf = any(not isfinite(g).all() for g in grads)        # on the device
    skipped  += found_inf                                         # counted on the device,
    streak    = (streak + 1) * found_inf                          # FOLD_EVERY steps at once
    every check_interval steps (one host read):  streak >= max_consecutive -> error

Policies:

* ``"skip"`` (default): an optimizer step whose gradients hold an inf or NaN is not taken
  (a fused optimizer gets ``found_inf`` and skips inside its kernel: no host sync; any
  other optimizer costs one host read of ``found_inf`` per step, as ``torch.amp``).
  ``max_consecutive`` skips in a row raise :class:`NonFiniteGradientError`, naming the
  first non-finite parameter and the number of steps, on the next periodic check.
* ``"raise"``: the first non-finite gradient raises :class:`NonFiniteGradientError` before
  anything is changed (one host read per step).
* ``"ignore"``: no check, no cost; a NaN is written into the weights. Only for recipes
  without loss scaling (a loss-scaled step that overflowed must be skipped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from mixprec.scaling.kernels import GradChecker

__all__ = ["NONFINITE_POLICIES", "NonFiniteGradientError", "NonFiniteGuard", "NonFinitePolicy"]

NonFinitePolicy = Literal["skip", "raise", "ignore"]
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonFinitePolicy)
FOLD_EVERY = 32  # steps whose found_inf are kept before the skip counters take them in


class NonFiniteGradientError(RuntimeError):
    """Gradients held an inf or NaN: once (policy ``"raise"``) or for too many steps in a row."""


def check_policy(policy: str, *, loss_scaling: bool, max_consecutive: int) -> None:
    """Refuse an unknown policy, ``"ignore"`` with loss scaling, or a bad ``max_consecutive``."""
    if policy not in NONFINITE_POLICIES:
        raise ValueError(
            f"nonfinite={policy!r} is not one of {', '.join(map(repr, NONFINITE_POLICIES))}"
        )
    if policy == "ignore" and loss_scaling:
        raise ValueError(
            "nonfinite='ignore' cannot be used with loss scaling: a step whose scaled "
            "gradients overflowed must be skipped; use 'skip' or 'raise'"
        )
    if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int):
        raise TypeError(f"max_consecutive_skips={max_consecutive!r} must be an int >= 1")
    if max_consecutive < 1:
        raise ValueError(f"max_consecutive_skips={max_consecutive!r} must be >= 1")


def first_nonfinite(grads: Sequence[torch.Tensor | None], names: Sequence[str]) -> str | None:
    """Name of the first gradient holding an inf or NaN (host syncs: for error messages only)."""
    for grad, name in zip(grads, names, strict=True):
        if grad is not None and not bool(torch.isfinite(grad).all()):
            return name
    return None


class NonFiniteGuard:
    """Checks gradients for inf / NaN and counts skipped steps for one :class:`Precision`.

    Args:
        policy: ``"skip"``, ``"raise"`` or ``"ignore"`` (see the module docstring).
        check_grads: check the gradients here (recipes without loss scaling); with loss
            scaling the scaler's ``found_inf`` is passed to :meth:`record` instead.
        max_consecutive: skipped steps in a row that raise (policy ``"skip"``).
        check_interval: steps between the host reads of the consecutive-skip counter.

    Example:
        >>> guard = NonFiniteGuard("skip", check_grads=True)
        >>> found = guard.check([torch.tensor([1.0, float("nan")])])
        >>> guard.record(found); guard.skipped_steps
        1
    """

    def __init__(
        self,
        policy: NonFinitePolicy = "skip",
        *,
        check_grads: bool,
        max_consecutive: int = 10,
        check_interval: int = 100,
    ) -> None:
        self.policy = policy
        self.check_grads = check_grads and policy != "ignore"
        self.max_consecutive = max_consecutive
        self.check_interval = check_interval
        self.steps = 0
        self._skipped: torch.Tensor | None = None  # int64 0-dim, on the gradients' device
        self._streak: torch.Tensor | None = None
        self._pending: list[torch.Tensor] = []  # found_inf of the steps not yet counted
        self._ones: dict[torch.device, torch.Tensor] = {}  # the unscale factor 1.0, per device
        self._checker = GradChecker()

    def check(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``found_inf`` (fp32 0-dim, 1.0 when any gradient is non-finite) on the first
        gradient's device; the loss scaler's checker at scale 1, so no gradient changes;
        no host sync."""
        device = next((g.device for g in grads if g is not None), torch.device("cpu"))
        one = self._ones.get(device)
        if one is None:  # kept: one allocation less per step
            one = self._ones[device] = torch.ones((), dtype=torch.float32, device=device)
        found, _ = self._checker(grads, one, unscale=False, locate=False, amplifies=False)
        return found

    def raise_if_found(self, found: torch.Tensor, grads, names: Sequence[str]) -> None:
        """Policy ``"raise"``: read ``found`` (one host sync) and raise when set."""
        if bool(found.item()):
            raise NonFiniteGradientError(
                f"gradient of {first_nonfinite(grads, names)!r} holds an inf or NaN at step "
                f"{self.steps} (nonfinite='raise'); nothing was changed. Look for the first "
                "non-finite activation with mixprec.numerics.Monitor, or pass "
                "nonfinite='skip' to skip such steps"
            )

    def check_streak(self, found: torch.Tensor, grads, names: Sequence[str]) -> None:
        """Policy ``"skip"``, every ``check_interval`` steps: raise on a long run of skips.

        Reads the consecutive-skip counter (one host sync per ``check_interval`` steps),
        adding this step's ``found``; called before the step's gradients are dropped, so
        the error can name the first non-finite one.
        """
        if self.policy != "skip" or not self.check_interval:
            return
        if (self.steps + 1) % self.check_interval:
            return
        self._fold()
        streak = 0 if self._streak is None else int(self._streak.item())
        if not bool(found.item()):
            return
        streak += 1
        if streak >= self.max_consecutive:
            raise NonFiniteGradientError(
                f"{streak} steps in a row had an inf or NaN gradient (the first non-finite "
                f"one now: {first_nonfinite(grads, names)!r}); every one was skipped, so "
                "training has stopped making progress. Find where it starts with "
                "mixprec.numerics.Monitor, lower the learning rate, or raise "
                f"max_consecutive_skips (now {self.max_consecutive})"
            )

    def record(self, found: torch.Tensor | None) -> None:
        """Count one iteration: skipped when ``found`` is non-zero (no host sync).

        ``found`` is kept as it is; the counters take in :data:`FOLD_EVERY` steps at a
        time (a handful of device ops instead of four per step, see :meth:`_fold`).
        """
        self.steps += 1
        if found is None:
            return
        self._pending.append(found)
        if len(self._pending) >= FOLD_EVERY:
            self._fold()

    @torch.no_grad()
    def _fold(self) -> None:
        """Add the pending steps to the counters, on the device (no host sync)::

            hits     = [found != 0 for each pending step]
            skipped += sum(hits)
            streak   = streak + n   if all(hits)   else   trailing run of hits
        """
        if not self._pending:
            return
        device = self._pending[-1].device
        hits = torch.cat([f.detach().reshape(-1).to(device) for f in self._pending]).ne(0)
        self._pending = []
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)
            self._streak = torch.zeros_like(self._skipped)
        elif self._skipped.device != device:  # loaded from a checkpoint onto the CPU
            self._skipped, self._streak = self._skipped.to(device), self._streak.to(device)
        trailing = hits.flip(0).to(torch.int64).cumprod(0).sum()
        self._skipped = self._skipped + hits.sum()
        self._streak = torch.where(hits.all(), self._streak + hits.numel(), trailing)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far because a gradient was inf / NaN (one host sync)."""
        self._fold()
        return 0 if self._skipped is None else int(self._skipped.item())

    def state_dict(self) -> dict:
        self._fold()
        return {"steps": self.steps, "skipped": self.skipped_steps,
                "streak": 0 if self._streak is None else int(self._streak.item())}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self._pending = []
        self.steps = int(state["steps"])
        self._skipped = torch.tensor(int(state["skipped"]), dtype=torch.int64)
        self._streak = torch.tensor(int(state["streak"]), dtype=torch.int64)
