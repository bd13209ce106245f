"""What the estimate needs to know of a model: parameter counts, and how its optimizer steps.

A model comes as an ``nn.Module`` (counted as is, also on the meta device), a preset or
config (closed-form counts from :mod:`mixprec.memory.specs`) or a bare parameter count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mixprec.memory.specs import ModelSpec, get_spec, load_config, spec_from_config

__all__ = ["OPTIMIZERS"]

# optimizer name -> states per parameter
OPTIMIZERS: dict[str, int] = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1, "adafactor": 1}


@dataclass(frozen=True, slots=True)
class _Params:
    """Parameter counts that decide the model states."""

    total: int
    norm: int  # parameters of normalisation layers
    matmul: int  # read by matmuls (get autocast copies)
    linear_weights: int  # Linear weight matrices (get fp8 copies)
    linear_layers: int
    largest: int  # elements of the largest parameter tensor
    tensors: int  # parameter tensors (one Adam step counter each)
    factored: int | None  # Adafactor state elements (None: shapes unknown)
    # how the optimizer steps: "single" (a tensor at a time, torch's CPU default),
    # "foreach" (all tensors at once, torch's CUDA default) or "fused" (one kernel)
    impl: str = "foreach"
    buffers: int = 0  # bytes of module buffers
    trainable: int | None = None  # parameters with requires_grad (None: all)
    norm_trainable: int | None = None  # of which in norm layers (None: all norm params)
    layer: int = 0  # parameters of one transformer block (FSDP2 wraps one at a time)

    @property
    def n_train(self) -> int:
        """Parameters that get gradients, masters and optimizer states."""
        return self.total if self.trainable is None else self.trainable

    @property
    def n_norm_train(self) -> int:
        return self.norm if self.norm_trainable is None else self.norm_trainable


def _default_impl(params: list[torch.Tensor]) -> str:
    """torch's default: foreach when every parameter is on CUDA, else one tensor at a time."""
    return "foreach" if params and all(p.device.type == "cuda" for p in params) else "single"


def _optimizer_of(optimizer, params: list[torch.Tensor]) -> tuple[str, str | None]:
    """(name in OPTIMIZERS, implementation or None for the default) of a name or optimizer."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        return optimizer, None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a name or a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    kind = type(optimizer).__name__.lower()
    if kind == "sgd" and optimizer.defaults.get("momentum", 0):
        kind = "sgd-momentum"
    if kind not in OPTIMIZERS:
        raise ValueError(
            f"optimizer {type(optimizer).__name__} is not one the estimator knows; "
            f"pass the closest of {', '.join(OPTIMIZERS)} by name"
        )
    if optimizer.defaults.get("fused"):
        return kind, "fused"
    if optimizer.defaults.get("foreach"):
        return kind, "foreach"
    if optimizer.defaults.get("foreach") is False:
        return kind, "single"
    return kind, _default_impl(params)


def _params_of_module(model: nn.Module) -> _Params:
    from mixprec.master import is_norm_module

    params = list(model.parameters())
    norm = norm_train = matmul = lin_w = lin_n = 0
    seen: set[int] = set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if is_norm_module(module):
            norm += sum(p.numel() for p in own)
            norm_train += sum(p.numel() for p in own if p.requires_grad)
        # Hugging Face's Conv1D (GPT-2) is a matmul too: x @ W + b (duck-typed: no import)
        conv1d = type(module).__name__ == "Conv1D" and hasattr(module, "nf")
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or conv1d:
            matmul += sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, nn.Linear):
            lin_w += module.weight.numel()
            lin_n += 1
        seen.update(id(p) for p in own)
    stepped = [p for p in params if p.requires_grad]  # what the optimizer steps
    factored = sum(
        (p.shape[-2] + p.shape[-1]) * math.prod(p.shape[:-2]) if p.dim() >= 2 else p.numel()
        for p in stepped
    )
    return _Params(
        total=sum(p.numel() for p in params), norm=norm, matmul=matmul,
        linear_weights=lin_w, linear_layers=lin_n,
        largest=max((p.numel() for p in stepped), default=0), tensors=len(stepped),
        factored=factored, impl=_default_impl(params),
        buffers=sum(b.numel() * b.element_size() for b in model.buffers()),
        trainable=sum(p.numel() for p in params if p.requires_grad), norm_trainable=norm_train,
        layer=max((sum(p.numel() for p in m.parameters()) for m in _blocks(model)), default=0),
    )  # fmt: skip


def _blocks(model: nn.Module):
    """The repeated blocks of a model: the items of its ModuleLists."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            yield from module


