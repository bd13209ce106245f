"""The MX GEMM on hardware: ``torch._scaled_mm`` with E8M0 block scales in cuBLAS's layout.

Blackwell GPUs (CUDA compute capability 10.0 and later) multiply MXFP8 operands in their
tensor cores: the product of ``a`` (M, K) and ``b`` (K, N), both E4M3, each with one E8M0
scale per 32 elements along K, accumulated in float32. ``torch._scaled_mm`` reaches that
kernel (cuBLASLt's ``VEC32_UE8M0`` scale mode) when both scales are ``float8_e8m0fnu``
tensors laid out as cuBLAS reads them: the (rows, K/32) scale matrix of each operand
(rows = M for ``a``, N for ``b``) cut into tiles of 128 rows x 4 columns, each tile stored
as 32 x 16 bytes where byte ``(r % 32, 4 * (r // 32) + c)`` holds tile entry (r, c)
(:func:`to_blocked`; NVIDIA's cuBLAS documentation, "1D block scaling factors layout").

Where that kernel is missing (a CPU, Hopper and older GPUs, ROCm, an older torch), the MX
product is emulated (:func:`mixprec.float8.granular_linear.granular_gemm`):
:func:`mx_scaled_mm_support` says which, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DeviceFacts",
    "MX_MIN_CAPABILITY",
    "MX_MIN_CUDA",
    "MX_MIN_TORCH",
    "e8m0_codes",
    "mx_scaled_mm",
    "mx_scaled_mm_operands",
    "mx_scaled_mm_support",
    "to_blocked",
]

MX_MIN_CAPABILITY = (10, 0)
"""CUDA compute capability of the first GPUs with MX tensor cores (Blackwell, sm_100)."""
MX_MIN_TORCH = (2, 7)
"""First torch release whose ``_scaled_mm`` takes ``float8_e8m0fnu`` block scales."""
MX_MIN_CUDA = (12, 8)
"""First CUDA toolkit with Blackwell support and cuBLASLt's ``VEC32_UE8M0`` scales."""


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What decides whether the MX kernel can run: the device and the torch build.

    Args:
        device: the device, as ``str(torch.device)`` (``"cuda:0"``, ``"cpu"``).
        name: the GPU's name (``torch.cuda.get_device_name``), or ``""``.
        capability: CUDA compute capability, or None off CUDA.
        torch_version: ``torch.__version__``.
        cuda_version: ``torch.version.cuda`` (None for a CPU or ROCm build).
        hip: the torch build is ROCm's.
        e8m0: the torch build has ``torch.float8_e8m0fnu``.
    """

    device: str
    name: str
    capability: tuple[int, int] | None
    torch_version: str
    cuda_version: str | None
    hip: bool
    e8m0: bool

    @classmethod
    def of(cls, device: torch.device | str) -> DeviceFacts:
        """The facts of ``device`` in this process (asks CUDA only for a CUDA device)."""
        device = torch.device(device)
        cuda = device.type == "cuda" and torch.cuda.is_available()
        return cls(
            device=str(device),
            name=torch.cuda.get_device_name(device) if cuda else "",
            capability=tuple(torch.cuda.get_device_capability(device)) if cuda else None,
            torch_version=str(torch.__version__),
            cuda_version=torch.version.cuda,
            hip=torch.version.hip is not None,
            e8m0=hasattr(torch, "float8_e8m0fnu"),
        )


def _version(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def mx_scaled_mm_support(
    device: torch.device | str,
    a_dtype: torch.dtype | None = None,
    b_dtype: torch.dtype | None = None,
    *,
    facts: DeviceFacts | None = None,
) -> tuple[bool, str]:
    """Whether ``torch._scaled_mm`` runs MXFP8 products on ``device``: ``(ok, reason)``.

    Supported when all hold: a CUDA (not ROCm) build of torch >= 2.7 with CUDA >= 12.8 and
    ``float8_e8m0fnu``; a CUDA device of compute capability >= 10.0; both operands E4M3
    (``float8_e4m3fn``; torch's MXFP8 kernel takes no other pair). ``reason`` names the
    device and the first condition that fails, or what was found when supported.
    ``facts`` replaces what is read from this process (for tests and planning).

    Example:
        >>> mx_scaled_mm_support("cpu")
        (False, 'cpu: the MX kernel of torch._scaled_mm runs only on CUDA GPUs')
        >>> sm100 = DeviceFacts("cuda:0", "NVIDIA B200", (10, 0), "2.8.0", "12.8", False, True)
        >>> mx_scaled_mm_support("cuda:0", facts=sm100)
        (True, 'cuda:0 (NVIDIA B200, sm_100): torch 2.8.0, CUDA 12.8')
    """
    f = facts if facts is not None else DeviceFacts.of(device)
    e4m3 = getattr(torch, "float8_e4m3fn", None)
    where = f.device
    if not f.device.startswith("cuda"):
        return False, f"{where}: the MX kernel of torch._scaled_mm runs only on CUDA GPUs"
    if f.hip:
        return False, f"{where}: ROCm build; mixprec calls the MX kernel only on CUDA (cuBLASLt)"
    if f.capability is None:
        return False, f"{where}: no CUDA device is available to this process"
    major, minor = f.capability
    gpu = f"{f.name}, " if f.name else ""
    where = f"{f.device} ({gpu}sm_{major}{minor})"
    if f.capability < MX_MIN_CAPABILITY:
        return False, (
            f"{where}: compute capability {major}.{minor}; MX tensor cores need "
            f"{MX_MIN_CAPABILITY[0]}.{MX_MIN_CAPABILITY[1]} or later (Blackwell)"
        )
    if not f.e8m0 or _version(f.torch_version) < MX_MIN_TORCH:
        return False, (
            f"{where}: torch {f.torch_version} has no float8_e8m0fnu block scales in "
            f"_scaled_mm; they need torch >= {MX_MIN_TORCH[0]}.{MX_MIN_TORCH[1]}"
        )
    if _version(f.cuda_version) < MX_MIN_CUDA:
        return False, (
            f"{where}: torch built with CUDA {f.cuda_version}; Blackwell's MX kernels need "
            f"CUDA >= {MX_MIN_CUDA[0]}.{MX_MIN_CUDA[1]}"
        )
    for side, dtype in (("a", a_dtype), ("b", b_dtype)):
        if dtype is not None and dtype != e4m3:
            return False, (
                f"{where}: operand {side} is {dtype}; torch._scaled_mm's MXFP8 kernel takes "
                "float8_e4m3fn x float8_e4m3fn only (use backward_format='fp8_e4m3fn', "
                "as Float8Config.from_recipe_name('mxfp8') does)"
            )
    return True, f"{where}: torch {f.torch_version}, CUDA {f.cuda_version}"


def e8m0_codes(X: torch.Tensor) -> torch.Tensor:  # noqa: N803 (the specification's name)
    """E8M0 codes (uint8, 2**(code - 127)) of float32 powers of two in [2**-127, 2**127].

    The code is the float32 exponent field: exact for normal powers of two, and 0 for
    2**-127 (a float32 subnormal, whose exponent field is 0). No rounding is involved.

    Example:
        >>> e8m0_codes(torch.tensor([1.0, 0.5, 2.0**-127, 2.0**127]))
        tensor([127, 126,   0, 254], dtype=torch.uint8)
    """
    bits = X.to(torch.float32).contiguous().view(torch.int32)
    return ((bits >> 23) & 0xFF).to(torch.uint8)


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """Rearrange a (rows, cols) scale matrix into cuBLAS's blocked layout, flattened.

    Zero-pads to rows a multiple of 128 and cols a multiple of 4, cuts (128, 4) tiles in
    row-major tile order, and stores tile entry (r, c) at ``(r % 32, 4 * (r // 32) + c)``
    of the tile's 32 x 16 block::

        out.numel() = ceil(rows / 128) * 128 * ceil(cols / 4) * 4

    Example:
        >>> s = torch.arange(128 * 4).reshape(128, 4)
        >>> to_blocked(s)[:8].tolist()   # row 0 of the tile, then row 32
        [0, 1, 2, 3, 128, 129, 130, 131]
    """
    rows, cols = scales.shape
    tiles_r, tiles_c = -(-rows // 128), -(-cols // 4)
    padded = scales.new_zeros(tiles_r * 128, tiles_c * 4)
    padded[:rows, :cols] = scales
    # (tile_r, r_hi 4, r_lo 32, tile_c, c 4) -> (tile_r, tile_c, r_lo, r_hi, c)
    tiles = padded.view(tiles_r, 4, 32, tiles_c, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(-1)


def mx_scaled_mm_operands(
    qa: torch.Tensor,
    xa: torch.Tensor,
    qb: torch.Tensor,
    xb: torch.Tensor,  # noqa: N803
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The arguments of ``torch._scaled_mm`` for MX operands from :func:`mx_to_float8`.

    ``qa`` (M, K') with scales ``xa`` (M, K'/32) along K; ``qb`` (K', N) with ``xb``
    (K'/32, N); K' a multiple of 32. Returns ``(a, b, scale_a, scale_b, n)``: ``a``
    row-major (M, K'), ``b`` column-major (K', N'), N zero-padded to N' (a multiple of 16,
    as ``_scaled_mm`` requires; zeros add nothing and the result is sliced back to ``n``
    columns), the scales as E8M0 codes (uint8) in the blocked layout of :func:`to_blocked`
    (view them as ``float8_e8m0fnu`` for the call).
    """
    n = qb.shape[1]
    extra = -n % 16
    if extra:
        qb = torch.cat([qb, qb.new_zeros(qb.shape[0], extra)], dim=1)
        xb = torch.cat([xb, xb.new_ones(xb.shape[0], extra)], dim=1)
    a = qa.contiguous()
    b = qb.t().contiguous().t()  # (K', N') column-major
    scale_a = to_blocked(e8m0_codes(xa))  # rows M, one scale per 32 along K
    scale_b = to_blocked(e8m0_codes(xb.t()))  # rows N', one scale per 32 along K
    return a, b, scale_a, scale_b, n


def mx_scaled_mm(
    qa: torch.Tensor,
    xa: torch.Tensor,
    qb: torch.Tensor,
    xb: torch.Tensor,  # noqa: N803
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(qa * xa) @ (qb * xb)`` on the MX tensor cores, float32 accumulation, ``out_dtype``.

    .. warning:: needs a device where :func:`mx_scaled_mm_support` is True; it has not
       run in this project (no Blackwell GPU was available), so it follows torch's
       documented ``_scaled_mm`` contract and torch's own MXFP8 tests.
    """
    a, b, scale_a, scale_b, n = mx_scaled_mm_operands(qa, xa, qb, xb)
    e8m0 = torch.float8_e8m0fnu
    out = torch._scaled_mm(
        a, b, scale_a=scale_a.view(e8m0), scale_b=scale_b.view(e8m0), out_dtype=out_dtype
    )
    return out[:, :n]
