"""Flat buffers: a group of parameters made views of one contiguous tensor."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


class _FlatGroup:
    """16-bit parameters of one (device, dtype) group made views of one flat buffer."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.numels = [p.numel() for p in params]
        self.shapes = [p.shape for p in params]
        first = params[0]
        self.low = torch.empty(sum(self.numels), dtype=first.dtype, device=first.device)
        self.low_views = self.views(self.low)
        with torch.no_grad():
            torch._foreach_copy_(self.low_views, [p.data for p in params])
        for p, view in zip(params, self.low_views):
            p.data = view

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [
            t.view(shape) for t, shape in zip(flat.split(self.numels), self.shapes, strict=True)
        ]

    def gather_grads_(self, flat: torch.Tensor, views: list[torch.Tensor]) -> None:
        """Write the params' ``.grad`` into ``flat`` (converting dtype; missing = 0)."""
        grads = [p.grad for p in self.params]
        if all(g is not None for g in grads):
            torch._foreach_copy_(views, grads)
        else:
            flat.zero_()
            pairs = [(v, g) for v, g in zip(views, grads) if g is not None]
            if pairs:
                torch._foreach_copy_([v for v, _ in pairs], [g for _, g in pairs])


def _group_low_precision(optimizer: torch.optim.Optimizer) -> dict:
    """Map (device, dtype) -> 16-bit params of the optimizer, in param_groups order."""
    groups: dict = defaultdict(list)
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.dtype in (torch.float16, torch.bfloat16):
                groups[(p.device, p.dtype)].append(p)
    return groups


def _swap_optimizer_params(optimizer: torch.optim.Optimizer, mapping: dict[int, torch.Tensor]):
    """Replace params in the optimizer's param_groups (and state keys) in place."""
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(id(p), p) for p in group["params"]]
    for old_id, new in mapping.items():
        for key in list(optimizer.state):
            if id(key) == old_id:
                optimizer.state[new] = {
                    k: v.float() if torch.is_tensor(v) and v.is_floating_point() and v.dim() else v
                    for k, v in optimizer.state.pop(key).items()
                }
