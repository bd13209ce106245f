"""Format verdicts per module, judged as each format is really used (with its scaling).

A plain cast is not how reduced formats train: fp8 is used with per-tensor scaling, fp16
gradients with a loss scale. So each format ``F`` is judged under the scaling it gets:

==================  ==========================  ==============================================
format              scaling assumed             lost fraction of a tensor (one step)
==================  ==========================  ==============================================
8 bits or fewer     per-tensor, amax -> F.max   ``#{0 < |x| < amax * (F.min_subnormal / 2) /
(fp8, fp6, fp4)     (what ``Float8Linear``      F.max} / numel`` (+ non-finite): the range
                    does, dynamic scaling)      below ``amax / 2^range``, ``range =
                                                log2(F.max / (F.min_subnormal / 2))``
fp16 gradients      the loss scale ``S``        ``#{|x| * S >= overflow_F or 0 < |x| * S <
                    (``loss_scale=``)           F.min_subnormal / 2} / numel``
anything else       none: a plain cast          ``(overflow_F + flush_F) / numel``, exact
==================  ==========================  ==============================================

The scaled fractions are read from the monitor's log2 histogram of each step (the scale
of a step is that step's amax): exact at binade edges (a power-of-two loss scale puts the
flush threshold on one), and in the one binade a threshold cuts, the share below it is
taken as ``log2(T / 2^e)`` (values spread evenly in log2 within the binade).

Formats of 8 bits or fewer are judged only for ``nn.Linear`` modules: fp8 recipes cast
only the inputs, weights and output gradients of Linear layers (``Float8Linear``); the
other modules stay in 16 bits, so fp8 does not apply to them (``fits[F] is None``). An
fp8 format is judged only for the tensor kind fp8 training casts to it
(:class:`~mixprec.float8.Float8Config`: activations ``fp8_e4m3fn``, gradients ``fp8_e5m2``,
and their ``fnuz`` twins). Activations are judged on the Linear layer's output (the monitor
records module outputs; the fp8 cast applies to its input, the previous module's output,
which that module's own verdict covers at 16 bits). The model itself (path ``""``, when
it has submodules) gets no verdict: it is not a layer one can keep in a format, and its
output gradient is the loss gradient.

Rule, per module, for activations (``output``) and gradients (``grad_output`` and
``grad_input``) separately: a format *fits* a group when its lost fraction is at most
``loss_threshold``; ``needs[group]`` is, of the narrowest width with a format that fits,
the most precise format that fits (fp16 before bf16; ``fp32`` when none fits). A
recommendation is written when a format of that width or narrower does not fit a group
(fp16 gradients where bf16 is needed, fp8 activations where 16 bits are needed), naming
the tensor kind, the format it needs, and what the other format loses under its scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from mixprec.numerics.stats import HIST_LOW, TensorStats

__all__ = ["GROUPS", "LayerVerdict", "Scaling", "lost_counts", "verdicts"]

GROUPS = {"activations": ("output",), "gradients": ("grad_output", "grad_input")}
_WORDS = {"output": "outputs", "grad_output": "output gradients", "grad_input": "input gradients"}


@dataclass(frozen=True, slots=True)
class Scaling:
    """How a format is scaled before the cast: ``"none"``, ``"per-tensor"`` or ``"loss"``."""

    kind: str
    loss_scale: float | None = None

    def describe(self, fmt) -> str:
        if self.kind == "per-tensor":
            return f"per-tensor scaling (amax -> {fmt.max:g})"
        if self.kind == "loss":
            return f"loss scale {self.loss_scale:g}"
        return "plain cast"


def scaling_for(fmt, group: str, loss_scale: float | None) -> Scaling:
    """The scaling a format gets for a tensor group (table in the module docstring)."""
    if fmt.bits <= 8:
        return Scaling("per-tensor")
    if fmt.name == "fp16" and group == "gradients" and loss_scale is not None:
        return Scaling("loss", float(loss_scale))
    return Scaling("none")


def _count_below(stats: TensorStats, threshold: float) -> float:
    """Finite non-zero values with ``|x| < threshold``, from the log2 histogram."""
    if threshold <= 0:
        return 0.0
    hist = stats.histogram
    e = math.log2(threshold)
    whole = math.floor(e)
    i = whole - HIST_LOW  # bin of the binade [2^whole, 2^(whole + 1))
    if i <= 0:  # threshold below 2^-126: only bin 0 (every value below 2^-126) can hold
        # such values; counted whole when the threshold lies in (2^-127, 2^-126), else none
        return float(hist[0]) if i == 0 and e > whole else 0.0
    if i >= len(hist):
        return float(hist.sum())
    return float(hist[:i].sum()) + float(hist[i]) * (e - whole)


def lost_counts(stats: TensorStats, fmt, scaling: Scaling) -> tuple[float, float]:
    """``(overflowed, flushed)`` values of one step's tensor cast to ``fmt`` under ``scaling``."""
    if scaling.kind == "none":
        c = stats.formats[fmt.name]
        return float(c.overflow), float(c.flush)
    if scaling.kind == "per-tensor":
        amax = stats.max_abs
        if not math.isfinite(amax):  # an inf/NaN makes the scale non-finite: all lost
            return float(stats.numel - stats.zeros), 0.0
        return float(stats.nonfinite), _count_below(stats, amax * fmt.min_subnormal / 2 / fmt.max)
    s = scaling.loss_scale
    finite_nonzero = stats.numel - stats.zeros - stats.nonfinite
    top = fmt.max + 2.0 ** (math.floor(math.log2(fmt.max)) - fmt.mantissa_bits) / 2
    over = finite_nonzero - _count_below(stats, top / s) + stats.nonfinite
    return float(over), _count_below(stats, fmt.min_subnormal / 2 / s)


