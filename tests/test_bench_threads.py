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
    [(0.0, 2, 2, 2), (0.4, 2, 2, 2), (1.0, 2, 2, 1), (0.6, 2, 2, 1), (2.0, 2, 2, 1),
     (1.0, 16, 8, 8), (9.2, 16, 16, 7)],  # fmt: skip
)
def test_threads_for_leaves_the_busy_cores_out(busy, cores, current, expected):
    assert threads_for(busy, cores, current) == expected


def test_busy_cores_reads_the_machine_share_from_proc_stat(monkeypatch):
    import mixprec.bench.cores as cores

    # two readings 0.5 s apart on a 4-core machine: 200 of 400 jiffies busy = 2 cores
    readings = iter([(1000, 5000), (1200, 5400)])
    monkeypatch.setattr(cores, "_cpu_times", lambda: next(readings))
    monkeypatch.setattr(cores.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(cores.time, "sleep", lambda s: None)
    assert cores.busy_cores(0.5) == pytest.approx(2.0, abs=0.05)  # minus our own ~0 s


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
