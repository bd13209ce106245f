"""Compensated bf16 steps for AdamW, Adam and SGD with bf16 optimizer states.

The generic path of :class:`~mixprec.master.CompensatedUpdate` lets the user's optimizer
step fp32 stand-ins for the bf16 parameters, so the optimizer's states are fp32 (8 B/param
for Adam) and the step holds ~14 B/param of fp32 temporaries. For ``torch.optim.AdamW``,
``Adam`` (``amsgrad=False``) and ``SGD`` this module does the optimizer's own arithmetic
instead, a chunk of at most :data:`CHUNK` elements of one tensor at a time:

* read the chunk's bf16 grad, param ``p``, compensation ``c`` and states into fp32;
* ``v = p + c`` (Kahan) or ``v = p`` (stochastic rounding), then torch's update, e.g. AdamW::

      m = beta1 m + (1 - beta1) g;  s = beta2 s + (1 - beta2) g^2
      v = v (1 - lr wd) - lr / (1 - beta1^t) * m / (sqrt(s) / sqrt(1 - beta2^t) + eps)

  (torch writes ``m`` as ``lerp(m, g, 1 - beta1)``: the same value, rounded differently
  in fp32, which needs ``g`` in fp32 beside ``m`` and ``s``; Adam adds ``wd * v`` to
  ``g`` instead of decaying ``v``; SGD:
  ``b = momentum b + (1 - dampening) g``, ``v -= lr (g + momentum b)`` with Nesterov);
* store the states as bf16 under torch's key names (``step`` stays a 0-dim fp32 tensor,
  on the parameter's device so no bias correction reads it on the host), rounded to
  nearest with Kahan and stochastically (same generator as the parameters) with
  stochastic rounding. Nearest rounding freezes an EMA whose relative change per step is
  under half a bf16 ulp (2**-9), e.g. ``exp_avg_sq`` with ``beta2 = 0.999`` when ``g^2``
  is close to ``s``; stochastic rounding keeps such updates in expectation;
* write ``p = bf16(v)``, ``c = bf16(v - p)`` (Kahan) or ``p = stochastic_round(v)``.

Memory: persistent ``2 + 2 + 2 k + 2`` B/param (params, grads, k bf16 states, Kahan
buffer; ``k = 2`` for Adam: 10 B), plus fp32 temporaries of one chunk only (see
:func:`step_temp_bytes`). No host syncs, a skip included (``found_inf``). Parameters
that are not bf16 (fp32 norms) are stepped by ``optimizer.step()`` itself (torch's
single-tensor CPU Adam reads its step counter on the host; ``fused=True`` does not). The
optimizer's ``fused`` / ``foreach`` flags do not apply to the bf16 parameters here.
"""

from __future__ import annotations

import torch

from mixprec.master.casting import stochastic_round_to_bf16

__all__ = ["CHUNK", "bf16_step", "step_temp_bytes", "supports_bf16_step"]

CHUNK = 1 << 20  # elements of one tensor processed at a time (4 MiB per fp32 temporary)
_NAMES = ("adamw", "adam", "sgd", "sgd-momentum")  # the memory planner's names
_BF16 = torch.bfloat16


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def supports_bf16_step(optimizer: torch.optim.Optimizer) -> bool:
    """True when :func:`bf16_step` can step ``optimizer``: exactly AdamW, Adam or SGD.

    Adam / AdamW need ``amsgrad=False``, float betas and weight decay, no
    ``differentiable``; SGD needs float momentum, dampening and weight decay. ``lr`` may
    be a float or a 0-dim tensor. Anything else keeps the generic fp32-view path.

    Example:
        >>> p = [torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))]
        >>> supports_bf16_step(torch.optim.AdamW(p)), supports_bf16_step(torch.optim.NAdam(p))
        (True, False)
    """
    kind = type(optimizer)
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        return all(
            not g.get("amsgrad") and not g.get("differentiable")
            and all(_number(b) for b in g["betas"]) and _number(g["weight_decay"])
            for g in optimizer.param_groups
        )  # fmt: skip
    if kind is torch.optim.SGD:
        return all(
            not g.get("differentiable")
            and all(_number(g[k]) for k in ("momentum", "dampening", "weight_decay"))
            for g in optimizer.param_groups
        )
    return False