def _params_of_spec(spec: ModelSpec) -> _Params:
    c = spec.param_counts()
    h, big = spec.hidden_size, spec.vocab_size * spec.hidden_size
    # parameter tensors: per layer, and outside the layers (embeddings, final norm, head)
    per_layer = {"gpt2": 12, "bert": 16, "llama": 9}[spec.family]
    outside = {"gpt2": 4, "bert": 7, "llama": 2 if spec.tie_word_embeddings else 3}[spec.family]
    # one transformer block (what FSDP2 gathers at a time): all but embeddings, head, final norm
    V, P_, h_ = spec.vocab_size, spec.max_position_embeddings, spec.hidden_size
    not_layers = {
        "gpt2": V * h_ + P_ * h_ + 2 * h_,
        "bert": (V + P_ + spec.type_vocab_size) * h_ + 2 * h_,
        "llama": V * h_ * (1 if spec.tie_word_embeddings else 2) + h_,
    }[spec.family]
    layer = (c.total - not_layers) // spec.num_layers
    return _Params(
        c.total,
        c.norm,
        c.matmul,
        c.linear_weights,
        c.linear_layers,
        max(big, h * spec.intermediate_size),
        per_layer * spec.num_layers + outside,
        None,
        layer=layer,
    )


# LoRA target name -> (in features, out features) of the adapted Linear, per family
def _lora_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    h, ff, kvd = spec.hidden_size, spec.intermediate_size, spec.kv_heads * spec.head_dim
    if spec.family == "gpt2":
        return {"c_attn": (h, 3 * h), "c_proj": (h, h), "c_fc": (h, ff), "mlp.c_proj": (ff, h)}
    if spec.family == "bert":
        return {"query": (h, h), "key": (h, h), "value": (h, h), "dense": (h, h)}
    return {
        "q_proj": (h, h), "k_proj": (h, kvd), "v_proj": (h, kvd), "o_proj": (h, h),
        "gate_proj": (h, ff), "up_proj": (h, ff), "down_proj": (ff, h),
    }  # fmt: skip


def lora_params(spec: ModelSpec, rank: int, targets: tuple[str, ...]) -> tuple[int, int]:
    """(LoRA parameters, LoRA tensors): ``L * sum over targets of r * (in + out) * E``
    (E experts for an MLP target of a mixture of experts), as PEFT's LoRA adds them.

    Raises:
        ValueError: a rank < 1 or a target the family does not have (listing the names).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank={rank!r} must be a positive integer")
    shapes = _lora_shapes(spec)
    if not targets:
        raise ValueError(f"lora targets are empty; choose from {', '.join(shapes)}")
    n = 0
    for t in targets:
        if t not in shapes:
            raise ValueError(
                f"lora target {t!r} is not a {spec.family} module; choose from {', '.join(shapes)}"
            )
        i, o = shapes[t]
        mlp = t in ("gate_proj", "up_proj", "down_proj", "c_fc", "mlp.c_proj")
        n += rank * (i + o) * (spec.experts if mlp else 1)
    return spec.num_layers * n, 2 * len(targets) * spec.num_layers


def _resolve(model_or_spec) -> tuple[str, _Params, ModelSpec | None, nn.Module | None]:
    if isinstance(model_or_spec, nn.Module):
        return type(model_or_spec).__name__, _params_of_module(model_or_spec), None, model_or_spec
    if isinstance(model_or_spec, bool) or not isinstance(
        model_or_spec, (int, str, Path, dict, ModelSpec)
    ):
        raise TypeError(
            "model_or_spec must be an nn.Module, a ModelSpec, a preset name, a config.json "
            f"path, a config dict or a parameter count, got {type(model_or_spec).__name__}"
        )
    if isinstance(model_or_spec, int):
        if model_or_spec <= 0:
            raise ValueError(f"parameter count {model_or_spec} must be positive")
        n = model_or_spec
        return f"{n:,} params", _Params(n, 0, n, n, 0, 0, 0, None), None, None
    if isinstance(model_or_spec, dict):
        spec = spec_from_config(model_or_spec)
    elif isinstance(model_or_spec, ModelSpec):
        spec = model_or_spec
    else:
        text = str(model_or_spec)
        is_path = isinstance(model_or_spec, Path) or text.endswith(".json") or "/" in text
        is_path = is_path or Path(text).is_file() or Path(text).is_dir()
        spec = load_config(text) if is_path else get_spec(text)
    return spec.name, _params_of_spec(spec), spec, None
