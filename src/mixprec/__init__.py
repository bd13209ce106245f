"""mixprec: mixed-precision training for PyTorch.

Number formats, training recipes, loss scaling, fp8 Linear layers, a memory planner, a
numerics monitor and a benchmark, behind one small API (see docs/design.md).
"""

from mixprec import float8, memory, numerics
from mixprec.formats import (
    FORMATS,
    FloatFormat,
    decode,
    explain,
    get_format,
    quantize,
    to_torch_dtype,
)
from mixprec.precision import Precision, StepResult
from mixprec.recipes import RECIPES, Recipe, get_recipe, recipe_names
from mixprec.scaling import GradScaler, LossScaler

__version__ = "0.1.0"

__all__ = [
    # number formats
    "FORMATS",
    "FloatFormat",
    "decode",
    "explain",
    "get_format",
    "quantize",
    "to_torch_dtype",
    # recipes
    "RECIPES",
    "Recipe",
    "get_recipe",
    "recipe_names",
    # training engine
    "Precision",
    "StepResult",
    # loss scaling
    "GradScaler",
    "LossScaler",
    # fp8 training (subpackage)
    "float8",
    # memory planner (subpackage)
    "memory",
    # numerics monitor (subpackage)
    "numerics",
]
