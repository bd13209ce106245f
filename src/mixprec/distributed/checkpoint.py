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

All or nothing: the file is a ``torch.save`` of ``{"format": "mixprec-checkpoint",
"version": 1, "sha256": hex, "payload": uint8 tensor}`` where ``payload`` is the
``torch.save`` bytes of the state and ``sha256 = SHA-256(payload)``. ``load_checkpoint``
checks the digest (a flipped byte is an error naming the file), the layout, the ranks, the
model's keys and shapes, the optimizer's groups and the Precision state, and only then
changes anything. ``save_checkpoint`` refuses an ``extra`` that ``weights_only`` loading
could not read back.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixprec.distributed.core import is_sharded, strategy_of, world_size
from mixprec.distributed.reshard import reshard_state

__all__ = [
    "CheckpointError",
    "checkpoint_path",
    "load_checkpoint",
    "read_checkpoint_file",
    "save_checkpoint",
]

_FORMAT, _VERSION = "mixprec-checkpoint", 1
_KEYS = ("world_size", "strategy", "model", "optimizer", "precision", "rng", "extra")
_PLAIN = (type(None), bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: unreadable, corrupt, or of another setup."""


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


def _check_plain(value, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` would not read back."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}: "
                                "use str or int keys")  # fmt: skip
            _check_plain(item, f"{where}[{key!r}]")
        return
    hint = " (e.g. value.isoformat())" if isinstance(value, (datetime.date, datetime.time)) else ""
    raise TypeError(
        f"{where} is a {type(value).__name__} ({value!r}), which load_checkpoint could not "
        "read back: extra keeps plain data (None, bool, int, float, str, bytes, tensors, and "
        f"lists / tuples / dicts of them); convert it first{hint}"
    )


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
        extra: plain data to keep alongside (step counter, data position): None, bool,
            int, float, str, bytes, tensors, and lists / tuples / dicts of them.

    Raises:
        TypeError: ``extra`` holds something else (a ``datetime``, an object), named by
            its place, e.g. ``extra['when']``; nothing is written then.

    Example:
        >>> save_checkpoint("ckpt", model=model, optimizer=opt, precision=p)  # doctest: +SKIP
    """
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict of plain data, got {type(extra).__name__}")
    _check_plain(extra, "extra")
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "world_size": world_size(),
        "strategy": strategy_of(model),  # "ddp" / "none": every rank holds the same state
        "model": _plain_state(_unwrapped(model).state_dict()),
        "optimizer": optimizer.state_dict(),
        "precision": precision.state_dict() if precision is not None else None,
        "rng": {"torch": torch.get_rng_state()},
        "extra": extra,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng"]["cuda"] = torch.cuda.get_rng_state()
    _write(path, state)
    if world_size() > 1:
        dist.barrier()
    return path


def _write(path: Path, state: dict) -> None:
    """Save ``state`` wrapped with its SHA-256, atomically (a crash leaves the old file)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = bytearray(buffer.getbuffer())
    wrapped = {
        "format": _FORMAT,
        "version": _VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(payload, dtype=torch.uint8),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(wrapped, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous file intact


def read_checkpoint_file(path: str | os.PathLike) -> dict:
    """The checked content of one rank's checkpoint file (for inspection), or one
    :class:`CheckpointError` naming the file.

    Example:
        >>> read_checkpoint_file("ckpt/rank-00000-of-00001.pt")["extra"]  # doctest: +SKIP
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (0 bytes): the save did not finish")
    try:
        wrapped = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated zip, not a torch file, ...: one clear error
        raise CheckpointError(
            f"checkpoint file {path} ({size} bytes) cannot be read, it is truncated or not a "
            f"mixprec checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(wrapped, dict) or wrapped.get("format") != _FORMAT:
        raise CheckpointError(
            f"checkpoint file {path} is not a mixprec checkpoint (no format={_FORMAT!r} "
            "header); it may be an older mixprec checkpoint, or another torch file"
        )
    if wrapped.get("version") != _VERSION:
        raise CheckpointError(
            f"checkpoint file {path} has version {wrapped.get('version')!r}; this mixprec "
            f"reads version {_VERSION}"
        )
    payload = wrapped.get("payload")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
        raise CheckpointError(f"checkpoint file {path} has no payload")
    data = payload.numpy().tobytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != wrapped.get("sha256"):
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: the SHA-256 of its content is {digest}, "
            f"but {wrapped.get('sha256')!r} was written when it was saved"
        )
    state = torch.load(io.BytesIO(data), weights_only=True)  # to the devices they left
    missing = [key for key in _KEYS if key not in state] if isinstance(state, dict) else _KEYS
    if missing:
        raise CheckpointError(f"checkpoint file {path} lacks {list(missing)}")
    return state


def _check_model(path: Path, model: nn.Module, saved: dict) -> None:
    mine = model.state_dict()
    missing = [k for k in mine if k not in saved]
    unexpected = [k for k in saved if k not in mine]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint file {path} holds another model: missing keys {missing[:4]}, "
            f"unexpected keys {unexpected[:4]}"
        )
    for key, value in mine.items():
        other = saved[key]
        if isinstance(value, torch.Tensor) and (
            not isinstance(other, torch.Tensor) or other.shape != value.shape
        ):
            raise CheckpointError(
                f"checkpoint file {path} holds another model: {key!r} has shape "
                f"{tuple(getattr(other, 'shape', ()))} there and {tuple(value.shape)} here"
            )


