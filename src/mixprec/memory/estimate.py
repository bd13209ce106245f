"""Predicted training memory per device, part by part, from a recipe's dtypes.

Every byte count is ``elements x bytes per element`` with the dtype taken from the
:class:`~mixprec.Recipe` (``param_dtype``, ``master_dtype``, ``grad_dtype``,
``optimizer_state_dtype``, ``update``, ``fp8``); normalisation parameters stay fp32 when
``keep_norms_fp32``. Two accountings:

* ``"mixprec"`` (default): what :class:`mixprec.Precision` allocates. Master-weight recipes
  keep a persistent fp32 master-gradient buffer; ``bf16-master`` accumulates 16-bit
  gradients straight into it. Kahan / stochastic updates (``bf16-true``) keep bf16
  optimizer states for AdamW / Adam / SGD (given by name or as the optimizer; fp32
  temporaries of one chunk of one tensor during the step, see
  :func:`mixprec.master.bf16_step.step_temp_bytes`); any other optimizer steps fp32
  views, so its states are fp32.
* ``"zero"``: the ZeRO paper's model-state accounting (Rajbhandari et al. 2020): 16-bit
  weights and gradients (2 + 2 bytes) and K = 12 bytes of fp32 master + Adam states.

The peak per device is::

    total = persistent + max(activations + weight copies + backward transient,
                             gradients + step transient)
    persistent = weights + master weights + master gradients + optimizer states
                 + compensation + other state

Sharding across ``world_size`` (ZeRO / FSDP): stage 1 divides master weights, optimizer
states and compensation buffers by the world size; stage 2 also gradients; stage 3 (FSDP
full shard) also weights and their compute copies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mixprec.memory.calls import batch_items
from mixprec.memory.counts import OPTIMIZERS, _optimizer_of, _resolve
from mixprec.memory.fp8 import fp8_weights, resolve_fp8_config
from mixprec.memory.parts import activation_parts, model_states, shard, sharding_buffers
from mixprec.recipes import Recipe, get_recipe

__all__ = ["OPTIMIZERS", "MemoryEstimate", "estimate"]

Optimizer = Literal["adamw", "adam", "sgd", "sgd-momentum", "adafactor"]
Accounting = Literal["mixprec", "zero"]
_ZERO_STAGES = {0: 0, 1: 1, 2: 2, 3: 3, "fsdp": 3, "full_shard": 3, "shard_grad_op": 2}
PARTS = (
    "weights", "gradients", "master_weights", "master_gradients", "optimizer_states",
    "compensation", "other_state", "weight_copies", "fp8_copies", "activations",
    "backward_transient", "step_transient", "sharding_buffers",
)  # fmt: skip
# moved to host memory by offload="optimizer" (DeepSpeed ZeRO-Offload, FSDP CPUOffload)
_OFFLOADED = ("master_weights", "master_gradients", "optimizer_states", "step_transient")
_STATE_PARTS = (
    "weights", "gradients", "master_weights", "master_gradients", "optimizer_states",
    "compensation",
)  # fmt: skip
ATTENTION = ("eager", "sdpa", "flash")
IMPLEMENTATIONS = ("hf", "megatron")
DEVICE_KINDS = ("cuda", "cpu")


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Predicted bytes per device for one training setup.

    Every part is in bytes on one device after sharding; ``formulas`` gives the formula
    each part was computed with. ``bytes_per_param`` is the unsharded model-state bytes
    (weights + gradients + master weights + master gradients + optimizer states +
    compensation buffers) over the parameter count: what is really held (bf16-master 18,
    fp16-master 20 with AdamW).

    Example:
        >>> e = estimate(7_000_000_000, "fp32", accounting="zero")
        >>> e.weights / 1e9, e.bytes_per_param, e.model_states / 1e9
        (28.0, 16.0, 112.0)
    """

    model: str
    recipe: str
    optimizer: str
    num_params: int
    batch_size: int
    seq_len: int | None
    world_size: int
    zero_stage: int
    activation_checkpointing: bool
    accounting: str
    attention: str
    implementation: str
    device: str
    weights: int
    gradients: int
    master_weights: int
    master_gradients: int
    optimizer_states: int
    compensation: int
    other_state: int
    weight_copies: int
    fp8_copies: int
    activations: int
    backward_transient: int
    step_transient: int
    sharding_buffers: int
    bytes_per_param: float
    formulas: tuple[tuple[str, str], ...]
    num_trainable: int = 0
    offload: str = "none"
    host_memory: int = 0

    @property
    def headroom(self) -> int:
        """What no formula counts, on CUDA: the CUDA context and kernels (0.5 GiB) and the
        caching allocator's fragmentation (10% of the total); 0 on a CPU::

            headroom = 0.5 GiB + 0.10 * total
        """
        return 0 if self.device == "cpu" else 2**29 + self.total // 10

    @property
    def required(self) -> int:
        """``total + headroom``: what a device must have for "fits" to mean fits."""
        return self.total + self.headroom

    @property
    def parts(self) -> dict[str, int]:
        """Part name -> bytes per device, in table order."""
        return {name: getattr(self, name) for name in PARTS}

    @property
    def model_states(self) -> int:
        """weights + gradients + master weights + master gradients + optimizer states +
        compensation, per device."""
        return sum(getattr(self, name) for name in _STATE_PARTS)

    @property
    def persistent(self) -> int:
        """Bytes held across steps (everything but gradients and per-step memory)."""
        return (
            self.weights
            + self.master_weights
            + self.master_gradients
            + self.optimizer_states
            + self.compensation
            + self.other_state
        )

    @property
    def peak_phase(self) -> str:
        """``"backward"`` or ``"step"``: where the larger of the two sides of the peak is."""
        return "backward" if self._forward_side >= self._step_side else "step"

    @property
    def _forward_side(self) -> int:
        return (
            self.activations + self.weight_copies + self.fp8_copies + self.backward_transient
            + self.sharding_buffers
        )  # fmt: skip

    @property
    def _step_side(self) -> int:
        return self.gradients + self.step_transient

    @property
    def total(self) -> int:
        """Peak bytes per device: ``persistent + max(forward side, step side)``."""
        return self.persistent + max(self._forward_side, self._step_side)

    def to_dict(self) -> dict:
        """JSON-ready form: settings, parts, total and formulas."""
        return {
            "model": self.model, "recipe": self.recipe, "optimizer": self.optimizer,
            "num_params": self.num_params, "batch_size": self.batch_size,
            "seq_len": self.seq_len, "world_size": self.world_size,
            "zero_stage": self.zero_stage,
            "activation_checkpointing": self.activation_checkpointing,
            "accounting": self.accounting, "attention": self.attention,
            "implementation": self.implementation, "device": self.device, "parts": self.parts,
            "model_states": self.model_states, "total": self.total,
            "peak_phase": self.peak_phase, "bytes_per_param": self.bytes_per_param,
            "headroom": self.headroom, "required": self.required,
            "num_trainable": self.num_trainable, "offload": self.offload,
            "host_memory": self.host_memory,
            "formulas": dict(self.formulas),
        }  # fmt: skip


