"""The gradient pass of a loss scaler: grouped inf/NaN check, unscale, first non-finite.

Without locating, one ``torch._amp_foreach_non_finite_check_and_unscale_`` call per
(device, dtype) group (torch.amp.GradScaler's kernel and grouping). To also find *which*
gradient was the first non-finite one, with no host read and at low cost:

* ``"flags"`` (default on CPU): the same kernel once per gradient, each writing its own
  slot of a flag vector, so ``found_inf = max(flags)`` and ``first = min{i : flags[i]}``.
  No extra pass over the data; costs one dispatch per gradient instead of one per group.
* ``"amax"`` (default elsewhere): one extra fused read of the gradients,
  ``torch._foreach_norm(grads, inf)`` (max |g| is non-finite iff ``g`` holds an inf or a
  NaN), before the grouped kernel; a constant number of launches per group.

Checking what is applied (``amplifies=True``, needed whenever the scale can be below 1):
``torch._amp_foreach_non_finite_check_and_unscale_`` looks at each gradient *before* it
multiplies it by ``1/scale``, so with a scale below 1 a finite gradient can become inf
(an fp16 gradient of 4096 unscaled at 2^-5 is 131072 > 65504) and the step would apply
it. The ``"amax"`` pass is then used and also tested on what the unscale writes: the
unscaled value of a gradient's largest element, ``cast(amax * (1/scale))`` computed in the
kernel's arithmetic (fp32, fp64 for fp64 gradients), is non-finite exactly when any
unscaled element is (multiplying by a positive number and rounding are monotonic). For
``unscale=False`` (a fused optimizer divides by the scale in its fp32 arithmetic and does
not round back) the test is ``amax / scale`` in that arithmetic. No extra pass over the
data beyond the ``amax`` read.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = ["NONE_INDEX", "GradChecker", "LocateMethod"]


def _max_abs(group: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``max |g|`` of each tensor (NaN if it holds one), stacked. On CPU from
    ``torch.aminmax`` (``vector_norm(ord=inf)`` is about 20x slower there in torch 2.13);
    elsewhere one fused ``torch._foreach_norm(group, inf)``."""
    if device.type != "cpu":
        return torch.stack(torch._foreach_norm(group, math.inf))
    out = []
    for grad in group:
        if grad.numel() == 0:
            out.append(torch.zeros((), dtype=grad.dtype))
        else:
            low, high = torch.aminmax(grad)
            out.append(torch.maximum(high, low.neg()))
    return torch.stack(out)

# Marks "no non-finite gradient" in int64 index tensors (above any real index).
NONE_INDEX = 2**62

LocateMethod = Literal["auto", "flags", "amax"]
_METHODS = ("auto", "flags", "amax")


