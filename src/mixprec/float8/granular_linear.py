"""The three GEMMs of ``Float8Linear`` with rowwise or MX scales (``Float8Config.granularity``).

For ``y = x·Wᵀ`` with x (M, K), W (N, K) and grad_out g (M, N), each operand is scaled
along the dimension its GEMM does *not* sum over (rowwise) or in blocks of 32 along the
one it does (MX), so each GEMM casts its own copies::

    GEMM          product          summed   rowwise scales          MX blocks along
    output        x · Wᵀ           K        x (M, 1), W (N, 1)      K of x and of W
    grad_input    g · W            N        g (M, 1), W (1, K)      N of g and of W
    grad_weight   gᵀ · x           M        g (1, N), x (1, K)      M of g and of x

A GEMM not in ``Float8Config.gemms`` runs in high precision (torchao's "rowwise with
high-precision grad_weight" recipe is ``granularity="rowwise"`` with
``gemms=("output", "grad_input")``). Because the backward casts differ from the forward
ones, x and W are saved in high precision (as torchao does for rowwise scaling), and the
scaling buffers of the layer hold only metadata: the tensor-wide amax of the last step
and its tensorwise scale, for the numerics report.
"""

from __future__ import annotations

import functools

import torch

from mixprec.float8.config import Float8Config
from mixprec.float8.gemm import scaled_mm
from mixprec.float8.granular import axiswise_to_float8, mx_dequantize, mx_to_float8
from mixprec.float8.mx_gemm import mx_scaled_mm, mx_scaled_mm_support
from mixprec.float8.scaling import amax_to_scale, tensor_to_finite_amax

__all__ = ["granular_gemm"]


def granular_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_dtype: torch.dtype,
    b_dtype: torch.dtype,
    cfg: Float8Config,
    out_dtype: torch.dtype,
    *,
    emulate: bool,
) -> torch.Tensor:
    """a (M, K) · b (K, N) with fp8 operands scaled per ``cfg.granularity``, float32 sums.

    rowwise: ``(a8 · b8) * inv_a (M, 1) * inv_b (1, N)`` through ``torch._scaled_mm``
    (row and column scales) unless ``emulate``. MX: the block-scaled ``torch._scaled_mm``
    where :func:`~mixprec.float8.mx_gemm.mx_scaled_mm_support` says it runs (see
    :func:`_mx_on_tensor_cores`), else emulated: the float32 decoded operands multiplied
    in float32 (see :mod:`mixprec.float8.granular`). Both compute the same quantity.
    """
    if cfg.granularity == "rowwise":
        kw = {"margin": cfg.margin, "power_of_two": cfg.power_of_two_scale}
        a8, sa = axiswise_to_float8(a, -1, a_dtype, **kw)  # (M, 1)
        b8, sb = axiswise_to_float8(b, 0, b_dtype, **kw)  # (1, N)
        return scaled_mm(
            a8, b8, 1.0 / sa, 1.0 / sb, out_dtype, emulate=emulate, pad=cfg.pad_inner_dim
        )
    qa, xa = mx_to_float8(a, -1, a_dtype)
    qb, xb = mx_to_float8(b, 0, b_dtype)
    if _mx_on_tensor_cores(a.device, a_dtype, b_dtype, cfg.backend):
        return mx_scaled_mm(qa, xa, qb, xb, out_dtype)
    out = torch.mm(mx_dequantize(qa, xa, -1), mx_dequantize(qb, xb, 0))
    return out.to(out_dtype)


@functools.lru_cache(maxsize=64)
def _mx_support(device: torch.device, a_dtype: torch.dtype, b_dtype: torch.dtype):
    return mx_scaled_mm_support(device, a_dtype, b_dtype)


def _mx_on_tensor_cores(device: torch.device, a_dtype, b_dtype, backend: str) -> bool:
    """Whether an MX product on ``device`` runs the block-scaled ``torch._scaled_mm``.

    ``backend="emulate"``: never. ``"auto"``: on CUDA where the kernel runs (Blackwell),
    emulated elsewhere (CPU, Hopper), as documented. ``"scaled_mm"``: an explicit request
    for the kernel, so a device without it is a RuntimeError naming the device and why,
    never a silent emulation.
    """
    if backend == "emulate" or (backend == "auto" and device.type != "cuda"):
        return False
    ok, reason = _mx_support(device, a_dtype, b_dtype)
    if not ok and backend == "scaled_mm":
        raise RuntimeError(
            f"Float8Config(granularity='mx', backend='scaled_mm') asks for the block-scaled "
            f"torch._scaled_mm, which is not available here: {reason}. Use backend='auto' "
            "(MX emulated where the kernel is missing) or backend='emulate'"
        )
    return ok


def _record(hist: torch.Tensor, scale: torch.Tensor, t: torch.Tensor, dtype, cfg) -> None:
    """Metadata for the report: the tensor's finite amax and its tensorwise scale."""
    amax, finite = tensor_to_finite_amax(t)
    hist[0] = torch.where(finite, amax, hist[0])
    new = amax_to_scale(amax, dtype, margin=cfg.margin, previous_scale=scale)
    scale.copy_(torch.where(finite, new, scale))


class GranularLinearFn(torch.autograd.Function):
    """out = x·Wᵀ with rowwise- or MX-scaled fp8 operands in all three GEMMs."""

    @staticmethod
    def forward(ctx, x, weight, state, module, out_dtype):  # x: (M, K), weight: (N, K)
        cfg: Float8Config = module.config
        fwd8, emulate = cfg.forward_dtype, not cfg.use_scaled_mm(x.device)
        if module.training:
            _record(state[0], state[1], x, fwd8, cfg)
            _record(state[2], state[3], weight, fwd8, cfg)
        if "output" in cfg.gemms:
            out = granular_gemm(x, weight.t(), fwd8, fwd8, cfg, out_dtype, emulate=emulate)
        else:
            out = torch.mm(x.to(out_dtype), weight.to(out_dtype).t())
        ctx.save_for_backward(x, weight)
        ctx.g_state = (state[4], state[5]) if module.training else None
        ctx.cfg, ctx.emulate, ctx.out_dtype = cfg, emulate, out_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (M, N)
        x, weight = ctx.saved_tensors
        cfg: Float8Config = ctx.cfg
        fwd8, bwd8 = cfg.forward_dtype, cfg.backward_dtype
        grad_x = grad_w = None
        with torch.autocast(grad_out.device.type, enabled=False):
            if ctx.g_state is not None:
                _record(*ctx.g_state, grad_out, bwd8, cfg)
            if ctx.needs_input_grad[0]:
                if "grad_input" in cfg.gemms:
                    grad_x = granular_gemm(
                        grad_out, weight, bwd8, fwd8, cfg, x.dtype, emulate=ctx.emulate
                    )  # (M, K)
                else:
                    hp = ctx.out_dtype
                    grad_x = torch.mm(grad_out.to(hp), weight.to(hp)).to(x.dtype)
            if ctx.needs_input_grad[1]:
                if "grad_weight" in cfg.gemms:
                    grad_w = granular_gemm(
                        grad_out.t(), x, bwd8, fwd8, cfg, weight.dtype, emulate=ctx.emulate
                    )  # (N, K)
                else:
                    hp = ctx.out_dtype
                    grad_w = torch.mm(grad_out.to(hp).t(), x.to(hp)).to(weight.dtype)
        return grad_x, grad_w, None, None, None
