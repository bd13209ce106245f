"""Which recipe/strategy combinations hold (``check_recipe``).

Valid combinations (anything else is refused at setup with the reason):

============  ====================================  ========================================
recipe        DDP                                   FSDP2 (``fully_shard``)
============  ====================================  ========================================
fp32, tf32    yes                                   yes
fp16-mixed    yes                                   yes (policy param_dtype fp16 or none)
bf16-mixed    yes                                   yes (policy param_dtype bf16 or none)
fp8-mixed     yes (delayed amax histories synced)   yes: Linears converted before sharding
                                                    (shard_model), weights all-gathered in
                                                    the compute dtype or in fp8
fp16-master   yes (DDP re-wrapped after the cast)   yes: fp32 shards are the master weights,
bf16-master   yes (DDP re-wrapped after the cast)   policy param_dtype must be the recipe's
bf16-true     yes (DDP re-wrapped after the cast)   no: no compensated update on shards
============  ====================================  ========================================

Gradient communication (``grad_comm_dtype``; DDP hook or FSDP2 ``reduce_dtype``): fp32 and
bf16 always; fp16 only with loss scaling (an unscaled gradient below fp16's smallest
subnormal, 2**-24, is flushed to zero on the wire).
"""

from __future__ import annotations

import torch

from mixprec.distributed.core import Strategy
from mixprec.distributed.ddp import COMM_DTYPES
from mixprec.recipes import Recipe

__all__ = ["check_recipe"]


def check_recipe(
    strategy: Strategy, recipe: Recipe, *, grad_comm_dtype: torch.dtype | None = None
) -> None:
    """Refuse a recipe that ``strategy`` cannot honour, or a bad ``grad_comm_dtype``.

    Raises:
        ValueError: naming the combination, the reason and what to use instead.

    Example:
        >>> check_recipe("fsdp2", get_recipe("bf16-true"))  # doctest: +SKIP
        ValueError: recipe 'bf16-true' cannot run under FSDP2: ...
    """
    if grad_comm_dtype is not None:
        if strategy == "none":
            raise ValueError(
                f"grad_comm_dtype={grad_comm_dtype} applies to gradient communication, but the "
                "model is neither DistributedDataParallel nor sharded with fully_shard"
            )
        if grad_comm_dtype not in COMM_DTYPES:
            raise ValueError(
                f"grad_comm_dtype={grad_comm_dtype!r} is not one of "
                "torch.float32, torch.bfloat16, torch.float16"
            )
        if grad_comm_dtype == torch.float16 and recipe.loss_scaling == "none":
            raise ValueError(
                f"grad_comm_dtype=torch.float16 with recipe {str(recipe)!r}, which has no loss "
                "scaling: gradients below 2**-24 would be flushed to zero on the wire; use "
                "torch.bfloat16, or a recipe with loss scaling (fp16-mixed, fp16-master)"
            )
    if strategy != "fsdp2":
        return
    prefix = f"recipe {str(recipe)!r} cannot run under FSDP2: "
    if recipe.update != "plain":
        raise ValueError(
            prefix + f"update={recipe.update!r} compensates low-precision parameters in place, "
            "but FSDP2 keeps its own storage shards; use bf16-master, whose fp32 shards are the "
            "master weights at 4 bytes/param divided by the number of ranks"
        )
    if recipe.master_dtype is None and recipe.param_dtype != torch.float32:
        raise ValueError(prefix + "16-bit parameters with no master copy; use a master recipe")
    if recipe.master_dtype not in (None, torch.float32):
        raise ValueError(prefix + "FSDP2's master weights are its fp32 storage shards")
