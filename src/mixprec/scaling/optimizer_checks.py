"""A :class:`~mixprec.scaling.GradScaler`'s record of one iteration, per optimizer: its stage
(torch's READY -> UNSCALED -> STEPPED), the ``found_inf`` of its gradients, and the gradients
kept to name a non-finite one later; the gradients are checked through a
:class:`~mixprec.scaling.LossScaler`, and an optimizer that unscales inside its own kernel
(``_step_supports_amp_scaling``) is handed the scale and ``found_inf``. The states keep
torch's ``_per_optimizer_states`` layout, so code written for ``torch.amp.GradScaler`` reads
them unchanged.
"""

from __future__ import annotations

import inspect
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from mixprec.scaling.loss_scaler import LossScaler

__all__ = ["OptimizerChecks", "optimizer_grads"]


def _ready() -> dict[str, Any]:
    return {"stage": OptState.READY, "found_inf_per_device": {}}


def optimizer_grads(
    optimizer: torch.optim.Optimizer, *, allow_fp16: bool
) -> tuple[list[torch.Tensor], list[str]]:
    """``optimizer``'s gradients (the values of sparse ones, fp16 sparse ones coalesced
    first) and their names: the optimizer's ``param_names`` (an optimizer built from
    ``model.named_parameters()``), else ``param_groups[g]['params'][i]``.

    Raises:
        ValueError: for an fp16 gradient unless ``allow_fp16``, as torch.
    """
    grads, names = [], []
    for g, group in enumerate(optimizer.param_groups):
        group_names = group.get("param_names")
        for i, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            if not allow_fp16 and param.grad.dtype == torch.float16:
                raise ValueError("Attempting to unscale FP16 gradients.")
            if param.grad.is_sparse:
                # Coalesce fp16 sparse grads first: duplicates summed may overflow.
                if param.grad.dtype is torch.float16:
                    param.grad = param.grad.coalesce()
                grads.append(param.grad._values())
            else:
                grads.append(param.grad)
            names.append(group_names[i] if group_names else f"param_groups[{g}]['params'][{i}]")
    return grads, names


class OptimizerChecks:
    """Per optimizer (keyed by ``id``), this iteration: ``{"stage": OptState,
    "found_inf_per_device": {device: tensor}}`` plus ``"unlocated"`` gradients, owned here
    and cleared by :meth:`reset` (the GradScaler's ``update``).

    Args:
        scaler: the LossScaler that checks and unscales the gradients.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> checks = OptimizerChecks(LossScaler())
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> checks.run(opt, unscale=True)
        >>> checks[opt]["stage"].name, checks.found_inf(opt).item()
        ('READY', 0.0)
    """

    def __init__(self, scaler: LossScaler) -> None:
        self.scaler = scaler
        self.states: defaultdict[int, dict[str, Any]] = defaultdict(_ready)

    def __getitem__(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self.states[id(optimizer)]

    @property
    def pending(self) -> bool:
        """Whether any optimizer was checked or stepped since the last :meth:`reset`."""
        return len(self.states) != 0

    def reset(self) -> None:
        """Start a new iteration (every optimizer READY)."""
        self.states = defaultdict(_ready)

    def run(self, optimizer: torch.optim.Optimizer, *, unscale: bool, locate=None) -> None:
        """Check (and, if ``unscale``, unscale) ``optimizer``'s gradients; keep ``found_inf``
        per device. With ``locate=False`` the gradients are kept (references, until
        :meth:`reset`) so that :meth:`locate` can name a non-finite one later. No sync."""
        state = self[optimizer]
        with torch.no_grad():
            grads, names = optimizer_grads(optimizer, allow_fp16=not unscale)
            if not grads:
                state["found_inf_per_device"] = {}
                return
            check = self.scaler.unscale_ if unscale else self.scaler.check_
            found_inf = check(grads, names, locate=locate)
        state["found_inf_per_device"] = {found_inf.device: found_inf}
        state["unlocated"] = (grads, names) if locate is False else None

    def locate(self, optimizer: torch.optim.Optimizer) -> None:
        """Record the first non-finite gradient of a step that overflowed, if :meth:`run`
        left it unlocated and the scaler locates (gradients stay as they are)."""
        state = self[optimizer]
        if state.get("unlocated") and self.scaler.locate_nonfinite:
            with torch.no_grad():
                self.scaler.check_(*state["unlocated"], locate=True)  # inf/NaN stay so
        state["unlocated"] = None

    def found_inf(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """``optimizer``'s ``found_inf`` on the scale's device (zero if it had no gradient)."""
        device = self.scaler.scale.device
        per_device = self[optimizer]["found_inf_per_device"].values()
        found = [t.to(device, non_blocking=True) for t in per_device]
        if not found:
            return torch.zeros((), dtype=torch.float32, device=device)
        return found[0] if len(found) == 1 else sum(found)

    def all_found(self) -> list[torch.Tensor]:
        """Every optimizer's ``found_inf`` this iteration, on the scale's device."""
        device = self.scaler.scale.device
        return [
            found.to(device, non_blocking=True)
            for state in self.states.values()
            for found in state["found_inf_per_device"].values()
        ]

    def fused_step(self, optimizer: torch.optim.Optimizer, grad_scaler, args, kwargs):
        """Step an optimizer with ``_step_supports_amp_scaling`` (torch's fused Adam / AdamW /
        SGD), which unscales and skips inside its kernel: it is given ``grad_scale`` and
        ``found_inf`` tensors (no sync), or ``grad_scaler`` itself for an optimizer whose
        ``step`` takes that argument (deprecated by torch). Returns what ``step`` returned."""
        state = self[optimizer]
        has_grad_scaler_kwarg = "grad_scaler" in inspect.signature(optimizer.step).parameters
        if has_grad_scaler_kwarg:
            warnings.warn(
                "GradScaler is going to stop passing itself as a keyword argument to the passed "
                "optimizer. In the near future GradScaler registers `grad_scale: Tensor` and "
                "`found_inf: Tensor` to the passed optimizer and let the optimizer use them "
                "directly.",
                FutureWarning,
                stacklevel=3,
            )
            kwargs = {**kwargs, "grad_scaler": grad_scaler}
        else:
            if state["stage"] is OptState.READY:
                self.run(optimizer, unscale=False)
            optimizer.grad_scale = (
                getattr(optimizer, "grad_scale", None)
                if state["stage"] is OptState.UNSCALED
                else self.scaler.scale * getattr(optimizer, "grad_scale", 1)
            )
            optimizer.found_inf = self.found_inf(optimizer)
        retval = optimizer.step(*args, **kwargs)
        state["stage"] = OptState.STEPPED
        if not has_grad_scaler_kwarg:
            del optimizer.grad_scale
            del optimizer.found_inf
        return retval
