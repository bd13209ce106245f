"""The bench tasks' data: all offline, deterministic, and fixed where they are evaluated.

* :func:`digits` — scikit-learn's handwritten digits (8x8, 1,797 images), a fixed
  stratified split of 360 test images;
* :func:`make_shapes` — noisy images of a circle and a rectangle, and their masks;
* :func:`stdlib_corpus` — the Python standard library's own ``.py`` source, in sorted order;
* :func:`make_marker_sequences` — token sequences labelled by their commonest marker token.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from pathlib import Path

import torch

__all__ = ["digits", "make_marker_sequences", "make_shapes", "stdlib_corpus"]


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, ...]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the mlp task needs scikit-learn: pip install scikit-learn") from exc
    x, y = load_digits(return_X_y=True)
    # Fixed split: 360 test images (20%), stratified, independent of the training seed.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=360, random_state=0, stratify=y)
    to_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731 pixels 0..16
    to_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return to_x(x_tr), to_y(y_tr), to_x(x_te), to_y(y_te)


def make_shapes(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``n`` noisy images with a circle and a rectangle each, and their masks.

    Returns:
        images ``(n, 1, size, size)`` fp32 and masks ``(n, 1, size, size)`` fp32 in {0, 1}.

    Example:
        >>> x, m = make_shapes(2, 16, torch.Generator().manual_seed(0))
        >>> x.shape, bool(((m == 0) | (m == 1)).all())
        (torch.Size([2, 1, 16, 16]), True)
    """
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = grid.view(1, -1, 1), grid.view(1, 1, -1)
    cy, cx, r = (size * (0.2 + 0.6 * u(3, n, 1, 1))).unbind(0)
    r = 0.1 * size + 0.15 * r  # radius 10% to 25% of the image
    circle = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    y0, x0, h, w = (size * u(4, n, 1, 1)).unbind(0)  # corner, extra height and width
    rect = (
        (yy >= y0)
        & (yy < y0 + 0.2 * size + 0.3 * h)
        & (xx >= x0)
        & (xx < x0 + 0.2 * size + 0.3 * w)
    )
    mask = (circle | rect).float().unsqueeze(1)
    brightness = 0.4 + 0.6 * u(n, 1, 1, 1)
    noise = 0.35 * torch.randn(n, 1, size, size, generator=generator)
    return mask * brightness + noise, mask


@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: int) -> bytes:
    """The first ``max_bytes`` of the standard library's ``.py`` files, in sorted order.

    Files come from ``sysconfig.get_paths()["stdlib"]``, walked depth-first with directory
    and file names sorted (``site-packages`` and ``__pycache__`` skipped), so the corpus is
    the same on every run of one Python installation.

    Example:
        >>> len(stdlib_corpus(1000))
        1000
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            try:
                data = (Path(dirpath) / filename).read_bytes()
            except OSError:
                continue
            chunks.append(data[: max_bytes - total])
            total += len(chunks[-1])
            if total >= max_bytes:
                return b"".join(chunks)
    if total < 64 * 1024:
        raise RuntimeError(
            f"found only {total} bytes of .py source under {root}; the gpt task needs the "
            "standard library's source files"
        )
    return b"".join(chunks)


def make_marker_sequences(
    n: int, seq_len: int, vocab_size: int, generator: torch.Generator, classes: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences whose label is the marker token (ids ``1..classes``) that occurs most often.

    Filler tokens are ids ``classes+1 .. vocab_size-1``; the winning marker occurs 1 to 3
    times more often than any other, so the rule has no ties.

    Example:
        >>> x, y = make_marker_sequences(3, 32, 64, torch.Generator().manual_seed(0))
        >>> counts = torch.stack([(x == k + 1).sum(1) for k in range(4)], 1)
        >>> bool((counts.argmax(1) == y).all())
        True
    """
    per_marker = (seq_len - 3) // (classes + 1)
    labels = torch.randint(classes, (n,), generator=generator)
    counts = torch.randint(per_marker + 1, (n, classes), generator=generator)
    win = counts.max(dim=1).values + 1 + torch.randint(3, (n,), generator=generator)
    counts[torch.arange(n), labels] = win
    cum = counts.cumsum(dim=1)  # (n, classes)
    rank = torch.arange(seq_len).view(1, -1, 1)
    marker = (rank >= cum.unsqueeze(1)).sum(dim=-1)  # (n, T): 0..classes, classes = filler
    filler = torch.randint(classes + 1, vocab_size, (n, seq_len), generator=generator)
    tokens_by_rank = torch.where(marker < classes, marker + 1, filler)
    order = torch.rand(n, seq_len, generator=generator).argsort(dim=1)
    tokens = torch.empty_like(tokens_by_rank).scatter_(1, order, tokens_by_rank)
    return tokens, labels
