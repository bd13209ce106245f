"""Cast a model to 16-bit parameters, keeping normalisation layers in fp32."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

from mixprec.formats import quantize

__all__ = ["cast_module_", "is_norm_module", "stochastic_round_to_bf16"]

_NORM_TYPES: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_norm_module(module: nn.Module) -> bool:
    """True for normalisation layers (kept in fp32 by recipes with ``keep_norms_fp32``).

    LayerNorm, GroupNorm, BatchNorm*, InstanceNorm*, RMSNorm, and any module whose class
    name ends with ``"Norm"`` (e.g. a hand-written ``LlamaRMSNorm``).

    Example:
        >>> is_norm_module(nn.LayerNorm(4)), is_norm_module(nn.Linear(4, 4))
        (True, False)
    """
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def _cast_floats(value, dtype: torch.dtype):
    def cast(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            return x.to(dtype)
        return x

    return tree_map(cast, value)


def cast_module_(
    model: nn.Module, dtype: torch.dtype, *, keep_norms_fp32: bool = True
) -> list[torch.utils.hooks.RemovableHandle]:
    """Cast a model's floating parameters and buffers to ``dtype`` in place.

    Normalisation layers (see :func:`is_norm_module`) stay fp32 when ``keep_norms_fp32``;
    hooks then cast their inputs to fp32 and their outputs back to ``dtype``. A hook on
    the model casts floating inputs to ``dtype`` and floating outputs to fp32, so the
    training loop feeds and receives the same tensors as with an fp32 model.

    Returns:
        The hook handles (``handle.remove()`` undoes the input/output casts).

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> _ = cast_module_(m, torch.bfloat16)
        >>> m[0].weight.dtype, m[1].weight.dtype, m(torch.ones(2, 4)).dtype
        (torch.bfloat16, torch.float32, torch.float32)
    """
    handles = []
    for module in model.modules():
        keep = keep_norms_fp32 and is_norm_module(module)
        target = torch.float32 if keep else dtype
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != target:
                param.data = param.data.to(target)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != target:
                setattr(module, name, buf.to(target))
        if keep and module is not model:
            handles.append(module.register_forward_pre_hook(_to_fp32_pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(_OutputCast(dtype)))
    if not (keep_norms_fp32 and is_norm_module(model)):
        handles.append(model.register_forward_pre_hook(_InputCast(dtype), with_kwargs=True))
    handles.append(model.register_forward_hook(_OutputCast(torch.float32)))
    return handles


def _to_fp32_pre_hook(module, args, kwargs):
    return _cast_floats(args, torch.float32), _cast_floats(kwargs, torch.float32)


class _InputCast:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module, args, kwargs):
        return _cast_floats(args, self.dtype), _cast_floats(kwargs, self.dtype)


class _OutputCast:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module, args, output):
        return _cast_floats(output, self.dtype)


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None):
    """Round fp32 ``x`` to bf16 stochastically (unbiased: ``E[round(x)] == x``).

    ``quantize(x, "bf16", rounding="stochastic")``, returned as a bf16 tensor (exact: the
    values are bf16 values): the magnitude rounds up with probability
    ``low16(x) / 2**16``, the distance to the lower bf16 neighbour over the gap between
    neighbours. Non-finite values pass through.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = stochastic_round_to_bf16(torch.full((10000,), 1.001), g)
        >>> round(y.float().mean().item(), 3)
        1.001
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 expects fp32 input, got {x.dtype}")
    return quantize(x, "bf16", rounding="stochastic", generator=generator).to(torch.bfloat16)
