"""On-device statistics of one tensor, exact for every target format, in one histogram.

Every statistic the monitor reports comes from one integer histogram of ``|x|`` over a
fixed set of *intervals* of the fp32 number line. The interval edges are

* every power of two (the fp32 binade edges ``2**e``, ``e = -126 .. 128``), and
* for each target format ``F`` three thresholds, written as "``|x| >= b``" for an fp32 bit
  pattern ``b`` (so ties are settled exactly as round-to-nearest-even settles them):

  =====================  ==============================================================
  ``F`` flush to zero     ``0 < |x| <= min_subnormal / 2``  (half rounds to zero: even)
  ``F`` subnormal         ``min_subnormal / 2 < |x| < min_normal - min_subnormal / 2``
  ``F`` overflow          ``|x| >= max + ulp(max) / 2`` (or ``>`` when ``max`` has an even
                          last mantissa bit, as in ``fp8_e4m3fn``: the tie rounds to max)
  =====================  ==============================================================

  where ``ulp(max) = 2**(floor(log2 max) - mantissa_bits)``. A value counted "subnormal"
  is one whose nearest-even cast is a non-zero subnormal of ``F``; "flush" is one whose
  cast is zero; "overflow" one whose cast is beyond ``F.max`` (inf, NaN or saturated).

The interval index of ``|x|`` with fp32 bits ``a`` is ``(a >> 23) + #{thresholds <= a}``
(monotone in ``a``), so the counts of the format classes are differences of tail sums.
On the device the index is read from a lookup table, so one tensor costs a handful of
elementwise passes and one ``bincount``:

* 16-bit tensors (fp16, bf16): a ``bincount`` of all ``2**15`` magnitudes ``bits & 0x7fff``,
  summed into the intervals with ``index_add_`` (exact for every value).
* other tensors, as fp32: the key ``k = (a >> 12) + ((a - 1) >> 12)`` is ``2j - 1`` when
  ``a == j << 12`` and ``2j`` for ``a`` strictly inside ``(j << 12, (j + 1) << 12)``; every
  threshold of a format with at most 10 mantissa bits is such a ``j << 12`` or
  ``(j << 12) + 1`` (its overflow threshold ``max + ulp(max) / 2`` has ``mantissa_bits + 1``
  significant bits), so ``lut20[k + 1]`` (int16) is exact. Formats with more mantissa bits
  fall back to comparing with each threshold (exact, slower).

On the CPU the same computation runs in one pass of a small C kernel when a C compiler
is present (:mod:`._cpu_kernel`; bit-identical, tested); ``StatsLayout(kernel="torch")``
forces the torch ops.

The result per tensor is one int64 vector ``[counts (n_intervals), max |x| bits,
smallest non-zero |x| bits]``; it stays on the device until the monitor reads it out.
Tensors of other dtypes are cast to fp32 first (fp64 values outside fp32's range are
counted as fp32 sees them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from mixprec.formats import get_format
from mixprec.numerics import _cpu_kernel

__all__ = ["FormatCounts", "StatsLayout", "TensorStats", "format_thresholds"]

_INF32 = 0x7F800000  # fp32 +inf bit pattern; every larger abs pattern is a NaN
_N_BINADES = 256  # fp32 biased exponents 0 (zero and fp32 subnormals) .. 255 (inf/NaN)
HIST_LOW = -127  # histogram bin of binade e covers [2**e, 2**(e+1)); -127 = below 2**-126
HIST_HIGH = 127


def _f32_bits_ge(value: float, *, strict: bool) -> int:
    """Smallest non-negative fp32 bit pattern ``b`` with ``float(b) >= value`` (``>`` if strict).

    With ``|x|`` an fp32 value, ``|x| >= value`` (or ``> value``) is exactly ``bits(|x|) >= b``.
    """
    if value <= 0.0:
        return 1 if strict else 0
    if not math.isfinite(value):
        return _INF32
    with np.errstate(over="ignore"):
        f = np.float32(value)  # nearest fp32
    if float(f) < value or (strict and float(f) == value):
        f = np.nextafter(f, np.float32(np.inf))
    return int(np.array(f, dtype=np.float32).view(np.int32))


def format_thresholds(fmt) -> tuple[int, int, int]:
    """fp32 bit patterns ``(not_flushed, normal, overflow)`` for a format: see the module doc.

    ``|x| >= not_flushed`` survives the cast (non-zero), ``|x| >= normal`` casts to a normal
    number, ``|x| >= overflow`` overflows.

    Example:
        >>> from mixprec.formats import get_format
        >>> [hex(b) for b in format_thresholds(get_format("fp16"))]
        ['0x33000001', '0x387fe000', '0x477ff000']
    """
    half_sub = fmt.min_subnormal / 2.0
    not_flushed = _f32_bits_ge(half_sub, strict=True)
    normal = _f32_bits_ge(fmt.min_normal - half_sub, strict=False)
    top = math.floor(math.log2(fmt.max))
    ulp = 2.0 ** (top - fmt.mantissa_bits)
    odd_max = int(round(fmt.max / ulp)) % 2 == 1  # nearest-even: tie goes up iff max is odd
    overflow = _f32_bits_ge(fmt.max + ulp / 2.0, strict=not odd_max)
    return not_flushed, normal, overflow


@dataclass(frozen=True, slots=True)
class FormatCounts:
    """Values of one tensor that a cast to one format would overflow, make subnormal, or flush."""

    overflow: int = 0
    subnormal: int = 0
    flush: int = 0

    def __add__(self, other: FormatCounts) -> FormatCounts:
        return FormatCounts(
            self.overflow + other.overflow,
            self.subnormal + other.subnormal,
            self.flush + other.flush,
        )


@dataclass(slots=True)
class TensorStats:
    """Statistics of one tensor (or several merged, e.g. a module called twice in a step).

    Fractions are of all ``numel`` values: ``zero_fraction = zeros / numel``,
    ``nonfinite_fraction = nonfinite / numel``, ``overflow_fraction(F) = overflow_F / numel``,
    likewise ``subnormal_fraction`` and ``flush_fraction``; ``lost_fraction(F)`` is
    ``(overflow_F + flush_F) / numel``. ``histogram[i]`` counts finite non-zero values with
    ``floor(log2 |x|) == HIST_LOW + i`` (index 0: every value below ``2**-126``).
    """

    numel: int
    zeros: int
    nonfinite: int  # inf or NaN
    nans: int
    max_abs: float  # largest |x|; inf when the tensor holds an inf or NaN
    min_nonzero_abs: float  # smallest non-zero |x| (finite); nan when there is none
    formats: dict[str, FormatCounts]
    histogram: np.ndarray = field(repr=False)  # int64, HIST_HIGH - HIST_LOW + 1 bins
    count: int = 1  # tensors merged into these statistics

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def nonfinite_fraction(self) -> float:
        return self.nonfinite / self.numel if self.numel else 0.0

    def _frac(self, fmt: str, what: str) -> float:
        if fmt not in self.formats:
            raise ValueError(
                f"format {fmt!r} is not monitored; monitored: {', '.join(self.formats)}"
            )
        return getattr(self.formats[fmt], what) / self.numel if self.numel else 0.0

    def overflow_fraction(self, fmt: str) -> float:
        return self._frac(fmt, "overflow")

    def subnormal_fraction(self, fmt: str) -> float:
        return self._frac(fmt, "subnormal")

    def flush_fraction(self, fmt: str) -> float:
        return self._frac(fmt, "flush")

    def lost_fraction(self, fmt: str) -> float:
        return self.overflow_fraction(fmt) + self.flush_fraction(fmt)

    def merge(self, other: TensorStats) -> TensorStats:
        """Statistics of the union of both tensors' values."""
        mins = [v for v in (self.min_nonzero_abs, other.min_nonzero_abs) if not math.isnan(v)]
        return TensorStats(
            numel=self.numel + other.numel,
            zeros=self.zeros + other.zeros,
            nonfinite=self.nonfinite + other.nonfinite,
            nans=self.nans + other.nans,
            max_abs=max(self.max_abs, other.max_abs),
            min_nonzero_abs=min(mins) if mins else math.nan,
            formats={k: v + other.formats[k] for k, v in self.formats.items()},
            histogram=self.histogram + other.histogram,
            count=self.count + other.count,
        )


