"""mixprec.bench side measurements (memory, FLOPs, numerics, profiler, plots): a figure that
cannot be measured is missing with its reason in results.json and report.md; an error that
is not one a measurement may fail with (a defect) propagates instead of being swallowed.

The failures are real ones: a layer that refuses forward hooks (the numerics monitor hooks
every module), a loss that raises the way a torch kernel does, a plot path that is a folder,
the CUDA profiler on a machine without CUDA.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mixprec.bench.probes import estimate_memory, measure_memory, profile_kernels
from mixprec.bench.report import write_report
from mixprec.bench.runner import BenchConfig, _flops_per_step, run_bench

QUICK = dict(size="tiny", steps=2, warmup=0, memory_steps=0, evaluate=False)


class _Unwatchable(nn.Linear):
    """Trains like a Linear; raises (as a torch op would) once a forward hook is on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._forward_hooks or self._forward_pre_hooks:
            raise RuntimeError("this layer refuses forward hooks")
        return super().forward(x)


def unwatchable_factory():
    """A user model the numerics monitor cannot watch; every recipe trains it."""
    torch.manual_seed(0)
    model = nn.Sequential(_Unwatchable(8, 8), nn.ReLU(), nn.Linear(8, 1))
    batches = [(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(2)]
    return model, lambda params: torch.optim.SGD(params, lr=0.1), batches, nn.functional.mse_loss


def test_numerics_monitor_failure_is_in_the_report_and_the_recipes_stand(tmp_path):
    config = BenchConfig(
        "tests.test_bench_probes:unwatchable_factory",
        recipes=("bf16-mixed",),
        numerics_steps=1,
        **QUICK,
    )
    result = run_bench(config)
    assert [r.status for r in result.recipes] == ["ok", "ok"]
    assert result.numerics is None
    why = "the numerics monitor failed (RuntimeError: this layer refuses forward hooks)"
    assert result.missing == {"numerics": why}
    files = write_report(result, tmp_path)
    assert json.loads(files["results"].read_text())["missing"] == {"numerics": why}
    assert f"## Missing figures\n\n- numerics: {why}" in files["report"].read_text()


def test_a_plot_that_cannot_be_written_is_missing_with_its_reason(tmp_path):
    config = BenchConfig("mlp", recipes=("fp32",), numerics_steps=1, **QUICK)
    result = run_bench(config)
    assert result.monitor is not None and result.missing == {}
    (tmp_path / "numerics.png").mkdir()  # savefig cannot write a file there
    files = write_report(result, tmp_path)
    assert "numerics" not in files
    why = json.loads(files["results"].read_text())["missing"]["numerics_plot"]
    assert why.startswith("plotting failed (IsADirectoryError: ")
    assert f"- numerics_plot: {why}" in files["report"].read_text()


def _raises(exc: Exception):
    def loss_fn(out, y):
        raise exc

    return loss_fn


def test_memory_probes_report_torch_errors_and_let_defects_through():
    model = nn.Linear(4, 2)
    batch = (torch.randn(3, 4), torch.randn(3, 2))
    kernel = _raises(RuntimeError("no kernel for this op"))
    assert estimate_memory(model, "bf16-mixed", batch, kernel) == {
        "error": "estimate failed (RuntimeError: no kernel for this op)"
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert measure_memory(model, opt, "bf16-mixed", batch, kernel, steps=1) == {
        "error": "measure failed (RuntimeError: no kernel for this op)"
    }
    with pytest.raises(KeyError, match="a defect"):
        estimate_memory(model, "bf16-mixed", batch, _raises(KeyError("a defect")))
    with pytest.raises(KeyError, match="a defect"):
        measure_memory(model, opt, "bf16-mixed", batch, _raises(KeyError("a defect")), steps=1)


class _Task:
    """The two members ``_flops_per_step`` reads of a task."""

    def __init__(self, loss_fn) -> None:
        self.loss = loss_fn


def test_flop_count_failure_is_named_and_a_defect_propagates():
    batch = (torch.randn(3, 4), torch.randn(3, 2))
    missing: dict[str, str] = {}
    task = _Task(_raises(NotImplementedError("cannot count this op")))
    assert _flops_per_step(nn.Linear(4, 2), task, batch, missing) is None
    assert missing == {
        "flops_per_step": "FLOP counting failed (NotImplementedError: cannot count this op)"
    }
    with pytest.raises(AttributeError, match="a defect"):
        _flops_per_step(nn.Linear(4, 2), _Task(_raises(AttributeError("a defect"))), batch, {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA profiler starts on a GPU")
@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_a_cuda_profiler_that_cannot_start_says_why():
    times: dict[str, float] = {}
    missing: dict[str, str] = {}
    with profile_kernels(times, missing):
        ran = torch.ones(2) + 1  # the steps inside still run
    assert ran.tolist() == [2.0, 2.0] and times == {}
    assert missing["tensor_core_share"].startswith("the CUDA profiler failed (AssertionError: ")
