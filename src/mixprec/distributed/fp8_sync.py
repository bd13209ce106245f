"""Delayed fp8 scaling on many ranks: the amax histories reduced (MAX) so every rank agrees.

With delayed scaling each ``Float8Linear`` records the amax of x, W and the output gradient
in a history and derives the next scale from it. Under DDP or FSDP2 every rank sees
different data, so left alone the histories (and scales) drift apart: each rank would cast
with its own scale, and a rank whose data is larger than rank 0's would saturate where
the others do not (DDP's buffer broadcast only copies rank 0's state over the others).
:func:`sync_float8_amax_history` makes them one, after backward and before the step::

    H = all_reduce_MAX(concat(every delayed layer's histories))   # one collective
    for each layer and role (input, weight, grad_output):
        history = H[slice of that history]
        scale   = amax_to_scale(reduce_history(history), fmt, previous_scale=scale)

Histories on every rank hold the same past entries (they were equal after the previous
sync), so the elementwise MAX puts ``max over ranks`` of each new amax in front, exactly
the history one process would record from the union of the ranks' data. The new scale is
then a pure function of the history: equal on every rank. ``Precision.step`` calls it once
per iteration for a distributed model; call it yourself in a loop without ``Precision``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mixprec.distributed.core import world_size
from mixprec.float8.linear import ROLES, Float8Linear
from mixprec.float8.scaling import amax_to_scale, reduce_history

__all__ = ["delayed_float8_layers", "sync_float8_amax_history"]


def delayed_float8_layers(model: nn.Module) -> list[Float8Linear]:
    """The ``Float8Linear`` layers of ``model`` that use delayed scaling."""
    return [
        m for m in model.modules() if isinstance(m, Float8Linear) and m.config.scaling == "delayed"
    ]


def _role_dtype(layer: Float8Linear, role: str) -> torch.dtype:
    cfg = layer.config
    return cfg.backward_dtype if role == "grad_output" else cfg.forward_dtype


@torch.no_grad()
def sync_float8_amax_history(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Reduce every delayed-scaling amax history over ranks (MAX) and recompute the scales.

    One ``all_reduce`` for the whole model, on the device, with no host synchronisation.
    A no-op with one rank or when no layer uses delayed scaling.

    Args:
        model: the model (DDP, FSDP2 or plain); its ``Float8Linear`` buffers change in place.
        group: ranks to agree over (default: all).

    Returns:
        The number of layers synchronised.

    Example:
        >>> sync_float8_amax_history(model)  # after backward, before the step  # doctest: +SKIP
        2
    """
    layers = delayed_float8_layers(model)
    if not layers or world_size(group) == 1:
        return 0
    histories = [getattr(layer, f"{role}_amax_history") for layer in layers for role in ROLES]
    flat = torch.cat([h.to(torch.float32) for h in histories])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    for history, reduced in zip(histories, flat.split([h.numel() for h in histories]), strict=True):
        history.copy_(reduced)
    for layer in layers:
        cfg = layer.config
        for role in ROLES:
            scale = getattr(layer, f"{role}_scale")
            amax = reduce_history(getattr(layer, f"{role}_amax_history"), cfg.history_reduce)
            new = amax_to_scale(
                amax,
                _role_dtype(layer, role),
                margin=cfg.margin,
                power_of_two=cfg.power_of_two_scale,
                previous_scale=scale,
            )
            scale.copy_(new)
    return len(layers)
