"""A one-pass C kernel for the CPU statistics (built with the system C compiler on first use).

The torch-ops path of :meth:`StatsLayout.compute` reads each tensor about a dozen times
(mask, keys, lookup, ``bincount``, extremes); on a CPU that costs more than the layer that
produced the tensor. This kernel does the same computation in one pass. For fp32 tensors
it computes each value's interval ``(a >> 23) + #{thresholds t <= a}`` by comparing eight
values at a time with every threshold in vector registers (no table lookup per element, no
branch), counts it in one of eight private sub-histograms, and tracks the extremes in vector
registers. fp16 and bf16 tensors read the interval from their format's 2**15-entry table
(64 KB, cache-resident), which is about twice as fast as comparing. The loops prefetch 2 KB
ahead: the tensors a training step produces are read back from memory, and the hardware
prefetcher alone left the loop waiting. (While developing, on the project's CPU, one core:
bf16 0.42-0.46 ns a value by table against 0.95 by comparing; fp32 2.1 ns a value from
memory without the prefetch, 0.75 with it. ``benchmarks/bench_stats.py`` times the
kernel as it is.) Results are bit-identical to the torch path (tested). Large tensors are split into
``torch.get_num_threads()`` chunks. When torch runs on GNU OpenMP (its CPU wheels do), the
kernel is built with ``-fopenmp`` and its ``libgomp.so.1`` resolves to torch's copy, so the
chunks run on torch's own OpenMP threads, already awake (with Python threads instead,
torch's idle OpenMP worker spinning on a core halved their speed). Otherwise one chunk runs
on the calling thread and the rest on Python threads (``ctypes`` releases the GIL).

It is compiled once per machine into the user's private cache folder (about a second;
every folder of its path is checked, the library is written under a private temporary name
and the opened file is checked before it is loaded, so no other user can place code that
this process runs)
with ``cc -O3 -march=native [-fopenmp]`` when the CPU's feature flags can be read (the file name
holds a hash of the source, compiler, flags and CPU flags, so a shared cache folder never
serves code built for another CPU), else with plain ``cc -O3``, and loaded with
``ctypes``. Without a compiler, or if the build fails, ``load()`` returns ``None`` and
the torch path is used.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

from mixprec.numerics.kernel_cache import compile_cached, load_private, private_folder

__all__ = ["load"]

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define MAXT 32        /* thresholds */
#define HB (256 + MAXT + 8) /* intervals (at most 256 + MAXT), padded: the lanes'
                               sub-histograms must not map to the same cache sets */
#define W 8            /* vector lanes (int32): one AVX2 register */
#define FLUSH (1 << 26) /* vectors between flushes of the 32-bit lane counters */
#define AHEAD 2048      /* bytes prefetched ahead (see the module doc) */

typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));

/* One scalar element, exactly as a vector lane does it. */
static inline void one(int32_t a, const int32_t *tm1, int nt, uint32_t *h, int32_t *top,
                       int32_t *low) {
    int32_t idx = a >> 23;
    for (int j = 0; j < nt; j++) idx += a > tm1[j];
    h[idx]++;
    if (a > *top) *top = a;
    int32_t m = (a - 1) & 0x7FFFFFFF; /* zero becomes the largest */
    if (m < *low) *low = m;
}

/* Add the lanes' sub-histograms into out[0 .. nb) and clear them. */
static void flush(uint32_t h[W][HB], int64_t nb, int64_t *out) {
    for (int l = 0; l < W; l++) {
        for (int64_t j = 0; j < nb; j++) out[j] += h[l][j];
    }
    memset(h, 0, sizeof(uint32_t) * W * HB);
}

/* |x| as fp32 bit patterns a.
   Interval of a: (a >> 23) + #{thresholds t <= a}, i.e. + #{a > t - 1}: the same index as
   StatsLayout.interval_of_bits. Thresholds tm1[j] = t_j - 1 are compared in vectors (no table
   lookup per element); the interval is counted in one of W private sub-histograms (one per
   lane, so repeated bins do not stall on store-to-load forwarding).
   out: nb counts, max a, smallest non-zero a (-1 when none). */
static void stats32(const int32_t *x32, int64_t n, const int32_t *tm1_in, int nt, int64_t nb,
                    int64_t *out) {
    uint32_t h[W][HB] __attribute__((aligned(64))); /* on the stack: a thread-local array is
                                                     reached through __tls_get_addr (-fPIC),
                                                     measured 12% slower */
    int32_t tm1[MAXT];
    vi tv[MAXT];
    int ntv = (nt + 1) & ~1; /* padded to a multiple of 2: INT32_MAX is never exceeded */
    for (int j = 0; j < ntv; j++) {
        tm1[j] = j < nt ? tm1_in[j] : 0x7FFFFFFF;
        for (int l = 0; l < W; l++) tv[j][l] = tm1[j];
    }
    memset(h, 0, sizeof(h));
    memset(out, 0, (size_t)nb * sizeof(int64_t));
    vi top = {0}, low, mask;
    for (int l = 0; l < W; l++) { low[l] = 0x7FFFFFFF; mask[l] = 0x7FFFFFFF; }
    int64_t nv = n / W;
    for (int64_t v0 = 0; v0 < nv; v0 += FLUSH) {
        int64_t v1 = v0 + FLUSH < nv ? v0 + FLUSH : nv;
        for (int64_t v = v0; v < v1; v++) {
            vi a;
            if ((v & 1) == 0) /* once per 64-byte line */
                __builtin_prefetch((const char *)(x32 + v * W) + AHEAD, 0, 3);
            memcpy(&a, x32 + v * W, sizeof(a));
            a &= mask;
            vi idx = a >> 23;
            for (int j = 0; j < ntv; j += 2) idx -= (a > tv[j]) + (a > tv[j + 1]);
            vi gt = a > top;
            top = (a & gt) | (top & ~gt);
            vi m = (a - 1) & mask;
            vi lt = m < low;
            low = (m & lt) | (low & ~lt);
            for (int l = 0; l < W; l++) h[l][idx[l]]++;
        }
        flush(h, nb, out);
    }
    int32_t t = 0, lo = 0x7FFFFFFF;
    for (int l = 0; l < W; l++) {
        if (top[l] > t) t = top[l];
        if (low[l] < lo) lo = low[l];
    }
    for (int64_t i = nv * W; i < n; i++) {
        one(x32[i] & 0x7FFFFFFF, tm1, nt, h[0], &t, &lo);
    }
    for (int64_t j = 0; j < nb; j++) out[j] += h[0][j];
    out[nb] = t;
    out[nb + 1] = lo == 0x7FFFFFFF ? -1 : (int64_t)lo + 1;
}

/* fp32 values: out[nb] = max |x| bits, out[nb + 1] = smallest non-zero |x| bits
   (0x80000000 when none), as the torch path. */
void mp_stats_f32(const void *x, int64_t n, const int32_t *tm1, int64_t nt, int64_t nb,
                  int64_t *out) {
    stats32((const int32_t *)x, n, tm1, (int)nt, nb, out);
    if (out[nb + 1] < 0) out[nb + 1] = 0x80000000LL;
}

/* 16-bit values (fp16 or bf16, with that format's table): interval lut[bits & 0x7fff]
   (every index < HB), counted in W private sub-histograms; extremes in vector lanes, returned
   as 16-bit patterns (0x8000: no non-zero value). */
void mp_stats_16(const uint16_t *x, int64_t n, const int16_t *lut, int64_t nb, int64_t *out) {
    uint32_t h[W][HB] __attribute__((aligned(64)));
    memset(h, 0, sizeof(h));
    memset(out, 0, (size_t)nb * sizeof(int64_t));
    vh top = {0}, low, mask;
    for (int l = 0; l < W; l++) { low[l] = 0xFFFFu; mask[l] = 0x7FFFu; }
    int64_t nv = n / W;
    for (int64_t v0 = 0; v0 < nv; v0 += FLUSH) {
        int64_t v1 = v0 + FLUSH < nv ? v0 + FLUSH : nv;
        for (int64_t v = v0; v < v1; v++) {
            if ((v & 3) == 0) __builtin_prefetch((const char *)(x + v * W) + AHEAD, 0, 3);
            vh a;
            memcpy(&a, x + v * W, sizeof(a));
            a &= mask;
            vh gt = a > top;
            top = (a & gt) | (top & ~gt);
            vh m = a - 1; /* unsigned: zero becomes the largest */
            vh lt = m < low;
            low = (m & lt) | (low & ~lt);
            for (int l = 0; l < W; l++) h[l][lut[a[l]]]++;
        }
        flush(h, nb, out);
    }
    uint32_t t = 0, lo = 0xFFFFu;
    for (int l = 0; l < W; l++) {
        if (top[l] > t) t = top[l];
        if (low[l] < lo) lo = low[l];
    }
    for (int64_t i = nv * W; i < n; i++) {
        uint32_t a = x[i] & 0x7FFFu;
        out[lut[a]]++;
        t = a > t ? a : t;
        uint32_t m = (a - 1u) & 0xFFFFu;
        lo = m < lo ? m : lo;
    }
    out[nb] = (int64_t)t;
    out[nb + 1] = lo == 0xFFFFu ? 0x8000LL : (int64_t)lo + 1;
}

/* fn over `threads` chunks of x (elements of `size` bytes) into parts[threads][nb + 2],
   then summed / maxed / minned into out. With OpenMP the chunks run on the process's
   OpenMP team: the very threads torch's own operators use (same libgomp), already awake,
   instead of extra threads competing with them for the cores. */
void mp_stats_par(int64_t which, const char *x, int64_t n, int64_t size, const void *table,
                  int64_t nt, int64_t nb, int64_t *out, int64_t threads, int64_t *parts) {
    int64_t step = (n + threads - 1) / threads;
    int64_t w = nb + 2;
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)threads) schedule(static, 1)
#endif
    for (int64_t t = 0; t < threads; t++) {
        int64_t lo = t * step < n ? t * step : n;
        int64_t hi = lo + step < n ? lo + step : n;
        int64_t *p = parts + t * w;
        if (which == 0)
            mp_stats_f32(x + lo * size, hi - lo, (const int32_t *)table, nt, nb, p);
        else
            mp_stats_16((const uint16_t *)(x + lo * size), hi - lo, (const int16_t *)table, nb, p);
    }
    for (int64_t j = 0; j < w; j++) out[j] = parts[j];
    for (int64_t t = 1; t < threads; t++) {
        const int64_t *p = parts + t * w;
        for (int64_t j = 0; j < nb; j++) out[j] += p[j];
        if (p[nb] > out[nb]) out[nb] = p[nb];
        if (p[nb + 1] < out[nb + 1]) out[nb + 1] = p[nb + 1];
    }
}
"""

