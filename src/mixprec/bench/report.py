"""The bench report: the comparison table, PNG plots, ``report.md`` and ``results.json``.

``results.json`` (schema ``"mixprec.bench/1"``; non-finite numbers are written as null)::

    {
      "schema": "mixprec.bench/1", "mixprec": str, "torch": str, "created": ISO-8601 UTC,
      "device": {"type", "name", "threads", "torch", "cpu_capability" and
                 "matrix_units" (CPU only: AMX flags, e.g. "amx_bf16"), "threads_before"
                 (torch's setting before the bench) and "threads_note" (why the bench
                 timed with "threads", see mixprec.bench.cores)},
      "task": {"name", "size", "seed", "description", "metric", "higher_is_better",
               "tolerance", "tolerance_text", "item_unit", "items_per_batch",
               "parameters", "flops_per_step"},
      "config": {"steps", "warmup", "max_grad_norm", "recipe_budget_s", "budget_vs_fp32",
                 "budget_floor_s", "memory_steps", "numerics_steps"},
      "timing": {"design", "rounds" (steps per round), "orders" (recipes per round, in the
                 order they ran), "offloaded" (other recipes' states in host memory),
                 "confidence", "noise": {"load_factors", "drift", "spread", "noisy", "why"}},
      "interrupted": null | name of the recipe running at Ctrl-C (not in "recipes"),
      "seconds": wall-clock seconds of the whole bench,
      "recipes": [{
          "recipe", "recipe_string", "status" ("ok" | "diverged" | "truncated" | "failed"),
          "steps_run", "diverged_at" (1-based step | null), "error" (str | null),
          "train_seconds", "budget_s" (the recipe's training-time cap | null),
          "step_time_s": {"median", "q1", "q3", "iqr", "n"} | null,
          "items_per_s", "speedup_vs_fp32" (median of the per-round speed-ups),
          "speedup_interval": {"point", "low", "high", "rounds", "level"} | null,
          "round_times_s": {round: mean step time in that round},
          "peak_memory_bytes", "memory_source", "estimated_memory_bytes",
          "metrics": {name: value}, "metric", "metric_gap_vs_fp32", "same_quality",
          "skipped_steps", "loss_scale", "losses": [one per step],
          "achieved_flops_per_s", "mfu", "tensor_core_share",
          "missing": {figure: why it is missing}}],
      "shape_check": {"8": [{"module", "kind", "dim", "value", "padded", "multiple"}],
                      "16": [...] (Linear layers, when an fp8 recipe ran)},
      "recommendation": {"recipe", "summary", "reasons": [str]},
      "missing": {figure ("flops_per_step", "numerics", "numerics_plot"): why it is missing},
      "numerics": null | {"steps", "formats", "loss_scale", "loss_scale_from",
                          "verdicts": [{"path", "fits", "lost", "needs", "scaling",
                                        "recommendation"}],
                          "fp8_check": {"agree": bool | null, "text"}}
    }

Every figure is defined in :mod:`mixprec.bench.runner` and :mod:`mixprec.bench.analysis`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from mixprec.bench.numerics_notes import numerics_json, numerics_section
from mixprec.bench.recommend import Recommendation, recommend
from mixprec.bench.results import BenchResult, RecipeResult

__all__ = ["SCHEMA", "table_rows", "to_json", "write_report"]

SCHEMA = "mixprec.bench/1"
TIMING_DESIGN = (
    "interleaved rounds: each recipe trains its own steps from the same initial weights on "
    "the same batches, a few steps per round, in a fresh random order each round; each "
    "recipe's state is kept between rounds (on a GPU in host memory, so the device holds "
    "one model at a time)"
)
HEADERS = (
    "recipe",
    "status",
    "step time (median ± IQR)",
    "{unit}/s",
    "speed-up (CI)",
    "peak memory (measured / estimated)",
    "{metric}",
    "gap to fp32",
    "skipped",
)


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _recipe_json(result: BenchResult, r: RecipeResult) -> dict[str, Any]:
    from mixprec.recipes import get_recipe

    return {
        "recipe": r.recipe,
        "recipe_string": get_recipe(r.recipe).to_string(),
        "status": r.status,
        "steps_run": r.steps_run,
        "train_seconds": r.train_seconds,
        "budget_s": r.budget_s,
        "diverged_at": r.diverged_at,
        "error": r.error,
        "step_time_s": r.step_time_stats(),
        "items_per_s": result.items_per_s(r),
        "speedup_vs_fp32": result.speedup(r),
        "speedup_interval": iv.to_dict() if (iv := result.speedup_interval(r)) else None,
        "round_times_s": {str(k): v for k, v in sorted(r.round_times.items())},
        "peak_memory_bytes": r.peak_memory_bytes,
        "memory_source": r.memory_source,
        "estimated_memory_bytes": r.estimated_memory_bytes,
        "metrics": dict(r.metrics),
        "metric": result.metric(r),
        "metric_gap_vs_fp32": result.metric_gap(r),
        "same_quality": result.same_quality(r),
        "skipped_steps": r.skipped_steps,
        "loss_scale": r.loss_scale,
        "losses": list(r.losses),
        "achieved_flops_per_s": result.achieved_flops(r),
        "mfu": result.mfu(r),
        "tensor_core_share": r.tensor_core_share,
        "missing": dict(r.missing),
    }


def _installed_version() -> str:
    """The installed mixprec distribution's version (what pip installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixprec")
    except PackageNotFoundError:
        return "unknown (mixprec is imported from a source tree, not installed)"


