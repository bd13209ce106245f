"""Memory sizes of common accelerators, and parsing of sizes like ``80GiB``.

Sizes are the marketed capacities (``GB`` for vendors quoting powers of ten is rare for
GPUs: an "80 GB" H100 has 80 GiB = 80 * 2**30 bytes of HBM).
"""

from __future__ import annotations

import re

from mixprec.formats.names import unknown

__all__ = ["DEVICES", "device_memory", "parse_size"]

_GIB = 2**30

# name -> bytes of device memory (GiB as sold).
DEVICES: dict[str, int] = {
    "h100-80gb": 80 * _GIB,
    "h100-94gb": 94 * _GIB,
    "h200": 141 * _GIB,
    "b200": 192 * _GIB,
    "a100-40gb": 40 * _GIB,
    "a100-80gb": 80 * _GIB,
    "a10g": 24 * _GIB,
    "l4": 24 * _GIB,
    "l40s": 48 * _GIB,
    "v100-16gb": 16 * _GIB,
    "v100-32gb": 32 * _GIB,
    "t4": 16 * _GIB,
    "rtx-3090": 24 * _GIB,
    "rtx-4090": 24 * _GIB,
    "rtx-5090": 32 * _GIB,
    "mi250x": 128 * _GIB,
    "mi300x": 192 * _GIB,
}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes in a size like ``"80GiB"``, ``"40 GB"``, ``"1.5TiB"`` or ``"1024"``.

    Raises:
        ValueError: unreadable, zero or negative.

    Example:
        >>> parse_size("80GiB"), parse_size("40GB")
        (85899345920, 40000000000)
    """
    match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"cannot read size {text!r}: expected a number and a unit "
            f"({', '.join(u for u in _UNITS if u)})"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value)


def device_memory(name: str) -> int:
    """Bytes of memory of a known device.

    Raises:
        ValueError: unknown name, listing the known devices.

    Example:
        >>> device_memory("a100-40gb") == 40 * 2**30
        True
    """
    key = name.strip().lower()
    if key not in DEVICES:
        raise ValueError(unknown("device", name, DEVICES))
    return DEVICES[key]
