"""DistributedDataParallel: gradient communication in fp32, bf16 or fp16, and re-wrapping.

DDP all-reduces gradients in buckets. A communication hook decides the dtype on the wire::

    wire   = cast(bucket, comm_dtype) / world_size     # divide first: fp16 cannot overflow
    wire   = all_reduce_SUM(wire)                      #   on the sum of world_size values
    bucket = cast(wire, bucket.dtype)                  # back in place

bf16 halves the bytes and keeps fp32's range (8 significant bits); fp16 keeps 11 bits but
only reaches 65504, so it needs loss scaling (a scaled gradient that overflows on the wire
becomes ``inf``, which the scaler sees and backs off from, as apex and Megatron do).

DDP fixes its buckets' dtypes when it wraps the model. A recipe that casts parameters
(``fp16-master``, ``bf16-master``, ``bf16-true``) therefore re-wraps the module after the
cast: :func:`rewrap_ddp` builds a new ``DistributedDataParallel`` with the old one's settings.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixprec.distributed.core import require_process_group

__all__ = ["COMM_DTYPES", "grad_comm_hook", "register_grad_comm_hook", "rewrap_ddp"]

COMM_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def _check_comm_dtype(dtype) -> torch.dtype:
    if dtype not in COMM_DTYPES:
        raise ValueError(
            f"grad_comm_dtype={dtype!r} is not one of torch.float32, torch.bfloat16, torch.float16"
        )
    return dtype


def _cast_allreduce_hook(
    comm_dtype: torch.dtype, process_group: dist.ProcessGroup | None, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    # .to() returns the buffer itself when the dtypes agree: then the division is in place,
    # as in torch's own allreduce_hook.
    wire = buffer.to(comm_dtype).div_(dist.get_world_size(group))
    future = dist.all_reduce(wire, group=group, async_op=True).get_future()

    def back_to_bucket(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        if reduced.data_ptr() != buffer.data_ptr():
            buffer.copy_(reduced)
        return buffer

    return future.then(back_to_bucket)


def grad_comm_hook(comm_dtype: torch.dtype):
    """A DDP communication hook that all-reduces every bucket in ``comm_dtype``.

    Works for any bucket dtype: fp32 gradients sent as bf16 or fp16 (compression), and bf16
    or fp16 gradients sent as fp32 (a sum with one rounding at the end).

    Args:
        comm_dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.

    Example:
        >>> ddp.register_comm_hook(None, grad_comm_hook(torch.bfloat16))  # doctest: +SKIP
    """
    comm_dtype = _check_comm_dtype(comm_dtype)

    # No annotations: DDP compares them with its own types, and this module's are strings.
    def hook(process_group, bucket):
        return _cast_allreduce_hook(comm_dtype, process_group, bucket)

    hook.__name__ = f"mixprec_allreduce_{str(comm_dtype).removeprefix('torch.')}"
    return hook


def register_grad_comm_hook(
    ddp: DistributedDataParallel, comm_dtype: torch.dtype, process_group=None
) -> None:
    """Make ``ddp`` all-reduce gradients in ``comm_dtype`` (once per DDP object).

    Raises:
        ValueError: if ``ddp`` already has a communication hook (DDP allows one).

    Example:
        >>> register_grad_comm_hook(ddp, torch.bfloat16)  # doctest: +SKIP
    """
    _check_comm_dtype(comm_dtype)
    if ddp._comm_hooks:
        raise ValueError(
            f"this DistributedDataParallel already has a communication hook "
            f"({ddp._comm_hooks[0][0]!r}); DDP allows one, so grad_comm_dtype={comm_dtype} "
            "cannot be applied: leave grad_comm_dtype=None to keep the existing hook"
        )
    ddp.register_comm_hook(process_group, grad_comm_hook(comm_dtype))


def rewrap_ddp(
    ddp: DistributedDataParallel, module: nn.Module | None = None
) -> DistributedDataParallel:
    """A new ``DistributedDataParallel`` around ``module`` (default ``ddp.module``).

    Takes the old wrapper's settings (device ids, process group, bucket size, unused
    parameters, bucket views, static graph, communication hooks) and detaches the old
    wrapper's gradient hooks, so the old object must not be used afterwards. Needed after
    parameters change dtype or identity: DDP fixed its buckets when it wrapped them.

    Raises:
        RuntimeError: if no process group is initialised.
        ValueError: if the old wrapper uses DDP's own ``mixed_precision`` option, which
            would cast parameters behind the recipe's back.

    Example:
        >>> ddp = rewrap_ddp(ddp)  # doctest: +SKIP
    """
    require_process_group("a DistributedDataParallel model")
    if getattr(ddp, "mixed_precision", None) is not None:
        raise ValueError(
            "DistributedDataParallel(mixed_precision=...) casts parameters itself and conflicts "
            "with the recipe; wrap without mixed_precision and let the recipe choose dtypes"
        )
    reducer = getattr(ddp, "reducer", None)
    if reducer is not None and hasattr(reducer, "_remove_autograd_hooks"):
        reducer._remove_autograd_hooks()
    new = DistributedDataParallel(
        ddp.module if module is None else module,
        device_ids=ddp.device_ids,
        output_device=ddp.output_device,
        dim=ddp.dim,
        broadcast_buffers=None if ddp.broadcast_buffers else False,
        process_group=ddp.process_group,
        bucket_cap_mb=ddp.bucket_bytes_cap / 1024**2,
        find_unused_parameters=ddp.find_unused_parameters,
        gradient_as_bucket_view=ddp.gradient_as_bucket_view,
        static_graph=ddp.static_graph,
    )
    for hook, state in ddp._comm_hooks:
        new.register_comm_hook(state, hook)
    return new
