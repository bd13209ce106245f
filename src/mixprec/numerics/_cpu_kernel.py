"""A one-pass C kernel for the CPU statistics (built with the system C compiler on first use).

The torch-ops path of :meth:`StatsLayout.compute` reads each tensor about a dozen times
(mask, keys, lookup, ``bincount``, extremes); on a CPU that costs more than the layer that
produced the tensor. This kernel does the same computation in one pass: for every element
it forms the same key, looks up the same interval table and counts it, and tracks the same
extremes. Results are bit-identical to the torch path (tested). Large tensors are split
into ``torch.get_num_threads()`` chunks run on Python threads (``ctypes`` releases the
GIL), so no second OpenMP runtime competes with torch's.

It is compiled once per machine into the user's private cache folder (``cc -O3 -shared``,
about a second)
and loaded with ``ctypes``. Without a compiler, or if the build fails, ``load()``
returns ``None`` and the torch path is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["load"]

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define MAXB 2048
#define LANES 4 /* interleaved sub-histograms: no store-to-load stall on repeated bins */

static void finish(int64_t *out, int64_t nb, int64_t local[LANES][MAXB]) {
    for (int64_t j = 0; j < nb; j++) {
        int64_t s = 0;
        for (int l = 0; l < LANES; l++) s += local[l][j];
        out[j] = s;
    }
}

/* fp32 values: key k = (a >> 12) + ((a - 1) >> 12) + 1 (arithmetic shifts), interval lut[k].
   out: nb counts, max |x| bits, smallest non-zero |x| bits (0x80000000 when none). */
void mp_stats_f32(const uint32_t *x, int64_t n, const int16_t *lut, int64_t nb, int64_t *out) {
    static __thread int64_t local[LANES][MAXB];
    memset(local, 0, sizeof(local));
    uint32_t top = 0, low = 0xFFFFFFFFu;
    for (int64_t i = 0; i < n; i++) {
        uint32_t a = x[i] & 0x7FFFFFFFu;
        int32_t s = (int32_t)a;
        int32_t k = (s >> 12) + ((s - 1) >> 12) + 1;
        local[i & (LANES - 1)][lut[k]]++;
        top = a > top ? a : top;
        uint32_t m = a - 1u; /* zero becomes the largest */
        low = m < low ? m : low;
    }
    finish(out, nb, local);
    out[nb] = (int64_t)top;
    out[nb + 1] = low == 0xFFFFFFFFu ? 0x80000000LL : (int64_t)low + 1;
}

/* fp16 / bf16 values: interval lut[bits & 0x7fff]; extremes as 16-bit patterns. */
void mp_stats_16(const uint16_t *x, int64_t n, const int16_t *lut, int64_t nb, int64_t *out) {
    static __thread int64_t local[LANES][MAXB];
    memset(local, 0, sizeof(local));
    uint32_t top = 0, low = 0xFFFFu;
    for (int64_t i = 0; i < n; i++) {
        uint32_t a = x[i] & 0x7FFFu;
        local[i & (LANES - 1)][lut[a]]++;
        top = a > top ? a : top;
        uint32_t m = (a - 1u) & 0xFFFFu;
        low = m < low ? m : low;
    }
    finish(out, nb, local);
    out[nb] = (int64_t)top;
    out[nb + 1] = low == 0xFFFFu ? 0x8000LL : (int64_t)low + 1;
}
"""

MAX_INTERVALS = 2048
PARALLEL_MIN = 1 << 18  # elements per tensor before it is split over threads
_lib = None
_tried = False
_pool = None


def _private_folder() -> Path | None:
    """The user's cache folder for the built library, or None if it is not private.

    A shared library is code: it is only loaded from a folder this user owns and nobody
    else can write to (``$XDG_CACHE_HOME/mixprec``, else ``~/.cache/mixprec``).
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = Path(base) / "mixprec" / "kernels"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        return None
    return folder


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    tag = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    folder = _private_folder()
    if folder is None:
        return None
    lib_path = folder / f"numerics_{tag}.so"
    if not lib_path.exists():
        src = folder / f"numerics_{tag}_{os.getpid()}.c"
        tmp = folder / f"numerics_{tag}_{os.getpid()}.so"
        src.write_text(_SOURCE)
        cmd = [cc, "-O3", "-shared", "-fPIC", str(src), "-o", str(tmp)]
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
        fn.argtypes = [*args, ctypes.c_void_p]
        fn.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or ``None`` when it cannot be built (cached)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = _build()
    return _lib


def run(fn, x, lut, nb: int, out, threads: int) -> None:
    """``fn`` over contiguous CPU tensor ``x`` into int64 ``out`` (``nb + 2``), threaded."""
    n = x.numel()
    if threads <= 1 or n < PARALLEL_MIN:
        fn(x.data_ptr(), n, lut.data_ptr(), nb, out.data_ptr())
        return
    import torch

    global _pool
    if _pool is None or _pool._max_workers < threads:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mixprec-stats")
    parts = torch.empty((threads, nb + 2), dtype=torch.int64)
    step = -(-n // threads)
    size = x.element_size()
    base, lut_ptr = x.data_ptr(), lut.data_ptr()
    jobs = []
    for i in range(threads):
        lo, hi = i * step, min(n, (i + 1) * step)
        ptr = parts[i].data_ptr()
        jobs.append(_pool.submit(fn, base + lo * size, max(hi - lo, 0), lut_ptr, nb, ptr))
    for job in jobs:
        job.result()
    torch.sum(parts[:, :nb], dim=0, out=out[:nb])
    out[nb] = parts[:, nb].max()
    out[nb + 1] = parts[:, nb + 1].min()
