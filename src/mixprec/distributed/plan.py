"""The two hooks ``Precision.setup`` calls for a distributed model: ``begin_setup`` checks
the recipe against the strategy (:mod:`mixprec.distributed.compat`) and the model, and
``finish_setup`` re-wraps DDP and registers the gradient communication hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mixprec.distributed.compat import check_recipe
from mixprec.distributed.core import (
    Strategy,
    global_grad_norm,
    is_sharded,
    local_tensor,
    reduce_found_inf,
    require_process_group,
    strategy_of,
)
from mixprec.distributed.ddp import register_grad_comm_hook, rewrap_ddp
from mixprec.distributed.fp8_all_gather import precompute_float8_scales
from mixprec.distributed.fp8_sync import sync_float8_amax_history
from mixprec.distributed.fsdp import NORM_TYPES, fsdp_policies
from mixprec.formats import get_format
from mixprec.recipes import Recipe

__all__ = ["DistributedSetup", "begin_setup", "finish_setup", "local_recipe"]



def _allowed_param_dtypes(recipe: Recipe) -> tuple:
    if recipe.master_dtype is not None:
        return (recipe.param_dtype,)
    if recipe.uses_autocast:
        return (None, torch.float32, recipe.compute_dtype)
    return (None, torch.float32)


def check_fsdp_model(model: nn.Module, recipe: Recipe, grad_comm_dtype=None) -> None:
    """Refuse an FSDP2 model whose sharding contradicts ``recipe`` (storage, policies).

    Raises:
        ValueError: naming the parameter or module and the fix.
    """
    from mixprec.float8.linear import Float8Linear

    check_recipe("fsdp2", recipe, grad_comm_dtype=grad_comm_dtype)
    fix = "shard the fp32 model with mixprec.distributed.shard_model(model, recipe)"
    if recipe.fp8 != "off" and not any(isinstance(m, Float8Linear) for m in model.modules()):
        raise ValueError(
            f"recipe {str(recipe)!r} runs fp8 Linear layers, but this FSDP2 model has no "
            "Float8Linear: under FSDP2 the layers must be converted before fully_shard (FSDP2 "
            f"holds on to the modules it sharded); {fix}"
        )
    for name, param in model.named_parameters():
        if not is_sharded(param):
            raise ValueError(
                f"parameter {name!r} is not sharded, so no rank would synchronise it: "
                f"apply fully_shard to the root module too, or {fix}"
            )
        if param.dtype != torch.float32:
            raise ValueError(
                f"under FSDP2 the sharded parameters are the fp32 master weights, but {name!r} "
                f"is stored in {param.dtype} (cast before fully_shard): {fix}"
            )
    allowed = _allowed_param_dtypes(recipe)
    for name, module, policy in fsdp_policies(model):
        if policy is None or isinstance(module, NORM_TYPES):
            continue
        if policy.param_dtype not in allowed:
            raise ValueError(
                f"module {name or '<root>'!r} has MixedPrecisionPolicy(param_dtype="
                f"{policy.param_dtype}) but recipe {str(recipe)!r} computes with parameters in "
                f"{' or '.join('none' if d is None else get_format(d).name for d in allowed)}: use "
                "mixprec.distributed.fsdp_policy(recipe)"
            )
        wire = policy.reduce_dtype or policy.param_dtype or torch.float32
        if grad_comm_dtype is not None and wire != grad_comm_dtype:
            raise ValueError(
                f"grad_comm_dtype={grad_comm_dtype} but module {name or '<root>'!r} reduces "
                f"gradients in {wire}: FSDP2 fixes reduce_dtype when fully_shard is applied, so "
                "pass grad_comm_dtype to mixprec.distributed.shard_model instead"
            )
        if wire == torch.float16 and recipe.loss_scaling == "none":
            raise ValueError(
                f"module {name or '<root>'!r} reduces gradients in fp16 but recipe "
                f"{str(recipe)!r} has no loss scaling: small gradients would flush to zero; "
                "set reduce_dtype=torch.float32 or torch.bfloat16"
            )


def local_recipe(strategy: Strategy, recipe: Recipe) -> Recipe:
    """The recipe ``Precision`` applies to the tensors this rank holds.

    Under FSDP2 a master-weight recipe's casting is FSDP's job (the all-gather makes the
    16-bit working copy of the fp32 shards, which are the masters), so the local recipe
    keeps fp32 parameters, no separate master and no autocast; loss scaling stays.
    Under DDP the gradients are reduced in the parameters' dtype (DDP's buckets hold it)
    after they are accumulated, so a master recipe's fp32 gradients are made from the
    reduced 16-bit ones at the step (``grad_dtype = param_dtype`` locally) instead of being
    accumulated into fp32 before the all-reduce. Under FSDP2 an fp8 recipe's Linear layers
    were converted before sharding (FSDP2 holds the modules it sharded), so the local recipe
    has ``fp8="off"``: nothing is converted again. Otherwise the recipe itself.

    Example:
        >>> local_recipe("fsdp2", get_recipe("bf16-master")).param_dtype  # doctest: +SKIP
        torch.float32
    """
    if strategy == "fsdp2" and recipe.fp8 != "off":  # converted before sharding
        recipe = recipe.replace(fp8="off")
    if strategy == "none" or recipe.master_dtype is None:
        return recipe
    if strategy == "ddp":
        return recipe.replace(grad_dtype=recipe.param_dtype)
    return recipe.replace(
        param_dtype=torch.float32, compute_dtype=None, master_dtype=None, grad_dtype=torch.float32
    )


@dataclass(frozen=True, slots=True)
class DistributedSetup:
    """What ``Precision.setup`` learned about a model's data-parallel wrapping.

    Attributes:
        strategy: ``"none"``, ``"ddp"`` or ``"fsdp2"``.
        module: the module ``Precision`` casts and converts (DDP: the wrapped module).
        recipe: the recipe to apply to this rank's tensors (:func:`local_recipe`).
        grad_comm_dtype: requested gradient communication dtype (``None``: the gradients').
        params_before: ``(id, dtype)`` of the module's parameters before setup (DDP).
    """

    strategy: Strategy
    module: nn.Module
    recipe: Recipe
    grad_comm_dtype: torch.dtype | None = None
    params_before: tuple = ()

    @property
    def is_distributed(self) -> bool:
        """True for DDP and FSDP2 (the inf verdict is then reduced across ranks)."""
        return self.strategy != "none"

    def local(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients as this rank holds them: FSDP2's DTensor shards as local tensors."""
        return [local_tensor(g) for g in grads] if self.strategy == "fsdp2" else grads

    def reduce_found_inf(self, found_inf: torch.Tensor) -> torch.Tensor:
        """``all_reduce(found_inf, MAX)`` for a distributed model with more than one rank."""
        return reduce_found_inf(found_inf) if self.is_distributed else found_inf

    def before_step(self) -> None:
        """Once an iteration, before the first optimizer steps: agree on the fp8 state.

        Delayed-scaling amax histories are reduced over ranks (MAX) and the scales
        recomputed (:func:`~mixprec.distributed.fp8_sync.sync_float8_amax_history`), so every
        rank casts with the same scales. One collective; none without delayed fp8 layers.
        """
        if self.is_distributed:
            sync_float8_amax_history(self.module)

    def after_step(self) -> None:
        """Once an iteration, after every optimizer stepped: FSDP2 fp8 all-gather scales.

        Computes the scale of every weight that is all-gathered in fp8 with one all-reduce
        (:func:`~mixprec.distributed.fp8_all_gather.precompute_float8_scales`); nothing
        otherwise.
        """
        if self.strategy == "fsdp2":
            precompute_float8_scales(self.module)

    def clip_(self, grads: list[torch.Tensor], max_norm: float, clip_fn) -> torch.Tensor:
        """Clip to a total 2-norm of ``max_norm``; returns the norm before clipping.

        FSDP2: the norm is taken over all ranks' shards (:func:`global_grad_norm`) and every
        shard is scaled by ``min(1, max_norm / (total + 1e-6))``; otherwise ``clip_fn``.
        """
        if self.strategy != "fsdp2":
            return clip_fn(grads, max_norm)
        total = global_grad_norm(grads)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grad in self.local(grads):
            grad.mul_(coef.to(grad.device, grad.dtype))
        return total


def begin_setup(
    model: nn.Module, recipe: Recipe, *, grad_comm_dtype: torch.dtype | None = None
) -> DistributedSetup:
    """First hook of ``Precision.setup``: detect the strategy and check it can honour ``recipe``.

    Raises:
        RuntimeError: a DDP/FSDP2 model but no initialised process group.
        ValueError: a combination the strategy cannot honour (see the module docstring).
    """
    strategy = strategy_of(model)
    check_recipe(strategy, recipe, grad_comm_dtype=grad_comm_dtype)
    if strategy == "none":
        return DistributedSetup("none", model, recipe)
    require_process_group(
        "a DistributedDataParallel model" if strategy == "ddp" else "an FSDP2-sharded model"
    )
    if strategy == "fsdp2":
        check_fsdp_model(model, recipe, grad_comm_dtype)
        return DistributedSetup("fsdp2", model, local_recipe("fsdp2", recipe), grad_comm_dtype)
    if getattr(model, "mixed_precision", None) is not None:
        raise ValueError(
            "DistributedDataParallel(mixed_precision=...) casts parameters itself and conflicts "
            f"with recipe {str(recipe)!r}; wrap without it and let the recipe choose dtypes"
        )
    if grad_comm_dtype is not None and model._comm_hooks:
        raise ValueError(
            f"grad_comm_dtype={grad_comm_dtype} but this DistributedDataParallel already has a "
            "communication hook and DDP allows one; pass grad_comm_dtype=None to keep it"
        )
    before = tuple((id(p), p.dtype) for p in model.module.parameters())
    return DistributedSetup(
        "ddp", model.module, local_recipe("ddp", recipe), grad_comm_dtype, before
    )


def finish_setup(setup: DistributedSetup, module: nn.Module, model: nn.Module) -> nn.Module:
    """Last hook of ``Precision.setup``: the model to hand back to the training loop.

    DDP: re-wraps ``module`` when its parameters changed dtype or identity (DDP fixed its
    buckets when it wrapped them), then registers the ``grad_comm_dtype`` hook. Otherwise
    returns ``model`` (FSDP2 and plain models are modified in place).

    Args:
        setup: what :func:`begin_setup` returned.
        module: the module after ``Precision`` cast and converted it.
        model: the model ``Precision.setup`` was given.
    """
    if setup.strategy != "ddp":
        return module if setup.strategy == "none" else model
    after = tuple((id(p), p.dtype) for p in module.parameters())
    if after != setup.params_before or module is not model.module:
        model = rewrap_ddp(model, module)
    if setup.grad_comm_dtype is not None:
        register_grad_comm_hook(model, setup.grad_comm_dtype)
    return model
