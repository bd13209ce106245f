"""Benchmark recipes side by side: built-in tasks (:mod:`.tasks`), user models (:mod:`.user`),
measuring (:mod:`.runner`) and the report (:mod:`.report`)."""

from mixprec.bench.tasks import SIZES, TASKS, Task, get_task

__all__ = ["SIZES", "TASKS", "Task", "get_task"]
