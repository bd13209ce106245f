"""``mixprec diagnose``: train a task or a user model through a recipe with the monitor on.

Writes into ``out``: ``numerics.json`` (:func:`mixprec.numerics.report.to_dict` plus the
run's settings, losses and skipped steps with their explanations), ``table.txt``,
``gradient_histogram.png`` and ``underflow_heatmap.png``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from mixprec.bench.output import replace_folder
from mixprec.numerics.monitor import DEFAULT_FORMATS, Monitor

__all__ = ["diagnose"]


def diagnose(
    task: str,
    *,
    recipe: str = "fp16-mixed",
    steps: int = 50,
    out: str | Path = "diagnose-report",
    size: str = "small",
    formats: Sequence[str] = DEFAULT_FORMATS,
    every: int = 1,
    seed: int = 0,
    device: str = "cpu",
    console=None,
) -> dict[str, Path]:
    """Train ``steps`` steps of ``task`` with ``recipe`` under a :class:`Monitor`; write reports.

    Args:
        task: a built-in task name (``mlp``, ``unet``, ``gpt``, ``bert``) or a user model
            ``"package.module:factory"`` (see :mod:`mixprec.bench.user`).
        recipe: recipe name or string (:func:`mixprec.get_recipe`).
        steps: training steps.
        out: output folder (created).
        size: task size (``tiny``, ``small``, ``base``; ignored for user models).
        formats: target formats of the monitor.
        every: measure one step in ``every``.
        seed: task seed (weights and data order).
        device: torch device to train on.
        console: a ``rich.console.Console`` for the table (default: stdout).

    Returns:
        ``{"json", "table", "histogram", "heatmap"}`` -> paths.

    Example:
        >>> files = diagnose("mlp", steps=2, size="tiny", out="/tmp/d")  # doctest: +SKIP
    """
    from mixprec.bench.tasks import get_task
    from mixprec.bench.user import call_model, to_device
    from mixprec.numerics.report import _num
    from mixprec.precision import Precision

    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    the_task = get_task(task, size, seed=seed)
    precision = Precision(recipe)  # ValueError lists the recipes
    dev = torch.device(device)
    model = the_task.build_model().to(dev)
    model, opt = precision.setup(model, the_task.build_optimizer(model))
    scaling = bool(getattr(precision.scaler, "enabled", False))
    monitor = Monitor(model, formats=formats, every=every)
    losses: list[float] = []
    skipped: list[dict] = []
    pending: list[tuple[torch.Tensor, object]] = []  # (loss, stepped) not yet read out

    def read_out() -> None:
        # One transfer per monitor readout interval, so the host keeps floats, not tensors.
        if not pending:
            return
        values = torch.stack([loss for loss, _ in pending]).float().cpu().tolist()
        first = len(losses)
        losses.extend(values)
        for i, (_, stepped) in enumerate(pending):
            if not bool(stepped):
                step = first + i
                why = monitor.explain_step(step) or "not measured (every > 1)"
                skipped.append({"step": step, "explanation": f"step {step} skipped: {why}"})
        pending.clear()

    with monitor:
        for x, y in the_task.train_batches(steps):
            x, y = to_device(x, dev), to_device(y, dev)
            with precision.autocast():
                loss = the_task.loss(call_model(model, x), y)
            precision.backward(loss)
            scale = precision.scaler.scale.detach().clone() if scaling else None
            stepped = precision.step(opt)
            monitor.step(scale=scale)
            pending.append((loss.detach(), stepped))
            if len(pending) >= monitor.report_every:
                read_out()
        read_out()
    with replace_folder(out) as tmp:  # out holds the previous report until this one is whole
        files = _write(monitor, tmp, console, {
            "task": task, "size": size, "recipe": str(precision.recipe), "steps": steps,
            "seed": seed, "device": str(dev), "losses": [_num(v) for v in losses],
            "skipped": skipped,
        })  # fmt: skip
    files = {k: Path(out) / p.name for k, p in files.items()}
    from rich.console import Console
    from rich.text import Text

    con = console or Console()
    for item in skipped:
        con.print(Text(item["explanation"]))
    con.print(Text(f"wrote {', '.join(str(p) for p in files.values())}"))
    return files


def _write(monitor, out: Path, console, run: dict) -> dict[str, Path]:
    from mixprec.numerics.report import write_report

    files = write_report(monitor, out, console=console)
    data = json.loads(files["json"].read_text())
    data["run"] = run
    files["json"].write_text(json.dumps(data, indent=1, allow_nan=False))
    return files