def _check_optimizer(path: Path, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    mine = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g.get("params", ())) for g in groups] if isinstance(groups, list) else None
    if theirs != mine:
        raise CheckpointError(
            f"checkpoint file {path} holds another optimizer: param groups of sizes {theirs} "
            f"there, {mine} here"
        )


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    precision=None,
) -> dict[str, Any]:
    """Restore this rank's part of a checkpoint in place; returns its ``extra`` dict.

    Call after ``Precision.setup`` with the same recipe. Everything is checked before
    anything is changed. The same number of ranks resumes bit-exactly. Another number of
    ranks loads the same state, with a warning that the RNG state is not restored
    (bit-exact continuation needs the same ranks): a replicated checkpoint (DDP, one
    process) from rank 0's file, into a model with or without DDP; an FSDP2 checkpoint from
    every rank's file, shards rebuilt for this run's sharding.

    Raises:
        FileNotFoundError: no file for this rank and no usable checkpoint of another number
            of ranks (a rank's file missing, no rank-0 file; names the paths).
        CheckpointError: (a ``ValueError``) the file is empty, truncated, corrupt (digest
            mismatch), lacks a key, says it was written by a different number of ranks, holds
            another model, optimizer or Precision state; names the file.
        ValueError: resharding met a tensor sharded other than FSDP2's 1-D ``Shard(0)``.

    Warns:
        UserWarning: a checkpoint loaded on a different number of ranks.

    Example:
        >>> load_checkpoint("ckpt", model=model, optimizer=opt, precision=p)  # doctest: +SKIP
    """
    path = checkpoint_path(directory)
    module = _unwrapped(model)
    resharded = not path.exists()
    if resharded:
        source, state = _state_for_this_world(directory, path, module, optimizer)
    else:
        state = read_checkpoint_file(path)
        if state["world_size"] != world_size():
            raise CheckpointError(
                f"checkpoint {directory} was written by {state['world_size']} ranks, this run "
                f"has {world_size()}; resume on {state['world_size']} ranks"
            )
    _check_model(path, module, state["model"])
    _check_optimizer(path, optimizer, state["optimizer"])
    if (precision is None) != (state["precision"] is None):
        raise CheckpointError(
            f"checkpoint file {path} was saved "
            + ("without a Precision; pass precision=None" if precision is not None else
               f"with Precision state (recipe {state['precision'].get('recipe')!r}); pass "
               "the Precision to load_checkpoint(..., precision=precision)")
        )  # fmt: skip
    if precision is not None:
        try:
            precision.check_state_dict(state["precision"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint file {path}: {exc}") from exc
    rng = state["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        raise CheckpointError(f"checkpoint file {path} has no torch RNG state")
    # everything checked: now change things (the Precision first: its scaler checks its own)
    if precision is not None:
        precision.load_state_dict(state["precision"])
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
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
    state = read_checkpoint_file(first[0]) if len(first) == 1 else None
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
        states = [state] + [read_checkpoint_file(p) for p in paths[1:]]
        return f"all {world} files", reshard_state(states, module, optimizer)
    raise FileNotFoundError(
        f"no checkpoint file {missing} for rank {_rank()} of {world_size()}"
        + (f"; the directory holds {[p.name for p in files[:4]]}" if files else "")
        + " (a checkpoint whose rank-0 file does not say its strategy resumes on the number "
        "of ranks that wrote it)"
    )
