"""``Float8Linear``: an ``nn.Linear`` whose three matrix products run on fp8 operands.

For ``y = x·Wᵀ + b`` with x of shape (M, K) and W of shape (N, K)::

    output      (M, N) = x_fp8      · W_fp8ᵀ      forward_format x forward_format
    grad_input  (M, K) = g_fp8      · W_fp8       backward_format x forward_format
    grad_weight (N, K) = g_fp8ᵀ     · x_fp8       backward_format x forward_format

Each operand is cast with its own per-tensor scale (see :mod:`mixprec.float8.scaling`;
rowwise and MX scales: :mod:`mixprec.float8.granular_linear`);
each product is ``(a_fp8 · b_fp8) * inv_scale_a * inv_scale_b``, accumulated in float32.
It runs through ``torch._scaled_mm`` (``Float8Config.backend``; where it refuses the
operands, e.g. e5m2 x e5m2 or dimensions not multiples of 16 on CUDA) or through an
emulation that computes the same quantity: the fp8 values upcast to float32 (exact),
a float32 matmul, then the product of the inverse scales. The two differ only by float32
accumulation order.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from mixprec.float8.config import Float8Config
from mixprec.float8.gemm import scaled_mm
from mixprec.float8.granular_linear import GranularLinearFn
from mixprec.float8.scaling import (
    cast_to_float8,
    hp_tensor_and_scale_to_float8,
    inverse_scale,
)

__all__ = [
    "ROLES",
    "STATE_NAMES",
    "Float8Conv1D",
    "Float8Linear",
    "scaled_mm",
    "without_float8_state",
]

ROLES = ("input", "weight", "grad_output")
"""The three tensors that get an fp8 scale; each has ``<role>_amax_history`` and
``<role>_scale`` buffers."""
STATE_NAMES = tuple(role + suffix for role in ROLES for suffix in ("_amax_history", "_scale"))
"""Names of the six scaling buffers of a Float8Linear (in ``state_dict`` under delayed
scaling only)."""


def without_float8_state(state_dict: dict) -> dict:
    """``state_dict`` without fp8 scaling buffers: what the plain (unconverted) model loads.

    Needed only for checkpoints of delayed-scaling models (current scaling keeps its state
    out of ``state_dict``).

    Example:
        >>> layer = Float8Linear(16, 16, config=Float8Config(scaling="delayed"))
        >>> sorted(without_float8_state(layer.state_dict()))
        ['bias', 'weight']
    """
    return {k: v for k, v in state_dict.items() if k.rpartition(".")[2] not in STATE_NAMES}


class _Float8LinearFn(torch.autograd.Function):
    """out = x·Wᵀ with fp8 operands; backward computes grad_input and grad_weight in fp8."""

    @staticmethod
    def forward(ctx, x, weight, state, module, out_dtype):  # x: (M, K), weight: (N, K)
        cfg: Float8Config = module.config
        update = module.training
        fwd8 = cfg.forward_dtype
        emulate = ctx.emulate = not cfg.use_scaled_mm(x.device)
        ctx.pad = cfg.pad_inner_dim
        kw = {
            "scaling": cfg.scaling,
            "reduce": cfg.history_reduce,
            "margin": cfg.margin,
            "power_of_two": cfg.power_of_two_scale,
            "update": update,
        }
        x8, sx = cast_to_float8(x, state[0], state[1], fwd8, **kw)
        if hasattr(weight, "float8_data_and_scale"):
            # Already fp8: FSDP2 all-gathered it in fp8 with the scale of the global amax
            # (mixprec.distributed.fp8_all_gather); the scale buffer records what was used.
            w8, sw = weight.float8_data_and_scale(fwd8)
            if update:
                state[3].copy_(sw)
        else:
            w8, sw = cast_to_float8(weight, state[2], state[3], fwd8, **kw)
        if "output" in cfg.gemms:
            out = scaled_mm(
                x8,
                w8.t(),
                inverse_scale(sx),
                inverse_scale(sw),
                out_dtype,
                emulate=emulate,
                pad=ctx.pad,
            )  # (M, N)
        else:
            out = torch.mm(x.to(out_dtype), weight.to(out_dtype).t())
        fp8_grads = [g in cfg.gemms for g in ("grad_input", "grad_weight")]
        # Keep the fp8 copy of x for an fp8 grad_weight GEMM (1 byte an element), else x.
        # W: the Parameter itself (held by autograd anyway) when the grad_input GEMM is in
        # high precision or the cast is recomputed in backward, else its fp8 copy (N·K bytes).
        ctx.recompute_w = fp8_grads[0] and cfg.recompute_weight_cast
        ctx.save_for_backward(
            x8 if fp8_grads[1] else x,
            w8 if fp8_grads[0] and not ctx.recompute_w else weight,
            sx,
            sw,
        )
        # The grad_output state is updated in place by every backward, so it is held as a
        # plain attribute: saved tensors would trip autograd's version check when the layer
        # runs twice before one backward (shared weights, two micro-batches summed).
        ctx.g_state = (state[4], state[5])
        ctx.kw, ctx.cfg, ctx.fp8_grads = kw, cfg, fp8_grads
        ctx.x_dtype, ctx.w_dtype, ctx.out_dtype = x.dtype, weight.dtype, out_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (M, N)
        x_saved, w_saved, sx, sw = ctx.saved_tensors
        g_hist, g_scale = ctx.g_state
        cfg: Float8Config = ctx.cfg
        with torch.autocast(grad_out.device.type, enabled=False):
            g8, sg = cast_to_float8(grad_out, g_hist, g_scale, cfg.backward_dtype, **ctx.kw)
            grad_x = grad_w = None
            if ctx.needs_input_grad[0]:
                if ctx.recompute_w:  # the forward's scale, so the same bits as in forward
                    w_saved = hp_tensor_and_scale_to_float8(w_saved, sw, cfg.forward_dtype)
                if ctx.fp8_grads[0]:
                    grad_x = scaled_mm(
                        g8,
                        w_saved,
                        inverse_scale(sg),
                        inverse_scale(sw),
                        ctx.x_dtype,
                        emulate=ctx.emulate,
                        pad=ctx.pad,
                    )  # (M, K)
                else:
                    grad_x = torch.mm(grad_out.to(ctx.out_dtype), w_saved.to(ctx.out_dtype))
                    grad_x = grad_x.to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                if ctx.fp8_grads[1]:
                    grad_w = scaled_mm(
                        g8.t(),
                        x_saved,
                        inverse_scale(sg),
                        inverse_scale(sx),
                        ctx.w_dtype,
                        emulate=ctx.emulate,
                        pad=ctx.pad,
                    )  # (N, K)
                else:
                    grad_w = torch.mm(grad_out.to(ctx.out_dtype).t(), x_saved.to(ctx.out_dtype))
                    grad_w = grad_w.to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None


class Float8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` whose matrix products use fp8 operands with per-tensor scales.

    Parameters stay in their high-precision dtype (the optimizer never sees fp8); each
    forward casts x and W to ``config.forward_format`` and each backward casts the output
    gradient to ``config.backward_format``. The scaling state is six buffers,
    ``{input,weight,grad_output}_amax_history`` (length ``history_len`` for delayed
    scaling, 1 for current) and ``{input,weight,grad_output}_scale``. They are in
    ``state_dict`` under delayed scaling only: a current-scaling layer has the same
    ``state_dict`` as the ``nn.Linear`` it replaces, so checkpoints load both ways with
    ``strict=True``. A delayed-scaling layer loads a checkpoint without the state (from a
    plain model) by starting fresh, with a warning; :func:`without_float8_state` strips
    the state for the way back.

    A weight that arrives already in fp8, one with a ``float8_data_and_scale(fp8_dtype)``
    method returning ``(data, scale)`` (FSDP2's fp8 all-gather,
    :mod:`mixprec.distributed.fp8_all_gather`), is used as it is; ``weight_scale`` then
    records the scale it came with.

    The state advances only in training mode (``module.training``): eval mode, with or
    without ``torch.no_grad``, reads it and leaves it unchanged. Every forward in training
    mode advances it, so activation recomputation advances it twice.

    Output dtype: the autocast dtype when autocast is enabled for x's device (bf16 under
    ``torch.autocast("cpu"|"cuda", torch.bfloat16)``, like ``nn.Linear``), otherwise x's
    dtype. grad_input has x's dtype, grad_weight the weight's dtype. The bias is added in
    the output dtype after the product.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        config: :class:`Float8Config` (default ``Float8Config()``).

    Example:
        >>> layer = Float8Linear(32, 16)
        >>> layer(torch.randn(4, 32)).shape
        torch.Size([4, 16])
        >>> sorted(layer.state_dict()) == sorted(nn.Linear(32, 16).state_dict())
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: Float8Config | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config = config if config is not None else Float8Config()
        _ = (self.config.forward_dtype, self.config.backward_dtype)  # no fp8 dtype: fail now
        n = self.config.state_len
        # Current scaling recomputes every scale from this step's tensors: its buffers are
        # metadata, kept out of state_dict so that checkpoints move between a plain model
        # and its fp8 twin with strict=True. Delayed scaling's history is training state.
        persistent = self.config.scaling == "delayed"
        for role in ROLES:
            hist = torch.zeros(n, dtype=torch.float32, device=self.weight.device)
            self.register_buffer(f"{role}_amax_history", hist, persistent=persistent)
            scale = torch.ones((), device=self.weight.device)
            self.register_buffer(f"{role}_scale", scale, persistent=persistent)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Float8Config | None = None) -> Float8Linear:
        """A Float8Linear sharing ``linear``'s weight and bias Parameters (same objects, so an
        optimizer built before the swap keeps working).

        Example:
            >>> lin = nn.Linear(16, 16)
            >>> Float8Linear.from_linear(lin).weight is lin.weight
            True
        """
        with torch.device("meta"):
            new = cls(
                linear.in_features, linear.out_features, bias=linear.bias is not None, config=config
            )
        new.weight = linear.weight
        new.bias = linear.bias
        new._fresh_state(linear.weight.device)
        new.train(linear.training)
        return new

    def _fresh_state(self, device: torch.device) -> None:
        """Scaling buffers on ``device`` as a new layer has them (histories 0, scales 1)."""
        for role in ROLES:
            for suffix in ("_amax_history", "_scale"):
                name = role + suffix
                setattr(self, name, torch.zeros_like(getattr(self, name), device=device))
            getattr(self, f"{role}_scale").fill_(1.0)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        # A plain nn.Linear's checkpoint (no scaling state) loads with strict=True: delayed
        # scaling then starts fresh, and says so. A checkpoint's delayed-scaling state is
        # dropped, with a warning, by a current-scaling layer (which has no use for it).
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        names = [prefix + name for name in STATE_NAMES]
        present = [n for n in names if n in state_dict]
        if self.config.scaling == "delayed" and len(present) < len(names):
            if present:
                errors.append(
                    f"{prefix or 'Float8Linear'}: the checkpoint has only part of the "
                    f"delayed-scaling state ({', '.join(present)}); give all six buffers or none"
                )
                return
            for n in names:
                if n in missing_keys:
                    missing_keys.remove(n)
            self._fresh_state(self.weight.device)
            warnings.warn(
                f"{prefix.rstrip('.') or 'Float8Linear'}: the checkpoint has no fp8 scaling state "
                "(saved from a plain model?); delayed scaling starts fresh",
                UserWarning,
                stacklevel=2,
            )
        elif self.config.scaling != "delayed" and present:
            for n in present:
                if n in unexpected_keys:
                    unexpected_keys.remove(n)
            warnings.warn(
                f"{prefix.rstrip('.') or 'Float8Linear'}: ignoring the checkpoint's "
                f"delayed-scaling state, this layer uses {self.config.scaling} scaling",
                UserWarning,
                stacklevel=2,
            )

    def _state(self) -> tuple[torch.Tensor, ...]:
        # The scaling state stays float32 even after model.to(bf16) / a recipe's cast of
        # every floating buffer: a bf16 scale or amax would lose precision step after step.
        for role in ROLES:
            for suffix in ("_amax_history", "_scale"):
                buf = getattr(self, role + suffix)
                if buf.dtype != torch.float32:
                    setattr(self, role + suffix, buf.to(torch.float32))
        return tuple(
            getattr(self, role + suffix) for role in ROLES for suffix in ("_amax_history", "_scale")
        )

    def _weight_nk(self) -> torch.Tensor:
        """The weight as (N, K) = (out_features, in_features); a view, so grads flow back."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            out_dtype = torch.get_autocast_dtype(device_type)
        else:
            out_dtype = x.dtype
        lead = x.shape[:-1]
        fn = _Float8LinearFn if self.config.granularity == "tensorwise" else GranularLinearFn
        with torch.autocast(device_type, enabled=False):
            out = fn.apply(
                x.reshape(-1, self.in_features), self._weight_nk(), self._state(), self, out_dtype
            )
            if self.bias is not None:
                out = out + self.bias.to(out_dtype)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{super().extra_repr()}, scaling={c.scaling}, granularity={c.granularity}, "
            f"formats={c.forward_format}/{c.backward_format}"
        )


