"""Low-precision parameters: fp32 master weights in flat buffers, and compensated bf16 updates.

Two ways to train a model whose parameters are stored in 16 bits:

* :class:`MasterWeights` (recipes ``fp16-master``, ``bf16-master``): the optimizer steps
  fp32 *master* copies kept in one flat buffer per (device, dtype) group. Gradients are
  converted to fp32 before the step (``bf16-master`` accumulates them in fp32 as they
  arrive, through post-accumulate-grad hooks); after the step the masters are copied back
  into the 16-bit parameters with one ``copy_`` per group.
* :class:`CompensatedUpdate` (recipe ``bf16-true``): no master copy. During the optimizer
  step each bf16 parameter ``p`` is stood in for by the fp32 value ``v = p + c``; after
  the step ``v`` is rounded back to bf16. With Kahan summation ``c`` is the bf16
  compensation buffer holding what rounding lost (``c = v - bf16(v)``); with stochastic
  rounding there is no buffer and ``bf16(v)`` rounds up with probability equal to the
  distance to the lower neighbour over the gap, so the expected value is ``v``.
  Either way updates smaller than half a bf16 ulp are not lost.

Both keep the user's optimizer object (its hyperparameters and param_groups) and swap
the tensors it steps, so any ``torch.optim`` optimizer works, fused ones included.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = [
    "CompensatedUpdate",
    "MasterWeights",
    "cast_module_",
    "is_norm_module",
    "stochastic_round_to_bf16",
]

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


class _FlatGroup:
    """16-bit parameters of one (device, dtype) group made views of one flat buffer."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.numels = [p.numel() for p in params]
        self.shapes = [p.shape for p in params]
        first = params[0]
        self.low = torch.empty(sum(self.numels), dtype=first.dtype, device=first.device)
        self.low_views = self.views(self.low)
        with torch.no_grad():
            torch._foreach_copy_(self.low_views, [p.data for p in params])
        for p, view in zip(params, self.low_views):
            p.data = view

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [
            t.view(shape) for t, shape in zip(flat.split(self.numels), self.shapes, strict=True)
        ]

    def gather_grads_(self, flat: torch.Tensor, views: list[torch.Tensor]) -> None:
        """Write the params' ``.grad`` into ``flat`` (converting dtype; missing = 0)."""
        grads = [p.grad for p in self.params]
        if all(g is not None for g in grads):
            torch._foreach_copy_(views, grads)
        else:
            flat.zero_()
            pairs = [(v, g) for v, g in zip(views, grads) if g is not None]
            if pairs:
                torch._foreach_copy_([v for v, _ in pairs], [g for _, g in pairs])


def _group_low_precision(optimizer: torch.optim.Optimizer) -> dict:
    """Map (device, dtype) -> 16-bit params of the optimizer, in param_groups order."""
    groups: dict = defaultdict(list)
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.dtype in (torch.float16, torch.bfloat16):
                groups[(p.device, p.dtype)].append(p)
    return groups


def _swap_optimizer_params(optimizer: torch.optim.Optimizer, mapping: dict[int, torch.Tensor]):
    """Replace params in the optimizer's param_groups (and state keys) in place."""
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(id(p), p) for p in group["params"]]
    for old_id, new in mapping.items():
        for key in list(optimizer.state):
            if id(key) == old_id:
                optimizer.state[new] = {
                    k: v.float() if torch.is_tensor(v) and v.is_floating_point() and v.dim() else v
                    for k, v in optimizer.state.pop(key).items()
                }


