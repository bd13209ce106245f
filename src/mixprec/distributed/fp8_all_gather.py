"""FSDP2 all-gather of fp8 weights: half the bytes of bf16 on the wire, one all-reduce a step.

Under FSDP2 every rank keeps a shard of each high-precision weight and all-gathers the full
weight before the layer runs. A ``Float8Linear`` casts that weight to fp8 anyway, so the
cast can move before the all-gather (as ``torchao``'s ``enable_fsdp_float8_all_gather``)::

    amax   = all_reduce_MAX(max |W_shard_r|)            # the global amax: one all-reduce
    scale  = amax_to_scale(amax, e4m3)                   # the same on every rank
    W8_r   = hp_tensor_and_scale_to_float8(W_shard_r, scale)   # 1 byte an element
    W8     = all_gather(W8_r)                            # instead of all_gather(bf16 W_r)
    out    = scaled_mm(x8, W8ᵀ, 1/sx, 1/scale)           # Float8Linear skips its own cast

``W8`` is bit-identical to casting the gathered full weight with current scaling: the
scale comes from the same amax (the max of the shards' maxes) and the cast is elementwise.
Only the weight of each ``Float8Linear`` travels in fp8; biases and other parameters travel
in the policy's ``param_dtype``.

Two tensor subclasses carry it, using FSDP2's all-gather extension points
(``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` on the sharded tensor):

* :class:`Float8AllGatherWeight`: the sharded weight. Every op but the cast runs on the
  high-precision shard it wraps (the optimizer steps it as usual).
* :class:`Float8GatheredWeight`: the gathered weight, fp8 data plus its scale. It looks like
  a high-precision tensor; ``Float8Linear`` reads ``float8_data_and_scale`` and multiplies in
  fp8, any other op sees the dequantised weight ``W8 * (1/scale)``, so nothing is silently
  wrong when something other than ``Float8Linear`` reads it.

:func:`precompute_float8_scales` computes every weight's scale with one all-reduce after the
optimizer step (``Precision.step`` calls it); without it each all-gather reduces its own
amax. Any write into a shard (an optimizer step, ``load_state_dict``) clears its
precomputed scale, so a forgotten call costs an all-reduce, never a stale scale.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn

from mixprec.distributed.core import is_sharded
from mixprec.float8.linear import Float8Linear
from mixprec.float8.scaling import amax_to_scale, hp_tensor_and_scale_to_float8, tensor_to_amax

__all__ = [
    "Float8AllGatherWeight",
    "Float8GatheredWeight",
    "check_float8_all_gather",
    "enable_float8_all_gather",
    "float8_all_gather_modules",
    "precompute_float8_scales",
]

# Ops FSDP2 (and moving a module between devices) applies to the sharded weight that must
# keep it a Float8AllGatherWeight: padding, chunking, copying the shard into place.
_KEEP_SHARD_SUBCLASS = {
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_zeros.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.copy_.default,
    torch.ops.aten.view.default,
    torch.ops.aten.as_strided.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten._pin_memory.default,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.clone.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
}

# Ops that take a view of the gathered fp8 weight (FSDP2 narrows the padded all-gather
# output to the parameter's shape, nn.Parameter detaches it).
_GATHERED_VIEWS = {
    torch.ops.aten.as_strided.default,
    torch.ops.aten.view.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
}


def _wrapper(cls, tensor: torch.Tensor, dtype: torch.dtype, requires_grad: bool):
    return torch.Tensor._make_wrapper_subclass(
        cls,
        tensor.size(),
        strides=tensor.stride(),
        storage_offset=tensor.storage_offset(),
        dtype=dtype,
        layout=tensor.layout,
        device=tensor.device,
        requires_grad=requires_grad,
    )


class Float8AllGatherWeight(torch.Tensor):
    """A high-precision weight (or its FSDP2 shard) that FSDP2 all-gathers in fp8.

    Args:
        tensor: the high-precision weight (N, K).
        config: the owning ``Float8Linear``'s :class:`~mixprec.float8.Float8Config`
            (forward format, margin, power-of-two scales).

    Wrap before ``fully_shard`` (:func:`enable_float8_all_gather` does it).
    """

    _tensor: torch.Tensor
    _precomputed: torch.Tensor | None

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, config, precomputed=None):
        return _wrapper(cls, tensor, tensor.dtype, tensor.requires_grad)

    def __init__(self, tensor: torch.Tensor, config, precomputed=None) -> None:
        self._tensor = tensor
        self._config = config
        self._precomputed = precomputed  # scale from precompute_float8_scales; any write clears it

    def __repr__(self) -> str:
        return f"Float8AllGatherWeight({self._tensor!r}, format={self._config.forward_format})"

    def __tensor_flatten__(self):
        return ["_tensor"], {"config": self._config}

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Float8AllGatherWeight(inner["_tensor"], meta["config"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func._schema.is_mutable:  # a write (optimizer step, load): the scale is stale
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, cls):
                    leaf._precomputed = None
        config = None

        def unwrap(t: Float8AllGatherWeight) -> torch.Tensor:
            nonlocal config
            config = t._config
            return t._tensor

        args, kwargs = pytree.tree_map_only(cls, unwrap, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _KEEP_SHARD_SUBCLASS:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: cls(t, config), out)

    def _scale(self, mesh) -> torch.Tensor:
        """The scale of the full weight: precomputed, or from this shard's amax all-reduced."""
        pre = self._precomputed
        if pre is not None:
            return pre
        amax = tensor_to_amax(self._tensor)
        if mesh is not None and mesh.size() > 1:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
        return _scale_from_amax(amax, self._config)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """FSDP2 hook: this shard cast to fp8 (as bytes) and its scale, before the all-gather.

        The shard is padded to FSDP2's padded shard size (ceil(N / ranks) rows) when the
        rows do not split evenly.
        """
        scale = self._scale(mesh)
        data = hp_tensor_and_scale_to_float8(self._tensor, scale, self._config.forward_dtype)
        rows = math.ceil(outer_size[0] / mesh.size()) if mesh is not None else outer_size[0]
        if data.shape[0] != rows:  # uneven split: FSDP2 gathers equal padded shards
            padded = data.new_zeros((rows, *data.shape[1:]))
            padded[: data.shape[0]].copy_(data)
            data = padded
        # Sent as bytes: every backend moves uint8, not every backend knows fp8 dtypes.
        return (data.view(torch.uint8),), (scale,)

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ):
        """FSDP2 hook: wrap the gathered fp8 bytes as a :class:`Float8GatheredWeight`."""
        (data,) = all_gather_outputs
        (scale,) = metadata
        if out is not None:  # later all-gathers refill the same storage: only the scale moves
            if not isinstance(out, Float8GatheredWeight):
                raise RuntimeError(
                    f"FSDP2 handed back {type(out).__name__} where the fp8-gathered weight was "
                    "expected; was the module re-sharded without enable_float8_all_gather?"
                )
            out._scale = scale
            return None
        weight = Float8GatheredWeight(data.view(self._config.forward_dtype), scale, param_dtype)
        return weight, (data,)


