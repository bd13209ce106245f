"""Memory planner: predict training memory per device, and measure it.

* :func:`estimate` — bytes per part (weights, gradients, masters, optimizer states,
  compensation buffers, autocast / fp8 copies, activations, transients) from a recipe's
  dtypes, for a preset, a Hugging Face ``config.json``, a :class:`ModelSpec`, a parameter
  count or an ``nn.Module``; ZeRO / FSDP sharding across devices.
* :func:`measure` — real training steps through :class:`mixprec.Precision`; peak and its
  breakdown (CUDA allocator statistics, or a live-storage tracker on other devices).

Example:
    >>> from mixprec import memory
    >>> e = memory.estimate("llama-2-7b", "bf16-mixed", seq_len=4096)
    >>> e.bytes_per_param
    16.0
"""

from mixprec.memory.devices import DEVICES, device_memory, parse_size
from mixprec.memory.estimate import OPTIMIZERS, MemoryEstimate, estimate
from mixprec.memory.measure import MeasuredMemory, measure
from mixprec.memory.specs import PRESETS, ModelSpec, get_spec, load_config, preset_names

__all__ = [
    "DEVICES",
    "OPTIMIZERS",
    "PRESETS",
    "MeasuredMemory",
    "MemoryEstimate",
    "ModelSpec",
    "device_memory",
    "estimate",
    "get_spec",
    "load_config",
    "measure",
    "parse_size",
    "preset_names",
]
