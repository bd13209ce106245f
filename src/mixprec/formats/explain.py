"""Single values: :func:`decode` (bit fields) and :func:`explain` (what a value becomes)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from mixprec.formats.layout import FloatFormat, get_format
from mixprec.formats.rounding import Rounding, quantize

__all__ = ["Decoded", "Explanation", "decode", "explain"]

ValueClass = Literal["zero", "subnormal", "normal", "inf", "nan"]


@dataclass(frozen=True, slots=True)
class Decoded:
    """The bit fields of one value of a format (see :func:`decode`)."""

    format: str
    value: float  # the representable value decoded (after rounding to nearest)
    bits: int | None  # the bit pattern as an unsigned integer; None: NaN in a format without
    bit_string: str  # fields separated by spaces: sign exponent mantissa ("no NaN" if none)
    sign: int
    exponent_field: int  # biased
    mantissa_field: int
    exponent: int | None  # unbiased exponent of a finite nonzero value
    value_class: ValueClass


def _scalar_quantize(value: float, f: FloatFormat, rounding: Rounding = "nearest") -> float:
    return float(quantize(torch.tensor([value], dtype=torch.float64), f, rounding=rounding)[0])


def decode(value: float, fmt: str | FloatFormat) -> Decoded:
    """Round ``value`` to ``fmt`` (nearest) and split the result into its bit fields.

    NaN in a format without NaN (fp6, fp4) has no bit pattern: ``bits`` is None and
    ``bit_string`` says ``"no NaN in fp4_e2m1fn"``.

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
    if math.isnan(v) and not f.has_nan:  # fp6, fp4: every pattern is a number
        return Decoded(f.name, v, None, f"no NaN in {f.name}", 0, 0, 0, None, "nan")
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
    below: float  # largest representable <= value (-inf past -max; NaN if none)
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
        smallest = f.min_subnormal if f.has_zero else f.min_normal
        if math.isnan(x):
            lo = hi = math.nan
        elif not f.signed and (x < 0 or (x == 0 and not f.has_zero)):
            lo, hi = math.nan, (0.0 if f.has_zero else smallest)  # nothing below
        elif mag > f.max or not math.isfinite(tz):
            lo, hi = (f.max, math.inf) if x > 0 else (-math.inf, -f.max)
        elif tz == x:
            lo = hi = x
        else:
            away = math.copysign(abs(tz) + gap, x)
            lo, hi = (tz, away) if x > 0 else (away, tz)
        if q == x:
            err = 0.0
        else:
            err = abs(q - x) if math.isfinite(q) and math.isfinite(x) else math.inf
        try:
            top_gap = math.ldexp(1.0, f.max_exponent - f.mantissa_bits)
        except OverflowError:  # the format's top binade is beyond float64 (e12m3)
            top_gap = math.inf
        saturating = not f.has_inf and not f.has_nan  # the default overflow is saturate
        if math.isnan(x):
            status: Status = "nan"
            err = math.nan
        elif math.isinf(x):
            status = "exact" if q == x else "overflow"
        elif not math.isfinite(q) or (saturating and mag >= f.max + top_gap / 2):
            # finite x beyond the rounding boundary above max (a tie there rounds away from
            # max, whose mantissa is odd, in every saturating format)
            status = "overflow" if mag > f.max else "nan"
        elif q == 0 and x != 0:
            status = "underflow"
        elif d.value_class == "subnormal":
            status = "subnormal"
        else:
            status = "exact" if q == x else "rounded"
        if math.isnan(err):
            rel = math.nan
        elif mag > 0 and math.isfinite(mag):
            rel = err / mag
        else:
            rel = 0.0 if err == 0 else math.inf
        rows.append(Explanation(f.name, x, q, err, rel, lo, hi, gap, status, d))
    return rows
