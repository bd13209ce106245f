"""FP8 training: ``Float8Linear`` with tensorwise, rowwise or MX scales.

Where MX products run on hardware and where they are emulated: :func:`mx_scaled_mm_support`.

Example:
    >>> import torch, mixprec as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
    ...                             torch.nn.Linear(64, 64))
    >>> report = mp.float8.convert_to_float8(model, config=mp.float8.Float8Config())
    >>> report.converted
    ('0', '2')
"""

from mixprec.float8.config import (
    FP8_FORMATS,
    GEMMS,
    GRANULARITIES,
    RECIPE_NAMES,
    Float8Config,
)
from mixprec.float8.convert import (
    Float8ConversionReport,
    LayerDecision,
    convert_to_float8,
    dims_reason,
    float8_decisions,
)
from mixprec.float8.granular import MX_BLOCK, axiswise_to_float8, mx_dequantize, mx_to_float8
from mixprec.float8.linear import (
    STATE_NAMES,
    Float8Conv1D,
    Float8Linear,
    scaled_mm,
    without_float8_state,
)
from mixprec.float8.mx_gemm import mx_scaled_mm_support
from mixprec.float8.scaling import (
    amax_to_scale,
    cast_to_float8,
    hp_tensor_and_scale_to_float8,
    inverse_scale,
    tensor_to_amax,
    tensor_to_finite_amax,
    update_delayed_scale,
)

__all__ = [
    "FP8_FORMATS",
    "GEMMS",
    "GRANULARITIES",
    "MX_BLOCK",
    "RECIPE_NAMES",
    "Float8Config",
    "Float8ConversionReport",
    "Float8Conv1D",
    "Float8Linear",
    "LayerDecision",
    "STATE_NAMES",
    "amax_to_scale",
    "axiswise_to_float8",
    "cast_to_float8",
    "convert_to_float8",
    "dims_reason",
    "float8_decisions",
    "hp_tensor_and_scale_to_float8",
    "inverse_scale",
    "mx_dequantize",
    "mx_scaled_mm_support",
    "mx_to_float8",
    "scaled_mm",
    "tensor_to_amax",
    "tensor_to_finite_amax",
    "update_delayed_scale",
    "without_float8_state",
]
