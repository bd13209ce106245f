"""Per-rank checkpoints that resume bit-exactly on the same number of ranks.

Each rank writes one file, ``rank-{rank:05d}-of-{world:05d}.pt``, holding exactly what it
needs to continue: the model's state dict (under FSDP2 its DTensor shards), the optimizer's
(with its sharded states), ``Precision.state_dict()`` (loss scaler, master weights) and the
rank's RNG states. Tensors are saved as they are, bit for bit, and loaded with
``weights_only=True``. fp8 models save their scaling state (``Float8Linear``'s amax
histories and scales are buffers of the state dict, the same on every rank once synced);
a weight that FSDP2 all-gathers in fp8 is saved as the high-precision shard it wraps, so
the file holds plain tensors only. On another number of ranks a checkpoint still loads,
not bit-exactly (the RNG state is not restored; a warning says so): a replicated one (DDP,
one process) from rank 0's file, an FSDP2 one from every rank's file, its shards rebuilt
for this run (:mod:`mixprec.distributed.reshard`; FSDP2's 1-D ``Shard(0)`` only).
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
from mixprec.distributed.reshard import reshard_state

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

    Call after ``Precision.setup`` with the same recipe. The same number of ranks resumes
    bit-exactly. Another number of ranks loads the same state, with a warning that the RNG
    state is not restored (bit-exact continuation needs the same ranks): a replicated
    checkpoint (DDP, one process) from rank 0's file, into a model with or without DDP; an
    FSDP2 checkpoint from every rank's file, shards rebuilt for this run's sharding.

    Raises:
        FileNotFoundError: no file for this rank and no usable checkpoint of another number
            of ranks (a rank's file missing, no rank-0 file; names the paths).
        ValueError: the file says it was written by a different number of ranks, or a
            tensor is sharded other than FSDP2's 1-D ``Shard(0)``.

    Warns:
        UserWarning: a checkpoint loaded on a different number of ranks.

    Example:
        >>> load_checkpoint("ckpt", model=model, optimizer=opt, precision=p)  # doctest: +SKIP
    """
    path = checkpoint_path(directory)
    resharded = not path.exists()
    if resharded:
        source, state = _state_for_this_world(directory, path, _unwrapped(model), optimizer)
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
            f"has {world_size()}: the model, optimizer and precision state (strategy "
            f"{state['strategy']!r}) were loaded from {source}; the RNG state was not "
            "restored, so the run continues correctly but not bit-exactly",
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


def _state_for_this_world(directory, missing: Path, module, optimizer) -> tuple[str, dict]:
    """A checkpoint of another number of ranks: rank 0's file when replicated (DDP, one
    process); every rank's file, shards rebuilt for this run, when FSDP2."""
    import torch.distributed.tensor  # noqa: F401  (registers DTensor for weights_only loads)

    files = sorted(Path(directory).glob("rank-*-of-*.pt"))
    first = [p for p in files if p.name.startswith("rank-00000-of-")]
    state = torch.load(first[0], weights_only=True) if len(first) == 1 else None
    strategy = None if state is None else state.get("strategy")
    if strategy in ("ddp", "none"):
        return first[0].name, state
    if strategy == "fsdp2":
        world = state["world_size"]
        paths = [checkpoint_path(directory, rank, world) for rank in range(world)]
        absent = [p.name for p in paths if not p.exists()]
        if absent:
            raise FileNotFoundError(
                f"checkpoint {directory} of {world} FSDP2 ranks lacks {absent[:4]}: every "
                "rank's file is needed to rebuild the shards for another number of ranks"
            )
        states = [state] + [torch.load(p, weights_only=True) for p in paths[1:]]
        return f"all {world} files", reshard_state(states, module, optimizer)
    raise FileNotFoundError(
        f"no checkpoint file {missing} for rank {_rank()} of {world_size()}"
        + (f"; the directory holds {[p.name for p in files[:4]]}" if files else "")
        + " (a checkpoint whose rank-0 file does not say its strategy resumes on the number "
        "of ranks that wrote it)"
    )
