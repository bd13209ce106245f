"""``convert_to_float8``: swap a model's eligible ``nn.Linear`` layers for ``Float8Linear``."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass

from torch import nn

from mixprec.float8.config import Float8Config
from mixprec.float8.linear import Float8Conv1D, Float8Linear

__all__ = [
    "Float8ConversionReport",
    "LayerDecision",
    "convert_to_float8",
    "dims_reason",
    "float8_decisions",
]

_MULTIPLE = 16  # fp8 tensor cores (and cuBLAS's fp8 GEMM) need K and N multiples of 16


@dataclass(frozen=True, slots=True)
class LayerDecision:
    """What :func:`convert_to_float8` did with one ``nn.Linear``.

    Args:
        name: fully qualified module name.
        in_features: K.
        out_features: N.
        converted: swapped for a ``Float8Linear``.
        reason: why (``"converted"``, or why not).
    """

    name: str
    in_features: int
    out_features: int
    converted: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Float8ConversionReport:
    """Every ``nn.Linear`` of the model, converted or not, with the reason.

    Example:
        >>> m = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 10))
        >>> report = convert_to_float8(m)
        >>> report.converted, [d.name for d in report.skipped]
        (('0',), ['1'])
    """

    layers: tuple[LayerDecision, ...]
    config: Float8Config

    @property
    def converted(self) -> tuple[str, ...]:
        """Names of the layers swapped for ``Float8Linear``."""
        return tuple(d.name for d in self.layers if d.converted)

    @property
    def skipped(self) -> tuple[LayerDecision, ...]:
        """Decisions for the layers left as they were."""
        return tuple(d for d in self.layers if not d.converted)

    def __str__(self) -> str:
        lines = [
            f"fp8 conversion ({self.config.scaling} scaling): "
            f"{len(self.converted)} of {len(self.layers)} Linear layers converted"
        ]
        width = max((len(d.name) for d in self.layers), default=4)
        for d in self.layers:
            mark = "fp8" if d.converted else "-- "
            shape = f"{d.in_features}->{d.out_features}"
            lines.append(f"  {mark} {d.name:<{width}}  {shape:<12} {d.reason}")
        return "\n".join(lines)


def hf_conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` when transformers is already imported, else None.

    Looked up in ``sys.modules`` so that mixprec never imports transformers itself (a
    model that holds a Conv1D has imported it).
    """
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a Hugging Face ``Conv1D`` (GPT-2's Linear, weight stored (in, out))."""
    conv1d = hf_conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape  # Conv1D: (nx, nf)
    return in_features, out_features


def dims_reason(in_features: int, out_features: int) -> str | None:
    """Why a Linear of this shape is not converted without ``pad_inner_dim``, or None.

    Example:
        >>> dims_reason(64, 10)
        'out_features=10 not a multiple of 16'
    """
    bad = [
        f"{label}={value}"
        for label, value in (
            ("in_features", in_features),
            ("out_features", out_features),
        )
        if value % _MULTIPLE
    ]
    if bad:
        return f"{' and '.join(bad)} not a multiple of {_MULTIPLE}"
    return None


def float8_decisions(
    model: nn.Module,
    *,
    config: Float8Config | None = None,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    force: Collection[str] = (),
) -> tuple[LayerDecision, ...]:
    """What :func:`convert_to_float8` would do with each Linear of ``model``; changes nothing.

    Same arguments and errors as :func:`convert_to_float8` (the memory planner counts the
    fp8 layers of a model with it before any conversion).

    Example:
        >>> m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 3))
        >>> [(d.name, d.converted) for d in float8_decisions(m)]
        [('0', True), ('1', False)]
    """
    config = config if config is not None else Float8Config()
    force = set(force)
    linears = {name: mod for name, mod in model.named_modules() if _is_linear(mod)}
    for name in sorted(force):
        if name not in linears:
            raise ValueError(
                f"force names {name!r}, which is not an nn.Linear of the model "
                f"(Linear layers: {', '.join(repr(n) for n in linears) or 'none'})"
            )
        reason = dims_reason(*_features(linears[name]))
        if reason is not None and not config.pad_inner_dim:
            k, n = _features(linears[name])
            raise ValueError(
                f"cannot force fp8 on {name!r}: shape (out_features={n}, "
                f"in_features={k}) has {reason}; set Float8Config(pad_inner_dim=True) "
                "or leave it out of force"
            )
    decisions: list[LayerDecision] = []
    for name, lin in linears.items():
        k, n = _features(lin)
        dims = dims_reason(k, n)
        if isinstance(lin, Float8Linear):
            reason = "already a Float8Linear"
        elif name == "":
            reason = "the model itself is the Linear: wrap it (nn.Sequential(model)) to convert"
        elif isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention):
            reason = "nn.MultiheadAttention reads its out_proj weight without calling forward"
        elif name in force:
            reason = None
        elif dims is not None and not config.pad_inner_dim:
            reason = dims
        elif module_filter_fn is not None and not module_filter_fn(lin, name):
            reason = "excluded by module_filter_fn"
        else:
            reason = None
        done = "converted"
        if reason is None and config.pad_inner_dim and dims is not None:
            done = "converted (operands padded to multiples of 16)"
        decisions.append(LayerDecision(name, k, n, reason is None, reason or done))
    return tuple(decisions)


