"""The numerics monitor's memory is bounded: a window of per-step results, exact totals,
the run's first inf/NaN (issue 14)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixprec.numerics import Monitor


def _run(monitor: Monitor, model: nn.Module, steps: int, bad_step: int | None = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same values
    x = torch.linspace(-1, 1, 32).reshape(8, 4)
    for step in range(steps):
        xin = x.clone()
        if step == bad_step:
            xin[0, 0] = float("inf")
        model(xin).square().mean().backward()
        opt.step()
        opt.zero_grad()
        monitor.step(scale=torch.tensor(2.0**step))  # a loss scale per step, read out later


def test_per_step_results_are_a_window_and_totals_cover_every_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with Monitor(model, formats=["fp16"], window=5, report_every=3) as monitor:
        _run(monitor, model, 23, bad_step=2)
    assert monitor.steps == list(range(18, 23))  # only the last 5 measured steps are kept
    assert len(monitor.results) == 5 and monitor.scales == {s: 2.0**s for s in range(18, 23)}
    assert monitor.stats("0", "output").numel == 23 * 8 * 4  # merged over all 23 steps
    assert monitor.stats("0", "output", step=22).numel == 8 * 4
    first = monitor.first_nonfinite  # step 2 left the window; its first inf is kept
    assert first is not None and first.step == 2 and first.path == "0"
    assert monitor.first_nonfinite_in(2) == first
    with pytest.raises(KeyError, match="step 3 is no longer kept: .* last 5 measured steps"):
        monitor.stats("0", "output", step=3)


def test_a_long_run_holds_no_more_than_the_window():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with Monitor(model, formats=["fp16"], window=4, report_every=10) as monitor:
        _run(monitor, model, 60)
        sizes = []
        for _ in range(3):
            _run(monitor, model, 40)
            monitor.readout()
            sizes.append((len(monitor.results), len(monitor.totals), len(monitor.scales)))
    assert sizes[0] == sizes[1] == sizes[2] and sizes[0][0] == sizes[0][2] == 4


def test_window_is_checked():
    with pytest.raises(ValueError, match="window=0 must be a positive integer"):
        Monitor(nn.Linear(2, 2), window=0)
