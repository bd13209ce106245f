"""Number formats: bit layouts, derived limits, rounding into any format, explanations.

A :class:`FloatFormat` is the bit layout of a binary floating-point format (sign, exponent and
mantissa fields, exponent bias, how infinity and NaN are encoded). Every limit users look up
in ``torch.finfo`` (max, smallest normal, smallest subnormal, eps) is *derived* from those
fields, never typed in. :func:`quantize` rounds a tensor into any format (the built-in ones
in :data:`FORMATS` or a :meth:`FloatFormat.custom` layout); :func:`decode` and
:func:`explain` show what a single value becomes.

Special encodings (the names follow ml_dtypes / LLVM):

* ``ieee``: the all-ones exponent holds ±inf (mantissa 0) and NaN (mantissa ≠ 0).
* ``fn`` ("finite, NaN"): no infinities; only the all-ones bit pattern is NaN, so the
  top binade is usable except its largest mantissa (fp8_e4m3fn max = 1.75 · 2^8 = 448).
  With no mantissa bits (e8m0fnu) the all-ones exponent is NaN.
* ``fnuz`` ("finite, NaN, unsigned zero"): NaN sits at the negative-zero pattern; no -0.
  These formats use a bias one larger than IEEE.
* ``none``: no infinities, no NaN (fp6, fp4): every pattern is a number.

A format with no mantissa bits (e8m0fnu) has no subnormals and no zero: exponent field 0
is the number 2^-bias (the OCP MX E8M0 scale convention).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from mixprec._quantize import quantize_tensor

__all__ = [
    "FORMATS",
    "FORMAT_ALIASES",
    "Decoded",
    "Explanation",
    "FloatFormat",
    "decode",
    "explain",
    "format_names",
    "get_format",
    "quantize",
    "to_torch_dtype",
]

NanEncoding = Literal["ieee", "fn", "fnuz", "none"]
Rounding = Literal["nearest", "stochastic", "toward_zero"]
Overflow = Literal["saturate", "inf", "nan"]
_NAN_ENCODINGS = ("ieee", "fn", "fnuz", "none")
_ROUNDINGS = ("nearest", "stochastic", "toward_zero")
_OVERFLOWS = ("saturate", "inf", "nan")


@dataclass(frozen=True, slots=True)
class FloatFormat:
    """The bit layout of a binary floating-point format; every limit is derived from it.

    Args:
        name: short name (registry key for built-in formats).
        exponent_bits: width of the exponent field (>= 1).
        mantissa_bits: width of the stored mantissa (fraction) field, without the hidden bit.
        bias: exponent bias; a normal number is ``(1 + f / 2^m) · 2^(E - bias)``.
        has_inf: whether the all-ones exponent with a zero mantissa means ±inf (IEEE only).
        nan: how NaN is encoded: ``"ieee"``, ``"fn"``, ``"fnuz"`` or ``"none"``.
        signed: whether there is a sign bit.

    Example:
        >>> fmt = get_format("fp8_e4m3fn")
        >>> fmt.bits, fmt.max, fmt.min_normal, fmt.min_subnormal
        (8, 448.0, 0.015625, 0.001953125)
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    has_inf: bool
    nan: NanEncoding
    signed: bool = True

    def __post_init__(self) -> None:
        e, m = self.exponent_bits, self.mantissa_bits
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(
                f"exponent_bits={e!r}: a float format needs at least 1 exponent bit "
                "(with 0 it is a fixed-point/integer format)"
            )
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"mantissa_bits={m!r}: must be an integer >= 0")
        if self.nan not in _NAN_ENCODINGS:
            raise ValueError(f"nan={self.nan!r}: choose one of {_NAN_ENCODINGS}")
        if self.bits > 64:
            raise ValueError(f"{self.bits} bits (1 + {e} + {m}): at most 64 bits are supported")
        if self.has_inf != (self.nan == "ieee"):
            raise ValueError(
                f"has_inf={self.has_inf} with nan={self.nan!r}: infinities exist exactly in "
                "the IEEE encoding (has_inf=True with nan='ieee')"
            )
        if self.nan == "ieee" and (m == 0 or e < 2):
            raise ValueError(
                f"e{e}m{m} with IEEE specials: needs >= 2 exponent bits and >= 1 mantissa bit "
                "to tell inf from NaN and keep finite numbers"
            )
        if self.nan == "fnuz" and not self.signed:
            raise ValueError("nan='fnuz' puts NaN at the negative-zero pattern: needs a sign bit")
        if self.nan == "fn" and e + m < 2:
            raise ValueError(f"e{e}m{m} with nan='fn': NaN would leave no finite number")
        if self.max_exponent < self.min_exponent:
            raise ValueError(f"e{e}m{m}: the special encodings leave no normal binade")

    @classmethod
    def custom(
        cls,
        exponent_bits: int,
        mantissa_bits: int,
        *,
        bias: int | None = None,
        nan: NanEncoding = "ieee",
        signed: bool = True,
        name: str | None = None,
    ) -> FloatFormat:
        """A format of any layout up to 32 bits, e.g. ``FloatFormat.custom(3, 4)``.

        Args:
            exponent_bits: exponent field width (>= 1).
            mantissa_bits: mantissa field width (>= 0).
            bias: exponent bias; default ``2^(e-1) - 1`` (IEEE), plus one for ``fnuz``.
            nan: NaN encoding (``"ieee"`` implies infinities).
            signed: whether there is a sign bit.
            name: label; default ``e{e}m{m}`` plus the encoding suffix.

        Raises:
            ValueError: if the layout is impossible (no exponent bits, more than 32 bits, ...).

        Example:
            >>> FloatFormat.custom(3, 4, nan="fn").max
            30.0
        """
        for label, v in (("exponent_bits", exponent_bits), ("mantissa_bits", mantissa_bits)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{label}={v!r}: must be an integer")
        total = int(signed) + exponent_bits + mantissa_bits
        if total > 32:
            raise ValueError(
                f"e{exponent_bits}m{mantissa_bits}: {total} bits; custom formats have at most 32"
            )
        if exponent_bits < 1:
            raise ValueError(
                f"exponent_bits={exponent_bits}: a float format needs at least 1 exponent bit"
            )
        if bias is None:
            bias = 2 ** (exponent_bits - 1) - 1 + (nan == "fnuz")
        suffix = {"ieee": "", "fn": "fn", "fnuz": "fnuz", "none": "fn"}[nan]
        return cls(
            name=name or f"e{exponent_bits}m{mantissa_bits}{suffix}{'' if signed else 'u'}",
            exponent_bits=exponent_bits,
            mantissa_bits=mantissa_bits,
            bias=bias,
            has_inf=nan == "ieee",
            nan=nan,
            signed=signed,
        )

    # ---- derived layout -----------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Total width: ``signed + exponent_bits + mantissa_bits``."""
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def has_zero(self) -> bool:
        """Zero exists unless there are no mantissa bits (then field 0 is ``2^-bias``)."""
        return self.mantissa_bits > 0

    @property
    def has_negative_zero(self) -> bool:
        """-0 exists for signed formats with a zero, except ``fnuz`` (NaN takes -0)."""
        return self.signed and self.has_zero and self.nan != "fnuz"

    @property
    def has_nan(self) -> bool:
        """Whether some bit pattern means NaN (every encoding but ``none``)."""
        return self.nan != "none"

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal: ``1 - bias`` (``-bias`` with no mantissa bits)."""
        return (1 if self.has_zero else 0) - self.bias

    @property
    def max_exponent(self) -> int:
        """Exponent of the top binade: all-ones exponent field minus bias, less one when
        that field is reserved (IEEE inf/NaN; ``fn`` with no mantissa bits)."""
        top = 2**self.exponent_bits - 1
        reserved = self.nan == "ieee" or (self.nan == "fn" and self.mantissa_bits == 0)
        return top - reserved - self.bias

    @property
    def max(self) -> float:
        """Largest finite value: ``(2^(m+1) - 1 - [fn]) · 2^(emax - m)``, where ``[fn]`` is 1
        when the all-ones pattern of the top binade is NaN (``fn`` with mantissa bits).
        Limits beyond float64 read as ``inf`` (max) and ``0.0`` (min_normal, min_subnormal)."""
        m = self.mantissa_bits
        try:
            return math.ldexp(float(self._max_significand), self.max_exponent - m)
        except OverflowError:  # beyond float64 (custom formats with > 11 exponent bits)
            return math.inf

    @property
    def _max_significand(self) -> int:
        m = self.mantissa_bits
        return 2 ** (m + 1) - 1 - (self.nan == "fn" and m > 0)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value: ``2^emin`` (``torch.finfo.tiny``)."""
        return math.ldexp(1.0, self.min_exponent)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value: ``2^(emin - m)`` (equals min_normal when m = 0)."""
        return math.ldexp(1.0, self.min_exponent - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Gap between 1 and the next larger value: ``2^-m``."""
        return math.ldexp(1.0, -self.mantissa_bits)

    @property
    def decimal_digits(self) -> int:
        """Decimal digits always kept: ``floor(m · log10 2)`` (numpy's ``finfo.precision``)."""
        return int(math.floor(self.mantissa_bits * math.log10(2)))

    @property
    def dynamic_range_binades(self) -> float:
        """``log2(max / min_subnormal)``: how many powers of two the finite values span."""
        return math.log2(self._max_significand) + self.max_exponent - self.min_exponent

    @property
    def layout(self) -> str:
        """Field widths as ``s1 e5 m10`` (``e8 m0`` for an unsigned format)."""
        sign = "s1 " if self.signed else ""
        return f"{sign}e{self.exponent_bits} m{self.mantissa_bits}"

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype with this exact layout, or ``None`` (see :func:`to_torch_dtype`)."""
        attr = _TORCH_DTYPE_OF_LAYOUT.get(self._layout_key())
        return getattr(torch, attr, None) if attr else None

    def _layout_key(self) -> tuple:
        return (self.exponent_bits, self.mantissa_bits, self.bias, self.nan, self.signed)

    def __str__(self) -> str:
        return self.name


def _fmt(name: str, e: int, m: int, nan: NanEncoding = "ieee", *, signed: bool = True):
    return FloatFormat.custom(e, m, nan=nan, signed=signed, name=name)


# One table: every built-in format. Biases follow from the encoding (IEEE: 2^(e-1)-1,
# fnuz: one more); e8m0fnu uses bias 127 like IEEE. fp64 is spelled out: custom() stops at
# 32 bits.
FORMATS: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        FloatFormat("fp64", 11, 52, 1023, True, "ieee"),
        _fmt("fp32", 8, 23),
        _fmt("tf32", 8, 10),
        _fmt("fp16", 5, 10),
        _fmt("bf16", 8, 7),
        _fmt("fp8_e4m3fn", 4, 3, "fn"),
        _fmt("fp8_e5m2", 5, 2),
        _fmt("fp8_e4m3fnuz", 4, 3, "fnuz"),
        _fmt("fp8_e5m2fnuz", 5, 2, "fnuz"),
        _fmt("fp6_e3m2fn", 3, 2, "none"),
        _fmt("fp6_e2m3fn", 2, 3, "none"),
        _fmt("fp4_e2m1fn", 2, 1, "none"),
        _fmt("e8m0fnu", 8, 0, "fn", signed=False),
    )
}

# Other names people use for the same formats (one table; keys are lower case).
FORMAT_ALIASES: dict[str, str] = {
    "float64": "fp64", "double": "fp64", "f64": "fp64",
    "float32": "fp32", "float": "fp32", "single": "fp32", "f32": "fp32",
    "tensorfloat32": "tf32",
    "float16": "fp16", "half": "fp16", "f16": "fp16",
    "bfloat16": "bf16",
    "e4m3": "fp8_e4m3fn", "e4m3fn": "fp8_e4m3fn", "float8_e4m3fn": "fp8_e4m3fn",
    "e5m2": "fp8_e5m2", "float8_e5m2": "fp8_e5m2",
    "e4m3fnuz": "fp8_e4m3fnuz", "float8_e4m3fnuz": "fp8_e4m3fnuz",
    "e5m2fnuz": "fp8_e5m2fnuz", "float8_e5m2fnuz": "fp8_e5m2fnuz",
    "e3m2": "fp6_e3m2fn", "float6_e3m2fn": "fp6_e3m2fn",
    "e2m3": "fp6_e2m3fn", "float6_e2m3fn": "fp6_e2m3fn",
    "e2m1": "fp4_e2m1fn", "fp4": "fp4_e2m1fn", "float4_e2m1fn": "fp4_e2m1fn",
    "e8m0": "e8m0fnu", "float8_e8m0fnu": "e8m0fnu", "fp8_e8m0fnu": "e8m0fnu",
}  # fmt: skip

# torch storage dtypes by layout (exponent bits, mantissa bits, bias, NaN encoding, signed).
# fp4 has only the packed float4_e2m1fn_x2 (two values a byte), which is not an element dtype.
_TORCH_DTYPE_OF_LAYOUT: dict[tuple, str] = {
    (11, 52, 1023, "ieee", True): "float64",
    (8, 23, 127, "ieee", True): "float32",
    (5, 10, 15, "ieee", True): "float16",
    (8, 7, 127, "ieee", True): "bfloat16",
    (4, 3, 7, "fn", True): "float8_e4m3fn",
    (5, 2, 15, "ieee", True): "float8_e5m2",
    (4, 3, 8, "fnuz", True): "float8_e4m3fnuz",
    (5, 2, 16, "fnuz", True): "float8_e5m2fnuz",
    (8, 0, 127, "fn", False): "float8_e8m0fnu",
}


def format_names() -> list[str]:
    """Names of the built-in formats, widest first.

    Example:
        >>> format_names()[:3]
        ['fp64', 'fp32', 'tf32']
    """
    return list(FORMATS)


def get_format(fmt: str | FloatFormat | torch.dtype) -> FloatFormat:
    """Look up a format by name, alias (``"half"``, ``"e4m3"``...) or torch dtype.

    A name ``e{E}m{M}`` with an optional ``fn``/``fnuz`` suffix that is not an alias gives
    :meth:`FloatFormat.custom` (``"e3m4"`` is IEEE-style with infinities).

    Raises:
        ValueError: for an unknown name, listing the known names and aliases.

    Example:
        >>> get_format("bfloat16").name
        'bf16'
    """
    if isinstance(fmt, FloatFormat):
        return fmt
    if isinstance(fmt, torch.dtype):
        for f in FORMATS.values():
            if f.torch_dtype == fmt:
                return f
        raise ValueError(f"torch dtype {fmt} is not a float format mixprec knows")
    if isinstance(fmt, str):
        key = fmt.strip().lower()
        key = FORMAT_ALIASES.get(key, key)
        if key in FORMATS:
            return FORMATS[key]
        spec = re.fullmatch(r"e(\d+)m(\d+)(fnuz|fn)?", key)
        if spec:  # a custom layout spelled like ml_dtypes: e3m4, e2m5fn, e4m3fnuz
            nan = {None: "ieee", "fn": "fn", "fnuz": "fnuz"}[spec[3]]
            return FloatFormat.custom(int(spec[1]), int(spec[2]), nan=nan)
    raise ValueError(
        f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)} "
        f"(aliases: {', '.join(FORMAT_ALIASES)}), or a layout such as e3m4"
    )


def to_torch_dtype(fmt: str | FloatFormat) -> torch.dtype:
    """The torch dtype storing ``fmt``.

    Raises:
        ValueError: if torch has no element dtype with this layout (tf32, fp6, fp4, custom).

    Example:
        >>> to_torch_dtype("e4m3")
        torch.float8_e4m3fn
    """
    f = get_format(fmt)
    dtype = f.torch_dtype
    if dtype is None:
        have = [n for n, g in FORMATS.items() if g.torch_dtype is not None]
        raise ValueError(f"torch has no dtype for {f.name}; formats with one: {', '.join(have)}")
    return dtype


def quantize(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    *,
    rounding: Rounding = "nearest",
    overflow: Overflow | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round every element of ``x`` to a value representable in ``fmt``; keep x's dtype.

    ``nearest`` is round-to-nearest, ties to even (ties away from zero when the format has
    no mantissa bits, as ml_dtypes does). ``toward_zero`` truncates. ``stochastic`` picks
    the lower or upper neighbour ``lo <= |x| <= hi`` with ``P(hi) = (|x| - lo) / (hi - lo)``
    (drawn from ``generator``; reproducible with it), so ``E[quantize(x)] = x``.

    Overflow (a rounded magnitude above ``fmt.max``) follows ``overflow``: ``"inf"``,
    ``"nan"`` or ``"saturate"`` (±max; infinities too, like ``torch.clamp``). The default is
    the format's own convention, as in ml_dtypes: IEEE formats -> inf, ``fn``/``fnuz`` ->
    NaN, formats with neither -> saturate. NaN inputs stay NaN (also for fp6/fp4, which
    have no NaN; ml_dtypes turns them into ±0). Formats without -0 return +0; unsigned
    formats map negatives (and, with no zero, 0) to NaN.

    Works on CPU and CUDA tensors of dtype float64, float32, bfloat16 or float16; only
    vectorized tensor ops. A value representable in ``fmt`` but not in x's dtype (e8m0's
    2^-127 in a float16 tensor) is rounded to x's dtype by torch's cast.

    Raises:
        TypeError: for a non-tensor, or an integer, complex or other dtype.
        ValueError: for an unknown format, rounding or overflow mode, or an overflow mode
            the format cannot express (``"inf"`` without infinities, ``"nan"`` without NaN).

    Example:
        >>> quantize(torch.tensor([0.1, 500.0]), "fp8_e4m3fn")
        tensor([0.1016,    nan])
        >>> quantize(torch.tensor([0.1, 500.0]), "fp8_e4m3fn", overflow="saturate")
        tensor([  0.1016, 448.0000])
    """
    f = get_format(fmt)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize takes a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"quantize takes float64, float32, bfloat16 or float16 tensors, got {x.dtype}"
        )
    if rounding not in _ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: choose one of {_ROUNDINGS}")
    if overflow is None:
        overflow = "inf" if f.has_inf else ("nan" if f.has_nan else "saturate")
    if overflow not in _OVERFLOWS:
        raise ValueError(f"overflow={overflow!r}: choose one of {_OVERFLOWS} or None")
    if overflow == "inf" and not f.has_inf:
        raise ValueError(f"overflow='inf': {f.name} has no infinities; use 'nan' or 'saturate'")
    if overflow == "nan" and not f.has_nan:
        raise ValueError(f"overflow='nan': {f.name} has no NaN; use 'saturate'")
    return quantize_tensor(x, f, rounding, overflow, generator)