def to_json(
    result: BenchResult, verdict: Recommendation | None = None, plots_missing: dict | None = None
) -> dict[str, Any]:
    """The results.json document (schema in the module docstring); ``plots_missing``: the
    plots :func:`~mixprec.bench.plots.write_plots` could not draw, and why."""
    import torch

    task, cfg = result.task, result.config
    verdict = verdict or recommend(result)
    doc = {
        "schema": SCHEMA,
        "mixprec": _installed_version(),
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result.started)),
        "device": dict(result.device),
        "task": {
            "name": task.name if task.name != "user" else getattr(task, "spec", "user"),
            "size": task.size,
            "seed": task.seed,
            "description": task.description,
            "metric": task.metric,
            "higher_is_better": task.higher_is_better,
            "tolerance": task.tolerance,
            "tolerance_text": task.tolerance_text,
            "item_unit": task.item_unit,
            "items_per_batch": task.items_per_batch,
            "parameters": result.parameters,
            "flops_per_step": result.flops_per_step,
        },
        "config": {
            "steps": result.steps,
            "warmup": cfg.warmup,
            "max_grad_norm": cfg.max_grad_norm,
            "recipe_budget_s": cfg.recipe_budget_s,
            "budget_vs_fp32": cfg.budget_vs_fp32,
            "budget_floor_s": cfg.budget_floor_s,
            "memory_steps": cfg.memory_steps,
            "numerics_steps": cfg.numerics_steps,
        },
        "timing": {
            "design": TIMING_DESIGN,
            "rounds": cfg.round_plan(result.steps),
            "orders": result.round_orders,
            "offloaded": result.offloaded,
            "confidence": cfg.confidence,
            "noise": result.noise(),
        },
        "interrupted": result.interrupted,
        "seconds": result.seconds,
        "recipes": [_recipe_json(result, r) for r in result.recipes],
        "shape_check": {str(m): [i.to_dict() for i in v] for m, v in result.shape_issues.items()},
        "recommendation": verdict.to_dict(),
        "missing": {**result.missing, **(plots_missing or {})},
        "numerics": numerics_json(result),
    }
    return _finite(doc)


def _memory_cell(r) -> str:
    """measured / estimated peak, and why a figure is missing when a probe failed."""
    cell = f"{_bytes(r.peak_memory_bytes)} / {_bytes(r.estimated_memory_bytes)}"
    failed = r.memory_source and "failed" in r.memory_source
    return f"{cell} ({r.memory_source})" if failed else cell