@dataclass(frozen=True, slots=True)
class LayerVerdict:
    """Which formats one module's activations and gradients fit in, under their scaling.

    Attributes:
        path: module path.
        fits: ``{format: True / False}`` (both groups under the threshold); ``None`` where
            the format does not apply to the module (fp8 on a module that is not Linear).
        lost: ``{format: {"activations": fraction, "gradients": fraction}}`` (scaled).
        recommendation: a sentence, or ``None`` when every format as narrow as the one a
            group needs fits it (no format of that width or narrower loses too much).
        needs: ``{group: format}``, the narrowest format each tensor group fits.
        scaling: ``{format: {group: "per-tensor scaling (amax -> 448)" | ...}}``.
    """

    path: str
    fits: dict[str, bool | None]
    lost: dict[str, dict[str, float]] = field(repr=False)
    recommendation: str | None
    needs: dict[str, str] = field(default_factory=dict)
    scaling: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "fits": self.fits,
            "lost": self.lost,
            "needs": self.needs,
            "scaling": self.scaling,
            "recommendation": self.recommendation,
        }


def _fraction(monitor, path: str, kinds, fmt, scaling: Scaling) -> tuple[float, float, int]:
    """(overflow, flush, numel) summed over the measured steps and ``kinds``."""
    over = flush = 0.0
    numel = 0
    for table in monitor.results.values():
        for kind in kinds:
            s = table.get((path, kind))
            if s is not None:
                o, f = lost_counts(s, fmt, scaling)
                over, flush, numel = over + o, flush + f, numel + s.numel
    return over, flush, numel


def verdicts(monitor, loss_threshold: float = 0.01, *, loss_scale: float | None = None):
    """Per-module verdicts (rule and scalings in the module docstring).

    They judge the measured steps the monitor keeps (its last ``window`` ones): per-tensor
    fp8 scaling is applied per step, from that step's amax, which the run's merged totals
    cannot give.

    Args:
        monitor: a :class:`~mixprec.numerics.Monitor` that has measured steps.
        loss_threshold: the lost fraction a format may have and still fit.
        loss_scale: judge fp16 gradients as multiplied by this loss scale (the scale an
            fp16 run used); None: as measured (already scaled when the monitor was given
            ``scale=``, else a plain cast).

    Example:
        >>> v = monitor.verdicts(loss_scale=65536.0)  # doctest: +SKIP
        >>> v[0].recommendation                       # doctest: +SKIP
        'keep the gradients of ln in bf16: 9.0% of its output gradients underflow in fp16
        (loss scale 65536); its activations fit fp16 (plain cast)'
    """
    monitor.readout()
    modules = dict(monitor.model.named_modules())
    out = []
    for path in monitor.module_paths:
        if path == "" and next(monitor.model.children(), None) is not None:
            continue  # the model itself: not a layer, and its output gradient is the loss's
        groups = [
            g
            for g, kinds in GROUPS.items()
            if any((path, k) in t for t in monitor.results.values() for k in kinds)
        ]
        if groups:
            linear = isinstance(modules.get(path), nn.Linear)
            out.append(_verdict(monitor, path, groups, loss_threshold, loss_scale, linear))
    return out