def step_temp_bytes(optimizer, method: str) -> int | None:
    """Bytes of temporaries per element of the chunk being stepped; None: generic path.

    ``12`` (three fp32 tensors alive at once as the allocator sees them: Adam's ``s``,
    ``m`` and ``v``; SGD's ``b``, ``v`` and the update), ``+ 8`` for Adam with L2 weight
    decay (``g = grad + wd v`` in fp32 beside them), ``+ 15`` with stochastic rounding
    (its int32 noise, sum and result, a bool mask and the bf16 result). The step's peak
    adds ``step_temp_bytes x min(largest bf16 tensor, CHUNK)``. Measured with the CPU
    allocator's events (``torch.profiler``, ``profile_memory=True``): a tensor-level
    tracker under a dispatch mode saw one fp32 temporary fewer (8). Not counted: a skip
    decided on a GPU (``found_inf``, see :func:`bf16_step`) also holds the new bf16
    ``p`` and ``c`` (Kahan) or the fp32 select of a state beside them, up to 4 B more
    per element; the CPU path never does (not measured: no GPU was at hand).

    Args:
        optimizer: a torch optimizer, or a planner name (``"adamw"``, ``"adam"``,
            ``"sgd"``, ``"sgd-momentum"``: torch's defaults, so no L2 decay for Adam).
        method: ``"kahan"`` or ``"stochastic"``.

    Example:
        >>> step_temp_bytes("adamw", "kahan"), step_temp_bytes("adafactor", "kahan")
        (12, None)
    """
    if isinstance(optimizer, str):
        if optimizer not in _NAMES:
            return None
        l2 = False
    else:
        if not supports_bf16_step(optimizer):
            return None
        l2 = isinstance(optimizer, torch.optim.Adam) and any(
            g["weight_decay"] != 0 and not g.get("decoupled_weight_decay", False)
            for g in optimizer.param_groups
        )
    return 12 + 8 * l2 + 15 * (method == "stochastic")


def _state(state: dict, key: str, p: torch.Tensor) -> torch.Tensor:
    """``state[key]`` as a contiguous bf16 tensor on p's device (created as zeros)."""
    t = state.get(key)
    if t is None:
        t = torch.zeros(p.shape, dtype=_BF16, device=p.device)
    elif t.dtype != _BF16 or t.device != p.device or not t.is_contiguous():
        t = t.to(device=p.device, dtype=_BF16, memory_format=torch.contiguous_format)
    state[key] = t
    return t


def _chunks(*tensors):
    flat = [None if t is None else t.reshape(-1) for t in tensors]
    n = flat[0].numel()
    for i in range(0, n, CHUNK):
        yield [None if t is None else t[i : i + CHUNK] for t in flat]


def _store(dst: torch.Tensor, src: torch.Tensor, gen, keep=None) -> None:
    value = src if gen is None else stochastic_round_to_bf16(src, gen)
    dst.copy_(value if keep is None else torch.where(keep, value, dst))


def _load(p, c) -> torch.Tensor:
    v = p.float()
    if c is not None:
        v.add_(c)
    return v


def _write_back(p: torch.Tensor, c, v: torch.Tensor, gen, keep=None) -> None:
    if c is None:  # stochastic rounding
        _store(p, v, gen, keep)
    elif keep is None:  # Kahan: p = bf16(v), c = bf16(v - p)
        p.copy_(v)
        c.copy_(v.sub_(p))
    else:  # the same two values, written only where the step is kept
        new_p = v.to(_BF16)
        new_c = v.sub_(new_p).to(_BF16)
        p.copy_(torch.where(keep, new_p, p))
        c.copy_(torch.where(keep, new_c, c))


