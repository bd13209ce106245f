"""A one-pass C kernel for the CPU statistics (built with the system C compiler on first use).

The torch-ops path of :meth:`StatsLayout.compute` reads each tensor about a dozen times
(mask, keys, lookup, ``bincount``, extremes); on a CPU that costs more than the layer that
produced the tensor. This kernel does the same computation in one pass: for every element
it forms the same key, looks up the same interval table and counts it, and tracks the same
extremes, with OpenMP threads (``torch.get_num_threads()``). Results are bit-identical to
the torch path (tested).

It is compiled once per machine into the temp folder (``cc -O3 -fopenmp -shared``, about a
second) and loaded with ``ctypes``. Without a compiler, or if the build fails, ``load()``
returns ``None`` and the torch path is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["load"]

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define MAXB 2048
#define LANES 4

static void merge(int64_t *out, int64_t nb, int64_t local[LANES][MAXB]) {
    for (int64_t j = 0; j < nb; j++) {
        int64_t s = 0;
        for (int l = 0; l < LANES; l++) s += local[l][j];
        out[j] += s;
    }
}

/* fp32 values: key k = (a >> 12) + ((a - 1) >> 12) + 1 (arithmetic shifts), interval lut[k]. */
void mp_stats_f32(const uint32_t *x, int64_t n, const int16_t *lut, int64_t nb,
                  int64_t *out, int nthreads) {
    uint32_t gtop = 0, glow = 0xFFFFFFFFu;
    memset(out, 0, (size_t)(nb + 2) * sizeof(int64_t));
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t local[LANES][MAXB];
        memset(local, 0, sizeof(local));
        uint32_t top = 0, low = 0xFFFFFFFFu;
        #pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < n; i++) {
            uint32_t a = x[i] & 0x7FFFFFFFu;
            int32_t s = (int32_t)a;
            int32_t k = (s >> 12) + ((s - 1) >> 12) + 1;
            local[i & (LANES - 1)][lut[k]]++;
            top = a > top ? a : top;
            uint32_t m = a - 1u; /* zero becomes the largest */
            low = m < low ? m : low;
        }
        #pragma omp critical
        {
            merge(out, nb, local);
            if (top > gtop) gtop = top;
            if (low < glow) glow = low;
        }
    }
    out[nb] = (int64_t)gtop;
    out[nb + 1] = glow == 0xFFFFFFFFu ? 0x80000000LL : (int64_t)glow + 1;
}

/* fp16 / bf16 values: interval lut[bits & 0x7fff]. */
void mp_stats_16(const uint16_t *x, int64_t n, const int16_t *lut, int64_t nb,
                 int64_t *out, int nthreads) {
    uint32_t gtop = 0, glow = 0xFFFFu;
    memset(out, 0, (size_t)(nb + 2) * sizeof(int64_t));
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t local[LANES][MAXB];
        memset(local, 0, sizeof(local));
        uint32_t top = 0, low = 0xFFFFu;
        #pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < n; i++) {
            uint32_t a = x[i] & 0x7FFFu;
            local[i & (LANES - 1)][lut[a]]++;
            top = a > top ? a : top;
            uint32_t m = (a - 1u) & 0xFFFFu;
            low = m < low ? m : low;
        }
        #pragma omp critical
        {
            merge(out, nb, local);
            if (top > gtop) gtop = top;
            if (low < glow) glow = low;
        }
    }
    out[nb] = (int64_t)gtop;
    out[nb + 1] = glow == 0xFFFFu ? 0x8000LL : (int64_t)glow + 1;
}
"""

MAX_INTERVALS = 2048
_lib = None
_tried = False


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    tag = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"mixprec-kernels-{os.getuid()}"
    lib_path = folder / f"numerics_{tag}.so"
    if not lib_path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        src = folder / f"numerics_{tag}_{os.getpid()}.c"
        tmp = folder / f"numerics_{tag}_{os.getpid()}.so"
        src.write_text(_SOURCE)
        cmd = [cc, "-O3", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(tmp)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
        finally:
            src.unlink(missing_ok=True)
        os.replace(tmp, lib_path)  # atomic: concurrent builders agree
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError:
        return None
    args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    for fn in (lib.mp_stats_f32, lib.mp_stats_16):
        fn.argtypes = [*args, ctypes.c_void_p, ctypes.c_int]
        fn.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or ``None`` when it cannot be built (cached)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = _build()
    return _lib
