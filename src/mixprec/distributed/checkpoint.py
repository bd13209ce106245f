"""Per-rank checkpoints that resume bit-exactly on the same number of ranks.

Each rank writes one file, ``rank-{rank:05d}-of-{world:05d}.pt``, holding exactly what it
needs to continue: the model's state dict (under FSDP2 its DTensor shards), the optimizer's
(with its sharded states), ``Precision.state_dict()`` (loss scaler, master weights) and the
rank's RNG states. Tensors are saved as they are, bit for bit, and loaded with
``weights_only=True``. fp8 models save their scaling state (``Float8Linear``'s amax
histories and scales are buffers of the state dict, the same on every rank once synced);
a weight that FSDP2 all-gathers in fp8 is saved as the high-precision shard it wraps, so
the file holds plain tensors only. A replicated checkpoint (DDP, one process) also loads
on another number of ranks (rank 0's file; RNG not restored, with a warning). Resharding an
FSDP2 checkpoint onto a different number of ranks is not supported: use
``torch.distributed.checkpoint`` for that.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixprec.distributed.core import is_sharded, strategy_of, world_size

__all__ = ["checkpoint_path", "load_checkpoint", "save_checkpoint"]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _plain(tensor):
    """A weight all-gathered in fp8 saved as the high-precision tensor it wraps."""
    from mixprec.distributed.fp8_all_gather import Float8AllGatherWeight

    if is_sharded(tensor) and isinstance(tensor._local_tensor, Float8AllGatherWeight):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            tensor._local_tensor._tensor,
            tensor.device_mesh,
            tensor.placements,
            run_check=False,
            shape=tensor.shape,
            stride=tensor.stride(),
        )
    if isinstance(tensor, Float8AllGatherWeight):
        return tensor._tensor
    return tensor


def _plain_state(state: dict[str, Any]) -> dict[str, Any]:
    return {key: _plain(value) for key, value in state.items()}


def checkpoint_path(
    directory: str | os.PathLike, rank: int | None = None, world: int | None = None
) -> Path:
    """The file of ``rank`` (default: this rank) in a checkpoint directory.

    Example:
        >>> checkpoint_path("ckpt", 1, 2).name
        'rank-00001-of-00002.pt'
    """
    rank = _rank() if rank is None else rank
    world = world_size() if world is None else world
    return Path(directory) / f"rank-{rank:05d}-of-{world:05d}.pt"


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    precision=None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write this rank's part of a checkpoint (every rank calls it); returns the file.

    Args:
        directory: created if missing; shared or local to each node.
        model: the model ``Precision.setup`` returned (DDP, FSDP2 or plain).
        optimizer: the optimizer ``Precision.setup`` returned.
        precision: the :class:`~mixprec.Precision` (scaler and master state), or ``None``.
        extra: plain data to keep alongside (step counter, data position).

    Example:
        >>> save_checkpoint("ckpt", model=model, optimizer=opt, precision=p)  # doctest: +SKIP
    """
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    strategy = strategy_of(model)
    state = {
        "world_size": world_size(),
        "strategy": strategy,  # "ddp" / "none": every rank holds the same state
        "model": _plain_state(_unwrapped(model).state_dict()),
        "optimizer": optimizer.state_dict(),
        "precision": precision.state_dict() if precision is not None else None,
        "rng": {"torch": torch.get_rng_state()},
        "extra": extra or {},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng"]["cuda"] = torch.cuda.get_rng_state()
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous file intact
    if world_size() > 1:
        dist.barrier()
    return path


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    precision=None,
) -> dict[str, Any]:
    """Restore this rank's part of a checkpoint in place; returns its ``extra`` dict.

    Call after ``Precision.setup`` with the same recipe and strategy. The same number of
    ranks resumes bit-exactly. A checkpoint of replicated state (DDP or one process) also
    loads on a different number of ranks, DDP or not: every rank reads rank 0's file, with a
    warning that the RNG state is not restored (bit-exact continuation needs the same ranks).

    Raises:
        FileNotFoundError: no file for this rank, and the checkpoint is sharded (FSDP2) or
            holds no rank 0 file (names the path and what the directory holds).
        ValueError: the file says it was written by a different number of ranks.

    Warns:
        UserWarning: a replicated checkpoint loaded on a different number of ranks.

    Example:
        >>> load_checkpoint("ckpt", model=model, optimizer=opt, precision=p)  # doctest: +SKIP
    """
    path = checkpoint_path(directory)
    resharded = not path.exists()
    if resharded:
        path, state = _replicated_state(directory, path)
    else:
        state = torch.load(path, weights_only=True)  # tensors return to the devices they left
        if state["world_size"] != world_size():
            raise ValueError(
                f"checkpoint {directory} was written by {state['world_size']} ranks, this run "
                f"has {world_size()}; resume on {state['world_size']} ranks"
            )
    _unwrapped(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if precision is not None and state["precision"] is not None:
        precision.load_state_dict(state["precision"])
    if resharded:
        warnings.warn(
            f"checkpoint {directory} was written by {state['world_size']} rank(s) and this run "
            f"has {world_size()}: the model, optimizer and precision state are replicated "
            f"(strategy {state['strategy']!r}) and were loaded from {path.name}; the RNG state "
            "was not restored, so the run continues correctly but not bit-exactly",
            UserWarning,
            stacklevel=2,
        )
        return state["extra"]
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["extra"]


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module whose state is saved: DDP's wrapped module (no ``module.`` prefix), so a
    replicated checkpoint loads with or without DDP."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _replicated_state(directory, missing: Path) -> tuple[Path, dict]:
    """Rank 0's file of a replicated (DDP / one-process) checkpoint, for another rank count."""
    files = sorted(Path(directory).glob("rank-*-of-*.pt"))
    first = [p for p in files if p.name.startswith("rank-00000-of-")]
    state = torch.load(first[0], weights_only=True) if len(first) == 1 else None
    if state is None or state.get("strategy") not in ("ddp", "none"):
        what = "sharded (FSDP2) " if state is not None else ""
        raise FileNotFoundError(
            f"no checkpoint file {missing} for rank {_rank()} of {world_size()}"
            + (f"; the directory holds {[p.name for p in files[:4]]}" if files else "")
            + f" (a {what}checkpoint resumes on the number of ranks that wrote it; "
            "resharding needs torch.distributed.checkpoint)"
        )
    return first[0], state
