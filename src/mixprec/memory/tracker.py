"""Live tensor memory on any device, counted by storage: the CPU stand-in for CUDA's stats.

:class:`StorageTracker` is a ``TorchDispatchMode`` that sees every ATen op (forward,
backward and optimizer step alike), registers each output's untyped storage once, and
drops it through a ``weakref.finalize`` when the storage is freed. Its ``live`` is the sum
of ``storage.nbytes()`` over tracked storages that are still alive; ``peak`` the largest
``live`` seen. Views share their base's storage, so nothing is counted twice.

The storages alive before tracking starts (a model's parameters, the batch) are passed to
:meth:`StorageTracker.track` so they count too.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

__all__ = ["StorageTracker", "storages_of", "tensor_nbytes"]


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that own memory behind ``t`` (inner tensors of wrapper subclasses)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [x for name in names for x in _plain_tensors(getattr(t, name))]
    return [t]


def storages_of(obj) -> list[torch.UntypedStorage]:
    """The untyped storages of every tensor in a nested structure (deduplicated).

    Example:
        >>> x = torch.zeros(4); len(storages_of([x, x[1:], {"a": x}]))
        1
    """
    seen: dict[int, torch.UntypedStorage] = {}
    leaves, _ = tree_flatten(obj)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            for t in _plain_tensors(leaf):
                if t.device.type == "meta":
                    continue
                st = t.untyped_storage()
                seen.setdefault(id(st), st)
    return list(seen.values())


def tensor_nbytes(obj) -> int:
    """Bytes of the distinct storages behind the tensors in ``obj``.

    Example:
        >>> tensor_nbytes([torch.zeros(4), torch.zeros(2, dtype=torch.bfloat16)])
        20
    """
    return sum(st.nbytes() for st in storages_of(obj))


class StorageTracker(TorchDispatchMode):
    """Count the bytes of live tensor storage while active.

    Example:
        >>> with StorageTracker() as tracker:
        ...     y = torch.ones(1000) * 2
        >>> tracker.peak >= 8000
        True
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self.peak_callbacks: list = []

    def track(self, obj: Iterable | torch.Tensor) -> None:
        """Count the storages behind the tensors in ``obj`` (e.g. alive before tracking)."""
        for st in storages_of(obj):
            self._add(st)

    def reset_peak(self) -> None:
        """Start a new peak from the current live bytes."""
        self.peak = self.live

    def _add(self, st: torch.UntypedStorage) -> None:
        key = id(st)
        if key in self._sizes:
            return
        size = st.nbytes()
        self._sizes[key] = size
        weakref.finalize(st, self._free, key)
        self.live += size
        if self.live > self.peak:
            self.peak = self.live
            for callback in self.peak_callbacks:
                callback(self)

    def _free(self, key: int) -> None:
        size = self._sizes.pop(key, 0)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                for t in _plain_tensors(leaf):
                    if t.device.type != "meta":
                        self._add(t.untyped_storage())
        return out
