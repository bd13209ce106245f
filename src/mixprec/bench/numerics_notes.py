"""The bench report's numerics section, and whether its fp8 verdict agrees with the fp8 run.

The verdicts come from :mod:`mixprec.numerics.verdicts` (each format judged under the
scaling it gets in training). The check set against the fp8 recipe of the same bench:

* the verdict says *fp8 fits* when every Linear layer's activations and gradients need a
  format of 8 bits (after per-tensor scaling);
* the run says *fp8 works* when the fp8 recipe finished with a metric within the task's
  tolerance of fp32's, and *fails* when it diverged, failed or ended outside the tolerance
  (a truncated or unevaluated run says nothing);
* they agree when both say the same; the report states either way, and says so plainly
  when they disagree.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from mixprec.bench.results import BenchResult
from mixprec.recipes import get_recipe

__all__ = ["fp8_check", "numerics_json", "numerics_section"]


def _is_fp8(name: str) -> bool:
    return name.startswith("fp8")


def fp8_check(result: BenchResult) -> dict[str, Any] | None:
    """``{"agree": True | False | None, "text": sentence}``; None without numerics or fp8 run."""
    num = result.numerics
    run = next((r for r in result.recipes if get_recipe(r.recipe).fp8 != "off"), None)
    if not num or run is None:
        return None
    linear = [
        v
        for v in num["verdicts"]
        if any(_is_fp8(f) and ok is not None for f, ok in v["fits"].items())
    ]
    if not linear:
        return None
    bad = [v for v in linear if not all(_is_fp8(f) for f in v["needs"].values())]
    verdict_ok = not bad
    same = result.same_quality(run)
    gap = result.metric_gap(run)
    metric = result.task.metric
    if run.status in ("diverged", "failed") or same is False:
        run_ok: bool | None = False
        how = (
            f"{run.recipe} {run.status}"
            if run.status != "ok"
            else f"{run.recipe} ended outside the tolerance ({metric} gap {gap:+.4f})"
        )
    elif same:
        run_ok, how = True, f"{run.recipe} trained to the same {metric} (gap {gap:+.4f})"
    else:
        run_ok, how = None, f"{run.recipe} was not compared ({run.status})"
    said = (
        f"every one of the {len(linear)} Linear layers fits fp8 after per-tensor scaling"
        if verdict_ok
        else f"{len(bad)} of {len(linear)} Linear layers lose more than the threshold in "
        f"fp8 even after per-tensor scaling ({', '.join(v['path'] for v in bad[:3])}"
        f"{', ...' if len(bad) > 3 else ''})"
    )
    if run_ok is None:
        return {"agree": None, "text": f"fp8 verdict: {said}; {how}, so nothing to check"}
    if run_ok == verdict_ok:
        return {"agree": True, "text": f"fp8 verdict agrees with the run: {said}, and {how}"}
    why = (
        "the values it loses did not change the result over these steps"
        if run_ok
        else "what fp8 loses here is not range (the verdict's concern) but precision "
        "(2-3 mantissa bits) or tensors the monitor does not see (Linear inputs)"
    )
    return {
        "agree": False,
        "text": f"**the numerics verdict and the fp8 run disagree**: {said}, yet {how}; {why}",
    }


def numerics_json(result: BenchResult) -> dict[str, Any] | None:
    """The ``numerics`` entry of results.json, with the fp8 check added."""
    if not result.numerics:
        return result.numerics
    return {**result.numerics, "fp8_check": fp8_check(result)}


def _needs_line(verdicts: list[dict], group: str) -> str | None:
    counts = Counter(v["needs"][group] for v in verdicts if group in v["needs"])
    if not counts:
        return None
    scaling = {}
    for v in verdicts:
        fmt = v["needs"].get(group)
        if fmt in v["scaling"]:
            scaling.setdefault(fmt, v["scaling"][fmt][group])
    parts = [
        f"{n} module(s) fit {fmt}" + (f" ({scaling[fmt]})" if fmt in scaling else "")
        for fmt, n in counts.most_common()
    ]
    return f"- {group}: " + ", ".join(parts)


def numerics_section(result: BenchResult) -> list[str]:
    """Markdown lines of the report's numerics section (empty without numerics)."""
    num = result.numerics
    if not num:
        return []
    verdicts = num.get("verdicts", [])
    notes = [v for v in verdicts if v.get("recommendation")]
    scale = num.get("loss_scale")
    out = [
        "## Numerics",
        "",
        f"{num['steps']} fp32 steps watched by the numerics monitor against "
        f"{', '.join(num['formats'])}, each format judged as training uses it: fp8 after "
        "per-tensor scaling (amax -> format max), on Linear layers only (what an fp8 "
        "recipe casts); fp16 gradients after loss scale "
        f"{scale:g} ({num.get('loss_scale_from', '')}); bf16 and fp16 activations as "
        "plain casts. The model itself and the loss gradient are not judged as layers.",
        "",
        "Narrowest format each tensor kind fits (1% lost at most), by module:",
        "",
        *[line for g in ("activations", "gradients") if (line := _needs_line(verdicts, g))],
        "",
    ]
    if notes:
        out += [f"- `{v['path']}`: {v['recommendation']}" for v in notes[:10]]
        if len(notes) > 10:
            out.append(f"- ... and {len(notes) - 10} more (results.json)")
        out.append("")
    check = fp8_check(result)
    if check is not None:
        out += [f"{check['text']}.", ""]
    return out
