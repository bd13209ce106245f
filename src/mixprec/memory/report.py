"""Rendering of memory estimates: the breakdown table, and the verdict against a device.

:func:`verdict` answers "does it fit?" and, when it does not, tries the changes below in
order of cost and names the first that fits::

    1. activation checkpointing       (one more forward pass of compute)
    2. a higher ZeRO stage            (more communication; needs world_size > 1)
    3. a smaller micro-batch          (halved down to 1; more accumulation steps)
    4. a recipe with fewer bytes per parameter of model states (fewest first)
    5. activation checkpointing together with one of 2-4
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mixprec.memory.estimate import PARTS, MemoryEstimate, estimate

__all__ = ["Verdict", "render", "verdict"]

_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "master_weights": "master weights",
    "master_gradients": "master gradients",
    "optimizer_states": "optimizer states",
    "compensation": "compensation buffers",
    "other_state": "other state (scaler, buffers, batch)",
    "weight_copies": "weight copies (autocast)",
    "fp8_copies": "fp8 copies and scale state",
    "activations": "activations",
    "backward_transient": "backward transient",
    "step_transient": "optimizer-step transient",
    "sharding_buffers": "ZeRO-3 / FSDP gathered buffers",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """Whether an estimate fits a device, and the cheapest single change that makes it fit.

    Args:
        fits: ``total <= capacity``.
        capacity: device memory in bytes.
        change: a description of the change (``None`` when it fits or nothing helps).
        changed: the estimate after the change.
    """

    fits: bool
    capacity: int
    change: str | None = None
    changed: MemoryEstimate | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "fits": self.fits,
            "capacity": self.capacity,
            "change": self.change,
            "total_after_change": self.changed.total if self.changed else None,
        }


def gb(n: int | float) -> str:
    """Bytes in the binary unit that fits (B, KiB, MiB, GiB, TiB), three significant
    figures or more: a tiny model is not "0.00 GiB".

    Example:
        >>> gb(512), gb(3 * 2**20), gb(80 * 2**30)
        ('512 B', '3.00 MiB', '80.00 GiB')
    """
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def verdict(model_or_spec, e: MemoryEstimate, capacity: int, **kwargs) -> Verdict:
    """Does ``e`` fit in ``capacity`` bytes (its total plus the headroom no formula
    counts, :attr:`MemoryEstimate.required`); if not, the cheapest change that fits.

    ``kwargs`` are the extra arguments ``e`` was made with (e.g. ``batch=``).

    Example:
        >>> e = estimate("gpt2", "bf16-mixed", seq_len=1024)
        >>> verdict("gpt2", e, 80 * 2**30).fits
        True
    """
    if capacity <= 0:
        raise ValueError(f"capacity={capacity} must be positive")
    if e.required <= capacity:
        return Verdict(True, capacity)
    base = dict(
        optimizer=e.optimizer, batch_size=e.batch_size, seq_len=e.seq_len,
        activation_checkpointing=e.activation_checkpointing, zero_stage=e.zero_stage,
        world_size=e.world_size, accounting=e.accounting, attention=e.attention,
        implementation=e.implementation, device=e.device, **kwargs,
    )  # fmt: skip
    for desc, changes in _candidates(e):
        recipe = changes.pop("recipe", e.recipe)
        changed = estimate(model_or_spec, recipe, **{**base, **changes})
        if changed.required <= capacity:
            return Verdict(False, capacity, desc, changed)
    return Verdict(False, capacity)


def _candidates(e: MemoryEstimate):
    """(description, estimate() changes), cheapest first.

    Single changes in order of cost (checkpointing, ZeRO stages, halved micro-batches),
    then the other recipes from fewest bytes per parameter, then activation checkpointing
    combined with each of those.
    """
    from mixprec.recipes import RECIPES

    ckpt = ("activation checkpointing", {"activation_checkpointing": True})
    others = [(f"ZeRO stage {z}", {"zero_stage": z}) for z in range(e.zero_stage + 1, 4)]
    if e.world_size == 1:
        others = []
    size = e.batch_size // 2
    while size >= 1:
        others.append((f"micro-batch {size} (accumulate gradients)", {"batch_size": size}))
        size //= 2
    per_param = {r: estimate(1000, r, optimizer=e.optimizer).bytes_per_param for r in RECIPES}
    recipes = [
        (f"recipe {r} ({per_param[r]:g} B/param of model states)", {"recipe": r})
        for r in sorted(RECIPES, key=per_param.__getitem__)
        if r != e.recipe and per_param[r] < e.bytes_per_param
    ]
    singles = others + recipes
    if not e.activation_checkpointing:
        singles = [ckpt, *singles]
    for desc, changes in singles:
        yield desc, dict(changes)
    if not e.activation_checkpointing:
        for desc, changes in others + recipes:
            yield f"{ckpt[0]} + {desc}", {**ckpt[1], **changes}


def render(e: MemoryEstimate, v: Verdict | None = None, *, formulas: bool = True) -> str:
    """The breakdown as a rich table (text), and the verdict below it; every cell as written
    (not read as rich markup)."""
    from rich.console import Console
    from rich.table import Table

    title = (
        f"{e.model} · {e.recipe} · {e.optimizer} · batch {e.batch_size}"
        + (f" · seq {e.seq_len}" if e.seq_len else "")
        + (f" · {e.world_size} devices ZeRO-{e.zero_stage}" if e.world_size > 1 else "")
        + (" · checkpointing" if e.activation_checkpointing else "")
    )
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("per device", justify="right")
    if formulas:
        table.add_column("formula", overflow="fold")
    formula = dict(e.formulas)
    for name in PARTS:
        row = [_LABELS[name], gb(getattr(e, name))]
        table.add_row(*([*row, formula[name]] if formulas else row))
    table.add_section()
    extra = ["persistent + max(forward side, step side)"] if formulas else []
    table.add_row("peak per device", gb(e.total), *extra)
    if e.headroom:
        note = ["not counted by any formula: CUDA context 0.5 GiB + 10% fragmentation"]
        table.add_row("headroom", gb(e.headroom), *(note if formulas else []))
        table.add_row("required", gb(e.required), *(["peak + headroom"] if formulas else []))
    # markup and emoji off: a cell or line is printed as written (a model path with
    # [brackets] or :name: in it is not read as rich markup)
    console = Console(
        record=True, width=160 if formulas else 80, force_terminal=False, markup=False,
        emoji=False,
    )  # fmt: skip
    with console.capture() as cap:
        console.print(table)
        console.print(
            f"{e.num_params:,} parameters ({e.num_trainable:,} trainable); model states "
            f"{e.bytes_per_param:.2f} B/param; peak in the {e.peak_phase} phase"
        )
        if e.host_memory:
            console.print(f"host memory (offloaded optimizer): {gb(e.host_memory)}")
        if e.activations == 0 and "not counted" in dict(e.formulas)["activations"]:
            console.print("activations not counted: pass a batch (or a transformer config)")
        if v is not None:
            if v.fits:
                console.print(f"fits: {gb(e.required)} with headroom, of {gb(v.capacity)}")
            elif v.change:
                console.print(
                    f"does not fit: {gb(e.required)} > {gb(v.capacity)}; cheapest fix: "
                    f"{v.change} -> {gb(v.changed.required)}"
                )
            else:
                console.print(
                    f"does not fit: {gb(e.required)} > {gb(v.capacity)}; no change tried makes "
                    "it fit (more devices, or a smaller model)"
                )
    return cap.get()
