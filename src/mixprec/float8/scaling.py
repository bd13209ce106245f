"""Per-tensor fp8 scaling: tensor -> amax -> scale -> fp8 tensor, and delayed scaling.

The pipeline, as small named functions (hp = high precision, e.g. fp32/bf16)::

    amax  = tensor_to_amax(x)                        # max |x|, fp32
    scale = amax_to_scale(amax, fp8_dtype)           # fmt_max / amax, computed in float64
    x_fp8 = hp_tensor_and_scale_to_float8(x, scale, fp8_dtype)   # saturate(fl32(x * scale))
    x    ~= x_fp8.float() * inverse_scale(scale)     # what torch._scaled_mm multiplies by

Conventions (the same as ``torchao.float8``): ``scale`` maps high precision to fp8
(multiply before the cast); ``torch._scaled_mm`` takes the *inverse* scales
(``scale_a``/``scale_b`` are dequantisation multipliers), as 0-dim float32 tensors.

Everything is tensor ops: no ``.item()``, no host synchronisation.
"""

from __future__ import annotations

import torch

__all__ = [
    "EPS",
    "amax_to_scale",
    "cast_to_float8",
    "float8_max",
    "hp_tensor_and_scale_to_float8",
    "inverse_scale",
    "reduce_history",
    "tensor_to_amax",
    "tensor_to_finite_amax",
    "update_delayed_scale",
]

EPS = 1e-12
"""Smallest amax a scale is computed from (avoids dividing by zero), as in torchao."""


_HAS_INF = {torch.float8_e5m2} if hasattr(torch, "float8_e5m2") else set()
"""fp8 dtypes with an infinity (e4m3fn and the fnuz formats have none, only NaN)."""


def float8_max(float8_dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2).

    Example:
        >>> float8_max(torch.float8_e4m3fn)
        448.0
    """
    return float(torch.finfo(float8_dtype).max)


def tensor_to_amax(x: torch.Tensor) -> torch.Tensor:
    """amax = max |x| as a 0-dim float32 tensor (0 for an empty tensor; NaN/inf propagate).

    Example:
        >>> tensor_to_amax(torch.tensor([1.0, -3.0, 2.0]))
        tensor(3.)
    """
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.detach().abs().amax().to(torch.float32)


def tensor_to_finite_amax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x| over the finite elements, whether every element is finite), 0-dim tensors.

    The scale of a tensor that holds an inf or a NaN comes from its finite elements, so
    that those keep their fp8 precision while the non-finite ones pass through the cast
    (see :func:`hp_tensor_and_scale_to_float8`); the flag tells the caller not to advance
    any scaling state from this tensor. Sync-free (two reductions, no ``.item()``).

    Example:
        >>> tensor_to_finite_amax(torch.tensor([1.0, float("inf"), -3.0]))
        (tensor(3.), tensor(False))
    """
    if x.numel() == 0:
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        return zero, torch.ones((), dtype=torch.bool, device=x.device)
    a = x.detach().abs()
    amax = a.amax().to(torch.float32)
    finite = torch.isfinite(amax)
    # a <= finfo.max is False for inf and NaN, so the masked max is over the finite ones.
    masked = torch.where(a <= torch.finfo(a.dtype).max, a, torch.zeros((), dtype=a.dtype))
    return torch.where(finite, amax, masked.amax().to(torch.float32)), finite


