"""fp32 master weights of 16-bit parameters, in flat buffers (fp16-master, bf16-master)."""

from __future__ import annotations

import torch
from torch import nn

from mixprec.master.flat import _FlatGroup, _group_low_precision, _swap_optimizer_params

__all__ = ["MasterWeights"]


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
                if accumulate_fp32 and p.requires_grad:
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
        """``{"masters": [flat fp32 buffer per group], "shapes": [[shape per param] per group]}``.

        The buffers are copies; the shapes let :meth:`load_state_dict` refuse a checkpoint
        of another model whose groups happen to hold the same number of elements.
        """
        return {
            "masters": [flat.clone() for flat in self.master_flats],
            "shapes": [[tuple(shape) for shape in group.shapes] for group in self.groups],
        }

    def check_state_dict(self, state: dict) -> None:
        """Raise ``ValueError`` if ``state`` cannot be loaded here; changes nothing."""
        if not isinstance(state, dict) or "masters" not in state or "shapes" not in state:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"master-weight state must be a dict with 'masters' and 'shapes' (what "
                f"MasterWeights.state_dict() returns), got {keys}"
            )
        flats, shapes = state["masters"], state["shapes"]
        if len(flats) != len(self.master_flats) or len(shapes) != len(self.groups):
            raise ValueError(
                f"checkpoint has {len(flats)} master-weight groups, this setup has "
                f"{len(self.master_flats)}: was it saved from the same model and optimizer?"
            )
        for g, (group, mine, saved, saved_shapes) in enumerate(
            zip(self.groups, self.master_flats, flats, shapes, strict=True)
        ):
            if not isinstance(saved, torch.Tensor) or saved.dtype != mine.dtype:
                raise ValueError(
                    f"master-weight group {g} in the checkpoint is "
                    f"{getattr(saved, 'dtype', type(saved).__name__)}, expected {mine.dtype}"
                )
            want = [tuple(s) for s in group.shapes]
            got = [tuple(s) for s in saved_shapes]
            if got != want or saved.shape != mine.shape:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
                detail = (
                    f"parameter {at} is {got[at]} there and {want[at]} here"
                    if at is not None
                    else f"{len(got)} parameters there, {len(want)} here"
                )
                raise ValueError(
                    f"master-weight group {g} was saved from a model with other parameter "
                    f"shapes ({detail}): load a checkpoint of this model"
                )

    def load_state_dict(self, state: dict) -> None:
        """Restore the masters and round them into the 16-bit parameters.

        Raises:
            ValueError: the checkpoint holds other groups, shapes or dtypes (nothing is
                changed then).
        """
        self.check_state_dict(state)
        with torch.no_grad():
            for mine, saved in zip(self.master_flats, state["masters"], strict=True):
                mine.copy_(saved)
        self.copy_back()


class _AccumulateInto:
    def __init__(self, target: torch.Tensor) -> None:
        self.target = target

    def __call__(self, param: torch.Tensor) -> None:
        self.target.add_(param.grad)
        param.grad = None