class MasterWeights:
    """fp32 master copies of one optimizer's 16-bit parameters, in flat buffers.

    Built by :class:`mixprec.Precision` for master-weight recipes. The optimizer's
    param_groups are changed in place to hold the fp32 masters (views of one flat fp32
    buffer per (device, dtype) group); fp32 parameters (kept norms) stay as they are.

    Args:
        optimizer: the user's optimizer (its params already cast to 16 bits).
        accumulate_fp32: accumulate gradients straight into the fp32 master-grad buffer
            with post-accumulate-grad hooks (bf16-master); otherwise the 16-bit ``.grad``
            is converted at :meth:`gather_grads` time (fp16-master).

    Example:
        >>> model = nn.Linear(4, 2).to(torch.bfloat16)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> masters = MasterWeights(opt)
        >>> opt.param_groups[0]["params"][0].dtype
        torch.float32
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, accumulate_fp32: bool = False):
        self.optimizer = optimizer
        self.accumulate_fp32 = accumulate_fp32
        self.groups: list[_FlatGroup] = []
        self.master_flats: list[torch.Tensor] = []
        self.grad_flats: list[torch.Tensor] = []
        self._grad_views: list[list[torch.Tensor]] = []
        self.masters: list[nn.Parameter] = []
        self._hooks = []
        mapping: dict[int, torch.Tensor] = {}
        for params in _group_low_precision(optimizer).values():
            group = _FlatGroup(params)
            master_flat = group.low.float()
            grad_flat = torch.zeros_like(master_flat)
            grad_views = group.views(grad_flat)
            for p, mview, gview in zip(params, group.views(master_flat), grad_views):
                master = nn.Parameter(mview, requires_grad=p.requires_grad)
                master.grad = gview
                mapping[id(p)] = master
                self.masters.append(master)
                if accumulate_fp32:
                    self._hooks.append(p.register_post_accumulate_grad_hook(_AccumulateInto(gview)))
            self.groups.append(group)
            self.master_flats.append(master_flat)
            self.grad_flats.append(grad_flat)
            self._grad_views.append(grad_views)
        self._master_grad_views = [v for views in self._grad_views for v in views]
        _swap_optimizer_params(optimizer, mapping)
        master_ids = {id(m) for m in self.masters}
        self.direct_params = [
            p for g in optimizer.param_groups for p in g["params"] if id(p) not in master_ids
        ]

    def gather_grads(self) -> None:
        """Make the master grads hold the current fp32 gradients (fp16 → fp32 if needed)."""
        if self.masters and self.masters[0].grad is None:  # the user ran opt.zero_grad()
            for m, g in zip(self.masters, self._master_grad_views):
                m.grad = g
        if not self.accumulate_fp32:
            for group, flat, views in zip(self.groups, self.grad_flats, self._grad_views):
                group.gather_grads_(flat, views)

    def low_params_by_master(self) -> dict[int, nn.Parameter]:
        """``id(master) -> 16-bit model parameter`` it stands in for."""
        low = [p for group in self.groups for p in group.params]
        return {id(m): p for m, p in zip(self.masters, low, strict=True)}

    def copy_back(self) -> None:
        """Round the fp32 masters into the 16-bit parameters (one copy per group)."""
        with torch.no_grad():
            for group, flat in zip(self.groups, self.master_flats):
                group.low.copy_(flat)

    def zero_grad(self) -> None:
        """Zero the master-grad buffers and drop the 16-bit and fp32 params' grads."""
        for flat in self.grad_flats:
            flat.zero_()
        for group in self.groups:
            for p in group.params:
                p.grad = None
        for p in self.direct_params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"masters": [flat.clone() for flat in self.master_flats]}

    def load_state_dict(self, state: dict) -> None:
        flats = state["masters"]
        if len(flats) != len(self.master_flats):
            raise ValueError(
                f"checkpoint has {len(flats)} master-weight groups, this setup has "
                f"{len(self.master_flats)}: was it saved from the same model and optimizer?"
            )
        with torch.no_grad():
            for mine, saved in zip(self.master_flats, flats, strict=True):
                if mine.shape != saved.shape:
                    raise ValueError(
                        f"master-weight buffer of {saved.numel()} elements in the checkpoint "
                        f"does not match this model's {mine.numel()}"
                    )
                mine.copy_(saved)
        self.copy_back()