class Float8GatheredWeight(torch.Tensor):
    """An all-gathered fp8 weight and its scale, seen from outside as a ``param_dtype`` tensor.

    ``Float8Linear`` takes ``float8_data_and_scale()`` and multiplies in fp8 directly. Any
    other op sees the dequantised weight ``data * (1 / scale)`` in ``param_dtype``; an op
    that would write into it raises ``RuntimeError`` (the write would be lost).
    """

    _data: torch.Tensor
    _scale: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        return _wrapper(cls, data, dtype, False)

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self._data = data
        self._scale = scale

    def __repr__(self) -> str:
        return f"Float8GatheredWeight(shape={tuple(self.shape)}, data={self._data.dtype})"

    def __tensor_flatten__(self):
        return ["_data", "_scale"], {"dtype": self.dtype}

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Float8GatheredWeight(inner["_data"], inner["_scale"], meta["dtype"])

    def float8_data_and_scale(self, float8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp8 weight (N, K) and its scale (``W ≈ data * (1 / scale)``).

        Raises:
            RuntimeError: the weight was gathered in another fp8 format.
        """
        if self._data.dtype != float8_dtype:
            raise RuntimeError(
                f"the weight was all-gathered as {self._data.dtype} but the layer casts its "
                f"weight to {float8_dtype}: enable_float8_all_gather after changing the config"
            )
        return self._data, self._scale

    def dequantize(self) -> torch.Tensor:
        """The weight in its outward dtype: ``fl32(data) * fl32(1 / scale)``."""
        return (self._data.to(torch.float32) * torch.reciprocal(self._scale)).to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GATHERED_VIEWS and isinstance(args[0], cls):
            src = args[0]
            return cls(func(src._data, *args[1:], **kwargs), src._scale, src.dtype)
        if func._schema.is_mutable and isinstance(args[0], cls):
            # a write would land in a dequantised copy and vanish: refuse it
            raise RuntimeError(
                f"{func} would modify an fp8 all-gathered weight, which is a read-only copy of "
                "the sharded weight for this forward/backward; modify the sharded parameter "
                "(outside forward) instead"
            )
        args, kwargs = pytree.tree_map_only(cls, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)


def _scale_from_amax(amax: torch.Tensor, config) -> torch.Tensor:
    return amax_to_scale(
        amax,
        config.forward_dtype,
        margin=config.margin,
        power_of_two=config.power_of_two_scale,
    )


def check_float8_all_gather(module: Float8Linear, name: str = "") -> None:
    """Refuse a layer whose weight cannot be all-gathered in fp8 (with the reason).

    fp8 all-gather casts the weight with current, per-tensor scaling from the global amax.

    Raises:
        ValueError: delayed scaling, a non-tensorwise granularity, or an fp8 output GEMM
            that is off (the weight would then be used in high precision).
    """
    cfg = module.config
    label = repr(name or type(module).__name__)
    granularity = getattr(cfg, "granularity", "tensorwise")
    if cfg.scaling != "current":
        raise ValueError(
            f"fp8 all-gather of {label}: scaling={cfg.scaling!r}, but the gathered weight is "
            "cast with current scaling from the global amax; use Float8Config(scaling="
            "'current') or shard without fp8_all_gather"
        )
    if granularity != "tensorwise":
        raise ValueError(
            f"fp8 all-gather of {label}: granularity={granularity!r}, but one scale per weight "
            "is what travels with it; use granularity='tensorwise' or fp8_all_gather=False"
        )
    if "output" not in cfg.gemms:
        raise ValueError(
            f"fp8 all-gather of {label}: gemms={cfg.gemms!r} leaves the output GEMM in high "
            "precision, which would read the fp8-rounded weight; use fp8_all_gather=False"
        )


def enable_float8_all_gather(model: nn.Module) -> list[str]:
    """Wrap each ``Float8Linear`` weight so that FSDP2 all-gathers it in fp8 (in place).

    Call after ``convert_to_float8`` and before ``fully_shard`` (``shard_model(...,
    fp8_all_gather=True)`` does both); build the optimizer afterwards.

    Returns:
        The names of the layers whose weights now travel in fp8.

    Raises:
        ValueError: the model is already sharded, has no ``Float8Linear``, or a layer's
            config cannot be gathered in fp8 (:func:`check_float8_all_gather`).

    Example:
        >>> convert_to_float8(model); enable_float8_all_gather(model)  # doctest: +SKIP
        ['0', '2']
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    if not layers:
        raise ValueError(
            "enable_float8_all_gather found no Float8Linear: convert the model first "
            "(mixprec.float8.convert_to_float8) or use shard_model(model, 'fp8-mixed', "
            "fp8_all_gather=True)"
        )
    names = []
    for name, module in layers:
        if is_sharded(module.weight):
            raise ValueError(
                f"layer {name!r} is already sharded: enable fp8 all-gather before fully_shard"
            )
        check_float8_all_gather(module, name)
        if isinstance(module.weight, Float8AllGatherWeight):
            names.append(name)
            continue
        weight = module.weight
        module.weight = nn.Parameter(
            Float8AllGatherWeight(weight.data, module.config), requires_grad=weight.requires_grad
        )
        names.append(name)
    return names


def float8_all_gather_modules(model: nn.Module) -> list[Float8Linear]:
    """The ``Float8Linear`` layers of ``model`` whose sharded weights travel in fp8."""
    return [
        m
        for m in model.modules()
        if isinstance(m, Float8Linear)
        and is_sharded(m.weight)
        and isinstance(m.weight._local_tensor, Float8AllGatherWeight)
    ]


@torch.no_grad()
def precompute_float8_scales(model: nn.Module) -> int:
    """Compute the fp8 scale of every fp8-gathered weight with one all-reduce (MAX).

    ``scale_i = amax_to_scale(max over ranks of max |W_i shard|)`` for every layer i, the
    amaxes of all layers stacked into one tensor and reduced once per process group. Call it
    after the optimizer step (``Precision.step`` does); the next all-gathers use these scales
    until a write into a shard clears its scale.

    Returns:
        The number of weights whose scale was computed (0 when none travel in fp8).

    Example:
        >>> opt.step(); precompute_float8_scales(model)  # doctest: +SKIP
        3
    """
    modules = float8_all_gather_modules(model)
    by_group: dict[Any, list[Float8AllGatherWeight]] = {}
    for module in modules:
        weight = module.weight
        mesh = weight.device_mesh  # reduce over the mesh dimensions the weight is sharded on
        groups = tuple(mesh.get_group(d) for d, p in enumerate(weight.placements) if p.is_shard())
        # the very object FSDP2 calls fsdp_pre_all_gather on (to_local() may return an alias)
        by_group.setdefault(groups, []).append(weight._local_tensor)
    for groups, shards in by_group.items():
        amaxes = torch.stack([tensor_to_amax(s._tensor) for s in shards])
        for group in groups:
            dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=group)
        for shard, amax in zip(shards, amaxes, strict=True):
            shard._precomputed = _scale_from_amax(amax, shard._config)
    return len(modules)
