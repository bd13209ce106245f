"""Recipes: where each piece of training state lives, and in which number format.

A :class:`Recipe` is a frozen description; :class:`mixprec.Precision` carries it out.
The built-in recipes (``RECIPES``) follow the recipe table of README.md:

=============  ======  ===========  ======  ======  ============
recipe         params  compute      master  grads   loss scaling
=============  ======  ===========  ======  ======  ============
fp32           fp32    fp32         --      fp32    none
tf32           fp32    tf32 (GPU)   --      fp32    none
fp16-mixed     fp32    fp16         --      fp32    dynamic
bf16-mixed     fp32    bf16         --      fp32    none
fp16-master    fp16    fp16         fp32    fp16    dynamic
bf16-master    bf16    bf16         fp32    fp32    none
bf16-true      bf16    bf16         --      bf16    none (Kahan)
fp8-mixed      fp32    bf16 + fp8   --      fp32    none
=============  ======  ===========  ======  ======  ============

``str(recipe)`` gives a string that :func:`get_recipe` reads back: the name of a built-in
recipe when the recipe equals it, otherwise ``key=value`` pairs, e.g.
``"params=bf16,compute=bf16,master=fp32,grads=fp32,update=plain"``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from mixprec.formats import get_format, to_torch_dtype
from mixprec.formats.names import unknown
from mixprec.scaling.rules import PRESETS_NAMES

__all__ = ["RECIPES", "Recipe", "get_recipe", "recipe_names"]

LossScaling = Literal["none", "static", "dynamic"]
Update = Literal["plain", "kahan", "stochastic"]
Fp8Scaling = Literal["off", "current", "delayed"]

# The dtypes a recipe may place state in; their names come from the format registry.
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = tuple(get_format(d).name for d in _STATE_DTYPES)
_LOSS_SCALINGS = ("none", "static", "dynamic")
_UPDATES = ("plain", "kahan", "stochastic")
_FP8_SCALINGS = ("off", "current", "delayed")


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


@dataclass(frozen=True, slots=True)
class Recipe:
    """Where each piece of training state lives.

    Args:
        name: label shown in tables; the registry key for built-in recipes.
        param_dtype: dtype the model's parameters are stored in.
        compute_dtype: autocast dtype for the forward pass, or ``None`` for no autocast.
        master_dtype: dtype of the optimizer's master copy of the parameters, or ``None``
            when the optimizer steps the model's own parameters.
        grad_dtype: dtype gradients have when the optimizer reads them.
        keep_norms_fp32: normalisation layers keep fp32 parameters when ``param_dtype``
            is 16-bit (they are cheap and sensitive to rounding).
        loss_scaling: ``"none"``, ``"static"`` (fixed ``static_scale``) or ``"dynamic"``.
        scaler_preset: dynamic-scaling rule to follow (see :mod:`mixprec.scaling`).
        static_scale: the fixed scale used when ``loss_scaling == "static"``.
        update: how the optimizer's update is added to low-precision parameters with no
            master copy: ``"plain"``, ``"kahan"`` (compensated summation) or
            ``"stochastic"`` (stochastic rounding).
        fp8: per-tensor scaling of fp8 Linear layers (``"current"`` or ``"delayed"``),
            or ``"off"``.
        allow_tf32: allow TF32 tensor-core math for fp32 matmuls and convolutions (GPU).

    Example:
        >>> r = get_recipe("bf16-master")
        >>> r.param_dtype, r.master_dtype
        (torch.bfloat16, torch.float32)
        >>> get_recipe(str(r)) == r
        True
    """

    name: str = dataclasses.field(compare=False)
    param_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype | None = None
    master_dtype: torch.dtype | None = None
    grad_dtype: torch.dtype = torch.float32
    keep_norms_fp32: bool = True
    loss_scaling: LossScaling = "none"
    scaler_preset: str = "torch"
    static_scale: float = 1.0
    update: Update = "plain"
    fp8: Fp8Scaling = "off"
    allow_tf32: bool = False

    def __post_init__(self) -> None:
        for field in ("param_dtype", "grad_dtype"):
            _check_dtype(field, getattr(self, field), allow_none=False)
        for field in ("compute_dtype", "master_dtype"):
            _check_dtype(field, getattr(self, field), allow_none=True)
        if self.loss_scaling not in _LOSS_SCALINGS:
            raise ValueError(
                f"loss_scaling={self.loss_scaling!r} is not one of {_choices(_LOSS_SCALINGS)}"
            )
        if self.scaler_preset not in PRESETS_NAMES:
            raise ValueError(
                f"scaler_preset={self.scaler_preset!r} is not one of {_choices(PRESETS_NAMES)}"
            )
        if not self.static_scale > 0:
            raise ValueError(f"static_scale={self.static_scale!r} must be positive")
        if self.update not in _UPDATES:
            raise ValueError(f"update={self.update!r} is not one of {_choices(_UPDATES)}")
        if self.fp8 not in _FP8_SCALINGS:
            raise ValueError(f"fp8={self.fp8!r} is not one of {_choices(_FP8_SCALINGS)}")
        if self.update != "plain" and self.master_dtype is not None:
            raise ValueError(
                f"update={self.update!r} compensates low-precision parameters that have no "
                f"master copy, but master_dtype={self.master_dtype}; use update='plain'"
            )
        if self.update != "plain" and self.param_dtype == torch.float32:
            raise ValueError(
                f"update={self.update!r} only matters for 16-bit parameters; "
                "param_dtype is fp32, use update='plain'"
            )

    # -- derived properties -------------------------------------------------------------
    @property
    def uses_autocast(self) -> bool:
        """True when the forward pass runs under ``torch.autocast``."""
        return self.compute_dtype is not None and self.compute_dtype != self.param_dtype

    @property
    def optimizer_state_dtype(self) -> torch.dtype:
        """dtype of the optimizer's states (they follow the tensor the optimizer steps)."""
        return self.master_dtype if self.master_dtype is not None else self.param_dtype

    def replace(self, **changes) -> Recipe:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- string form --------------------------------------------------------------------
    def to_string(self) -> str:
        """``key=value`` form of every field that differs from the defaults."""
        parts = []
        for key, field in _STRING_KEYS.items():
            value = getattr(self, field)
            default = _DEFAULT_FIELDS[field]
            if key == "params" or value != default:
                parts.append(f"{key}={_format_value(value)}")
        return ",".join(parts)

    def __str__(self) -> str:
        builtin = RECIPES.get(self.name)
        if builtin is not None and builtin == self:
            return self.name
        return self.to_string()