class StatsLayout:
    """The intervals for a tuple of formats, their lookup tables, and the readout.

    Args:
        formats: ``FloatFormat`` objects (from :func:`mixprec.formats.get_format`).
        kernel: ``"auto"`` (the C kernel on the CPU when it builds, else torch ops) or
            ``"torch"`` (torch ops only).

    Example:
        >>> from mixprec.formats import get_format
        >>> layout = StatsLayout((get_format("fp16"),))
        >>> s = layout.summarize(layout.compute(torch.tensor([0.0, 1.0, 1e5, 1e-8])).numpy(),
        ...                      torch.float32)
        >>> s.zeros, s.formats["fp16"]
        (1, FormatCounts(overflow=1, subnormal=0, flush=1))
    """

    def __init__(self, formats, *, kernel: str = "auto") -> None:
        if kernel not in ("auto", "torch"):
            raise ValueError(f"kernel={kernel!r} is not one of 'auto', 'torch'")
        self.kernel = kernel
        self.formats = tuple(formats)
        self.names = tuple(f.name for f in self.formats)
        self.format_bits = [format_thresholds(f) for f in self.formats]
        edges = {1, _INF32 + 1}  # separate exact zeros; separate NaN from inf
        for triple in self.format_bits:
            edges.update(triple)
        self.thresholds = np.array(sorted(edges), dtype=np.int64)
        self.n_intervals = _N_BINADES + len(self.thresholds)
        self.vector_len = self.n_intervals + 2
        self._tail_start = {int(b): int(self.interval_of_bits(np.array([b]))[0]) for b in edges}
        self.nonfinite_start = int(self.interval_of_bits(np.array([_INF32]))[0])
        self._nan_interval = self._tail_start[_INF32 + 1]
        # The fine key is exact when every threshold is j << 12 or (j << 12) + 1.
        self.fine_exact = all((int(b) & 0xFFF) in (0, 1) for b in self.thresholds)
        self._interval_binade = self._binade_of_intervals()
        self._luts: dict[tuple, torch.Tensor] = {}
        # The C kernel compares with ``threshold - 1`` ("a > t - 1" is "a >= t").
        self._tm1 = torch.tensor(self.thresholds - 1, dtype=torch.int32)
        self._c_ok = (
            self.n_intervals <= _cpu_kernel.MAX_INTERVALS
            and len(self.thresholds) <= _cpu_kernel.MAX_THRESHOLDS
        )
        self._buffers: dict[tuple, torch.Tensor] = {}

    # -- host-side reference ------------------------------------------------------------
    def interval_of_bits(self, bits: np.ndarray) -> np.ndarray:
        """Interval index of non-negative fp32 bit patterns: ``(a >> 23) + #{t <= a}``."""
        bits = np.asarray(bits, dtype=np.int64)
        return (bits >> 23) + np.searchsorted(self.thresholds, bits, side="right")

    def _binade_of_intervals(self) -> np.ndarray:
        # Representative bits of each interval: every edge starts one; binade of its start.
        starts = np.concatenate(
            [np.arange(1, _N_BINADES, dtype=np.int64) << 23, self.thresholds, [0]]
        )
        out = np.full(self.n_intervals, HIST_LOW - 1, dtype=np.int64)  # no binade (zero)
        idx = self.interval_of_bits(starts)
        binade = np.maximum((starts >> 23) - 127, HIST_LOW)
        keep = (starts > 0) & (starts < _INF32)
        out[idx[keep]] = binade[keep]
        return out

    # -- device side --------------------------------------------------------------------
    def _lut(self, kind: str, device: torch.device) -> torch.Tensor:
        key = (kind, device)
        lut = self._luts.get(key)
        if lut is None:
            lut = torch.from_numpy(self._build_lut(kind)).to(device)
            self._luts[key] = lut
        return lut

    def _build_lut(self, kind: str) -> np.ndarray:
        if kind == "fine":
            # k = 2j - 1 for a == j << 12, k = 2j for a inside (j << 12, (j + 1) << 12)
            k = np.arange(-1, (1 << 20) - 1, dtype=np.int64)  # entry i is key i - 1
            rep = np.where(k & 1, ((k + 1) >> 1) << 12, ((k >> 1) << 12) + 1)
            return self.interval_of_bits(rep).astype(np.int16)
        if kind.endswith("_i16"):  # the C kernel's copy of a 16-bit table
            return self._build_lut(kind[:-4]).astype(np.int16)
        patterns = np.arange(1 << 15, dtype=np.uint16)
        if kind == "bf16":
            values = (patterns.astype(np.uint32) << 16).view(np.float32)
        else:  # fp16
            values = patterns.view(np.float16).astype(np.float32)
        return self.interval_of_bits(values.view(np.int32).astype(np.int64))  # int64 for index_add_

    def _scratch(self, n: int, dtype: torch.dtype, device: torch.device, slots: int):
        """Reused work buffers on the CPU: a fresh multi-MB tensor costs page faults there."""
        if device.type != "cpu":
            return [None] * slots
        key = (dtype, slots)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[1] < n:
            buf = torch.empty((slots, max(n, 1 << 16)), dtype=dtype)
            self._buffers[key] = buf
        return [buf[i, :n] for i in range(slots)]

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The statistics vector of ``x`` (int64, on ``x``'s device), without a host sync.

        ``[counts per interval..., bits of max |x|, bits of smallest non-zero |x|]``; the bit
        patterns are in ``x``'s own 16-bit format for fp16/bf16 tensors, fp32 otherwise.
        """
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "StatsLayout.compute() was traced by torch.compile: the statistics read raw "
                "bits and memory (a C kernel on the CPU) and cannot run on the fake tensors a "
                "compiler traces with. Call it outside the compiled region, or wrap the caller "
                "in torch.compiler.disable (the numerics Monitor's hooks already are)"
            )
        x = x.detach()
        n = x.numel()
        half = x.dtype in (torch.float16, torch.bfloat16)
        if self.kernel == "auto" and n and x.device.type == "cpu" and self._c_ok:
            lib = _cpu_kernel.load()
            if lib is not None:
                return self._compute_c(lib, x)
        if half:
            a, low_src = self._scratch(n, torch.int16, x.device, 2)
            bits = x.reshape(-1).view(torch.int16)
            a = torch.bitwise_and(bits, 0x7FFF, out=a)  # |x| as bits; monotone in |x|
            lut = self._lut(get_format(x.dtype).name, x.device)
            # Exact histogram of all 2**15 magnitudes, then summed into the intervals.
            fine = torch.bincount(a, minlength=1 << 15)
            counts = torch.zeros(self.n_intervals, dtype=torch.int64, device=x.device)
            counts.index_add_(0, lut, fine)
            low_src = torch.sub(a, 1, out=low_src)
            low_src &= 0x7FFF  # zero becomes the largest pattern
        else:
            if x.dtype != torch.float32:
                x = x.float()
            a, low_src, k, tmp = self._scratch(n, torch.int32, x.device, 4)
            a = torch.bitwise_and(x.reshape(-1).view(torch.int32), 0x7FFFFFFF, out=a)
            low_src = torch.sub(a, 1, out=low_src)
            if self.fine_exact:
                k = torch.bitwise_right_shift(low_src, 12, out=k)
                k += torch.bitwise_right_shift(a, 12, out=tmp)
                k += 1  # -1 (|x| == 0) -> 0
                (idx,) = self._scratch(n, torch.int16, x.device, 1)
                idx = torch.index_select(self._lut("fine", x.device), 0, k, out=idx)
            else:
                idx = torch.bitwise_right_shift(a, 23, out=k)
                for b in self.thresholds.tolist():
                    idx += torch.ge(a, b, out=tmp)
            low_src &= 0x7FFFFFFF
            counts = torch.bincount(idx, minlength=self.n_intervals)
        if n:
            top = a.amax().to(torch.int64).view(1)
            low = low_src.amin().to(torch.int64).view(1) + 1
        else:
            top = low = torch.zeros(1, dtype=torch.int64, device=x.device)
        return torch.cat([counts.to(torch.int64), top, low])

    def _compute_c(self, lib, x: torch.Tensor) -> torch.Tensor:
        """:meth:`compute` in one pass of the C kernel (:mod:`._cpu_kernel`); same result.

        fp32 compares each value with the thresholds in vector registers; fp16 and bf16 read
        the interval from their format's 2**15-entry table.
        """
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            x = x.float()
        if not x.is_contiguous():
            x = x.contiguous()
        out = torch.empty(self.vector_len, dtype=torch.int64)
        threads = torch.get_num_threads()
        if x.dtype == torch.float32:
            kind, table, nt = "f32", self._tm1.data_ptr(), len(self.thresholds)
        else:
            lut = "fp16_i16" if x.dtype == torch.float16 else "bf16_i16"
            kind, table, nt = "16", self._lut(lut, x.device).data_ptr(), 0
        _cpu_kernel.run(lib, kind, x, table, nt, self.n_intervals, out, threads)
        return out

    # -- readout ------------------------------------------------------------------------
    def summarize(self, vec: np.ndarray, dtype: torch.dtype) -> TensorStats:
        """:class:`TensorStats` from one vector of :meth:`compute` (a numpy int64 array)."""
        counts = vec[: self.n_intervals]
        tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0]])  # tail[i] = sum counts[i:]
        inf_tail = tail[self.nonfinite_start]
        finite_ge = {b: int(tail[i] - inf_tail) for b, i in self._tail_start.items()}
        numel = int(tail[0])
        nonfinite = int(tail[self.nonfinite_start])
        zeros = numel - nonfinite - finite_ge[1]
        fmts = {}
        for name, (nf, normal, over) in zip(self.names, self.format_bits):
            fmts[name] = FormatCounts(
                overflow=finite_ge[over],
                subnormal=finite_ge[nf] - finite_ge[normal],
                flush=finite_ge[1] - finite_ge[nf],
            )
        hist = np.zeros(HIST_HIGH - HIST_LOW + 1, dtype=np.int64)
        has_bin = self._interval_binade >= HIST_LOW
        np.add.at(hist, self._interval_binade[has_bin] - HIST_LOW, counts[has_bin])
        top, low = _decode_bits(int(vec[-2]), dtype), _decode_bits(int(vec[-1]), dtype)
        if numel == 0 or nonfinite:
            top = math.inf if nonfinite else 0.0
        if numel - zeros - nonfinite == 0:
            low = math.nan
        nans = int(tail[self._nan_interval])
        return TensorStats(numel, zeros, nonfinite, nans, top, low, fmts, hist)


def _decode_bits(bits: int, dtype: torch.dtype) -> float:
    if dtype == torch.float16:
        return float(np.array(bits, dtype=np.uint16).view(np.float16))
    if dtype == torch.bfloat16:
        return float(np.array(bits << 16, dtype=np.uint32).view(np.float32))
    return float(np.array(bits & 0xFFFFFFFF, dtype=np.uint32).view(np.float32))
