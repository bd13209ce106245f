"""What the bench derives from a model and from measured runs: FLOPs, MFU, shape check, verdict.

Formulas (every printed number comes from one of these):

* FLOPs per step: counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward
  and backward pass of the fp32 model on the first batch (matmuls, convolutions and
  attention). For a transformer this is ``6 * W * tokens + 14 * L * d * T * tokens``
  (W weights of the Linear layers, L layers, d width, T sequence length): the PaLM/nanoGPT
  estimate ``6N + 12 L d T`` per token, except that the attention backward is counted as
  torch counts it, with the recomputation of the scores (5 matmuls instead of 4).
* achieved FLOP/s = FLOPs per step / median step time.
* MFU (model FLOPs utilisation) = achieved FLOP/s / peak FLOP/s of the device in the
  recipe's compute dtype (GPU table below; no MFU on a CPU, whose peak is not tabulated).
* speed-up = items/s of the recipe / items/s of fp32.
* metric gap = metric of the recipe - metric of fp32 (same steps, weights and batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixprec.float8.convert import hf_conv1d_type

__all__ = ["PEAK_FLOPS", "ShapeIssue", "count_flops", "peak_flops", "shape_check"]

# Dense peak FLOP/s by GPU name fragment and compute dtype (vendor data sheets, SXM parts).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12},
    "H100": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
    "L4": {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12, "fp8": 242.5e12},
}


def peak_flops(device: torch.device, compute: str) -> float | None:
    """Peak dense FLOP/s of ``device`` for ``compute`` ("fp32", "tf32", "bf16", "fp16", "fp8").

    Returns None on a CPU or an unlisted GPU.

    Example:
        >>> peak_flops(torch.device("cpu"), "bf16") is None
        True
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table.get(compute)
    return None


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


def count_flops(model: nn.Module, run_step) -> int:
    """FLOPs of one training step: ``run_step(model)`` does a forward and a backward pass.

    Example:
        >>> m = nn.Linear(8, 4, bias=False)
        >>> # forward and weight gradient (the input needs none): 2 * (2 * B * in * out)
        >>> count_flops(m, lambda m: m(torch.ones(2, 8)).sum().backward())
        256
    """
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run_step(model)
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


@dataclass(frozen=True, slots=True)
class ShapeIssue:
    """A Linear/convolution dimension that is not a multiple of ``multiple``.

    Tensor cores (and CPU matrix units) work on tiles: a GEMM whose K or N is not a
    multiple of 8 elements (16 for fp8) falls back to slower kernels or pads internally.
    ``padded`` is the value that fixes it: the next multiple of ``multiple``, or of 64 for
    dimensions of 1024 or more (as nanoGPT pads GPT-2's vocabulary 50257 to 50304).
    """

    module: str
    kind: str
    dim: str
    value: int
    padded: int
    multiple: int

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def _padded(value: int, multiple: int) -> int:
    step = 64 if value >= 1024 else multiple
    return int(math.ceil(value / step) * step)


def shape_check(model: nn.Module, multiple: int = 8, *, convs: bool = True) -> list[ShapeIssue]:
    """Linear (and, with ``convs``, convolution) dims of ``model`` not multiples of ``multiple``.

    Hugging Face's ``Conv1D`` (GPT-2's Linear layers) counts as a Linear.

    The bench checks every Linear and convolution against 8 (16-bit tensor cores), and the
    Linear layers alone against 16 when an fp8 recipe runs (fp8 swaps only Linear layers).

    Example:
        >>> [(i.dim, i.value, i.padded) for i in shape_check(nn.Linear(64, 50257))]
        [('out_features', 50257, 50304)]
    """
    if multiple < 1:
        raise ValueError(f"multiple={multiple} must be >= 1")
    conv1d = hf_conv1d_type()  # Hugging Face GPT-2's Linear: weight stored (in, out)
    issues = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            dims = {"in_features": module.in_features, "out_features": module.out_features}
        elif conv1d is not None and isinstance(module, conv1d):
            n_in, n_out = module.weight.shape
            dims = {"in_features": n_in, "out_features": n_out}
        elif convs and isinstance(module, nn.modules.conv._ConvNd):
            dims = {"in_channels": module.in_channels, "out_channels": module.out_channels}
        else:
            continue
        for dim, value in dims.items():
            if value % multiple:
                issues.append(
                    ShapeIssue(
                        name or "(model)",
                        type(module).__name__,
                        dim,
                        value,
                        _padded(value, multiple),
                        multiple,
                    )
                )
    return issues


# Kernel-name fragments of tensor-core GEMM/conv kernels (cuBLAS, cuDNN, CUTLASS, Triton).
_TENSOR_CORE_MARKERS = (
    "xmma",
    "hmma",
    "imma",
    "gmma",
    "wgmma",
    "tensorop",
    "16816",
    "1688",
    "_tc_",
    "s884",
    "h884",
    "cutlass_80",
    "cutlass_90",
    "sm80_",
    "sm90_",
)


def tensor_core_share(kernel_times: dict[str, float]) -> float | None:
    """Share of GPU kernel time spent in tensor-core kernels (by kernel name).

    share = sum(time of kernels whose name has a tensor-core marker) / sum(all kernel time)

    Example:
        >>> tensor_core_share({"sm90_xmma_gemm_bf16": 3.0, "elementwise_kernel": 1.0})
        0.75
    """
    total = sum(kernel_times.values())
    if total <= 0:
        return None
    tc = sum(
        t
        for name, t in kernel_times.items()
        if any(m in name.lower() for m in _TENSOR_CORE_MARKERS)
    )
    return tc / total
