"""Model checks and conversions ``Precision.setup`` makes before it casts anything."""

from __future__ import annotations

import torch
from torch import nn

from mixprec.recipes import Recipe

__all__ = ["check_model_dtype", "convert_fp8"]


def check_model_dtype(recipe: Recipe, model: nn.Module) -> None:
    """Refuse a 16-bit model under a recipe that keeps fp32 parameters (``ValueError``)."""
    if recipe.param_dtype != torch.float32:
        return
    low = {p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)}
    if low:
        dtype = sorted(low, key=str)[0]
        master = "fp16-master" if dtype == torch.float16 else "bf16-master' or 'bf16-true"
        raise ValueError(
            f"recipe {recipe.name!r} keeps fp32 parameters and autocasts the compute, "
            f"but this model's parameters are already {dtype}: the optimizer would step "
            f"16-bit weights and lose small updates. Use the master-weight recipe "
            f"'{master}' (fp32 master copies of 16-bit parameters), or call model.float() "
            f"before setup."
        )


def convert_fp8(recipe: Recipe, model: nn.Module) -> None:
    """Swap eligible ``nn.Linear`` layers for ``Float8Linear`` with the recipe's scaling.

    A model that already holds ``Float8Linear`` layers was converted by the caller, with
    its own :class:`~mixprec.float8.Float8Config` and filter: it is kept as it is (as
    FSDP2's setup does), so ``convert_to_float8(model, config=...)`` before ``setup`` is
    how a recipe runs with a chosen fp8 configuration.
    """
    from mixprec.float8 import Float8Config, Float8Linear, convert_to_float8

    if any(isinstance(m, Float8Linear) for m in model.modules()):
        return
    convert_to_float8(model, config=Float8Config(scaling=recipe.fp8))