def _spec_of_module(module: nn.Module):
    """The ModelSpec of a module that carries a Hugging Face style ``config`` (duck-typed:
    ``config.to_dict()`` with a supported ``model_type``), else None."""
    from mixprec.memory.specs import spec_from_config

    to_dict = getattr(getattr(module, "config", None), "to_dict", None)
    if not callable(to_dict):
        return None
    try:
        return spec_from_config(to_dict(), type(module).__name__)
    except (ValueError, TypeError):
        return None


def _positive(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def estimate(
    model_or_spec,
    recipe: str | Recipe,
    *,
    optimizer: str | torch.optim.Optimizer = "adamw",
    batch_size: int | None = None,
    seq_len: int | None = None,
    activation_checkpointing: bool = False,
    zero_stage: int | str = 0,
    world_size: int = 1,
    batch: tuple | None = None,
    loss_fn=None,
    accounting: Accounting = "mixprec",
    attention: Literal["eager", "sdpa", "flash"] = "sdpa",
    implementation: Literal["hf", "megatron"] = "hf",
    device: Literal["cuda", "cpu"] = "cuda",
    lora: tuple[int, tuple[str, ...]] | None = None,
    offload: Literal["none", "optimizer"] = "none",
    fp8_config=None,
) -> MemoryEstimate:
    """Predict the training memory per device of a model under a recipe.

    Args:
        model_or_spec: an ``nn.Module`` (counted as is; on the meta device nothing is
            allocated), a preset name (see :func:`~mixprec.memory.specs.preset_names`),
            a path to a Hugging Face ``config.json``, its parsed dict, a
            :class:`~mixprec.memory.specs.ModelSpec`, or a bare parameter count.
        recipe: recipe name or :class:`~mixprec.Recipe`.
        optimizer: ``"adamw"``/``"adam"`` (2 states), ``"sgd"`` (none), ``"sgd-momentum"``
            (1), ``"adafactor"`` (factored second moment: rows + columns of each matrix;
            needs an nn.Module), or the optimizer itself, whose class and ``fused`` /
            ``foreach`` settings decide the states and the step's temporaries.
        batch_size: micro-batch per device (default 1, or the size of ``batch``).
        seq_len: tokens per sequence (transformer specs; default the model's maximum).
        activation_checkpointing: keep only each layer's input, recompute the rest.
        zero_stage: 0-3 (or ``"fsdp"`` = 3, ``"shard_grad_op"`` = 2).
        world_size: devices the states are sharded over.
        batch: ``(inputs, targets)`` micro-batch to trace an nn.Module's activations
            (scaled linearly to ``batch_size``); inputs a tensor, tuple or dict, outputs a
            tensor, tuple, dict or ModelOutput (:mod:`mixprec.memory.calls`). Without it
            a module's activations are not counted, and the formulas say so.
        loss_fn: ``loss_fn(outputs, targets)`` for the trace (default: the model's own
            loss, else cross-entropy / MSE).
        accounting: ``"mixprec"`` (what Precision allocates) or ``"zero"`` (the ZeRO
            paper's 2 + 2 + K model-state accounting).
        attention: for transformer specs, ``"sdpa"`` (default: what Hugging Face and
            torch users get, a fused kernel on CUDA), ``"flash"`` (a fused kernel keeps
            only log-sum-exp) or ``"eager"`` (the score matrix is kept).
        implementation: ``"hf"`` (what the Hugging Face code of the family saves,
            :mod:`mixprec.memory.hf`) or ``"megatron"`` (Korthikanti et al.'s fused kernels).
        device: ``"cuda"`` or ``"cpu"``: where training runs (dropout masks are 1 byte on
            CUDA and full width on a CPU; SDPA with attention dropout falls back to the
            math kernel on a CPU; the optimizer steps one tensor at a time on a CPU).
        lora: ``(rank, targets)``, e.g. ``(16, ("q_proj", "v_proj"))``, for a preset or
            config: the base model is frozen and only the adapters get gradients, masters
            and optimizer states. An nn.Module is counted by ``requires_grad`` instead.
        offload: ``"optimizer"`` keeps master weights, master gradients and optimizer
            states (and the step) in host memory, reported as ``host_memory``.
        fp8_config: for fp8 recipes, the :class:`~mixprec.float8.Float8Config` of the
            Linear layers (default ``Float8Config(scaling=recipe.fp8)``, what
            ``Precision`` converts with; an nn.Module already converted is counted with
            its own layers' configs). Its ``recompute_weight_cast`` decides the fp8
            weights: False saves N·K x 1 B per layer for backward (``fp8_copies``); True
            (the default) saves none and counts one layer's transient recast
            (:mod:`mixprec.memory.fp8`).

    Returns:
        :class:`MemoryEstimate`.

    Raises:
        ValueError: unknown optimizer, ZeRO stage, preset or accounting; sizes <= 0;
            ``fp8_config`` with a recipe without fp8 layers.
        TypeError: ``fp8_config`` is not a Float8Config.

    Example:
        >>> e = estimate("llama-2-7b", "bf16-mixed", batch_size=1, seq_len=4096)
        >>> round(e.weights / 1e9, 2)  # 6.74e9 fp32 params
        26.95
    """
    recipe = get_recipe(recipe)
    from mixprec.master.bf16_step import step_temp_bytes

    bf16_temp = step_temp_bytes(optimizer, recipe.update) if recipe.update != "plain" else None
    optimizer, impl = _optimizer_of(
        optimizer, list(model_or_spec.parameters()) if isinstance(model_or_spec, nn.Module) else []
    )
    if offload not in ("none", "optimizer"):
        raise ValueError(f"offload={offload!r} is not one of none, optimizer")
    if zero_stage not in _ZERO_STAGES:
        raise ValueError(
            f"zero_stage={zero_stage!r} is not one of {', '.join(map(str, _ZERO_STAGES))}"
        )
    for arg, value, choices in (
        ("attention", attention, ATTENTION),
        ("implementation", implementation, IMPLEMENTATIONS),
        ("device", device, DEVICE_KINDS),
    ):
        if value not in choices:
            raise ValueError(f"{arg}={value!r} is not one of {', '.join(choices)}")
    if accounting not in ("mixprec", "zero"):
        raise ValueError(f"accounting={accounting!r} is not one of 'mixprec', 'zero'")
    _positive("batch_size", batch_size)
    _positive("seq_len", seq_len)
    _positive("world_size", world_size)
    stage = _ZERO_STAGES[zero_stage]
    name, P, spec, module = _resolve(model_or_spec)
    if lora is not None:
        if spec is None:
            raise ValueError(
                "lora= needs a preset or config.json; for an nn.Module, freeze the base "
                "parameters (requires_grad=False) and estimate the module"
            )
        from mixprec.memory.counts import lora_params

        rank, targets = lora
        n_lora, n_tensors = lora_params(spec, rank, tuple(targets))
        P = dataclasses.replace(
            P, total=P.total + n_lora, trainable=n_lora, norm_trainable=0,
            matmul=P.matmul + n_lora, tensors=n_tensors,
        )  # fmt: skip
    if impl is not None:
        P = dataclasses.replace(P, impl=impl)
    elif module is None:  # torch's default: foreach on CUDA, one tensor at a time on a CPU
        P = dataclasses.replace(P, impl="foreach" if device == "cuda" else "single")
    if P.total == 0:
        raise ValueError(
            f"{name} has no parameters: nothing to train, so no training memory to estimate"
        )
    if module is not None and batch is not None:
        if any(p.device.type == "meta" for p in module.parameters()):
            raise ValueError("a module on the meta device cannot run a batch: pass batch=None")
    if module is not None and batch is None and spec is None:
        spec = _spec_of_module(module)  # a Hugging Face model: its config gives the shapes
    if optimizer == "adafactor" and P.factored is None:
        raise ValueError("optimizer='adafactor' needs parameter shapes: pass an nn.Module")
    if batch_size is None:
        batch_size = batch_items(batch[0]) if batch is not None else 1
    if spec is not None and seq_len is None:
        seq_len = spec.max_position_embeddings
    fp8_cfg = resolve_fp8_config(recipe, fp8_config, module)
    traced = module is not None and batch is not None
    fp8w = None if fp8_cfg is None or traced else fp8_weights(P, spec, module, fp8_cfg, device)

    states = model_states(P, recipe, optimizer, accounting, bf16_temp)
    acts = activation_parts(
        recipe,
        P,
        spec,
        module,
        batch,
        loss_fn,
        batch_size,
        seq_len,
        activation_checkpointing,
        states,
        attention=attention,
        implementation=implementation,
        device=device,
        fp8_config=fp8_config,
        fp8_weights=fp8w,
    )
    if fp8w is not None:
        acts["backward_transient"] = fp8w.with_cast(acts["backward_transient"])
    merged = {**states, **acts}
    if "batch" in merged:  # the micro-batch is alive for the whole step
        nbytes, text = merged.pop("batch")
        other, other_text = merged["other_state"]
        text = f"{nbytes:,} B ({text})"
        merged["other_state"] = (other + nbytes, f"{other_text} + {text}" if other else text)
    merged["sharding_buffers"] = sharding_buffers(
        P, recipe, stage, world_size, fsdp=zero_stage in ("fsdp", "full_shard")
    )
    per_param = sum(merged[k][0] for k in _STATE_PARTS) / P.total
    sharded = shard(merged, stage, world_size, recipe)
    host = 0
    if offload == "optimizer":
        for k in _OFFLOADED:
            nbytes, text = sharded[k]
            host += nbytes
            sharded[k] = (0, f"0 on the device: {nbytes:,} B in host memory ({text})")
    return MemoryEstimate(
        model=name, recipe=str(recipe), optimizer=optimizer, num_params=P.total,
        batch_size=batch_size, seq_len=seq_len, world_size=world_size, zero_stage=stage,
        activation_checkpointing=activation_checkpointing, accounting=accounting,
        attention=attention, implementation=implementation, device=device,
        **{k: sharded[k][0] for k in PARTS}, bytes_per_param=per_param,
        formulas=tuple((k, sharded[k][1]) for k in PARTS),
        num_trainable=P.n_train, offload=offload, host_memory=host,
    )  # fmt: skip
