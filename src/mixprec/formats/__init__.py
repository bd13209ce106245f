"""Number formats: bit layouts, derived limits, rounding into any format, explanations.

Modules: ``layout`` (FloatFormat, registry), ``rounding`` (quantize), ``explain`` (decode,
explain), ``report`` (tables and pictures; imports rich/matplotlib lazily).

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

from mixprec.formats.explain import Decoded, Explanation, decode, explain
from mixprec.formats.layout import (
    FORMAT_ALIASES,
    FORMATS,
    FloatFormat,
    format_names,
    get_format,
    to_torch_dtype,
)
from mixprec.formats.rounding import quantize

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
