"""The bench on a terminal: rich progress bars while it runs, the comparison table at the end."""

from __future__ import annotations

from typing import Any

from mixprec.bench.recommend import Recommendation
from mixprec.bench.report import table_rows
from mixprec.bench.results import BenchResult

__all__ = ["BenchProgress", "print_summary"]


class BenchProgress:
    """Progress bars for :func:`~mixprec.bench.runner.run_bench`: pass it as ``on_event``.

    One bar per recipe (steps done, last loss); use it as a context manager.

    Example:
        >>> import io
        >>> from rich.console import Console
        >>> with BenchProgress(total_recipes=1, console=Console(file=io.StringIO())) as progress:
        ...     progress("recipe_start", {"recipe": "fp32", "steps": 2})
    """

    def __init__(self, total_recipes: int, console=None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description:<12}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._bars: dict[str, Any] = {}
        self.total_recipes = total_recipes

    def __enter__(self) -> BenchProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        name = info.get("recipe", "")
        if kind == "recipe_start":
            self._bars[name] = self._progress.add_task(name, total=info["steps"], loss="–")
        elif kind == "step" and name in self._bars:
            loss = info["loss"]
            self._progress.update(self._bars[name], completed=info["step"], loss=f"{loss:.4g}")
        elif kind == "recipe_end" and name in self._bars:
            r = info["result"]
            label = {"ok": "", "truncated": " (budget)", "diverged": " (diverged)"}.get(
                r.status, f" ({r.status})"
            )
            self._progress.update(self._bars[name], description=f"{name}{label}")


def print_summary(result: BenchResult, verdict: Recommendation, console=None) -> None:
    """Print the comparison table, the shape check and the recommendation."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    task = result.task
    name = getattr(task, "spec", task.name)
    title = f"{name} ({task.size}), {result.steps} steps, {result.device['name']}"
    headers, rows = table_rows(result)
    table = Table(title=Text(title))  # user text (module names, errors) printed literally
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*map(Text, row))
    console.print(table)
    issues = [i for v in result.shape_issues.values() for i in v]
    for i in issues:
        console.print(
            Text(
                f"shape check: {i.module} ({i.kind}) {i.dim}={i.value} is not a multiple of "
                f"{i.multiple}: pad to {i.padded}"
            )
        )
    if result.interrupted:
        console.print(Text(f"interrupted while running {result.interrupted}", style="yellow"))
    dev = result.device
    if dev.get("threads_before", dev["threads"]) > dev["threads"]:  # fewer: say why
        console.print(Text(f"threads: {dev['threads_note']}", style="yellow"))
    noise = result.noise()
    if noise["noisy"]:
        console.print(Text(f"noisy run: {'; '.join(noise['why'])}", style="yellow"))
    ref = result.reference
    if ref is not None and ref.status == "ok":  # else nothing is recommended
        console.print(
            Text.assemble((f"Recommended: {verdict.recipe}", "bold green"), f" — {verdict.summary}")
        )
    for line in verdict.reasons:
        console.print(Text(f"  • {line}"))


def wide_console():
    """A rich Console for the commands' tables: the terminal's width, or 160 columns
    when writing to a file or pipe (so wide tables stay readable there)."""
    from rich.console import Console

    literal = {"markup": False, "emoji": False, "highlight": False}  # user text as written
    console = Console(**literal)
    if not console.is_terminal:
        console = Console(width=max(console.width, 160), **literal)
    return console
