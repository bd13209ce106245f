"""The gradient pass of a loss scaler: grouped inf/NaN check, unscale, first non-finite.

One pass per (device, dtype) group with ``torch._amp_foreach_non_finite_check_and_unscale_``
(torch.amp.GradScaler's kernel); optionally a foreach max-abs before it to find which
gradient was the first non-finite one. Nothing is read back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = ["NONE_INDEX", "GradChecker"]

# Marks "no non-finite gradient" in int64 index tensors (above any real index).
NONE_INDEX = 2**62


class GradChecker:
    """Checks (and unscales) gradient lists; caches the index tensors it builds.

    Example:
        >>> grads = [torch.tensor([2.0, 4.0]), torch.tensor([float("nan")])]
        >>> found_inf, first = GradChecker()(grads, torch.tensor(2.0), unscale=True, locate=True)
        >>> found_inf.item(), first.item(), grads[0].tolist()
        (1.0, 1, [1.0, 2.0])
    """

    def __init__(self) -> None:
        self._positions: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(
        self,
        grads: Sequence[torch.Tensor | None],
        scale: torch.Tensor,
        *,
        unscale: bool,
        locate: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(found_inf, first)`` on ``scale``'s device.

        ``found_inf`` is an fp32 0-dim tensor, non-zero if a gradient held an inf/NaN
        (checked before unscaling, as torch does). ``first`` (when ``locate``) is the int64
        index in ``grads`` of the first such gradient, or ``NONE_INDEX``.
        Grads are multiplied in place by ``1/scale`` (reciprocal taken in float64, as
        torch does) when ``unscale``, else left as they are.
        """
        present = [(i, g) for i, g in enumerate(grads) if g is not None]
        if unscale:
            inv_scale = scale.double().reciprocal().float()
        else:
            inv_scale = torch.ones((), dtype=torch.float32, device=scale.device)
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        per_device = {scale.device: (found_inf, inv_scale)}
        first = None
        grouped = _group_tensors_by_device_and_dtype([[g for _, g in present]], True)
        for (device, _), ((group,), indices) in grouped.items():
            if device not in per_device:
                per_device[device] = (
                    torch.zeros((), dtype=torch.float32, device=device),
                    inv_scale.to(device, non_blocking=True),
                )
            dev_found, dev_inv = per_device[device]
            if locate:
                original = tuple(present[k][0] for k in indices)
                candidate = self._first_nonfinite(group, original).to(scale.device, None, True)
                first = candidate if first is None else torch.minimum(first, candidate)
            torch._amp_foreach_non_finite_check_and_unscale_(group, dev_found, dev_inv)
        for device, (dev_found, _) in per_device.items():
            if device != scale.device:
                found_inf += dev_found.to(scale.device, non_blocking=True)
        if locate and first is None:
            first = torch.full((), NONE_INDEX, dtype=torch.int64, device=scale.device)
        return found_inf, first

    def _first_nonfinite(self, group: list[torch.Tensor], original: tuple[int, ...]):
        # max |g| of a tensor is non-finite iff the tensor holds an inf or NaN.
        amax = torch.stack(torch._foreach_norm(group, math.inf))
        key = (amax.device, original)
        positions = self._positions.get(key)
        if positions is None:
            positions = torch.tensor(original, dtype=torch.int64, device=amax.device)
            if len(self._positions) > 64:
                self._positions.clear()
            self._positions[key] = positions
        return torch.where(torch.isfinite(amax), NONE_INDEX, positions).amin()