def _bytes(n: int | None) -> str:
    if not n:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _flops(x: float) -> str:
    for unit, size in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6)):
        if x >= size:
            return f"{x / size:,.1f} {unit}"
    return f"{x:,.0f} FLOP/s"


def _seconds(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _status(result: BenchResult, r: RecipeResult) -> str:
    if r.status == "diverged":
        return f"diverged at step {r.diverged_at}"
    if r.status == "truncated":
        return f"truncated ({r.steps_run}/{result.steps} steps)"
    return r.status


def table_rows(result: BenchResult) -> tuple[list[str], list[list[str]]]:
    """Headers and one row of strings per recipe: the comparison table (console and report)."""
    task = result.task
    headers = [h.format(unit=task.item_unit, metric=task.metric) for h in HEADERS]
    rows = []
    for r in result.recipes:
        stats = r.step_time_stats()
        ips = result.items_per_s(r)
        metric, gap = result.metric(r), result.metric_gap(r)
        same = result.same_quality(r)
        mark = "" if same is None or r is result.reference else (" ✓" if same else " ✗")
        rows.append(
            [
                r.recipe,
                _status(result, r),
                f"{_seconds(stats['median'])} ± {_seconds(stats['iqr'])}" if stats else "–",
                f"{ips:,.0f}" if ips else "–",
                _speedup_cell(result, r),
                _memory_cell(r),
                f"{metric:.4f}" if metric is not None else "–",
                (f"{gap:+.4f}" if gap is not None else "–") + mark,
                str(r.skipped_steps),
            ]
        )
    return headers, rows


def _speedup_cell(result: BenchResult, r: RecipeResult) -> str:
    speedup = result.speedup(r)
    if not speedup:
        return "–"
    iv = result.speedup_interval(r)
    if iv is None or r is result.reference or iv.rounds < 2:
        return f"{speedup:.2f}x"
    cell = f"{speedup:.2f}x [{iv.low:.2f}, {iv.high:.2f}]"
    if not iv.reaches(result.config.confidence):  # too few rounds: say how sure it is
        cell += f" ({iv.rounds} rounds: {iv.level:.0%})"
    return cell


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _missing_section(result: BenchResult, plots_missing: dict[str, str]) -> list[str]:
    """``## Missing figures``: each figure a side measurement could not give, and why."""
    named = {**result.missing, **plots_missing}
    named |= {f"{r.recipe} {k}": why for r in result.recipes for k, why in r.missing.items()}
    lines = [f"- {figure}: {why}" for figure, why in named.items()]
    return ["## Missing figures", "", *lines, ""] if lines else []


def _markdown(result: BenchResult, verdict: Recommendation, plots: dict, missing: dict) -> str:
    task, cfg, dev = result.task, result.config, result.device
    name = getattr(task, "spec", task.name)
    out = [
        f"# mixprec bench: {name} ({task.size}) on {dev['name']}",
        "",
        f"**Recommended: {verdict.recipe}** — {verdict.summary}",
        "",
        *[f"- {line}" for line in verdict.reasons],
        "",
    ]
    if result.interrupted:
        out += [
            f"> Interrupted (Ctrl-C) while running **{result.interrupted}**: the table holds "
            "the recipes that finished before it.",
            "",
        ]
    noise = result.noise()
    if noise["noisy"]:
        out += [
            f"> **Noisy run**: {'; '.join(noise['why'])}. Speed-ups are medians of "
            "per-round ratios, which a load shared by all recipes cancels; read the "
            "intervals.",
            "",
        ]
    out += ["## Results", "", _markdown_table(*table_rows(result)), ""]
    plan = cfg.round_plan(result.steps)
    out += [
        f"Timing: {TIMING_DESIGN}. {len(plan)} rounds of {plan} steps (round 0 untimed "
        f"when warmup > 0); speed-up = median over rounds of fp32's mean step time / the "
        f"recipe's in the same round, [interval of at least {cfg.confidence:.0%} coverage] "
        "between order statistics of the per-round speed-ups; load drift across rounds "
        f"{noise['drift']:.2f}x.",
        "",
    ]
    flops = result.flops_per_step
    extra = [
        (r.recipe, result.achieved_flops(r), result.mfu(r), r.tensor_core_share)
        for r in result.recipes
    ]
    if flops:
        out += [
            "| recipe | achieved FLOP/s | MFU | tensor-core share of kernel time |",
            "|---|---|---|---|",
        ]
        for recipe, achieved, mfu, tc in extra:
            out.append(
                f"| {recipe} | {_flops(achieved)} | "
                f"{f'{mfu:.1%}' if mfu else '– (no peak for this device)'} | "
                f"{f'{tc:.1%}' if tc is not None else '– (GPU only)'} |"
                if achieved
                else f"| {recipe} | – | – | – |"
            )
        out.append("")
    if plots:
        out += ["## Plots", ""]
        out += [f"![{title}]({path})" for title, path in plots.items()]
        out.append("")
    out += numerics_section(result)
    out += _missing_section(result, missing)
    out += ["## Shape check (tensor-core friendly dimensions)", ""]
    for multiple, issues in result.shape_issues.items():
        scope = "Linear and convolution" if multiple == 8 else "Linear (fp8 GEMMs)"
        if not issues:
            out.append(f"- {scope} dimensions: all multiples of {multiple}.")
        for i in issues:
            out.append(
                f"- `{i.module}` ({i.kind}) {i.dim} = {i.value} is not a multiple of {multiple}: "
                f"pad to {i.padded}"
            )
    out += [
        "",
        "## Setup",
        "",
        f"- task: {task.description}; {result.parameters:,} parameters; "
        f"{task.items_per_batch:,} {task.item_unit} per batch; "
        f"{f'{flops / 1e9:,.3g} GFLOP per step' if flops else 'FLOPs not counted'}",
        f"- {result.steps} steps per recipe from the same initial weights (seed {task.seed}) "
        f"on the same batches; the first {cfg.warmup} steps are not timed; "
        f"gradient clipping {cfg.max_grad_norm}",
        f"- quality: final {task.metric} ({'higher' if task.higher_is_better else 'lower'} is "
        f"better); same quality = within {task.tolerance_text} of fp32's",
        f"- device: {dev['name']} ({dev['type']}, threads: {dev['threads']}), torch {dev['torch']}",
        *([f"- threads: {dev['threads_note']}"] if dev.get("threads_note") else []),
        f"- peak memory measured over {cfg.memory_steps} extra steps by mixprec.memory.measure",
        f"- bench wall time {result.seconds:.1f} s",
        "",
        "Formulas: step time = wall clock per step (median, IQR = q3 - q1); "
        f"{task.item_unit}/s = {task.item_unit} per batch / median step time; speed-up = "
        "median over timed rounds of fp32's mean step time / the recipe's in that round "
        "[distribution-free interval for the median]; "
        f"gap = {task.metric} - fp32's; achieved FLOP/s = FLOPs per step (counted by torch's "
        "FlopCounterMode) / median step time; MFU = achieved / peak FLOP/s of the GPU in the "
        "compute dtype.",
        "",
    ]
    return "\n".join(out)


def write_report(result: BenchResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``results.json`` and the PNG plots into ``out_dir``.

    Returns:
        The written files by name (``report``, ``results``, and one key per plot).

    Example:
        >>> from mixprec.bench.runner import BenchConfig, run_bench
        >>> res = run_bench(BenchConfig("mlp", "tiny", recipes=("bf16-mixed",), steps=3))
        >>> import tempfile; files = write_report(res, tempfile.mkdtemp())
        >>> sorted(files)[:2]
        ['loss_curves', 'memory']
    """
    from mixprec.bench.plots import write_plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    verdict = recommend(result)
    plots_missing: dict[str, str] = {}
    files = write_plots(result, out, plots_missing)
    results = out / "results.json"
    doc = to_json(result, verdict, plots_missing)
    results.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    report = out / "report.md"
    titles = {"loss_curves": "loss curves", "memory": "peak memory"}  # else the key
    plots = {titles.get(k, k): p.name for k, p in files.items()}
    report.write_text(_markdown(result, verdict, plots, plots_missing))
    return {**files, "results": results, "report": report}