MAX_THRESHOLDS = 32  # MAXT
MAX_INTERVALS = 256 + MAX_THRESHOLDS  # every interval index fits the kernels' histograms
PARALLEL_MIN = 1 << 16  # elements per tensor before it is split over threads
_lib = None
_tried = False
_pool = None


def _cpu_flags() -> str | None:
    """The CPU's feature flags (Linux), or None when they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _torch_gomp_loaded() -> bool:
    """Whether this process has GNU OpenMP loaded (torch's CPU wheels bring libgomp.so.1).

    Only then is the kernel built with ``-fopenmp``: its ``libgomp.so.1`` then resolves to
    the copy already loaded, so the kernel shares torch's OpenMP threads instead of starting
    a second runtime whose threads would compete with torch's.
    """
    try:
        with open("/proc/self/maps") as f:
            return any("/libgomp" in line for line in f)
    except OSError:
        return False


_OPENMP = False  # whether the loaded library runs its chunks on the OpenMP team
_KINDS = {"f32": 0, "16": 1}


def _compile(cc: str, folder: Path, flags: list[str]) -> Path | None:
    """Build the kernel with ``flags`` into ``folder``; see :func:`.kernel_cache.compile_cached`."""
    ident = "\0".join([_SOURCE, cc, *flags])
    if "-march=native" in flags:
        ident += "\0" + (_cpu_flags() or "")
    return compile_cached(_SOURCE, ident, "numerics", cc, folder, flags)


def _build() -> ctypes.CDLL | None:
    global _OPENMP
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    folder = private_folder()
    if cc is None or folder is None:
        return None
    # Vector code for this CPU when its flags are known, on torch's OpenMP threads when
    # it uses GNU OpenMP; else the portable baseline on Python threads.
    tries = []
    if _cpu_flags():
        if _torch_gomp_loaded():
            tries.append(["-O3", "-march=native", "-fopenmp"])
        tries.append(["-O3", "-march=native"])
    tries.append(["-O3"])
    for flags in tries:
        lib_path = _compile(cc, folder, flags)
        if lib_path is None:
            continue
        try:
            lib = _open(lib_path)
        except OSError:
            continue
        _OPENMP = "-fopenmp" in flags
        return lib
    return None


def _open(lib_path: Path) -> ctypes.CDLL:
    """Load a built library (checked, see :func:`.kernel_cache.load_private`) and declare
    its functions' signatures."""
    lib = load_private(lib_path)
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mp_stats_f32.argtypes = [ptr, i64, ptr, i64, i64, ptr]
    lib.mp_stats_f32.restype = None
    lib.mp_stats_16.argtypes = [ptr, i64, ptr, i64, ptr]
    lib.mp_stats_16.restype = None
    lib.mp_stats_par.argtypes = [i64, ptr, i64, i64, ptr, i64, i64, ptr, i64, ptr]
    lib.mp_stats_par.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or ``None`` when it cannot be built (cached)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = _build()
    return _lib


def run(lib, kind: str, x, table, nt: int, nb: int, out, threads: int) -> None:
    """Statistics of contiguous CPU tensor ``x`` into int64 ``out`` (``nb + 2`` entries).

    ``kind`` is ``"f32"`` (``table``: the thresholds minus one, ``nt`` of them) or ``"16"``
    for fp16 and bf16 (``table``: that format's interval of each 15-bit magnitude). Tensors of
    ``PARALLEL_MIN`` elements or more are split into ``threads`` chunks whose counts are
    summed, maxima maxed and minima minned: on the OpenMP team when the library has it,
    else one chunk on this thread and the rest on Python threads (``ctypes`` releases the
    GIL).
    """
    import numpy as np

    n = x.numel()
    base, optr = x.data_ptr(), out.data_ptr()
    single = threads <= 1 or n < PARALLEL_MIN
    if kind == "16":
        call = lambda p, m, o: lib.mp_stats_16(p, m, table, nb, o)  # noqa: E731
    else:
        call = lambda p, m, o: lib.mp_stats_f32(p, m, table, nt, nb, o)  # noqa: E731
    if single:
        call(base, n, optr)
        return
    parts = np.empty((threads, nb + 2), dtype=np.int64)
    if _OPENMP:
        lib.mp_stats_par(
            _KINDS[kind], base, n, x.element_size(), table, nt, nb, optr, threads,
            parts.ctypes.data,
        )  # fmt: skip
        return
    global _pool
    if _pool is None or _pool._max_workers < threads - 1:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="mixprec-stats")
    step = -(-n // threads)
    size = x.element_size()
    jobs = []
    for i in range(1, threads):  # chunk 0 runs on this thread meanwhile
        lo, hi = min(n, i * step), min(n, (i + 1) * step)
        jobs.append(_pool.submit(call, base + lo * size, hi - lo, parts[i].ctypes.data))
    call(base, min(n, step), parts[0].ctypes.data)
    for job in jobs:
        job.result()
    res = out.numpy()
    np.sum(parts[:, :nb], axis=0, out=res[:nb])
    res[nb] = parts[:, nb].max()
    res[nb + 1] = parts[:, nb + 1].min()