def convert_to_float8(
    model: nn.Module,
    *,
    config: Float8Config | None = None,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    force: Collection[str] = (),
) -> Float8ConversionReport:
    """Swap, in place, each eligible ``nn.Linear`` of ``model`` for a ``Float8Linear``.

    Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections, weight
    stored (in, out)) counts as a Linear and becomes a :class:`Float8Conv1D`.

    A Linear is eligible when both ``in_features`` and ``out_features`` are multiples of
    16 (what fp8 tensor cores require; with ``config.pad_inner_dim`` any shape is, its
    operands padded) and ``module_filter_fn(module, fqn)`` (when given)
    returns True. The new layers share the old layers' Parameter objects, so an optimizer
    built before the conversion keeps working.

    Args:
        model: the model; modified in place.
        config: :class:`Float8Config` for every converted layer (default ``Float8Config()``).
        module_filter_fn: ``(module, fully_qualified_name) -> bool``; False leaves the layer.
        force: names of layers that must be converted, whatever the filter says; a forced
            layer that cannot be converted is an error.

    Returns:
        A :class:`Float8ConversionReport` listing every Linear with its decision.

    Raises:
        RuntimeError: this torch build has no float8 dtypes.
        ValueError: a name in ``force`` is not a Linear of the model, or its dimensions
            are not multiples of 16 (without ``pad_inner_dim``).

    Warns:
        UserWarning: no Linear was converted (the message gives each reason); the model
            is then unchanged.

    Example:
        >>> m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
        >>> print(convert_to_float8(m, config=Float8Config(scaling="delayed")))
        fp8 conversion (delayed scaling): 1 of 2 Linear layers converted
          fp8 0  64->64       converted
          --  2  64->3        out_features=3 not a multiple of 16
    """
    config = config if config is not None else Float8Config()
    # Resolve the dtypes now: a torch build without float8 fails here, not at the first step.
    _ = (config.forward_dtype, config.backward_dtype)
    decisions = float8_decisions(
        model, config=config, module_filter_fn=module_filter_fn, force=force
    )
    swaps = [(d.name, model.get_submodule(d.name)) for d in decisions if d.converted]
    for name, lin in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(lin, nn.Linear):
            new = Float8Linear.from_linear(lin, config)
        else:
            new = Float8Conv1D.from_conv1d(lin, config)
        setattr(parent, child, new)
    report = Float8ConversionReport(tuple(decisions), config)
    if not swaps:
        details = "; ".join(f"{d.name or '<model>'}: {d.reason}" for d in decisions)
        warnings.warn(
            "convert_to_float8 found no eligible nn.Linear, the model is unchanged"
            + (f" ({details})" if details else " (it has no nn.Linear)"),
            UserWarning,
            stacklevel=2,
        )
    return report
