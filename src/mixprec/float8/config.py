"""Configuration of fp8 Linear layers: :class:`Float8Config`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mixprec.formats import FORMATS, to_torch_dtype

__all__ = [
    "BACKENDS",
    "FP8_FORMATS",
    "GEMMS",
    "GRANULARITIES",
    "RECIPE_NAMES",
    "Float8Config",
]

Scaling = Literal["current", "delayed"]
HistoryReduce = Literal["max", "most_recent"]
Gemm = Literal["output", "grad_input", "grad_weight"]
Backend = Literal["auto", "scaled_mm", "emulate"]
Granularity = Literal["tensorwise", "rowwise", "mx"]

_SCALINGS = ("current", "delayed")
_REDUCES = ("max", "most_recent")
BACKENDS: tuple[str, ...] = ("auto", "scaled_mm", "emulate")
GRANULARITIES: tuple[str, ...] = ("tensorwise", "rowwise", "mx")
RECIPE_NAMES: tuple[str, ...] = ("tensorwise", "rowwise", "rowwise_with_gw_hp", "mxfp8")
GEMMS: tuple[str, ...] = ("output", "grad_input", "grad_weight")
"""The three matrix products of a Linear layer: output = x·Wᵀ, grad_input = grad_out·W,
grad_weight = grad_outᵀ·x."""

# The fp8 formats an fp8 layer may cast to: the signed 8-bit formats of the registry
# (e8m0fnu, unsigned, is only a scale format). Their torch dtypes come from
# mixprec.formats.to_torch_dtype, the one format -> dtype lookup.
FP8_FORMATS: tuple[str, ...] = tuple(
    name for name, f in FORMATS.items() if f.bits == 8 and f.signed
)


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


@dataclass(frozen=True, slots=True)
class Float8Config:
    """How :class:`~mixprec.float8.Float8Linear` casts its matrix-product operands to fp8.

    Args:
        scaling: ``"current"`` (also called dynamic or tensorwise): each tensor's scale comes
            from its own amax in this step; always in range, costs one reduction per
            tensor. ``"delayed"``: the scale comes from a history of past amaxes (see
            :func:`mixprec.float8.scaling.update_delayed_scale`), so the cast needs no
            reduction before it; a sudden growth saturates. Default ``"current"``: it is
            the more robust one and the one torchao recommends.
        forward_format: fp8 format of the input x and the weight W. Default
            ``"fp8_e4m3fn"``: activations and weights need precision (3 mantissa bits)
            more than range.
        backward_format: fp8 format of the output gradient. Default ``"fp8_e5m2"``:
            gradients span many binades and need range (5 exponent bits) more than
            precision. The grad GEMMs then multiply e5m2 by e4m3, a pair cuBLAS accepts
            (it refuses e5m2 x e5m2).
        history_len: amax history length for delayed scaling. Default 16, as in
            TransformerEngine and torchao: long enough to ride over one-step spikes,
            short enough to follow a trend.
        history_reduce: how the history becomes one amax: ``"max"`` (default, the safe
            choice: the scale covers every recent amax) or ``"most_recent"``.
        margin: scale = fmt_max / amax / 2**margin. Default 0: saturating casts already
            handle a rare overflow, and every unit of margin costs one binade of range
            at the small end.
        power_of_two_scale: round each scale down to a power of two, so that scaling is
            exact (only the exponent changes). Default False (a finer scale uses the
            format's range fully).
        gemms: which of ``"output"``, ``"grad_input"``, ``"grad_weight"`` run in fp8; the
            others run in the high-precision dtype. Default all three.
        backend: how the fp8 products are computed. ``"scaled_mm"``: ``torch._scaled_mm``
            wherever it accepts the operands (emulation where it refuses them).
            ``"emulate"``: always the emulation (fp8 values upcast to float32, float32
            matmul, times the inverse scales): the same numbers up to float32 summation
            order. ``"auto"`` (default): ``"scaled_mm"`` on CUDA, ``"emulate"`` elsewhere,
            because torch's CPU ``_scaled_mm`` is a reference kernel (about 0.1 GFLOP/s
            measured on this project's CPU, against tens of GFLOP/s for the float32 matmul
            of the emulation).
        pad_inner_dim: convert layers whose in_features or out_features is not a multiple
            of 16 (otherwise skipped) and zero-pad the operands of each ``torch._scaled_mm``
            call to multiples of 16 (the result is sliced back; zeros add nothing to a
            product, so the numbers are unchanged). Costs a padded copy of each fp8
            operand per product. Default False, as torchao's ``pad_inner_dim``.
        granularity: how many scales a tensor gets. ``"tensorwise"`` (default): one.
            ``"rowwise"``: one per row of each GEMM's left operand and per column of its
            right one (torchao's axiswise scaling; an outlier row no longer costs the
            other rows their precision); ``torch._scaled_mm`` takes the row/column scales
            (CUDA: e4m3fn operands, sm89+). ``"mx"``: MXFP8, one power-of-two E8M0 scale
            per 32 elements along the summed dimension (OCP Microscaling): the
            block-scaled ``torch._scaled_mm`` where it runs (CUDA capability 10.0+, torch
            >= 2.7, e4m3fn operands; :func:`~mixprec.float8.mx_scaled_mm_support`), else
            emulated under ``backend="auto"`` (CPU, Hopper) and a RuntimeError naming the
            device under ``backend="scaled_mm"``.
            rowwise and mx need ``scaling="current"``. See
            :mod:`mixprec.float8.granular_linear`.
        recompute_weight_cast: in backward, cast the saved high-precision weight to fp8
            again (with the forward's scale, so bit-identical) instead of saving the fp8
            copy of W from forward. The weight is a Parameter that autograd holds anyway,
            so recomputing saves N·K bytes per forward not yet backpropagated (each
            micro-batch of gradient accumulation, each pipeline stage in flight) for one
            more cast in backward. Default True: torchao saves the high-precision weight
            and casts it again in backward.

    Example:
        >>> cfg = Float8Config(scaling="delayed", history_reduce="most_recent")
        >>> cfg.forward_dtype, cfg.backward_dtype
        (torch.float8_e4m3fn, torch.float8_e5m2)
        >>> Float8Config(scaling="sometimes")
        Traceback (most recent call last):
        ValueError: scaling='sometimes' is not one of 'current', 'delayed'
    """

    scaling: Scaling = "current"
    forward_format: str = "fp8_e4m3fn"
    backward_format: str = "fp8_e5m2"
    history_len: int = 16
    history_reduce: HistoryReduce = "max"
    margin: int = 0
    power_of_two_scale: bool = False
    gemms: tuple[Gemm, ...] = GEMMS
    backend: Backend = "auto"
    pad_inner_dim: bool = False
    granularity: Granularity = "tensorwise"
    recompute_weight_cast: bool = True

    def __post_init__(self) -> None:
        if self.scaling not in _SCALINGS:
            raise ValueError(f"scaling={self.scaling!r} is not one of {_choices(_SCALINGS)}")
        for field in ("forward_format", "backward_format"):
            value = getattr(self, field)
            if value not in FP8_FORMATS:
                raise ValueError(f"{field}={value!r} is not one of {_choices(FP8_FORMATS)}")
        if isinstance(self.history_len, bool) or not isinstance(self.history_len, int):
            raise ValueError(f"history_len={self.history_len!r} must be a positive int")
        if self.history_len < 1:
            raise ValueError(f"history_len={self.history_len!r} must be a positive int")
        if self.history_reduce not in _REDUCES:
            raise ValueError(
                f"history_reduce={self.history_reduce!r} is not one of {_choices(_REDUCES)}"
            )
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"margin={self.margin!r} must be a non-negative int")
        if not isinstance(self.gemms, tuple):
            raise ValueError(f"gemms={self.gemms!r} must be a tuple drawn from {_choices(GEMMS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {_choices(BACKENDS)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity={self.granularity!r} is not one of {_choices(GRANULARITIES)}"
            )
        if self.granularity != "tensorwise" and self.scaling != "current":
            raise ValueError(
                f"granularity={self.granularity!r} needs scaling='current' (got "
                f"{self.scaling!r}): delayed scaling keeps one amax history per tensor"
            )
        for field in ("pad_inner_dim", "recompute_weight_cast", "power_of_two_scale"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field}={getattr(self, field)!r} must be True or False")
        for gemm in self.gemms:
            if gemm not in GEMMS:
                raise ValueError(f"gemms contains {gemm!r}, not one of {_choices(GEMMS)}")

    @classmethod
    def from_recipe_name(cls, name: str, **overrides) -> Float8Config:
        """The named configurations of torchao's ``Float8LinearConfig.from_recipe_name``, and MX.

        ``"tensorwise"``: the default. ``"rowwise"``: rowwise scales rounded down to powers
        of two, every operand in e4m3fn (as torchao: rowwise scales leave gradients
        enough range).
        ``"rowwise_with_gw_hp"``: rowwise, with the grad_weight GEMM in high precision
        (torchao's recommendation for stability at scale). ``"mxfp8"``: MX blocks, e4m3fn.

        Example:
            >>> Float8Config.from_recipe_name("rowwise_with_gw_hp").gemms
            ('output', 'grad_input')
        """
        table = {
            "tensorwise": {},
            "rowwise": {
                "granularity": "rowwise",
                "backward_format": "fp8_e4m3fn",
                "power_of_two_scale": True,
            },
            "rowwise_with_gw_hp": {
                "granularity": "rowwise",
                "backward_format": "fp8_e4m3fn",
                "power_of_two_scale": True,
                "gemms": ("output", "grad_input"),
            },
            "mxfp8": {"granularity": "mx", "backward_format": "fp8_e4m3fn"},
        }
        if name not in table:
            raise ValueError(f"recipe name {name!r} is not one of {_choices(RECIPE_NAMES)}")
        return cls(**{**table[name], **overrides})

    @property
    def forward_dtype(self) -> torch.dtype:
        """torch dtype of x and W (RuntimeError when this torch build lacks it)."""
        return to_torch_dtype(self.forward_format)

    @property
    def backward_dtype(self) -> torch.dtype:
        """torch dtype of the output gradient (RuntimeError when this torch build lacks it)."""
        return to_torch_dtype(self.backward_format)

    def use_scaled_mm(self, device: torch.device) -> bool:
        """Whether products on ``device`` go through ``torch._scaled_mm`` (see ``backend``)."""
        if self.backend == "auto":
            return device.type == "cuda"
        return self.backend == "scaled_mm"

    @property
    def state_len(self) -> int:
        """Length of each amax-history buffer: ``history_len`` when delayed, else 1."""
        return self.history_len if self.scaling == "delayed" else 1
