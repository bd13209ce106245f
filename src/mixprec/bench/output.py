"""Output folders that are replaced whole: a reader sees the old report or the new one.

A command writes its report into a private temporary folder beside ``out`` and, once every
file is complete, renames it into place (the previous folder is renamed aside first and
removed after). Ctrl-C (SIGINT) that arrives during the two renames is held back until they
are done. On any error or Ctrl-C while writing, the temporary folder is removed and ``out``
is left exactly as it was. A leaf module: it imports nothing from mixprec.

Example:
    >>> import pathlib, tempfile
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "report"
    >>> with replace_folder(out) as tmp:
    ...     _ = (tmp / "a.txt").write_text("new")
    >>> (out / "a.txt").read_text()
    'new'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["replace_folder"]


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) inside the block; raise KeyboardInterrupt after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def replace_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it becomes ``out`` (replacing it whole).

    Raises:
        NotADirectoryError: ``out`` (or a folder above it) is a file.
    """
    out = Path(out)
    parent = out.absolute().parent
    for part in (out, *out.absolute().parents):
        if part.exists() and not part.is_dir():
            raise NotADirectoryError(f"{part} is a file, not a folder (output {str(out)!r})")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual mode
        with _sigint_deferred():
            old = None
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
                os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                if old is not None:  # put the previous report back
                    os.replace(old / out.name, out)
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