class GradChecker:
    """Checks (and unscales) gradient lists; caches the index tensors it builds.

    Args:
        method: how the first non-finite gradient is located (see the module docstring).

    Example:
        >>> grads = [torch.tensor([2.0, 4.0]), torch.tensor([float("nan")])]
        >>> found_inf, first = GradChecker()(grads, torch.tensor(2.0), unscale=True, locate=True)
        >>> found_inf.item(), first.item(), grads[0].tolist()
        (1.0, 1, [1.0, 2.0])
    """

    def __init__(self, method: LocateMethod = "auto") -> None:
        if method not in _METHODS:
            raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, _METHODS))}")
        self.method = method
        self._positions: dict[tuple, torch.Tensor] = {}
        self._ones: dict[torch.device, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(
        self,
        grads: Sequence[torch.Tensor | None],
        scale: torch.Tensor,
        *,
        unscale: bool,
        locate: bool,
        amplifies: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(found_inf, first)`` on ``scale``'s device.

        ``found_inf`` is an fp32 0-dim tensor, non-zero if a gradient held an inf/NaN,
        or (when ``amplifies``: the scale may be below 1 or not finite) if unscaling would
        turn one non-finite. ``first`` (when ``locate``) is the int64 index in ``grads`` of
        the first such gradient, or ``NONE_INDEX``.
        Grads are multiplied in place by ``1/scale`` (reciprocal taken in float64, as
        torch does) when ``unscale``, else left as they are.
        """
        present = [(i, g) for i, g in enumerate(grads) if g is not None]
        if unscale:
            inv_scale = scale.double().reciprocal().float()
        else:  # kept per device: one allocation less per call
            inv_scale = self._ones.get(scale.device)
            if inv_scale is None:
                inv_scale = self._ones[scale.device] = scale.new_ones((), dtype=torch.float32)
        by_device: dict[torch.device, list] = defaultdict(list)
        grouped = (  # torch's grouping refuses an empty list: no gradient, nothing found
            _group_tensors_by_device_and_dtype([[g for _, g in present]], True) if present else {}
        )
        for (device, _), ((group,), indices) in grouped.items():
            by_device[device].append((group, indices))
        found_parts, first_parts = [], []
        for device, groups in by_device.items():
            dev_inv = inv_scale if device == scale.device else inv_scale.to(device, None, True)
            if amplifies:
                dev_found, first = self._amax_pass(
                    groups, present, device, dev_inv, scale=None if unscale else scale
                )
                first_parts.append(first)
            elif not locate:
                dev_found = torch.zeros((), dtype=torch.float32, device=device)
                for group, _ in groups:
                    torch._amp_foreach_non_finite_check_and_unscale_(group, dev_found, dev_inv)
            elif self._method(device) == "flags":
                dev_found, first = self._flags_pass(groups, present, device, dev_inv)
                first_parts.append(first)
            else:
                dev_found, first = self._amax_pass(groups, present, device, dev_inv)
                first_parts.append(first)
            found_parts.append(dev_found.to(scale.device, None, True))
        if not found_parts:
            found_parts.append(torch.zeros((), dtype=torch.float32, device=scale.device))
        found_inf = found_parts[0]
        for part in found_parts[1:]:
            found_inf = found_inf + part
        if not locate:
            return found_inf, None
        first = torch.full((), NONE_INDEX, dtype=torch.int64, device=scale.device)
        for part in first_parts:
            first = torch.minimum(first, part.to(scale.device, None, True))
        return found_inf, first

    def _method(self, device: torch.device) -> str:
        if self.method != "auto":
            return self.method
        return "flags" if device.type == "cpu" else "amax"

    def _flags_pass(self, groups, present, device, inv_scale):
        flags = torch.zeros(len(present), dtype=torch.float32, device=device)
        slots = flags.unbind()
        for group, indices in groups:
            for k, grad in zip(indices, group):
                torch._amp_foreach_non_finite_check_and_unscale_([grad], slots[k], inv_scale)
        positions = self._positions_of(device, tuple(i for i, _ in present))
        first = torch.where(flags != 0, positions, NONE_INDEX).amin()
        return flags.amax(), first

    def _amax_pass(self, groups, present, device, inv_scale, scale=False):
        """``scale=False``: flag non-finite gradients only. ``scale=None``: also flag those
        whose unscaled value ``cast(amax * inv_scale)`` is not finite. A tensor: also flag
        those where ``amax / scale`` is not finite (what a fused optimizer computes)."""
        dev_found = torch.zeros((), dtype=torch.float32, device=device)
        first = None
        for group, indices in groups:
            amax = _max_abs(group, device)
            dtype = group[0].dtype
            opmath = torch.float64 if dtype == torch.float64 else torch.float32
            if scale is None:  # what _amp_foreach_non_finite_check_and_unscale_ writes
                applied = (amax.to(opmath) * inv_scale.to(device, opmath)).to(dtype)
            elif isinstance(scale, torch.Tensor):  # what a fused optimizer computes
                applied = amax.to(opmath) / scale.to(device, opmath)
            else:
                applied = amax
            bad = ~torch.isfinite(applied)
            dev_found = torch.maximum(dev_found, bad.any().float())
            positions = self._positions_of(device, tuple(present[k][0] for k in indices))
            candidate = torch.where(bad, positions, NONE_INDEX).amin()
            first = candidate if first is None else torch.minimum(first, candidate)
            torch._amp_foreach_non_finite_check_and_unscale_(group, dev_found, inv_scale)
        return dev_found, first

    def __getstate__(self) -> dict:
        # The index and 1.0 tensors are a cache on some device; a pickle holds none of them.
        return {"method": self.method, "_positions": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._ones = {}

    def _positions_of(self, device: torch.device, original: tuple[int, ...]) -> torch.Tensor:
        key = (device, original)
        positions = self._positions.get(key)
        if positions is None:
            positions = torch.tensor(original, dtype=torch.int64, device=device)
            if len(self._positions) > 64:
                self._positions.clear()
            self._positions[key] = positions
        return positions