class _AccumulateInto:
    def __init__(self, target: torch.Tensor) -> None:
        self.target = target

    def __call__(self, param: torch.Tensor) -> None:
        self.target.add_(param.grad)
        param.grad = None


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None):
    """Round fp32 ``x`` to bf16 stochastically (unbiased: ``E[round(x)] == x``).

    bf16 is the top 16 bits of fp32. Adding a uniform random integer ``r`` in
    ``[0, 2**16)`` to the fp32 bit pattern and truncating the low 16 bits rounds the
    magnitude up with probability ``low16(x) / 2**16``, i.e. the distance to the lower bf16
    neighbour over the gap between neighbours. Non-finite values pass through.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = stochastic_round_to_bf16(torch.full((10000,), 1.001), g)
        >>> round(y.float().mean().item(), 3)
        1.001
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 expects fp32 input, got {x.dtype}")
    bits = x.view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator
    )
    rounded = ((bits + noise) & -65536).view(torch.float32)
    rounded = torch.where(torch.isfinite(x), rounded, x)
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero


class CompensatedUpdate:
    """bf16 parameters stepped without a master copy, with Kahan or stochastic rounding.

    Around ``optimizer.step()``: :meth:`begin` makes each bf16 parameter (and its grad)
    an fp32 view of ``v = p + c`` in one temporary flat buffer per device; :meth:`end`
    writes ``p = round(v)`` and, for Kahan, ``c = bf16(v - p)``. The optimizer's states are
    therefore fp32 (they follow the tensor it steps). The temporaries live only during
    the step.

    Args:
        optimizer: the user's optimizer (its params already cast to bf16).
        method: ``"kahan"`` (default) or ``"stochastic"``.
        seed: seed of the stochastic-rounding generator (saved in :meth:`state_dict`).

    Example:
        >>> p = nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
        >>> opt = torch.optim.SGD([p], lr=1e-4)
        >>> upd = CompensatedUpdate(opt)
        >>> for _ in range(100):
        ...     p.grad = -torch.ones_like(p)
        ...     upd.begin(); opt.step(); upd.end()
        >>> p.item()  # plain bf16 would stay at 1.0
        1.0078125
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, method: str = "kahan", seed: int = 0
    ) -> None:
        if method not in ("kahan", "stochastic"):
            raise ValueError(f"method={method!r} is not one of 'kahan', 'stochastic'")
        self.optimizer = optimizer
        self.method = method
        self.groups: list[_FlatGroup] = []
        self.comps: list[torch.Tensor | None] = []
        self.generators: dict[torch.device, torch.Generator] = {}
        self._temps: list[tuple[torch.Tensor, torch.Tensor]] = []
        for (device, dtype), params in _group_low_precision(optimizer).items():
            if dtype != torch.bfloat16:
                raise TypeError(
                    f"compensated updates are for bf16 parameters; found {dtype} parameters"
                )
            group = _FlatGroup(params)
            self.groups.append(group)
            self.comps.append(torch.zeros_like(group.low) if method == "kahan" else None)
            if method == "stochastic" and device not in self.generators:
                self.generators[device] = torch.Generator(device).manual_seed(seed)
        ids = {id(p) for g in self.groups for p in g.params}
        self.direct_params = [
            p for g in optimizer.param_groups for p in g["params"] if id(p) not in ids
        ]
        self._hooks = [
            optimizer.register_load_state_dict_pre_hook(self._load_pre_hook),
            optimizer.register_load_state_dict_post_hook(self._load_post_hook),
        ]

    def begin(self) -> None:
        """Swap each bf16 param (and grad) for an fp32 view of ``p + c`` (and of its grad)."""
        self._temps = []
        for group, comp in zip(self.groups, self.comps):
            value = group.low.float()
            if comp is not None:
                value.add_(comp)
            grad = torch.empty_like(value)
            group.gather_grads_(grad, group.views(grad))
            for p, v, gv in zip(group.params, group.views(value), group.views(grad)):
                p.data = v
                p.grad = gv
            self._temps.append((value, grad))

    def end(self) -> None:
        """Round the stepped fp32 values back into the bf16 params; update ``c``."""
        with torch.no_grad():
            for group, comp, (value, _) in zip(self.groups, self.comps, self._temps):
                if comp is None:
                    generator = self.generators[value.device]
                    group.low.copy_(stochastic_round_to_bf16(value, generator))
                else:
                    group.low.copy_(value)
                    comp.copy_(value - group.low.float())
                for p, view in zip(group.params, group.low_views):
                    p.grad = None
                    p.data = view
        self._temps = []

    def _load_pre_hook(self, optimizer, state_dict):
        # Optimizer.load_state_dict casts states to the params' dtype; the states are
        # fp32, so let it see fp32 params while it loads.
        for group in self.groups:
            for p in group.params:
                p.data = p.data.float()

    def _load_post_hook(self, optimizer):
        for group in self.groups:
            for p, view in zip(group.params, group.low_views):
                p.data = view

    def state_dict(self) -> dict:
        return {
            "comps": [None if c is None else c.clone() for c in self.comps],
            "generators": {str(d): g.get_state() for d, g in self.generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        comps = state["comps"]
        if len(comps) != len(self.comps):
            raise ValueError(
                f"checkpoint has {len(comps)} compensation groups, this setup has "
                f"{len(self.comps)}: was it saved from the same model and optimizer?"
            )
        with torch.no_grad():
            for mine, saved in zip(self.comps, comps, strict=True):
                if mine is not None and saved is not None:
                    mine.copy_(saved)
        for device, gen_state in state["generators"].items():
            self.generators[torch.device(device)].set_state(gen_state)
