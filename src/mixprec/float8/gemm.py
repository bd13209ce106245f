"""The fp8 GEMM: ``torch._scaled_mm`` where it accepts the operands, else its emulation.

``scaled_mm(a, b, inv_a, inv_b)`` computes ``(a · b) * inv_a * inv_b`` with float32
accumulation for fp8 ``a`` (M, K) and ``b`` (K, N); ``inv_a``/``inv_b`` are 0-dim
(tensorwise) or (M, 1) / (1, N) (rowwise) dequantisation multipliers.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["scaled_mm"]

_E5M2 = {getattr(torch, n) for n in ("float8_e5m2", "float8_e5m2fnuz") if hasattr(torch, n)}
_FNUZ = {getattr(torch, n) for n in ("float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)}


def _scaled_mm_accepts(
    a: torch.Tensor, b: torch.Tensor, rowwise: bool = False, out_dtype: torch.dtype | None = None
) -> bool:
    """Whether ``torch._scaled_mm`` takes (a, b) as laid out by this module.

    CPU: any shape, e4m3fn/e5m2 in any pair, tensorwise or rowwise scales (it refuses the
    fnuz formats). CUDA: every dimension but M a multiple of 16, and not e5m2 x e5m2
    (cuBLAS refuses it); rowwise scales only for e4m3fn x e4m3fn with a bf16 output (what
    torch's rowwise kernel, sm89+, takes); fnuz formats only on ROCm. Other devices: no.
    """
    if not hasattr(torch, "_scaled_mm"):
        return False
    if a.dtype in _FNUZ or b.dtype in _FNUZ:
        return a.device.type == "cuda" and torch.version.hip is not None
    if a.device.type == "cpu":
        return True
    if a.device.type == "cuda":
        dims_ok = a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0
        if rowwise:
            e4m3 = a.dtype == b.dtype == torch.float8_e4m3fn
            return dims_ok and e4m3 and out_dtype == torch.bfloat16
        return dims_ok and not (a.dtype in _E5M2 and b.dtype in _E5M2)
    return False


def _pad_to(t: torch.Tensor, dim: int, multiple: int = 16) -> torch.Tensor:
    """Row-major ``t`` zero-padded at the end of ``dim`` to a multiple of ``multiple``."""
    extra = -t.shape[dim] % multiple
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    zeros = torch.zeros(shape, dtype=torch.float32, device=t.device).to(t.dtype)
    return torch.cat([t, zeros], dim=dim)


def scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    inv_a: torch.Tensor,
    inv_b: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    emulate: bool = False,
    pad: bool = False,
) -> torch.Tensor:
    """out = (a · b) * inv_a * inv_b for fp8 ``a`` (M, K) and ``b`` (K, N), float32 accumulation.

    Uses ``torch._scaled_mm`` (``a`` made row-major, ``b`` column-major, as cuBLAS wants)
    unless ``emulate`` is set or it refuses the operands; then computes
    ``(a.float() @ b.float()) * (inv_a * inv_b)`` in float32, cast to ``out_dtype``.
    With ``pad`` (``Float8Config.pad_inner_dim``), K and N are zero-padded to multiples of
    16 for ``torch._scaled_mm`` and the result sliced back to N columns.

    Example:
        >>> a = torch.tensor([[1.0, 2.0]]).to(torch.float8_e4m3fn)
        >>> b = torch.tensor([[3.0], [4.0]]).to(torch.float8_e4m3fn)
        >>> scaled_mm(a, b, torch.tensor(0.5), torch.tensor(1.0), torch.float32)
        tensor([[5.5000]])
    """
    a = a.contiguous()
    b = b.t().contiguous().t()
    rowwise = inv_a.dim() > 0 or inv_b.dim() > 0
    if rowwise:  # torch._scaled_mm wants both scales 2-D then, (M, 1) and (1, N)
        inv_a = inv_a.reshape(-1, 1).expand(a.shape[0], 1).contiguous()
        inv_b = inv_b.reshape(1, -1).expand(1, b.shape[1]).contiguous()
    accepts = functools.partial(_scaled_mm_accepts, rowwise=rowwise, out_dtype=out_dtype)
    if not emulate and pad:
        n = b.shape[1]
        a_pad = _pad_to(a, 1)
        b_pad = _pad_to(_pad_to(b.t().contiguous(), 1), 0).t()  # (K', N') column-major
        if rowwise:
            extra = b_pad.shape[1] - n
            inv_b = torch.cat([inv_b, inv_b.new_ones(1, extra)], dim=1) if extra else inv_b
        if accepts(a_pad, b_pad):
            out = torch._scaled_mm(a_pad, b_pad, scale_a=inv_a, scale_b=inv_b, out_dtype=out_dtype)
            return out[:, :n]
    elif not emulate and accepts(a, b):
        return torch._scaled_mm(a, b, scale_a=inv_a, scale_b=inv_b, out_dtype=out_dtype)
    out = torch.mm(a.to(torch.float32), b.to(torch.float32))
    if rowwise:
        return out.mul_(inv_a).mul_(inv_b[:, : out.shape[1]]).to(out_dtype)
    return out.mul_(inv_a * inv_b).to(out_dtype)