def _adam(optimizer, group, items, gen_of, stochastic: bool, keep_of) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, wd, maximize = group["lr"], group["eps"], group["weight_decay"], group["maximize"]
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    l2 = wd != 0 and not decoupled
    sign = -1.0 if maximize else 1.0
    for p, comp in items:
        state = optimizer.state[p]
        step = state.get("step")
        if step is None or step.device != p.device:
            step = torch.zeros((), dtype=torch.float32, device=p.device) if step is None else step
            state["step"] = step = step.to(device=p.device, dtype=torch.float32)
        exp_avg, exp_avg_sq = _state(state, "exp_avg", p), _state(state, "exp_avg_sq", p)
        gen = gen_of(p.device)
        sgen = gen if stochastic else None
        keep = keep_of(p.device)
        step += 1 if keep is None else keep  # a skipped step does not count, as in torch
        step_size = lr / (1 - beta1**step)
        bc2_sqrt = (1 - beta2**step).sqrt()
        decay = 1 - lr * wd if (wd != 0 and decoupled) else None
        for pc, cc, gc, mc, sc in _chunks(p.data, comp, p.grad, exp_avg, exp_avg_sq):
            # fp32 temporaries: s and m, then m and v (8 B/element); L2 decay needs
            # g = grad + wd v in fp32 first (16 B/element)
            v, g, g_sign = None, gc, sign  # a bf16 g is read in fp32 by mixed-dtype ops
            if l2:
                v = _load(pc, cc)
                g = gc.to(torch.float32, copy=True).mul_(sign).add_(v, alpha=wd)
                g_sign = 1.0
            s = sc.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
            _store(sc, s, sgen, keep)
            m = mc.float().mul_(beta1).add_(g, alpha=g_sign * (1 - beta1))
            _store(mc, m, sgen, keep)
            del g
            m.div_(s.sqrt_().div_(bc2_sqrt).add_(eps)).mul_(step_size)
            del s
            if v is None:
                v = _load(pc, cc)
            if decay is not None:
                v.mul_(decay)
            _write_back(pc, cc, v.sub_(m), gen, keep)


def _sgd(optimizer, group, items, gen_of, stochastic: bool, keep_of) -> None:
    lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
    wd, nesterov, maximize = group["weight_decay"], group["nesterov"], group["maximize"]
    for p, comp in items:
        state = optimizer.state[p]
        first = momentum != 0 and state.get("momentum_buffer") is None
        buf = _state(state, "momentum_buffer", p) if momentum != 0 else None
        gen = gen_of(p.device)
        sgen = gen if stochastic else None
        keep = keep_of(p.device)
        for pc, cc, gc, bc in _chunks(p.data, comp, p.grad, buf):
            # fp32 temporaries: b, then b and v (8 B/element); g in fp32 only with
            # maximize or weight decay (+4 B)
            v, g = None, gc  # a bf16 g is read in fp32 by the mixed-dtype ops below
            if maximize or wd != 0:
                g = gc.to(torch.float32, copy=True)
                if maximize:
                    g.neg_()
                if wd != 0:
                    v = _load(pc, cc)
                    g.add_(v, alpha=wd)
            if bc is None:
                d = g if g.dtype == torch.float32 else g.float()
            else:
                if first:
                    b = g.to(torch.float32, copy=True)
                else:
                    b = bc.float().mul_(momentum).add_(g, alpha=1 - dampening)
                _store(bc, b, sgen, keep)
                d = b.mul_(momentum).add_(g) if nesterov else b
            del g
            if v is None:
                v = _load(pc, cc)
            _write_back(pc, cc, v.sub_(d.mul_(lr)), gen, keep)