def _check_dtype(field: str, value, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if value not in _STATE_DTYPES:
        raise ValueError(
            f"{field}={value!r} is not one of {_choices(_DTYPE_NAMES)} "
            f"(torch.float32, torch.bfloat16, torch.float16)"
        )


# key in the string form -> dataclass field
_STRING_KEYS = {
    "params": "param_dtype",
    "compute": "compute_dtype",
    "master": "master_dtype",
    "grads": "grad_dtype",
    "norms_fp32": "keep_norms_fp32",
    "scaling": "loss_scaling",
    "scaler": "scaler_preset",
    "scale": "static_scale",
    "update": "update",
    "fp8": "fp8",
    "tf32": "allow_tf32",
}
_DEFAULT_FIELDS = {
    f.name: f.default for f in dataclasses.fields(Recipe) if f.name != "name"
}


def _format_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, torch.dtype):
        return get_format(value).name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse_value(key: str, text: str, source: str):
    field = _STRING_KEYS[key]
    default = _DEFAULT_FIELDS[field]
    if field in ("param_dtype", "compute_dtype", "master_dtype", "grad_dtype"):
        if text == "none" and field in ("compute_dtype", "master_dtype"):
            return None
        if text not in _DTYPE_NAMES:
            raise ValueError(
                f"{key}={text!r} in recipe {source!r} is not one of {_choices(_DTYPE_NAMES)}"
            )
        return to_torch_dtype(text)
    if isinstance(default, bool):
        if text not in ("true", "false"):
            raise ValueError(f"{key}={text!r} in recipe {source!r} must be 'true' or 'false'")
        return text == "true"
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} in recipe {source!r} is not a number") from None
    return text


def _parse(text: str) -> Recipe:
    fields: dict = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in _STRING_KEYS:
            raise ValueError(
                f"cannot read {item.strip()!r} in recipe {text!r}: expected key=value with "
                f"key one of {_choices(list(_STRING_KEYS))}"
            )
        fields[_STRING_KEYS[key]] = _parse_value(key, value.strip(), text)
    recipe = Recipe(name=text, **fields)
    # A string that spells out a built-in recipe is that recipe (and prints as its name).
    return next((builtin for builtin in RECIPES.values() if builtin == recipe), recipe)


_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("fp32"),
        Recipe("tf32", allow_tf32=True),
        Recipe("fp16-mixed", compute_dtype=_F16, loss_scaling="dynamic"),
        Recipe("bf16-mixed", compute_dtype=_BF16),
        Recipe(
            "fp16-master",
            param_dtype=_F16,
            compute_dtype=_F16,
            master_dtype=_F32,
            grad_dtype=_F16,
            loss_scaling="dynamic",
        ),
        Recipe("bf16-master", param_dtype=_BF16, compute_dtype=_BF16, master_dtype=_F32),
        Recipe(
            "bf16-true", param_dtype=_BF16, compute_dtype=_BF16, grad_dtype=_BF16, update="kahan"
        ),
        Recipe("fp8-mixed", compute_dtype=_BF16, fp8="current"),
    )
}

# Names users already know from other libraries (Lightning, Accelerate).
_ALIASES = {
    "32": "fp32",
    "32-true": "fp32",
    "16-mixed": "fp16-mixed",
    "fp16": "fp16-mixed",
    "bf16": "bf16-mixed",
    "bf16-mixed-precision": "bf16-mixed",
    "fp8": "fp8-mixed",
}


def recipe_names() -> list[str]:
    """Names of the built-in recipes, in table order: the one list of them.

    Derived from :data:`RECIPES` (the registry, where a recipe is added once); the CLI's
    help, the bench and the tests list recipes through this function.

    Example:
        >>> recipe_names()[:4]
        ['fp32', 'tf32', 'fp16-mixed', 'bf16-mixed']
    """
    return list(RECIPES)


def get_recipe(recipe: str | Recipe) -> Recipe:
    """Look up a recipe by name, alias or ``key=value`` string; pass a Recipe through.

    Raises:
        ValueError: for an unknown name, listing the recipes.

    Example:
        >>> get_recipe("bf16-mixed").compute_dtype
        torch.bfloat16
    """
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a name or a Recipe, got {type(recipe).__name__}")
    name = recipe.strip().lower()
    name = _ALIASES.get(name, name)
    if name in RECIPES:
        return RECIPES[name]
    if "=" in name:
        return _parse(name)
    raise ValueError(unknown("recipe", recipe, RECIPES, quote=True))
