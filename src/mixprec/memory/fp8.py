"""fp8 Linear layers in the memory estimate: which weight copies are saved, which are transient.

A tensorwise ``Float8Linear`` needs W in fp8 for two GEMMs, output (forward) and grad_input
(backward). :class:`~mixprec.float8.Float8Config` ``recompute_weight_cast`` decides what
backward gets:

* ``True`` (default, torchao's choice): autograd keeps only the Parameter, and backward
  casts W again. The fp8 copy of a layer's W lives only while that layer's products run.
* ``False``: forward saves its fp8 copy of W, N·K x 1 B per layer, held from the layer's
  forward until its backward: once per micro-batch whose backward has not run yet (one in
  a plain loop or gradient accumulation, one per stage in flight in a pipeline).

Rowwise and MX layers save the high-precision x and W (each GEMM casts its own copies), so
they save no fp8 weight either way. The formulas, per device before sharding::

    saved (fp8_copies)   = sum over layers that save W_fp8 of N·K x 1 B
                           + layers x the amax/scale buffers of one layer
    cast  (transient)    = max over layers of N·K x (c + u)
                           c = 1 B when the layer casts W in backward (not saved), else 0
                           u = 4 B when the GEMM is emulated (float32 upcast of W_fp8), else 0

"Emulated" is read from ``Float8Config.use_scaled_mm(device)``: on CUDA an MX layer counts
as running on Blackwell's kernel (on an older GPU it is emulated: 4 B more per element).
The cast transient happens inside one layer's backward, after the loss's backward has
released its own transient, so the estimate counts ``max(backward transient, cast)``, not
their sum. The emulation's float32 upcasts of activations (x_fp8, grad_out_fp8) are not in
these formulas (the traced estimate of an nn.Module with a batch counts everything).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from mixprec.recipes import RECIPES, Recipe

__all__ = ["Fp8Weights", "fp8_weights", "prepare_fp8", "resolve_fp8_config", "spec_linear_shapes"]

Part = tuple[int, str]


def resolve_fp8_config(recipe: Recipe, fp8_config, module: nn.Module | None = None):
    """The :class:`~mixprec.float8.Float8Config` that training with ``recipe`` would use.

    ``None`` for a recipe without fp8 layers; ``fp8_config`` when given; else what
    :class:`~mixprec.Precision` converts with, ``Float8Config(scaling=recipe.fp8)``.
    A ``module`` that already holds ``Float8Linear`` layers keeps them (``Precision.setup``
    does not convert it again), so an ``fp8_config`` that differs from theirs is an error.

    Raises:
        TypeError: ``fp8_config`` is not a ``Float8Config``.
        ValueError: ``fp8_config`` with a recipe that has no fp8 layers, or one that
            contradicts the module's own fp8 layers.
    """
    from mixprec.float8 import Float8Config, Float8Linear

    if fp8_config is not None and not isinstance(fp8_config, Float8Config):
        raise TypeError(
            f"fp8_config must be a mixprec.float8.Float8Config, got {type(fp8_config).__name__}"
        )
    if recipe.fp8 == "off":
        if fp8_config is not None:
            fp8 = ", ".join(name for name, r in RECIPES.items() if r.fp8 != "off")
            raise ValueError(
                f"fp8_config is for recipes with fp8 layers ({fp8}); recipe {recipe.name!r} "
                "has none"
            )
        return None
    if module is not None and fp8_config is not None:
        for name, m in module.named_modules():
            if isinstance(m, Float8Linear) and m.config != fp8_config:
                raise ValueError(
                    f"layer {name!r} is already a Float8Linear with {m.config}, which "
                    "Precision.setup keeps; fp8_config differs from it: leave fp8_config out, "
                    "or pass the model before convert_to_float8"
                )
    return fp8_config if fp8_config is not None else Float8Config(scaling=recipe.fp8)


def prepare_fp8(model: nn.Module, recipe: Recipe, fp8_config) -> None:
    """Convert ``model`` in place with ``fp8_config`` before ``Precision.setup`` (which then
    keeps the conversion); nothing when ``fp8_config`` is None or the model already holds
    ``Float8Linear`` layers (checked against it by :func:`resolve_fp8_config`)."""
    from mixprec.float8 import Float8Linear, convert_to_float8

    resolve_fp8_config(recipe, fp8_config, model)
    if fp8_config is not None and not any(isinstance(m, Float8Linear) for m in model.modules()):
        convert_to_float8(model, config=fp8_config)


def spec_linear_shapes(spec) -> list[tuple[int, int, int]]:
    """``(in_features, out_features, count)`` of every Linear of a transformer spec, the LM
    head included (its weight may be tied: the fp8 cast copies it all the same).

    Their weights sum to ``spec.param_counts().linear_weights`` (tested for every preset).
    """
    h, ff, V, L = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.num_layers
    if spec.family == "gpt2":  # Conv1D layers: c_attn, attn.c_proj, c_fc, mlp.c_proj
        return [(h, 3 * h, L), (h, h, L), (h, ff, L), (ff, h, L), (h, V, 1)]
    if spec.family == "bert":
        head = {
            "mlm": [(h, h, 1), (h, V, 1)],  # transform dense, decoder
            "cls": [(h, h, 1), (h, spec.num_labels, 1)],  # pooler, classifier
            "base": [(h, h, 1)],  # pooler
        }[spec.head]
        return [(h, h, 4 * L), (h, ff, L), (ff, h, L), *head]
    kvd, E = spec.kv_heads * spec.head_dim, spec.experts
    shapes = [(h, h, 2 * L), (h, kvd, 2 * L), (h, ff, 2 * E * L), (ff, h, E * L), (h, V, 1)]
    if spec.num_experts:
        shapes.append((h, spec.num_experts, L))  # the router
    return shapes


@functools.lru_cache(maxsize=16)
def _state_bytes(config) -> int:
    """Bytes of one Float8Linear's amax histories and scales (built on meta)."""
    from mixprec.float8 import Float8Linear

    layer = Float8Linear(16, 16, device="meta", config=config)
    return sum(b.numel() * b.element_size() for b in layer.buffers())