# ---- single values: decode and explain ------------------------------------------------------
ValueClass = Literal["zero", "subnormal", "normal", "inf", "nan"]


@dataclass(frozen=True, slots=True)
class Decoded:
    """The bit fields of one value of a format (see :func:`decode`)."""

    format: str
    value: float  # the representable value decoded (after rounding to nearest)
    bits: int  # the bit pattern as an unsigned integer
    bit_string: str  # fields separated by spaces: sign exponent mantissa
    sign: int
    exponent_field: int  # biased
    mantissa_field: int
    exponent: int | None  # unbiased exponent of a finite nonzero value
    value_class: ValueClass


def _scalar_quantize(value: float, f: FloatFormat, rounding: Rounding = "nearest") -> float:
    return float(quantize(torch.tensor([value], dtype=torch.float64), f, rounding=rounding)[0])


def decode(value: float, fmt: str | FloatFormat) -> Decoded:
    """Round ``value`` to ``fmt`` (nearest) and split the result into its bit fields.

    For a finite nonzero result ``v``: ``exponent = max(floor(log2|v|), emin)``,
    ``exponent_field = exponent + bias`` (0 for subnormals), and
    ``mantissa_field = |v| / 2^(exponent - m) - 2^m`` (without the ``- 2^m`` for subnormals).

    Example:
        >>> decode(1.0, "bf16").bit_string
        '0 01111111 0000000'
    """
    f = get_format(fmt)
    v = _scalar_quantize(float(value), f)
    e_bits, m = f.exponent_bits, f.mantissa_bits
    sign = int(math.copysign(1.0, v) < 0) if f.signed else 0
    exponent: int | None = None
    if math.isnan(v):
        cls: ValueClass = "nan"
        if f.nan == "ieee":
            ef, mf = 2**e_bits - 1, 1 << (m - 1)
        elif f.nan == "fnuz":
            sign, ef, mf = 1, 0, 0
        else:  # fn: all ones but the sign
            ef, mf = 2**e_bits - 1, 2**m - 1
    elif math.isinf(v):
        cls, ef, mf = "inf", 2**e_bits - 1, 0
    elif v == 0.0:
        cls, ef, mf = "zero", 0, 0
    else:
        mag = abs(v)
        exponent = max(math.frexp(mag)[1] - 1, f.min_exponent)
        significand = int(math.ldexp(mag, m - exponent))  # exact: v is representable
        if significand >> m:  # normal (or any value of a format with no subnormals)
            cls, ef, mf = "normal", exponent + f.bias, significand - (1 << m)
        else:
            cls, ef, mf = "subnormal", 0, significand
    bits = (sign << (e_bits + m)) | (ef << m) | mf
    fields = ([str(sign)] if f.signed else []) + [format(ef, f"0{e_bits}b")]
    if m:
        fields.append(format(mf, f"0{m}b"))
    return Decoded(f.name, v, bits, " ".join(fields), sign, ef, mf, exponent, cls)


