"""What one measurement is: the record kept on the device, and the first non-finite value.

:class:`Record` is one measured tensor (its statistics vector, still on the device, and the
``(path, kind)`` keys it is filed under); :class:`FirstNonFinite` says where an inf/NaN
first appeared (step, phase, module, tensor); :func:`describe` puts a ``(path, kind)`` into
words for its messages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KINDS", "PHASE", "FirstNonFinite", "NonFiniteError", "Record", "describe"]

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


@dataclass(slots=True)
class Record:
    """One measured tensor: its statistics vector on the device and the keys it is filed under.

    ``keys`` grows when the same tensor is met again under another ``(path, kind)`` (a
    module's output is also its container's output).
    """

    step: int
    dtype: torch.dtype
    keys: list[tuple[str, str]]
    vec: torch.Tensor  # StatsLayout.compute(tensor): int64, on the tensor's device
