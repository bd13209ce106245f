"""How the planner calls a user's model: inputs and outputs as real training code has them.

The same protocol as ``mixprec bench --model``: ``inputs`` is a tensor (``model(x)``), a
tuple or list (``model(*inputs)``) or a dict (``model(**inputs)``); the model may return a
tensor, a tuple (nanoGPT's ``(logits, loss)``), a dict or a Hugging Face ``ModelOutput``
(a dict too). The loss of one micro-batch is, in this order:

1. ``loss_fn(outputs, targets)`` when a loss function is given;
2. the output's own scalar loss (``outputs["loss"]`` / ``outputs.loss``, or a 0-dim tensor
   in a tuple) when the model computed one;
3. :func:`default_loss` of the output's logits (``"logits"``, or its first tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["batch_items", "call_model", "default_loss", "loss_of", "main_output"]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _scalar(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.numel() == 1 and x.is_floating_point()


def main_output(outputs: Any) -> torch.Tensor:
    """The logits of a model's outputs: the tensor, ``outputs["logits"]``, or the first
    non-scalar tensor of a tuple / dict.

    Raises:
        TypeError: no tensor in ``outputs``.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    values = outputs.values() if isinstance(outputs, dict) else outputs
    if isinstance(values, (tuple, list)) or isinstance(outputs, dict):
        for value in values:
            if isinstance(value, torch.Tensor) and not _scalar(value):
                return value
    raise TypeError(
        f"cannot find the logits in the model's output of type {type(outputs).__name__}: "
        "return a tensor, a tuple, a dict or a ModelOutput, or pass loss_fn=(outputs, targets)"
    )


def default_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer targets (logits on the last dim), else mean squared error;
    ``outputs`` may be a tensor, tuple, dict or ModelOutput (its logits are used)."""
    logits = main_output(outputs)
    if not targets.is_floating_point():
        return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())
    return F.mse_loss(logits.float(), targets.float())


def loss_of(
    outputs: Any, targets: Any, loss_fn: Callable[[Any, Any], torch.Tensor] | None
) -> torch.Tensor:
    """The scalar loss of one micro-batch (see the module docstring for the order).

    Raises:
        TypeError: ``loss_fn`` did not return a scalar tensor.
    """
    if loss_fn is not None:
        loss = loss_fn(outputs, targets)
        if not _scalar(loss):
            raise TypeError(
                f"loss_fn must return a scalar floating-point tensor, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            )
        return loss
    own = None
    if isinstance(outputs, dict):
        own = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)):
        own = next((v for v in outputs if _scalar(v) and v.dim() == 0), None)
    else:
        own = getattr(outputs, "loss", None) if not isinstance(outputs, torch.Tensor) else None
    if _scalar(own):
        return own
    if targets is None:
        raise TypeError(
            "the model returned no loss and the batch has no targets: pass (inputs, targets) "
            "or a loss_fn"
        )
    return default_loss(outputs, targets)


def batch_items(inputs: Any) -> int:
    """Leading size of the first tensor in ``inputs`` (the micro-batch), 1 for a 0-dim one."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, dict) else inputs
    if isinstance(values, (tuple, list)) or isinstance(inputs, dict):
        for value in values:
            if isinstance(value, torch.Tensor) and value.dim():
                return int(value.shape[0])
    return 1
