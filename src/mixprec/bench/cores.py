"""How many threads the bench times with on a CPU that other processes are using.

A CPU step runs on ``torch.get_num_threads()`` threads that meet at a barrier after each
parallel kernel. When another process keeps one of the cores busy, the operating system
shares that core between it and one of the step's threads, and every other thread waits
at each barrier for the one that was paused: a step slows far more than the share of the
machine the other process takes, and not by the same factor for every recipe (on the
2-core machine of docs/bench.md, with one core taken, fp32 steps took 2.7x as long and
bf16 ones 2.2x, which moved the bf16 speed-up from 2.4x to 2.0x). The bench therefore
measures, before it starts, how many cores are busy with other processes and times with
fewer threads than there are free cores (``--threads auto``, the command's default)::

    busy    = (non-idle CPU time of the CPUs this process may use) / (wall time), over
              SAMPLE_S seconds while the bench itself sleeps (/proc/stat; Linux only)
    free    = usable cores (os.sched_getaffinity) - round(busy)
    threads = min(torch.get_num_threads(), max(1, free - HEADROOM))

``HEADROOM`` (one core) is left for whatever else runs: a process that starts during the
bench, which the reading at the start cannot see, then takes the spare core instead of
one the step's threads wait for, and a run beside one busy process times with as many
threads as a run on the quiet machine, so the two measure the same thing (on the 2-core
machine of docs/bench.md the bf16 speed-up is 2.3x with two threads and 2.5x with one:
the thread count is part of what a speed-up means). ``--threads N`` uses N threads.

Where /proc/stat cannot be read the thread count is left as it is and the report says so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

__all__ = [
    "HEADROOM", "SAMPLE_S", "ThreadChoice", "busy_cores", "check_threads", "choose_threads",
    "threads_for",
]  # fmt: skip

SAMPLE_S = 0.5
HEADROOM = 1  # cores left free for other processes


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


@dataclass(frozen=True, slots=True)
class ThreadChoice:
    """The threads the bench times with, and the sentence the report prints about them."""

    threads: int
    before: int
    busy: float | None
    cores: int
    note: str


def _usable() -> set[int] | None:
    """The CPUs this process may run on (None where the OS does not say)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None


def _usable_cores() -> int:
    cpus = _usable()
    return len(cpus) if cpus else (os.cpu_count() or 1)


def _cpu_times(cpus: set[int] | None = None) -> tuple[int, int, int]:
    """(busy, total, CPUs counted) jiffies from /proc/stat: the ``cpuN`` lines of ``cpus``,
    or the whole machine's first line when ``cpus`` is None or no such line is there."""
    per_cpu: list[list[int]] = []
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    machine = [int(x) for x in lines[0].split()[1:]]
    if cpus is not None:
        for line in lines[1:]:
            name, _, rest = line.partition(" ")
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                per_cpu.append([int(x) for x in rest.split()])
    rows, n = (per_cpu, len(per_cpu)) if per_cpu else ([machine], os.cpu_count() or 1)
    busy = total = 0
    for fields in rows:
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        all_time = sum(fields[:8])  # guest time is already counted in user time
        busy, total = busy + all_time - idle, total + all_time
    return busy, total, n


def busy_cores(seconds: float = SAMPLE_S) -> float:
    """Of the CPUs this process may use, how many other processes kept busy over
    ``seconds`` (this one sleeps meanwhile): ``busy share x CPUs - own CPU time / seconds``.

    Raises:
        OSError: /proc/stat cannot be read (not Linux).
    """
    cpus = _usable()
    busy0, total0, _ = _cpu_times(cpus)
    own0 = sum(os.times()[:2])
    time.sleep(seconds)
    busy1, total1, n = _cpu_times(cpus)
    own1 = sum(os.times()[:2])
    if total1 <= total0:
        return 0.0
    share = (busy1 - busy0) / (total1 - total0)  # of the CPUs counted
    return max(0.0, share * n - (own1 - own0) / seconds)


def threads_for(busy: float, cores: int, current: int) -> int:
    """``min(current, max(1, cores - round(busy) - HEADROOM))``: the module docstring's rule."""
    return min(current, max(1, cores - round(busy) - HEADROOM))


def check_threads(requested) -> None:
    """Refuse anything but ``"auto"``, None or a positive int, naming the value."""
    if requested is None or requested == "auto":
        return
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"threads={requested!r}: use 'auto', None or a positive int")


def choose_threads(requested: int | str | None) -> ThreadChoice:
    """The threads to time with: ``"auto"`` (measure the load), a number, or None (as is).

    Raises:
        ValueError: ``requested`` is not ``"auto"``, None or a positive int.
    """
    before = torch.get_num_threads()
    cores = _usable_cores()
    if requested is None:
        return ThreadChoice(before, before, None, cores, f"{_threads(before)} (torch's setting)")
    if requested != "auto":
        check_threads(requested)
        return ThreadChoice(requested, before, None, cores, f"{_threads(requested)} (as asked)")
    try:
        busy = busy_cores()
    except OSError as exc:
        return ThreadChoice(
            before, before, None, cores,
            f"{_threads(before)}: the load of other processes could not be read ({exc})",
        )  # fmt: skip
    threads = threads_for(busy, cores, before)
    seen = f"{busy:.1f} of {cores} cores busy with other processes"
    if threads == before:
        note = f"{_threads(threads)} ({seen})"
    else:
        note = (
            f"{threads} of {before} threads: {seen} when the bench started, and "
            f"{HEADROOM} left free for what else runs, so that no step's thread shares a core "
            f"and waits at every barrier (--threads {before} to use them all)"
        )
    return ThreadChoice(threads, before, busy, cores, note)
