"""The bench times with no more threads than the cores other processes leave free."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from mixprec.bench.cores import busy_cores, choose_threads, threads_for
from mixprec.bench.runner import BenchConfig, run_bench


@pytest.mark.parametrize(
    ("busy", "cores", "current", "expected"),
    [(0.0, 2, 2, 1), (0.4, 2, 2, 1), (1.0, 2, 2, 1), (2.0, 2, 2, 1), (0.0, 1, 1, 1),
     (0.0, 4, 4, 3), (1.4, 4, 4, 2), (1.6, 4, 4, 1), (1.0, 16, 8, 8), (9.2, 16, 16, 6),
     (0.0, 16, 16, 15)],  # fmt: skip
)
def test_threads_for_leaves_the_busy_cores_and_one_more_out(busy, cores, current, expected):
    assert threads_for(busy, cores, current) == expected


@pytest.mark.parametrize("busy", [0.0, 1.0])
def test_auto_times_with_as_many_threads_quiet_as_beside_one_busy_process(monkeypatch, busy):
    import mixprec.bench.cores as cores

    monkeypatch.setattr(cores, "busy_cores", lambda seconds=cores.SAMPLE_S: busy)
    monkeypatch.setattr(cores, "_usable_cores", lambda: 2)
    monkeypatch.setattr(cores.torch, "get_num_threads", lambda: 2)
    choice = choose_threads("auto")
    assert (choice.threads, choice.before, choice.busy) == (1, 2, busy)
    assert f"{busy:.1f} of 2 cores busy" in choice.note and "1 left free" in choice.note
    assert "--threads 2 to use them all" in choice.note


def test_busy_cores_counts_only_the_cpus_this_process_may_use(monkeypatch, tmp_path):
    import builtins

    import mixprec.bench.cores as cores

    # 4 CPUs; this process may use cpu0 and cpu1. Between the two readings cpu0 is half
    # busy, cpu1 idle, cpu2 and cpu3 (not ours) fully busy: 0.5 of our 2 CPUs are busy.
    def stat(rows: list[tuple[int, int]]) -> str:  # (busy, idle) jiffies per CPU, cumulative
        lines = [f"cpu{i} {b} 0 0 {idle} 0 0 0 0 0 0" for i, (b, idle) in enumerate(rows)]
        b, idle = sum(r[0] for r in rows), sum(r[1] for r in rows)
        return "\n".join([f"cpu  {b} 0 0 {idle} 0 0 0 0 0 0", *lines]) + "\n"

    files = iter([stat([(0, 100)] * 4), stat([(50, 150), (0, 200), (100, 100), (100, 100)])])
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/stat":
            p = tmp_path / "stat"
            p.write_text(next(files))
            return real_open(p, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cores.time, "sleep", lambda s: None)
    assert cores.busy_cores(0.5) == pytest.approx(0.5, abs=0.05)  # minus our own ~0 s


def test_busy_cores_sees_a_process_burning_a_core():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started and running
        loaded = busy_cores(0.5)
    finally:
        burner.kill()
        burner.wait()
    # at least most of a core (the tests running beside it may take the rest)
    assert 0.5 <= loaded <= (os.cpu_count() or 1)


@pytest.mark.parametrize("bad", [0, -2, "four", 1.5, True])
def test_a_bad_thread_count_is_refused(bad):
    with pytest.raises(ValueError, match="threads="):
        BenchConfig("mlp", "tiny", threads=bad)
    with pytest.raises(ValueError, match="threads="):
        choose_threads(bad)


def test_bench_times_with_the_chosen_threads_and_restores_the_setting():
    before = torch.get_num_threads()
    seen = []
    result = run_bench(
        BenchConfig("mlp", "tiny", recipes=("bf16-mixed",), steps=2, threads=1,
                    memory_steps=0, numerics_steps=0, evaluate=False),  # fmt: skip
        on_event=lambda kind, info: seen.append(torch.get_num_threads()),
    )
    assert set(seen) == {1}
    assert torch.get_num_threads() == before
    assert result.device["threads"] == 1 and result.device["threads_before"] == before
    assert result.device["threads_note"] == "1 thread (as asked)"
