"""Finer-grained fp8 scales: one scale per row (rowwise / axiswise) or per block of 32 (MX).

Tensorwise scaling (:mod:`mixprec.float8.scaling`) gives a whole tensor one scale, so one
outlier row pushes every other row towards fp8's subnormals. Finer scales fix that:

* **rowwise** (torchao's "axiswise"): one float32 scale per row of the GEMM's left
  operand and per column of its right operand, i.e. along the dimension that is *not*
  summed over. A product ``a (M, K) · b (K, N)`` is then ``(a8 · b8) * inv_a (M, 1) *
  inv_b (1, N)``: the scales factor out of the sum, so it is still one fp8 GEMM
  (``torch._scaled_mm`` takes (M, 1) and (1, N) scales).
* **mx** (OCP Microscaling, MXFP8): one power-of-two scale, stored as an E8M0 exponent
  (the format catalogue's ``e8m0fnu``), per block of 32 consecutive elements *along* the
  summed dimension. The scales do not factor out of the sum; hardware with MX support
  (NVIDIA Blackwell) applies them inside the GEMM (:mod:`mixprec.float8.mx_gemm`).
  Elsewhere the product is emulated: each operand is decoded to float32 (exact: the
  scales are powers of two) and multiplied in float32.

The MX scale of a block, two rules (``rule=``)::

    "floor" (OCP MX v1.0):  shared_exp = floor(log2(amax_block)) - emax_elem   # 8 for E4M3
    "ceil"  (default):      shared_exp = ceil(log2(amax_block / elem_max))     # 448 for E4M3
    X        = 2**clamp(shared_exp, e8m0 exponent range)
    elements = saturate(round(x / X))                    # to E4M3 (or E5M2)

The OCP rule maps amax to [256, 512) for E4M3, so a block whose amax has a significand
above 1.75 saturates (values up to 511 clipped to 448): measured on nn.Linear's uniform
±1/32 weights at K = 1024, that costs 3 dB of SQNR. The "ceil" rule (NVIDIA's RCEIL,
used by its MXFP8 recipes) picks the smallest X with amax / X <= elem_max, so nothing
saturates, at the price of up to one binade of range at the small end.

Non-finite values are passed through as in :func:`hp_tensor_and_scale_to_float8`; each
scale is computed from the finite values of its row or block.
"""

from __future__ import annotations

import math

import torch

from mixprec.float8.scaling import amax_to_scale, float8_max, hp_tensor_and_scale_to_float8
from mixprec.formats import get_format

__all__ = ["MX_BLOCK", "axiswise_to_float8", "mx_dequantize", "mx_to_float8"]

MX_BLOCK = 32
"""Elements per MX scale (the OCP MX v1.0 block size)."""


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    a = x.detach().abs()
    return torch.where(a <= torch.finfo(a.dtype).max, a, torch.zeros((), dtype=a.dtype))


def axiswise_to_float8(
    x: torch.Tensor,
    dim: int,
    float8_dtype: torch.dtype,
    *,
    margin: int = 0,
    power_of_two: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast with one scale per slice along ``dim``: (x_fp8, scale), scale keeps ``dim`` as 1.

    ``dim`` is the dimension reduced for the amax (the GEMM's summed dimension), so
    ``dim=-1`` of an (M, K) tensor gives an (M, 1) scale, one per row::

        amax  = max over dim of |x| (finite elements)    # (M, 1)
        scale = amax_to_scale(amax)                       # fmt_max / amax, per row
        x_fp8 = hp_tensor_and_scale_to_float8(x, scale)

    Example:
        >>> x = torch.tensor([[1.0, -2.0], [100.0, 50.0]])
        >>> x8, s = axiswise_to_float8(x, -1, torch.float8_e4m3fn)
        >>> s.flatten(), x8.float()
        (tensor([224.0000,   4.4800]), tensor([[ 224., -448.],
                [ 448.,  224.]]))
    """
    amax = _finite_abs(x).amax(dim=dim, keepdim=True).to(torch.float32)
    scale = amax_to_scale(amax, float8_dtype, margin=margin, power_of_two=power_of_two)
    return hp_tensor_and_scale_to_float8(x, scale, float8_dtype), scale


def _e8m0_exponent_range() -> tuple[int, int]:
    e8m0 = get_format("e8m0fnu")
    return int(math.log2(e8m0.min_normal)), int(math.log2(e8m0.max))


def mx_to_float8(
    x: torch.Tensor,
    dim: int,
    float8_dtype: torch.dtype,
    *,
    block: int = MX_BLOCK,
    rule: str = "ceil",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MX cast along ``dim``: (elements, X) with X = 2**shared_exp per block of ``block``.

    ``rule``: ``"ceil"`` (default, never saturates) or ``"floor"`` (the OCP rule); see
    the module docstring.

    ``x`` is zero-padded along ``dim`` to a multiple of ``block`` (zeros change no amax
    and add nothing to a product); ``elements`` keeps the padded length, ``X`` (float32,
    powers of two in E8M0's range) has ``dim`` replaced by the number of blocks. Decode
    with :func:`mx_dequantize`.

    Example:
        >>> x = torch.tensor([[3.0] * 32 + [0.01] * 32])
        >>> q, X = mx_to_float8(x, -1, torch.float8_e4m3fn)
        >>> X, q.float()[0, [0, 32]]       # X = 2**ceil(log2(3 / 448)), 2**ceil(log2(0.01 / 448))
        (tensor([[7.8125e-03, 3.0518e-05]]), tensor([384., 320.]))
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    extra = -n % block
    if extra:
        pad_shape = list(x.shape)
        pad_shape[dim] = extra
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    blocks = x.unflatten(dim, (-1, block))  # (..., nblocks, block, ...)
    amax = _finite_abs(blocks).amax(dim=dim + 1, keepdim=True).to(torch.float32)
    if rule == "floor":
        emax_elem = math.floor(math.log2(float8_max(float8_dtype)))
        shared = torch.floor(torch.log2(amax)) - emax_elem
    elif rule == "ceil":  # in float64: amax / elem_max is exact there, log2 of it nearly so
        shared = torch.ceil(torch.log2(amax.double() / float8_max(float8_dtype))).float()
    else:
        raise ValueError(f"rule={rule!r} is not one of 'ceil', 'floor'")
    lo, hi = _e8m0_exponent_range()
    # amax 0 (an all-zero block): any X works; log2(0) = -inf clamps to E8M0's lowest.
    X = torch.exp2(shared.clamp(lo, hi))  # noqa: N806 (the specification's name)
    elements = hp_tensor_and_scale_to_float8(blocks, 1.0 / X, float8_dtype)
    return elements.flatten(dim, dim + 1), X.squeeze(dim + 1)


def mx_dequantize(elements: torch.Tensor, X: torch.Tensor, dim: int) -> torch.Tensor:  # noqa: N803
    """float32 values of an MX tensor: elements * X, X broadcast over each block of ``dim``.

    Example:
        >>> q, X = mx_to_float8(torch.tensor([[1.5, -0.25]]), -1, torch.float8_e4m3fn)
        >>> mx_dequantize(q, X, -1)[:, :2]
        tensor([[ 1.5000, -0.2500]])
    """
    dim = dim % elements.dim()
    blocks = elements.to(torch.float32).unflatten(dim, (X.shape[dim], -1))
    return (blocks * X.unsqueeze(dim + 1)).flatten(dim, dim + 1)
