"""Count the bytes FSDP2 moves: every all-gather and reduce-scatter of a sharded model.

:func:`count_fsdp_bytes` installs FSDP2's own extension points
(``FSDPModule.set_custom_all_gather`` / ``set_custom_reduce_scatter``) on every sharded
module; the installed objects call the same collectives FSDP2 calls by default
(``all_gather_single``, ``reduce_scatter_single``) and add up, per rank::

    all_gather_bytes     += output.numel() * output.element_size()   # the gathered tensor
    reduce_scatter_bytes += input.numel()  * input.element_size()    # the full gradients

These are the sizes of the collectives' full buffers (what a ring moves is
``(ranks - 1) / ranks`` of that per rank, the same fraction for every dtype, so ratios
between runs are the same either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CommBytes", "count_fsdp_bytes"]


@dataclass
class CommBytes:
    """Running totals of FSDP2's collectives on this rank (reset with :meth:`reset`).

    Attributes:
        all_gather: bytes of the all-gathered parameter buffers.
        reduce_scatter: bytes of the gradient buffers reduce-scattered.
        all_gather_calls / reduce_scatter_calls: how many collectives of each kind.
    """

    all_gather: int = 0
    reduce_scatter: int = 0
    all_gather_calls: int = 0
    reduce_scatter_calls: int = 0

    def reset(self) -> None:
        """Zero the totals (keep counting)."""
        self.all_gather = self.reduce_scatter = 0
        self.all_gather_calls = self.reduce_scatter_calls = 0

    def as_dict(self) -> dict[str, int]:
        """The four totals as plain data."""
        return {
            "all_gather": self.all_gather,
            "reduce_scatter": self.reduce_scatter,
            "all_gather_calls": self.all_gather_calls,
            "reduce_scatter_calls": self.reduce_scatter_calls,
        }


def _alloc(size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(*size, dtype=dtype, device=device)


def _comms(counts: CommBytes):
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

    class CountingAllGather(AllGather):
        def allocate(self, size, *, dtype, device):
            return _alloc(size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            counts.all_gather += output_tensor.numel() * output_tensor.element_size()
            counts.all_gather_calls += 1
            return dist.all_gather_single(
                output_tensor, input_tensor, group=group, async_op=async_op
            )

    class CountingReduceScatter(ReduceScatter):
        def allocate(self, size, *, dtype, device):
            return _alloc(size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            counts.reduce_scatter += input_tensor.numel() * input_tensor.element_size()
            counts.reduce_scatter_calls += 1
            return dist.reduce_scatter_single(
                output_tensor, input_tensor, op=op, group=group, async_op=async_op
            )

    return CountingAllGather(), CountingReduceScatter()


def count_fsdp_bytes(model: nn.Module) -> CommBytes:
    """Count the bytes of every FSDP2 all-gather and reduce-scatter of ``model`` from now on.

    Raises:
        ValueError: no module of ``model`` is sharded with ``fully_shard``.

    Example:
        >>> counts = count_fsdp_bytes(model)  # doctest: +SKIP
        >>> train_one_step(); counts.all_gather  # doctest: +SKIP
        81920
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        raise ValueError("count_fsdp_bytes needs a model sharded with fully_shard / shard_model")
    counts = CommBytes()
    all_gather, reduce_scatter = _comms(counts)
    for module in sharded:
        module.set_custom_all_gather(all_gather)
        module.set_custom_reduce_scatter(reduce_scatter)
    return counts
