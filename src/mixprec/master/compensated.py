"""bf16 parameters without a master copy: Kahan-compensated or stochastically rounded updates."""

from __future__ import annotations

import torch

from mixprec.master.bf16_step import bf16_step, supports_bf16_step
from mixprec.master.casting import stochastic_round_to_bf16
from mixprec.master.flat import _FlatGroup, _group_low_precision

__all__ = ["CompensatedUpdate"]


class CompensatedUpdate:
    """bf16 parameters stepped without a master copy, with Kahan or stochastic rounding.

    Two paths, chosen once here (:attr:`native`):

    * AdamW, Adam (``amsgrad=False``) and SGD: :meth:`step` runs
      :func:`mixprec.master.bf16_step.bf16_step`, which does the optimizer's arithmetic in
      fp32 a chunk of one tensor at a time and keeps its states in ``optimizer.state``
      under torch's key names, as bf16 (Adam: 2 + 2 + 4 + 2 = 10 B/param of model states
      with the Kahan buffer).
    * any other optimizer (generic path): around ``optimizer.step()``, :meth:`begin` makes
      each bf16 parameter (and its grad) an fp32 view of ``v = p + c`` in one temporary
      flat buffer per device; :meth:`end` writes ``p = round(v)`` and, for Kahan,
      ``c = bf16(v - p)``. The optimizer's states are therefore fp32 (they follow the
      tensor it steps): 14 B/param with Adam, plus ~14 B/param of fp32 temporaries
      during the step.

    Either way call :meth:`step` (or, on the generic path only, ``begin(); opt.step();
    end()``).

    Args:
        optimizer: the user's optimizer (its params already cast to bf16).
        method: ``"kahan"`` (default) or ``"stochastic"``.
        seed: seed of the stochastic-rounding generator (saved in :meth:`state_dict`).
        native: use the bf16-state step when the optimizer supports it (default True);
            False forces the generic path.

    Example:
        >>> from torch import nn
        >>> p = nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
        >>> opt = torch.optim.SGD([p], lr=1e-4)
        >>> upd = CompensatedUpdate(opt)
        >>> for _ in range(100):
        ...     p.grad = -torch.ones_like(p)
        ...     upd.step()
        >>> p.item()  # plain bf16 would stay at 1.0
        1.0078125
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        method: str = "kahan",
        seed: int = 0,
        native: bool = True,
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
        self.native = native and supports_bf16_step(optimizer)
        self._comp_of = {
            id(p): view
            for g, c in zip(self.groups, self.comps)
            if c is not None
            for p, view in zip(g.params, g.views(c))
        }
        self._hooks = []
        if not self.native:  # torch casts loaded states to the param dtype: fp32 here
            self._hooks = [
                optimizer.register_load_state_dict_pre_hook(self._load_pre_hook),
                optimizer.register_load_state_dict_post_hook(self._load_post_hook),
            ]

    def step(self, found_inf: torch.Tensor | None = None) -> None:
        """One optimizer step of the bf16 parameters, compensated (and of any others).

        No host syncs on the native path, which also takes ``found_inf`` to skip on the
        device (see :func:`~mixprec.master.bf16_step.bf16_step`); the generic path is
        ``begin(); step; end()`` and takes no ``found_inf``.
        """
        if self.native:
            comps = self._comp_of if self.method == "kahan" else None
            bf16_step(self.optimizer, comps, self.method, self.generators, found_inf)
            return
        if found_inf is not None:
            raise ValueError(
                "found_inf is taken by the native bf16 step only; the generic path "
                f"({type(self.optimizer).__name__}) decides a skip before step()"
            )
        self.begin()
        try:
            self.optimizer.step()
        finally:
            self.end()

    def begin(self) -> None:
        """Swap each bf16 param (and grad) for an fp32 view of ``p + c`` (and of its grad)."""
        if self.native:
            raise RuntimeError(
                f"{type(self.optimizer).__name__} is stepped with bf16 states by "
                "CompensatedUpdate.step(); begin()/end() are for the generic path "
                "(CompensatedUpdate(..., native=False))"
            )
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
        """Compensation buffers (Kahan) and generator states (stochastic rounding)."""
        return {
            "comps": [None if c is None else c.clone() for c in self.comps],
            "generators": {str(d): g.get_state() for d, g in self.generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
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
