"""FSDP2 (``fully_shard``): a recipe as a ``MixedPrecisionPolicy``, and sharding a model.

FSDP2 keeps each rank's shard of every parameter in its storage dtype and all-gathers a
working copy in ``param_dtype`` for forward and backward; gradients are reduce-scattered in
``reduce_dtype`` and land on the shard in the storage dtype. With fp32 storage and a 16-bit
``param_dtype`` the shards *are* fp32 master weights, so recipes map as:

===========  =======  ===========  ===========  ====================================
recipe       storage  param_dtype  reduce       what mixprec does on top
===========  =======  ===========  ===========  ====================================
fp32, tf32   fp32     --           fp32         nothing
fp16-mixed   fp32     fp16         fp32         autocast fp16, dynamic loss scaling
bf16-mixed   fp32     bf16         fp32         autocast bf16
fp8-mixed    fp32     bf16 or fp8  fp32         Linears -> Float8Linear before sharding;
                                                autocast bf16 (fp8: fp8_all_gather=True)
fp16-master  fp32     fp16         fp16         dynamic loss scaling (shards = master)
bf16-master  fp32     bf16         fp32         nothing (shards = master)
bf16-true    refused: FSDP2 has no compensated (Kahan / stochastic) update; use bf16-master
===========  =======  ===========  ===========  ====================================

``reduce_dtype`` follows the recipe's ``grad_dtype`` unless ``grad_comm_dtype`` overrides it.
With ``keep_norms_fp32`` normalisation layers are sharded on their own with an fp32
``param_dtype`` (their inputs are cast up, their outputs back to the compute dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from mixprec.distributed.compat import check_recipe
from mixprec.distributed.core import require_process_group
from mixprec.distributed.fp8_all_gather import enable_float8_all_gather
from mixprec.recipes import Recipe, get_recipe

__all__ = ["NORM_TYPES", "fsdp_policy", "fsdp_policies", "shard_model"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._NormBase,
    nn.LocalResponseNorm,
)


def _is_16bit(dtype: torch.dtype | None) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def fsdp_policy(recipe: str | Recipe, *, grad_comm_dtype: torch.dtype | None = None):
    """The ``MixedPrecisionPolicy`` that carries out ``recipe`` under FSDP2 (table above).

    ``param_dtype`` is the recipe's 16-bit parameter dtype for master-weight recipes, the
    compute dtype for autocast recipes, ``None`` (storage dtype) otherwise.

    Raises:
        ValueError: for a recipe FSDP2 cannot honour, with the reason.

    Example:
        >>> fsdp_policy("bf16-master")  # doctest: +NORMALIZE_WHITESPACE
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                             output_dtype=None, cast_forward_inputs=True)
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy


    recipe = get_recipe(recipe)
    check_recipe("fsdp2", recipe, grad_comm_dtype=grad_comm_dtype)
    if recipe.master_dtype is not None:
        param_dtype = recipe.param_dtype
    elif recipe.uses_autocast:
        param_dtype = recipe.compute_dtype
    else:
        param_dtype = None
    reduce_dtype = grad_comm_dtype if grad_comm_dtype is not None else recipe.grad_dtype
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def _norm_policy(policy):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=torch.float32,
        reduce_dtype=policy.reduce_dtype,
        output_dtype=policy.param_dtype,
    )


def fsdp_policies(model: nn.Module) -> list[tuple[str, nn.Module, object]]:
    """``(name, module, MixedPrecisionPolicy)`` for every module ``fully_shard`` was applied to.

    Example:
        >>> fsdp_policies(nn.Linear(2, 2))
        []
    """
    from torch.distributed.fsdp import FSDPModule

    found = []
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            group = getattr(state, "_fsdp_param_group", None)
            policy = getattr(group, "mp_policy", None) or getattr(state, "_mp_policy", None)
            found.append((name, module, policy))
    return found


def _convert_before_sharding(model: nn.Module, recipe: Recipe) -> None:
    from mixprec.float8 import Float8Config, Float8Linear, convert_to_float8

    if any(isinstance(m, Float8Linear) for m in model.modules()):
        return  # converted by the caller, with its own config and filter
    convert_to_float8(model, config=Float8Config(scaling=recipe.fp8))


