"""Where compiled kernels live: a cache no other user can write, and loads that check it.

A shared library is code that runs in this process, so it is only loaded when no other
user could have placed it:

* :func:`private_folder` checks every folder of the cache's real path (owner this user or
  root, writable by nobody else unless sticky like ``/tmp``; the cache folder itself this
  user's and writable by nobody else);
* :func:`compile_cached` writes the source and the library under private, unpredictable
  temporary names and renames the finished library into place;
* :func:`load_private` checks the library's folders the same way, opens the library
  without following a link, checks the *opened* file (a regular file of this user,
  writable by nobody else) and loads it only if its path still names that file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
import subprocess
import tempfile
from pathlib import Path

__all__ = ["compile_cached", "load_private", "private_folder"]


def _safe_component(path: Path, info: os.stat_result, *, last: bool) -> bool:
    """Whether no other user can change what ``path`` holds.

    Every folder on the way must belong to this user or to root and be writable by nobody
    else (a world-writable folder with the sticky bit, like ``/tmp``, is accepted above the
    cache: there only a folder's owner can rename or remove it). The cache folder itself
    must belong to this user and be writable by nobody else.
    """
    if not stat.S_ISDIR(info.st_mode):
        return False
    uid = os.getuid()
    if last:
        return info.st_uid == uid and not info.st_mode & 0o022
    if info.st_uid not in (uid, 0):
        return False
    return not info.st_mode & 0o022 or bool(info.st_mode & stat.S_ISVTX)


def private_folder() -> Path | None:
    """The user's cache folder for the built library, or None if it is not private.

    A shared library is code: it is only loaded from a folder this user owns that nobody
    else can write to, reached through folders nobody else can change
    (``$XDG_CACHE_HOME/mixprec/kernels``, else ``~/.cache/mixprec/kernels``). Every
    component of the real path (symbolic links resolved) is checked, see
    :func:`_safe_component`.
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = Path(base) / "mixprec" / "kernels"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private_chain(folder):
            return None
    except OSError:
        return None
    return Path(os.path.realpath(folder))


def compile_cached(
    source: str, ident: str, stem: str, cc: str, folder: Path, flags: list[str]
) -> Path | None:
    """Build C ``source`` with ``cc`` and ``flags`` into ``folder`` unless built already;
    the library's path, or None when the compiler fails.

    The file is ``{stem}_{hash}.so``, ``hash`` of ``ident`` (the source, the compiler, the
    flags and, for ``-march=native``, the CPU's feature flags: a cache folder shared by
    machines with different CPUs never loads code built for another CPU).
    """
    tag = hashlib.sha256(ident.encode()).hexdigest()[:16]
    lib_path = folder / f"{stem}_{tag}.so"
    if lib_path.exists():
        return lib_path
    # Private, unpredictable temporary names (mode 0600), renamed into place when complete.
    fd, src_name = tempfile.mkstemp(prefix=f"{stem}_{tag}_", suffix=".c", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(source)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{stem}_{tag}_", suffix=".so", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    cmd = [cc, *flags, "-shared", "-fPIC", src_name, "-o", tmp_name]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.chmod(tmp, 0o700)
    except (OSError, subprocess.SubprocessError):
        tmp.unlink(missing_ok=True)
        return None
    finally:
        Path(src_name).unlink(missing_ok=True)
    os.replace(tmp, lib_path)  # atomic: concurrent builders agree
    return lib_path


def _private_chain(folder: Path) -> bool:
    """Whether every folder of ``folder``'s real path passes :func:`_safe_component`."""
    real = Path(os.path.realpath(folder))
    chain = [*reversed(real.parents), real]
    return all(
        _safe_component(part, os.stat(part), last=i == len(chain) - 1)
        for i, part in enumerate(chain)
    )


def load_private(lib_path: Path) -> ctypes.CDLL:
    """Load a shared library that only this user can have written.

    The folder it lies in must be private (:func:`_private_chain`: nobody else can rename,
    replace or add a file on the way). The file is opened without following a link and the
    *opened* file is checked (a regular file of this user, writable by nobody else); it is
    loaded only if the path still names that very file (same device and inode). The library
    is loaded by its path, not through ``/proc/self/fd/N``: the dynamic loader matches
    libraries by the name they were opened with, and a reused descriptor number would
    hand back a different library loaded before.

    Raises:
        PermissionError: the folder is not private or the file is not this user's own.
        OSError: the file cannot be opened (or is a symbolic link).
    """
    lib_path = Path(lib_path)
    if not _private_chain(lib_path.parent):
        raise PermissionError(
            f"{lib_path.parent}: a folder on its path is writable by other users or not "
            "this user's; not loaded"
        )
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(lib_path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise PermissionError(
                f"{lib_path}: not a regular file of this user that only it can write "
                f"(owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)}); not loaded"
            )
        now = os.stat(lib_path, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            raise PermissionError(f"{lib_path}: replaced while it was checked; not loaded")
        return ctypes.CDLL(str(lib_path))
    finally:
        os.close(fd)