def amax_to_scale(
    amax: torch.Tensor,
    float8_dtype: torch.dtype,
    *,
    margin: int = 0,
    power_of_two: bool = False,
    previous_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """scale = fmt_max / max(amax, EPS) / 2**margin, as a 0-dim float32 tensor.

    The division is done in float64: ``fmt_max / amax`` in float32 could round up, and
    ``x * scale`` would then land above ``fmt_max`` for ``x == amax``; float64 keeps the
    quotient exact to far below float32's rounding, leaving a single rounding to float32.
    With ``power_of_two`` the scale is rounded *down* to ``2**floor(log2(scale))``, so
    multiplying by it is exact and never overflows.

    A zero or non-finite amax says nothing about the range, so the scale stays
    ``previous_scale`` (1.0 when none is given); the non-finite values themselves are not
    hidden: :func:`hp_tensor_and_scale_to_float8` passes them through.

    Args:
        amax: 0-dim tensor, max |x|.
        float8_dtype: target fp8 dtype; fmt_max = ``torch.finfo(float8_dtype).max``.
        margin: the scale is divided by 2**margin (headroom for growth).
        power_of_two: round the scale down to a power of two.
        previous_scale: kept when amax is zero or non-finite.

    Returns:
        0-dim float32 tensor on amax's device.

    Example:
        >>> amax_to_scale(torch.tensor(2.0), torch.float8_e4m3fn)
        tensor(224.)
        >>> amax_to_scale(torch.tensor(3.0), torch.float8_e4m3fn, power_of_two=True)
        tensor(128.)
        >>> amax_to_scale(torch.tensor(0.0), torch.float8_e4m3fn, previous_scale=torch.tensor(5.0))
        tensor(5.)
    """
    amax64 = amax.detach().to(torch.float64)
    scale = float8_max(float8_dtype) / torch.clamp(amax64, min=EPS) / 2.0**margin
    if power_of_two:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    scale = scale.to(torch.float32)
    if previous_scale is None:
        previous_scale = torch.ones((), dtype=torch.float32, device=amax.device)
    usable = torch.isfinite(amax64) & (amax64 > 0)
    return torch.where(usable, scale, previous_scale.to(torch.float32))


def hp_tensor_and_scale_to_float8(
    x: torch.Tensor, scale: torch.Tensor, float8_dtype: torch.dtype
) -> torch.Tensor:
    """Saturating scaled cast: x_fp8 = fp8(clamp(fl32(x * scale), -fmt_max, fmt_max)).

    The product is formed in float32 (x is upcast first), clamped so that finite values
    beyond the format's range become ±fmt_max rather than inf/NaN, then rounded to nearest
    (ties to even) by torch's cast. Non-finite *inputs* are never clamped: NaN stays NaN
    and ±inf stays ±inf in e5m2 (it becomes NaN in formats without an infinity, e4m3fn and
    the fnuz formats; torch's own e4m3fn cast would saturate it to ±448), so a product
    that uses them is non-finite exactly where the high-precision product would be. (A
    saturated ±inf would hide an overflow from a loss scaler.)

    Example:
        >>> hp_tensor_and_scale_to_float8(torch.tensor([1.0, 1e5, float("inf")]),
        ...                               torch.tensor(1.0), torch.float8_e5m2).float()
        tensor([1.0000e+00, 5.7344e+04,        inf])
    """
    fmt_max = float8_max(float8_dtype)
    x = x.detach()
    scale = scale.to(torch.float32)
    if x.dtype == torch.float32:
        scaled = x * scale
    else:  # upcast copy, then in place: one temporary instead of two
        scaled = x.to(torch.float32).mul_(scale)
    clamped = scaled.clamp(-fmt_max, fmt_max)
    if float8_dtype not in _HAS_INF:  # torch's cast would saturate ±inf to ±448 in e4m3fn
        scaled = torch.full((), float("nan"), dtype=torch.float32, device=scaled.device)
    return torch.where(torch.isinf(x), scaled, clamped).to(float8_dtype)


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """The dequantisation multiplier fl32(1 / scale), 0-dim float32 (``_scaled_mm``'s scale_a/b).

    Example:
        >>> inverse_scale(torch.tensor(4.0))
        tensor(0.2500)
    """
    return torch.reciprocal(scale.to(torch.float32))


def reduce_history(history: torch.Tensor, reduce: str) -> torch.Tensor:
    """One amax from a history (newest first): ``max(history)`` or ``history[0]``.

    Example:
        >>> reduce_history(torch.tensor([1.0, 4.0, 2.0]), "max")
        tensor(4.)
    """
    if reduce == "max":
        return history.amax()
    if reduce == "most_recent":
        return history[0]
    raise ValueError(f"history_reduce={reduce!r} is not one of 'max', 'most_recent'")


def update_delayed_scale(
    history: torch.Tensor,
    scale: torch.Tensor,
    amax: torch.Tensor,
    float8_dtype: torch.dtype,
    *,
    reduce: str = "max",
    margin: int = 0,
    power_of_two: bool = False,
) -> None:
    """Record this use's amax and compute the scale for the *next* use (in place).

    Pseudocode (history is newest first, starts all zero; scale starts at 1.0)::

        if not isfinite(amax): return              # a non-finite amax advances nothing
        history = [amax] + history[:-1]            # roll by one, newest in front
        r = max(history)        if reduce == "max"
            history[0]          if reduce == "most_recent"
        scale = amax_to_scale(r, margin, power_of_two, previous_scale=scale)
                                                   # r == 0 keeps the previous scale

    A non-finite amax means the step that produced it is skipped by a loss scaler or a
    non-finite policy, so it must leave no trace in the history (recording it, or a 0 in
    its place, would shift the window by one step that never happened).

    Args:
        history: 1-D float32 buffer of past amaxes, updated in place.
        scale: 0-dim float32 buffer, updated in place.
        amax: this use's amax (0-dim).
        float8_dtype: target fp8 dtype.
        reduce: ``"max"`` or ``"most_recent"``.
        margin: see :func:`amax_to_scale`.
        power_of_two: see :func:`amax_to_scale`.

    Example:
        >>> h, s = torch.zeros(3), torch.ones(())
        >>> update_delayed_scale(h, s, torch.tensor(2.0), torch.float8_e4m3fn)
        >>> h, s
        (tensor([2., 0., 0.]), tensor(224.))
        >>> update_delayed_scale(h, s, torch.tensor(float("inf")), torch.float8_e4m3fn)
        >>> h, s
        (tensor([2., 0., 0.]), tensor(224.))
    """
    finite = torch.isfinite(amax)
    rolled = torch.roll(history, 1)
    rolled[0] = amax.to(history.dtype)
    new_history = torch.where(finite, rolled, history)
    reduced = reduce_history(new_history, reduce)
    new = amax_to_scale(
        reduced, float8_dtype, margin=margin, power_of_two=power_of_two, previous_scale=scale
    )
    history.copy_(new_history)
    scale.copy_(new)


def cast_to_float8(
    x: torch.Tensor,
    history: torch.Tensor,
    scale: torch.Tensor,
    float8_dtype: torch.dtype,
    *,
    scaling: str,
    reduce: str = "max",
    margin: int = 0,
    power_of_two: bool = False,
    update: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast ``x`` to fp8 with current or delayed per-tensor scaling; returns (x_fp8, scale used).

    Current scaling (``history`` has length 1 and holds the last amax)::

        amax, finite = tensor_to_finite_amax(x)          # max over the finite elements
        s = amax_to_scale(amax, previous_scale=scale)   # zero amax: keep scale
        if update and finite: history[0] = amax; scale = s

    Delayed scaling::

        amax, finite = tensor_to_finite_amax(x)
        s = scale if any(history != 0)                   # from past amaxes
            else amax_to_scale(amax, previous_scale=scale)   # first use: current scaling
        if update and finite: update_delayed_scale(history, scale, amax)

    In both cases ``x_fp8 = hp_tensor_and_scale_to_float8(x, s)``, which passes inf and
    NaN through, so a non-finite element of ``x`` gives a non-finite product exactly where
    the high-precision product has one, and the scaling state is left as it was. With
    ``update=False`` (eval mode) the state is only read.

    Example:
        >>> h, s = torch.zeros(1), torch.ones(())
        >>> x8, used = cast_to_float8(torch.tensor([0.5, -2.0]), h, s, torch.float8_e4m3fn,
        ...                           scaling="current")
        >>> used, x8.float()
        (tensor(224.), tensor([ 112., -448.]))
    """
    kw = {"margin": margin, "power_of_two": power_of_two}
    amax, finite = tensor_to_finite_amax(x)
    current = amax_to_scale(amax, float8_dtype, previous_scale=scale, **kw)
    if scaling == "current":
        used = current
        if update:
            history[0] = torch.where(finite, amax, history[0])
            scale.copy_(torch.where(finite, current, scale))
    elif scaling == "delayed":
        initialized = (history != 0).any()
        used = torch.where(initialized, scale, current)
        if update:
            masked = torch.where(finite, amax, torch.full_like(amax, float("nan")))
            update_delayed_scale(history, scale, masked, float8_dtype, reduce=reduce, **kw)
    else:
        raise ValueError(f"scaling={scaling!r} is not one of 'current', 'delayed'")
    return hp_tensor_and_scale_to_float8(x, used, float8_dtype), used
