"""Closest valid names for a misspelled one: the "did you mean" of every registry.

It lives in ``formats`` (the lowest layer) so that recipes, memory presets, devices and
bench tasks all word their unknown-name errors the same way.

Example:
    >>> unknown("recipe", "bf16mixed", ["fp32", "bf16-mixed"])
    "unknown recipe 'bf16mixed'; did you mean 'bf16-mixed'? Choose one of fp32, bf16-mixed"
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["closest", "did_you_mean", "unknown"]


def _key(name: str) -> str:
    """Spelling-insensitive form: lower case, without ``-``, ``_``, ``.`` and spaces."""
    return "".join(c for c in name.lower() if c not in "-_. ")


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` valid names closest to ``name``, best first.

    A choice that differs only in case or separators (``gpt-2`` for ``gpt2``,
    ``bf16mixed`` for ``bf16-mixed``) comes first; then :func:`difflib.get_close_matches`
    (ratio >= 0.6) on those separator-free forms, after the choices that start with
    ``name`` (``fp8_e4m3`` -> ``fp8_e4m3fn``).

    Example:
        >>> closest("gpt-2", ["gpt2", "gpt2-xl", "llama-2-7b"])
        ['gpt2']
        >>> closest("h100", ["h100-80gb", "h200", "a100-40gb"])
        ['h100-80gb', 'h200']
    """
    names = list(dict.fromkeys(str(c) for c in choices))
    if not isinstance(name, str) or not names:
        return []
    by_key: dict[str, list[str]] = {}
    for c in names:
        by_key.setdefault(_key(c), []).append(c)
    key = _key(name)
    if key in by_key:  # the same name spelled differently: nothing else is as close
        return by_key[key][:n]
    out = [c for c in names if key and _key(c).startswith(key)]
    for k in difflib.get_close_matches(key, list(by_key), n=n, cutoff=0.6):
        out += by_key[k]
    return list(dict.fromkeys(out))[:n]


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """``"; did you mean 'a' or 'b'?"`` for the closest choices, or ``""`` when none is close."""
    near = closest(name, choices, n)
    if not near:
        return ""
    quoted = [repr(c) for c in near]
    words = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f"; did you mean {words}?"


def unknown(
    kind: str, name: object, choices: Iterable[str], extra: str = "", *, quote: bool = False
) -> str:
    """The message of an unknown-name ``ValueError``: the bad name, the closest valid names
    and every valid name (quoted with ``quote``; ``extra`` appended, e.g.
    ``"(or a layout such as e3m4)"``)."""
    names = list(dict.fromkeys(str(c) for c in choices))
    listed = [repr(c) for c in names] if quote else names
    hint = did_you_mean(name, names) if isinstance(name, str) else ""
    tail = f" {extra}" if extra else ""
    lead = " Choose" if hint else "; choose"
    return f"unknown {kind} {name!r}{hint}{lead} one of {', '.join(listed)}{tail}"
