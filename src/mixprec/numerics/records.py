"""What one measurement is: the record kept on the device, tensor identity, first non-finite.

:class:`FirstNonFinite` says where an inf/NaN first appeared (step, phase, module, tensor);
:func:`describe` puts a ``(path, kind)`` into words for its messages.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["KINDS", "PHASE", "FirstNonFinite", "NonFiniteError", "describe"]

KINDS = ("output", "grad_output", "grad_input", "param_grad", "weight", "update")
PHASE = {  # the phase in which each kind of tensor is measured
    "output": "forward",
    "grad_output": "backward",
    "grad_input": "backward",
    "param_grad": "backward",
    "weight": "update",
    "update": "update",
}


def describe(path: str, kind: str) -> str:
    """Words for a tensor: ``describe("fc2", "grad_output") == "the gradient of fc2's output"``."""
    name = path or "the model"
    return {
        "output": f"the output of {name}",
        "grad_output": f"the gradient of {name}'s output",
        "grad_input": f"the gradient of {name}'s input",
        "param_grad": f"the gradient of parameter {name}",
        "weight": f"parameter {name}",
        "update": f"the update of parameter {name}",
    }[kind]


class NonFiniteError(FloatingPointError):
    """Raised at the first inf or NaN when the monitor runs with ``raise_on_nonfinite``."""


@dataclass(frozen=True, slots=True)
class FirstNonFinite:
    """Where an inf or NaN first appeared in one step, in execution order.

    Attributes:
        step: the monitor's step number.
        phase: ``"forward"``, ``"backward"`` or ``"update"`` (after the optimizer step).
        path: module path (``""`` for the model itself) or parameter name.
        kind: one of :data:`KINDS`.
        what: ``"inf"``, ``"nan"`` or ``"inf and nan"``.
        fraction: fraction of that tensor's values that are not finite.
        also: other ``(path, kind)`` the same tensor belongs to.
    """

    step: int
    phase: str
    path: str
    kind: str
    what: str
    fraction: float
    also: tuple[tuple[str, str], ...] = ()

    def message(self) -> str:
        """One sentence: ``"step 3, backward: first inf in the gradient of fc2's output"``."""
        text = (
            f"step {self.step}, {self.phase}: first {self.what} in {describe(self.path, self.kind)}"
        )
        if self.also:
            text += " (also " + ", ".join(describe(p, k) for p, k in self.also) + ")"
        return text

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "phase": self.phase,
            "path": self.path,
            "kind": self.kind,
            "what": self.what,
            "fraction": self.fraction,
            "also": [list(x) for x in self.also],
            "message": self.message(),
        }


class _Record:
    """One measured tensor: its vector on the device and the keys it is filed under."""

    __slots__ = ("seq", "step", "dtype", "keys", "vec")

    def __init__(self, seq: int, step: int, dtype: torch.dtype, keys, vec: torch.Tensor) -> None:
        self.seq, self.step, self.dtype, self.keys, self.vec = seq, step, dtype, list(keys), vec


class _Seen:
    """A tensor met in this step, forward output or gradient (by identity and version)."""

    __slots__ = ("ref", "record", "grad_keys", "handle")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.ref = weakref.ref(tensor)
        self.record: _Record | None = None
        self.grad_keys: list | None = None
        self.handle = None


def _tensors(obj) -> Iterable[torch.Tensor]:
    """Floating-point tensors in a (nested) tuple / list / dict output."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)
