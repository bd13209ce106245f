"""The numerics monitor is built by composition: a Monitor holds a Recorder (the hooks) that
measures into a MonitorResults (the measurements and the queries), each owning its state
(issue 19), and no code outside the numerics package reaches into a monitor's private state."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from mixprec.formats import FloatFormat, get_format
from mixprec.numerics import Monitor, StatsLayout
from mixprec.numerics.records import Record
from mixprec.numerics.results import MonitorResults

ROOT = Path(__file__).resolve().parents[1]


def test_results_stand_alone_without_a_monitor():
    layout = StatsLayout([get_format("fp16")])
    results = MonitorResults(layout, ["", "fc"], window=2)
    for step in range(3):
        x = torch.tensor([1.0, 1e5, 0.0, float("inf") if step == 1 else 2.0])
        results.add(Record(step, x.dtype, [("fc", "output")], layout.compute(x)))
        results.add_scale(step, torch.tensor(2.0**step) if step else 1.0)
    assert results.per_step == {}  # nothing leaves the device before the readout
    assert results.steps == [1, 2]  # reads out; the window keeps the last two steps
    assert results.scales == {1: 2.0, 2: 4.0}
    assert results.stats("fc").numel == 12  # totals cover all three steps
    assert results.stats("fc", step=2).formats["fp16"].overflow == 1
    first = results.first_nonfinite
    assert (first.step, first.path, first.kind, first.what) == (1, "fc", "output", "inf")
    assert results.explain_step(1) == "first inf in the output of fc (forward)"
    assert results.keys() == [("fc", "output")]
    with pytest.raises(KeyError, match="close matches: 'fc'"):
        results.stats("fx")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_readout_keeps_the_order_of_records_on_several_devices():
    layout = StatsLayout([get_format("fp16")])
    results = MonitorResults(layout, ["a", "b", "c"], window=4)
    for path, device, n in (("a", "cuda", 1), ("b", "cpu", 2), ("c", "cuda", 3)):
        x = torch.ones(n, device=device)
        results.add(Record(0, x.dtype, [(path, "output")], layout.compute(x)))
    results.add_scale(0, torch.tensor(4.0, device="cuda"))
    assert [results.stats(p).numel for p in "abc"] == [1, 2, 3]
    assert results.scales == {0: 4.0}


def test_monitor_holds_its_parts_and_inherits_none():
    assert Monitor.__mro__ == (Monitor, object)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with Monitor(model, formats=["fp16"]) as monitor:
        model(torch.randn(8, 4)).square().mean().backward()
        monitor.step(scale=torch.tensor(8.0))
    held = [v for v in vars(monitor).values() if isinstance(v, MonitorResults)]
    assert len(held) == 1 and held[0].steps == monitor.steps == [0]
    assert monitor.results is held[0].per_step and monitor.totals is held[0].totals
    assert monitor.scales == {0: 8.0}


def test_measurements_are_read_out_every_report_every_steps():
    model = nn.Linear(4, 4)
    with Monitor(model, formats=["fp16"], report_every=3, track=["activations"]) as monitor:
        for step in range(1, 7):
            model(torch.randn(2, 4).requires_grad_())
            monitor.step()
            # monitor.results is not a query: it shows what the periodic readouts filed
            assert sorted(monitor.results) == list(range(step - step % 3))


@pytest.mark.parametrize("name", ["every", "report_every", "window"])
@pytest.mark.parametrize("value", [0, True, 1.0])
def test_counts_must_be_positive_integers(name, value):
    with pytest.raises(ValueError, match=f"{name}={value!r} must be a positive integer"):
        Monitor(nn.Linear(2, 2), **{name: value})


def test_fine_key_is_exact_up_to_ten_mantissa_bits():
    # stats.py: every threshold of a format with at most 10 mantissa bits is j << 12 or
    # (j << 12) + 1 in fp32 bits; an 11th bit puts the overflow threshold off that grid.
    assert StatsLayout([FloatFormat.custom(5, 10)]).fine_exact
    assert not StatsLayout([FloatFormat.custom(5, 11)]).fine_exact


def _private_uses(path: Path) -> list[str]:
    """``x._name`` where ``x`` is a name or attribute that names a monitor."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__"):
            continue
        owner = node.value
        name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        if "monitor" in name.lower():
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_outside_numerics_reads_a_monitors_private_state():
    numerics = ROOT / "src" / "mixprec" / "numerics"
    files = [
        p
        for folder in ("src", "tests", "examples", "benchmarks")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if numerics not in p.parents
    ]
    assert len(files) > 50
    assert [use for p in files for use in _private_uses(p)] == []