def _needs_host_read(optimizer, groups) -> bool:
    """True when a skip cannot be decided on the device (see :func:`bf16_step`)."""
    others = any(
        p.dtype != _BF16 and p.grad is not None for g in optimizer.param_groups for p in g["params"]
    )
    if others and not all(g.get("fused") for g in optimizer.param_groups):
        return True
    if isinstance(optimizer, torch.optim.SGD):
        return any(
            g["momentum"] != 0 and optimizer.state[p].get("momentum_buffer") is None
            for g, ps in groups
            for p in ps
        )
    return False


def bf16_step(
    optimizer: torch.optim.Optimizer,
    comps: dict[int, torch.Tensor] | None,
    method: str,
    generators: dict[torch.device, torch.Generator],
    found_inf: torch.Tensor | None = None,
) -> None:
    """Step the bf16 parameters of ``optimizer`` (AdamW, Adam or SGD) with bf16 states.

    Args:
        optimizer: an optimizer :func:`supports_bf16_step` accepts.
        comps: ``id(param) -> bf16 Kahan buffer`` (``method="kahan"``), else None.
        method: ``"kahan"`` or ``"stochastic"``.
        generators: device -> generator for stochastic rounding.
        found_inf: a 0-dim tensor, non-zero when the gradients held an inf or NaN: the
            step is then skipped on the device, without a host read: every new value is
            computed and ``torch.where(found_inf == 0, new, old)`` is written, so
            parameters, Kahan buffers, states and ``step`` keep their bits (the stochastic
            rounding generator still advances). Two cases read ``found_inf`` on the host
            once instead (and skip the whole step): parameters that are not bf16 with an
            optimizer that is not ``fused`` (only a fused one takes ``found_inf``), and
            SGD's first momentum step (torch starts the buffer from ``g`` on the first
            step *taken*).

    Parameters that are not bf16 are stepped by ``optimizer.step()`` itself (the bf16
    ones hidden by setting their ``.grad`` to None meanwhile); parameters without a grad
    are skipped, as torch does.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
        >>> opt = torch.optim.SGD([w], lr=1e-4)
        >>> c = torch.zeros_like(w.data)
        >>> for _ in range(100):
        ...     w.grad = -torch.ones_like(w)
        ...     bf16_step(opt, {id(w): c}, "kahan", {})
        >>> w.item() + c.item()  # p + c: plain bf16 would stay at 1.0 (exact: 1.01)
        1.01025390625
    """
    groups = [
        (g, [p for p in g["params"] if p.dtype == _BF16 and p.grad is not None])
        for g in optimizer.param_groups
    ]
    if found_inf is not None and _needs_host_read(optimizer, groups):
        if bool(found_inf.item()):  # the one host read of this step
            return
        found_inf = None
    others = [p for g in optimizer.param_groups for p in g["params"] if p.dtype != _BF16]
    if any(p.grad is not None for p in others):
        held = [(p, p.grad) for _, ps in groups for p in ps]
        for p, _ in held:
            p.grad = None
        try:
            if found_inf is not None:  # fused (see _needs_host_read): skips in its kernel
                optimizer.grad_scale, optimizer.found_inf = None, found_inf
            optimizer.step()
        finally:
            if found_inf is not None:
                del optimizer.grad_scale, optimizer.found_inf
            for p, grad in held:
                p.grad = grad
    stochastic = method == "stochastic"
    kernel = _sgd if isinstance(optimizer, torch.optim.SGD) else _adam
    keeps: dict[torch.device, torch.Tensor] = {}

    def keep_of(device: torch.device) -> torch.Tensor | None:
        if found_inf is None:
            return None
        if device not in keeps:
            keeps[device] = found_inf.to(device) == 0
        return keeps[device]

    with torch.no_grad():
        for group, params in groups:
            items = [(p, None if comps is None else comps[id(p)]) for p in params]
            kernel(optimizer, group, items, generators.get, stochastic, keep_of)
    optimizer._opt_called = True  # what torch's LR schedulers look for