def _default_blocks(model: nn.Module) -> list[nn.Module]:
    """Every element of every ``nn.ModuleList`` (transformer blocks, ResNet stages)."""
    return [m for module in model.modules() if isinstance(module, nn.ModuleList) for m in module]


def shard_model(
    model: nn.Module,
    recipe: str | Recipe,
    *,
    mesh=None,
    grad_comm_dtype: torch.dtype | None = None,
    blocks: Iterable[nn.Module] | Callable[[nn.Module], Iterable[nn.Module]] | None = None,
    reshard_after_forward: bool = True,
    fp8_all_gather: bool = False,
) -> nn.Module:
    """Shard an fp32 ``model`` with FSDP2 so that it carries out ``recipe``; in place.

    ``fully_shard`` is applied bottom-up: normalisation layers (fp32 policy, when the recipe
    keeps norms in fp32 and the policy's ``param_dtype`` is 16-bit), then each block, then
    the root, all with :func:`fsdp_policy`. Pass the result to ``Precision.setup``.

    For an fp8 recipe the eligible ``nn.Linear`` layers are first converted to
    ``Float8Linear`` (``convert_to_float8`` with the recipe's scaling; layers converted
    before are kept as they are): FSDP2 holds on to the modules it shards, so converting
    after sharding would leave their weights unsharded.

    Args:
        model: fp32 module on its device (the fp32 shards become the master weights).
        recipe: recipe name or :class:`~mixprec.Recipe`.
        mesh: ``DeviceMesh`` to shard over (default: all ranks).
        grad_comm_dtype: dtype of the gradient reduce-scatter (default: recipe's grads).
        blocks: modules to shard one by one, or a function of the model returning them
            (default: every element of every ``nn.ModuleList``).
        reshard_after_forward: free the gathered parameters after forward (ZeRO-3) or not.
        fp8_all_gather: all-gather each ``Float8Linear`` weight in fp8 (1 byte an element
            instead of the compute dtype's 2), scaled from the global amax
            (:mod:`mixprec.distributed.fp8_all_gather`). fp8 recipes with current scaling.

    Raises:
        RuntimeError: no process group initialised.
        ValueError: a recipe FSDP2 cannot honour, parameters not in fp32, or
            ``fp8_all_gather`` with a recipe or layer it does not apply to.

    Example:
        >>> model = shard_model(task.build_model(), "bf16-master")  # doctest: +SKIP
    """
    from torch.distributed.fsdp import fully_shard

    require_process_group("shard_model")
    recipe = get_recipe(recipe)
    policy = fsdp_policy(recipe, grad_comm_dtype=grad_comm_dtype)
    wrong = [(n, p.dtype) for n, p in model.named_parameters() if p.dtype != torch.float32]
    if wrong:
        raise ValueError(
            f"shard_model expects fp32 parameters (under FSDP2 the fp32 shards are the master "
            f"weights and {policy} makes the working copy), but {wrong[0][0]} is "
            f"{wrong[0][1]}: shard the model before casting it"
        )
    if fp8_all_gather and recipe.fp8 == "off":
        raise ValueError(
            f"fp8_all_gather=True but recipe {str(recipe)!r} has no fp8 layers; use an fp8 "
            "recipe such as 'fp8-mixed'"
        )
    if recipe.fp8 != "off":
        _convert_before_sharding(model, recipe)
        if fp8_all_gather:
            enable_float8_all_gather(model)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if recipe.keep_norms_fp32 and _is_16bit(policy.param_dtype):
        for module in model.modules():
            if isinstance(module, NORM_TYPES) and any(True for _ in module.parameters()):
                fully_shard(module, mp_policy=_norm_policy(policy), **kwargs)
    if blocks is None:
        chosen = _default_blocks(model)
    elif callable(blocks) and not isinstance(blocks, nn.Module):
        chosen = list(blocks(model))
    else:
        chosen = list(blocks)
    for block in chosen:
        fully_shard(block, mp_policy=policy, **kwargs)
    fully_shard(model, mp_policy=policy, **kwargs)
    return model