def _fp8_formats() -> dict[str, str]:
    """The fp8 format of each group in fp8 training (``Float8Config`` defaults)."""
    from mixprec.float8.config import Float8Config

    config = Float8Config()
    return {"activations": config.forward_format, "gradients": config.backward_format}


def _applies(fmt, group: str, linear: bool) -> bool:
    """Whether training would cast this group of a module to ``fmt`` (module docstring)."""
    if fmt.bits > 8:
        return True
    if not linear:
        return False
    if fmt.bits == 8:  # e4m3 variants forward, e5m2 variants backward
        from mixprec.formats import get_format

        used = get_format(_fp8_formats()[group])
        return (fmt.exponent_bits, fmt.mantissa_bits) == (used.exponent_bits, used.mantissa_bits)
    return True


def _verdict(monitor, path, groups, threshold, loss_scale, linear) -> LayerVerdict:
    counts, lost, scaling = {}, {}, {}
    candidates = {g: [f for f in monitor.formats if _applies(f, g, linear)] for g in groups}
    for g in groups:
        for f in candidates[g]:
            sc = scaling_for(f, g, loss_scale)
            per_kind = {k: _fraction(monitor, path, (k,), f, sc) for k in GROUPS[g]}
            counts[f.name, g] = per_kind
            over = sum(c[0] for c in per_kind.values())
            flush = sum(c[1] for c in per_kind.values())
            numel = sum(c[2] for c in per_kind.values())
            lost.setdefault(f.name, {})[g] = (over + flush) / numel if numel else 0.0
            scaling.setdefault(f.name, {})[g] = sc.describe(f)
    fits: dict[str, bool | None] = {f.name: None for f in monitor.formats}
    fits.update({f: all(v <= threshold for v in lost[f].values()) for f in lost})

    def best(group: str, width: int):
        return min(
            (f for f in candidates[group] if f.bits == width),
            key=lambda f: lost[f.name][group],
            default=None,
        )

    needs = {}
    for g in groups:
        widths = sorted({f.bits for f in candidates[g]})
        ok = next((w for w in widths if lost[best(g, w).name][g] <= threshold), None)
        fitting = [f for f in candidates[g] if f.bits == ok and lost[f.name][g] <= threshold]
        # of the formats of that width that fit, the most precise (fp16 before bf16)
        needs[g] = max(fitting, key=lambda f: f.mantissa_bits).name if fitting else "fp32"
    width = {f.name: f.bits for f in monitor.formats}
    failing = {}  # group -> the format that explains why it needs what it needs
    for g in groups:
        top = width.get(needs[g], 64)
        fail = [f for f in candidates[g] if f.bits <= top and lost[f.name][g] > threshold]
        if fail:  # same width as the need first (why not fp16 beside bf16), else narrowest
            failing[g] = min(fail, key=lambda f: (f.bits != top, -f.bits, lost[f.name][g]))
    rec = None
    if failing:
        parts = []
        for g, fmt in failing.items():
            reasons = []
            for kind, (over, flush, numel) in counts[fmt.name, g].items():
                if numel:
                    verb = "overflow" if over >= flush else "underflow"
                    share = 100 * (over + flush) / numel
                    reasons.append((share, f"{share:.1f}% of its {_WORDS[kind]} {verb}"))
            why = max(reasons)[1]
            parts.append(
                f"keep the {g} of {path} in {needs[g]}: {why} in {fmt.name} "
                f"({scaling[fmt.name][g]})"
            )
        good = [g for g in groups if g not in failing]
        tail = "".join(f"; its {g} fit {needs[g]} ({scaling[needs[g]][g]})" for g in good)
        rec = "; ".join(parts) + tail
    return LayerVerdict(path, fits, lost, rec, needs, scaling)