class Float8Conv1D(Float8Linear):
    """fp8 twin of Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's Linear).

    ``Conv1D(nf, nx)`` computes ``y = x·W + b`` with its weight stored as (in, out) =
    (nx, nf), the transpose of ``nn.Linear``'s. This layer keeps that Parameter (same
    object, same shape, same ``state_dict`` key) and hands the fp8 products its (N, K)
    view ``weight.t()``, so the numbers are those of a ``Float8Linear`` with weight
    ``W.t()`` and the gradient lands on the (in, out) Parameter transposed back.

    Example:
        >>> from transformers.pytorch_utils import Conv1D
        >>> layer = Float8Conv1D.from_conv1d(Conv1D(48, 32))
        >>> tuple(layer.weight.shape), layer(torch.randn(4, 32)).shape
        ((32, 48), torch.Size([4, 48]))
    """

    def _weight_nk(self) -> torch.Tensor:
        return self.weight.t()

    @classmethod
    def from_conv1d(cls, conv: nn.Module, config: Float8Config | None = None) -> Float8Conv1D:
        """A Float8Conv1D sharing ``conv``'s weight (in, out) and bias Parameters."""
        in_features, out_features = conv.weight.shape
        with torch.device("meta"):
            new = cls(in_features, out_features, bias=conv.bias is not None, config=config)
        new.weight = conv.weight
        new.bias = conv.bias
        new._fresh_state(conv.weight.device)
        new.train(conv.training)
        return new