def _saves_weight(config) -> bool:
    return (
        config.granularity == "tensorwise"
        and "grad_input" in config.gemms
        and not config.recompute_weight_cast
    )


def _cast_bytes(config, device: str) -> int:
    """Bytes per weight element alive during one layer's backward beyond what is saved."""
    casts = "output" in config.gemms or "grad_input" in config.gemms
    if not casts:
        return 0
    emulated = not config.use_scaled_mm(torch.device(device))
    return (0 if _saves_weight(config) else 1) + (4 if emulated else 0)


@dataclass(frozen=True, slots=True)
class Fp8Weights:
    """The fp8 parts of an estimate (formulas in the module docstring).

    Args:
        copies: ``(bytes, formula)`` of the saved fp8 weights and the scaling state.
        cast: ``(bytes, formula)`` of the largest per-layer cast transient in backward.
        input_fp8: every fp8 layer saves x in fp8 (tensorwise with an fp8 grad_weight
            GEMM), 1 byte an element instead of the compute dtype's.
    """

    copies: Part
    cast: Part
    input_fp8: bool

    def with_cast(self, backward: Part) -> Part:
        """``max(backward transient, cast)``: the cast happens after the loss's backward."""
        if self.cast[0] <= backward[0]:
            return backward
        return self.cast[0], f"{self.cast[1]} (more than {backward[0]:,} B: {backward[1]})"


def fp8_weights(P, spec, module: nn.Module | None, config, device: str) -> Fp8Weights:
    """The fp8 weight parts of a model under ``config`` (see the module docstring).

    The layers counted are those training converts: a module's own ``Float8Linear`` layers
    (each with its config) when it has any, else what ``convert_to_float8(config)`` would
    convert; for a spec, every Linear whose dimensions are multiples of 16 (any with
    ``pad_inner_dim``); for a bare parameter count, all parameters as one layer's worth of
    saved weights, with no transient (the layer shapes are unknown).
    """
    from mixprec.float8 import Float8Linear, dims_reason, float8_decisions

    layers: list[tuple[int, int, object]]  # (elements of one weight, count, config)
    if module is not None:
        own = [m for m in module.modules() if isinstance(m, Float8Linear)]
        if own:
            layers = [(m.weight.numel(), 1, m.config) for m in own]
        else:
            decisions = float8_decisions(module, config=config)
            layers = [(d.in_features * d.out_features, 1, config) for d in decisions if d.converted]
    elif spec is not None:
        layers = [
            (k * n, count, config)
            for k, n, count in spec_linear_shapes(spec)
            if config.pad_inner_dim or dims_reason(k, n) is None
        ]
    else:
        layers = [(P.linear_weights, 1, config)]
    bare = spec is None and module is None  # a parameter count: layers unknown
    saved = sum(n * c for n, c, cfg in layers if _saves_weight(cfg))
    state = 0 if bare else sum(c * _state_bytes(cfg) for _, c, cfg in layers)
    n_layers = sum(c for _, c, _ in layers)
    terms = []
    if saved:
        terms.append(f"{saved:,} x 1 B (fp8 W saved for backward, recompute_weight_cast=False)")
    if state:
        terms.append(f"{state:,} B (amax/scale state of {n_layers:,} fp8 layers)")
    copies = (saved + state, " + ".join(terms) or "0 (no fp8 layer saves its weight)")
    if bare:
        cast = (0, "fp8 cast transient not counted (layer shapes unknown for a parameter count)")
    else:
        n, b = max(((n, _cast_bytes(cfg, device)) for n, _, cfg in layers), default=(0, 0),
                   key=lambda t: t[0] * t[1])  # fmt: skip
        cast = (n * b, f"{n:,} x {b} B (fp8 cast of the largest layer's W in its backward)")
    input_fp8 = bool(layers) and all(
        cfg.granularity == "tensorwise" and "grad_weight" in cfg.gemms for _, _, cfg in layers
    )
    return Fp8Weights(copies=copies, cast=cast, input_fp8=input_fp8)
