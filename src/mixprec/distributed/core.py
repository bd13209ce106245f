"""What every strategy shares: which strategy a model uses, the process group, found_inf.

The rank-consistent inf/NaN verdict is the heart of loss scaling on many ranks. Each rank
unscales the gradients it holds (all of them under DDP, its shard under FSDP2) into a
``found_inf`` flag; ranks may disagree (a shard holds the only ``inf``; a bit flip on one
device), and a rank that steps while another skips splits the model in two. So before the
step-or-skip decision every rank takes the maximum over ranks::

    found_inf = max over ranks r of found_inf_r        # all_reduce(found_inf, MAX)

The reduction is a collective on the device tensor: on CUDA it is queued on the stream with
no host synchronisation, so an optimizer that accepts ``found_inf`` as a tensor stays sync-free.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Strategy",
    "global_grad_norm",
    "is_sharded",
    "local_tensor",
    "reduce_found_inf",
    "require_process_group",
    "strategy_of",
    "world_size",
]

Strategy = Literal["none", "ddp", "fsdp2"]

_LAUNCH_HINT = (
    "call torch.distributed.init_process_group(backend) before wrapping the model "
    "(backend 'nccl' on GPUs, 'gloo' on CPUs), and launch with torchrun, which sets "
    "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, e.g. "
    "`torchrun --nproc-per-node 2 train.py`"
)


@functools.cache
def _fsdp_classes() -> tuple[type, type | None]:
    from torch.distributed.fsdp import FSDPModule

    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - FSDP1 removed in some future torch
        FullyShardedDataParallel = None
    return FSDPModule, FullyShardedDataParallel


@functools.cache
def _dtensor_class() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def strategy_of(model: nn.Module) -> Strategy:
    """Which data-parallel strategy ``model`` is wrapped in.

    ``"ddp"`` for ``DistributedDataParallel``, ``"fsdp2"`` when ``fully_shard`` was applied
    to the model or any of its submodules, ``"none"`` otherwise.

    Raises:
        ValueError: for the FSDP1 wrapper ``FullyShardedDataParallel``, which mixprec does
            not drive (its ``MixedPrecision`` and flat parameters predate DTensor).

    Example:
        >>> strategy_of(nn.Linear(2, 2))
        'none'
    """
    if not dist.is_available():
        return "none"
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    fsdp2, fsdp1 = _fsdp_classes()
    for module in model.modules():
        if fsdp1 is not None and isinstance(module, fsdp1):
            raise ValueError(
                "FullyShardedDataParallel (FSDP1) is not supported; shard with FSDP2 instead: "
                "mixprec.distributed.shard_model(model, recipe) or "
                "torch.distributed.fsdp.fully_shard(module, mp_policy=fsdp_policy(recipe))"
            )
        if isinstance(module, fsdp2):
            return "fsdp2"
    return "none"


def require_process_group(what: str = "a distributed model") -> None:
    """Raise a ``RuntimeError`` that says how to fix it when no process group is initialised.

    Example:
        >>> require_process_group()  # doctest: +SKIP
        RuntimeError: a distributed model was passed but ...
    """
    if not dist.is_available():
        raise RuntimeError(f"{what} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what} was passed but torch.distributed's default process group is not "
            f"initialised: {_LAUNCH_HINT}"
        )


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (the default group), 1 when none is initialised.

    Example:
        >>> world_size()  # a single process
        1
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def reduce_found_inf(
    found_inf: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Make ``found_inf`` the same on every rank: in-place ``all_reduce(MAX)``.

    A no-op with one rank. No host synchronisation: the collective works on the device
    tensor, so the step-or-skip decision can stay on the device.

    Args:
        found_inf: 0-dim float tensor, 1.0 where this rank saw a non-finite gradient.
        group: process group to reduce over (default: all ranks; every rank must take the
            same decision, so reducing over more ranks than the data-parallel group is safe).

    Returns:
        ``found_inf`` itself, now ``max_r found_inf_r``.

    Example:
        >>> reduce_found_inf(torch.tensor(0.0))  # one process: unchanged
        tensor(0.)
    """
    if world_size(group) > 1:
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
    return found_inf


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a parameter or gradient sharded by FSDP2)."""
    return dist.is_available() and isinstance(tensor, _dtensor_class())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds: ``DTensor.to_local()``, else ``tensor``.

    The local tensor shares storage with the DTensor, so in-place ops on it (unscaling,
    clipping) act on the sharded gradient.

    Example:
        >>> t = torch.ones(2)
        >>> local_tensor(t) is t
        True
    """
    return tensor.to_local() if is_sharded(tensor) else tensor


def global_grad_norm(grads: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norm of all gradients taken together, whether replicated or sharded (fp32, 0-dim).

    For replicated tensors each rank holds the whole gradient, so the local sum is the
    total. For a DTensor sharded on mesh dimensions ``D`` the shards' sums add up over the
    process groups of ``D``::

        total = (sum_plain |g|^p + sum_shard_groups all_reduce_SUM(sum_local |g|^p)) ^ (1/p)

    and for ``p = inf`` the same with ``max`` in place of the sums. No host sync.

    Example:
        >>> global_grad_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    if norm_type <= 0:
        raise ValueError(f"norm_type={norm_type!r} must be positive (or math.inf)")
    is_inf = math.isinf(norm_type)
    totals: dict[tuple, torch.Tensor] = {}  # key: shard process groups (empty = replicated)
    for grad in grads:
        groups: tuple = ()
        if is_sharded(grad):
            mesh = grad.device_mesh
            groups = tuple(
                mesh.get_group(dim) for dim, p in enumerate(grad.placements) if p.is_shard()
            )
        local = local_tensor(grad).detach().float()
        if local.numel() == 0:  # an uneven split can leave a rank an empty shard
            part = torch.zeros((), device=local.device)
        else:
            part = local.abs().amax() if is_inf else local.abs().pow(norm_type).sum()
        prev = totals.get(groups)
        if prev is None:
            totals[groups] = part
        else:
            totals[groups] = torch.maximum(prev, part) if is_inf else prev + part
    if not totals:
        return torch.zeros(())
    device = next(iter(totals.values())).device
    total = torch.zeros((), device=device)
    for groups, part in totals.items():
        for group in groups:
            op = dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM
            dist.all_reduce(part, op=op, group=group)
        total = torch.maximum(total, part) if is_inf else total + part
    return total if is_inf else total.pow(1.0 / norm_type)