Status = Literal["exact", "rounded", "subnormal", "underflow", "overflow", "nan"]


@dataclass(frozen=True, slots=True)
class Explanation:
    """What one value becomes in one format (see :func:`explain`)."""

    format: str
    value: float
    nearest: float  # quantize(value, rounding="nearest") with the format's overflow default
    abs_error: float  # |nearest - value|
    rel_error: float  # |nearest - value| / |value| (0 for value 0)
    below: float  # largest representable <= value (-inf past -max)
    above: float  # smallest representable >= value (inf past max)
    gap: float  # spacing at |value|: 2^(clamp(floor(log2|value|), emin, emax) - m)
    status: Status
    decoded: Decoded = field(repr=False)


def explain(value: float, formats: str | FloatFormat | list | tuple) -> list[Explanation]:
    """Explain what ``value`` becomes in each format.

    Per format: the nearest representable value, absolute and relative error
    (``|q - x|`` and ``|q - x| / |x|``), the neighbours ``below <= x <= above`` and the
    spacing ``gap = 2^(clamp(floor(log2|x|), emin, emax) - m)`` there, and a status: ``exact``,
    ``rounded``, ``subnormal`` (lands in the subnormal range), ``underflow`` (nonzero value
    rounds to 0), ``overflow`` (beyond max) or ``nan``.

    Example:
        >>> [round(e.rel_error, 5) for e in explain(0.001, ["fp16", "bf16"])]
        [0.0004, 0.00055]
    """
    fmts = [formats] if isinstance(formats, (str, FloatFormat)) else list(formats)
    x = float(value)
    rows = []
    for f in map(get_format, fmts):
        d = decode(x, f)
        q = d.value
        tz = _scalar_quantize(x, f, "toward_zero")
        mag = abs(x)
        if math.isfinite(x) and mag > 0:
            e = min(max(math.frexp(mag)[1] - 1, f.min_exponent), f.max_exponent)
            gap = math.ldexp(1.0, e - f.mantissa_bits)
        else:
            gap = f.min_subnormal if x == 0 else math.nan
        if math.isnan(x) or not math.isfinite(tz) or mag > f.max:
            lo, hi = (f.max, math.inf) if x > 0 else (-math.inf, -f.max)
            lo, hi = (lo, hi) if not math.isnan(x) else (math.nan, math.nan)
        elif tz == x:
            lo = hi = x
        else:
            away = math.copysign(abs(tz) + gap, x)
            lo, hi = (tz, away) if x > 0 else (away, tz)
        if not f.signed and x < 0:
            lo, hi = (math.nan, f.min_subnormal if f.has_zero else f.min_normal)
        err = abs(q - x) if math.isfinite(q) and math.isfinite(x) else math.inf
        if math.isnan(x):
            status: Status = "nan"
            err = math.nan
        elif math.isfinite(x) and mag > 0 and not math.isfinite(q) or mag > f.max:
            status = "overflow"
        elif math.isnan(q):
            status = "nan"
        elif q == 0 and x != 0:
            status = "underflow"
        elif d.value_class == "subnormal":
            status = "subnormal"
        else:
            status = "exact" if q == x else "rounded"
        rel = err / mag if mag > 0 and math.isfinite(mag) else (0.0 if err == 0 else math.inf)
        rows.append(Explanation(f.name, x, q, err, rel, lo, hi, gap, status, d))
    return rows
