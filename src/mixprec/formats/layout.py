"""Bit layouts: :class:`FloatFormat`, the built-in formats, their aliases, lookup.

Every limit (max, smallest normal and subnormal, eps, ...) is a property derived from the
layout's fields; see the package docstring for the NaN/inf encodings.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

from mixprec.formats.names import closest, unknown

__all__ = [
    "FORMATS",
    "FORMAT_ALIASES",
    "FloatFormat",
    "NanEncoding",
    "format_names",
    "get_format",
    "to_torch_dtype",
]

NanEncoding = Literal["ieee", "fn", "fnuz", "none"]
_NAN_ENCODINGS = ("ieee", "fn", "fnuz", "none")


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
        if isinstance(self.bias, bool) or not isinstance(self.bias, int):
            raise ValueError(f"bias={self.bias!r}: must be an integer")
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
        lowest = self.min_exponent - (m if self.has_zero else 0)  # smallest value 2^lowest
        low, high = self._bias_limits()
        if not low <= self.bias <= high:
            raise ValueError(
                f"bias={self.bias} puts e{e}m{m}'s values at 2^{lowest} .. 2^{self.max_exponent}; "
                f"mixprec computes in float64, which needs 2^-bias <= 2^{_F64_MAX_EXP} and a top "
                f"binade >= 2^{_F64_MIN_NORMAL_EXP}: the bias must be between {low} and {high} "
                f"(IEEE default {2 ** (e - 1) - 1})"
            )

    def _bias_limits(self) -> tuple[int, int]:
        """Smallest and largest bias mixprec computes with in float64: ``2^-bias`` (the scale
        of exponent field 0) at most 2^1023, and the top binade a float64 normal (>= 2^-1022)."""
        e, m = self.exponent_bits, self.mantissa_bits
        top = 2**e - 1 - (self.nan == "ieee" or (self.nan == "fn" and m == 0))
        return -_F64_MAX_EXP, top - _F64_MIN_NORMAL_EXP

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
        if nan not in _NAN_ENCODINGS:
            raise ValueError(f"nan={nan!r}: choose one of {_NAN_ENCODINGS}")
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


# float64's smallest normal and top binade (as powers of two)
_F64_MIN_NORMAL_EXP, _F64_MAX_EXP = -1022, 1023


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
    if not isinstance(fmt, str):
        raise TypeError(
            f"format must be a name, a FloatFormat or a torch dtype, got {type(fmt).__name__}"
        )
    extra = "(or an alias such as half, or a layout such as e3m4)"
    message = unknown("format", fmt, FORMATS, extra)
    near = closest(fmt, FORMAT_ALIASES)  # a misspelled alias: suggest it and its format
    if near and not closest(fmt, FORMATS):
        message += f"; close aliases: {', '.join(f'{a} ({FORMAT_ALIASES[a]})' for a in near)}"
    raise ValueError(message)


def to_torch_dtype(fmt: str | FloatFormat | torch.dtype) -> torch.dtype:
    """The torch dtype storing ``fmt``: :attr:`FloatFormat.torch_dtype`, or an error.

    The one lookup from a format to a torch dtype (fp8 layers, recipes and the top-level
    API all call it); use the property where "no dtype" is an answer, this where it is an
    error.

    Raises:
        ValueError: if torch has no element dtype with this layout (tf32, fp6, fp4, custom).
        RuntimeError: if torch has one, but not this build (float8_e8m0fnu is missing
            from older torch releases).

    Example:
        >>> to_torch_dtype("e4m3")
        torch.float8_e4m3fn
    """
    f = get_format(fmt)
    dtype = f.torch_dtype
    if dtype is not None:
        return dtype
    attr = _TORCH_DTYPE_OF_LAYOUT.get(f._layout_key())
    if attr is not None:
        raise RuntimeError(
            f"this torch build ({torch.__version__}) has no torch.{attr} dtype for {f.name}; "
            "a newer torch has it"
        )
    have = [n for n, g in FORMATS.items() if g.torch_dtype is not None]
    raise ValueError(f"torch has no dtype for {f.name}; formats with one: {', '.join(have)}")
