"""An FSDP2 checkpoint of N ranks loaded on M ranks (or on one process without FSDP2).

Each rank's file holds its shards: DTensors on a 1-D mesh, ``Shard(0)`` (rows split as
``torch.chunk`` splits them, rank order). Loading on another number of ranks, every rank
reads every file and rebuilds each tensor, then keeps the part it now owns::

    full      = cat([shard of rank r for r in 0 .. N-1], dim=0)       # the whole tensor
    new_shard = distribute_tensor(full, target.mesh, target.placements)  # no communication

for the model's state and the optimizer's per-parameter states (``exp_avg``...). Plain
tensors (buffers such as fp8 amax histories and scales, step counters) are the same on
every rank and come from rank 0's file, as do the optimizer's hyperparameters and the
``Precision`` state. Every rank holds the whole model for a moment: for models larger
than a host's memory use ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixprec.distributed.core import is_sharded

__all__ = ["reshard_state"]


def _joined(values: list, what: str) -> torch.Tensor:
    first = values[0]
    if not is_sharded(first):
        return first  # replicated: rank 0's copy
    from torch.distributed.tensor import Shard

    if first.device_mesh.ndim != 1 or first.placements != (Shard(0),):
        raise ValueError(
            f"{what} is saved with placements {first.placements} on a {first.device_mesh.ndim}-D "
            "mesh; only FSDP2's 1-D Shard(0) is rebuilt on another number of ranks: resume on "
            "the same number of ranks or use torch.distributed.checkpoint"
        )
    return torch.cat([v.to_local() for v in values], dim=0)


def _spread(full: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    if target is None or not is_sharded(target):
        return full
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank holds `full` already, so each keeps its chunk locally
    return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)


def reshard_state(states: list[dict[str, Any]], module: nn.Module, optimizer) -> dict[str, Any]:
    """Rank 0's checkpoint dict with model and optimizer tensors rebuilt for this run.

    Args:
        states: every rank's loaded file, in rank order.
        module: the model to load into (its state dict gives each tensor's new placement).
        optimizer: the optimizer to load into (its parameters give the states' placements).

    Raises:
        ValueError: a tensor sharded some other way than FSDP2's 1-D ``Shard(0)``.

    Example:
        >>> state = reshard_state([torch.load(f) for f in files], model, opt)  # doctest: +SKIP
    """
    first = states[0]
    targets = module.state_dict()
    model = {
        key: _spread(_joined([s["model"][key] for s in states], repr(key)), targets.get(key))
        for key in first["model"]
    }
    params = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state = {}
    for index, entry in first["optimizer"]["state"].items():
        target = params[index] if index < len(params) else None
        opt_state[index] = {
            name: _spread(
                _joined([s["optimizer"]["state"][index][name] for s in states], f"{name}[{index}]"),
                target if is_sharded(value) else None,
            )
            for name, value in entry.items()
        }
    optimizer_state = {**first["optimizer"], "state": opt_state}
    return {**first, "model": model, "optimizer": optimizer_state}
