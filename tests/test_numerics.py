"""Tests for mixprec.numerics: exact per-format counts, hooks, first non-finite, reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from mixprec.formats import FORMATS, FloatFormat, get_format, quantize
from mixprec.numerics import Monitor, NonFiniteError, StatsLayout
from mixprec.numerics.report import to_dict, verdicts, write_report

# Formats whose values include zero and which have mantissa bits (e8m0 has neither a zero
# nor a mantissa: "flush" means something else there).
EXACT_FORMATS = [n for n, f in FORMATS.items() if f.has_zero and f.mantissa_bits > 0]


def _known_tensor() -> torch.Tensor:
    """Random magnitudes over the whole fp32 range, plus every threshold and its neighbours."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, generator=g) * torch.exp2(
        torch.randint(-150, 128, (4000,), generator=g).float()
    )
    special = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45]
    for f in FORMATS.values():
        top = math.floor(math.log2(f.max))
        half_ulp = 2.0 ** (top - f.mantissa_bits - 1)
        for v in (f.min_subnormal / 2, f.min_normal - f.min_subnormal / 2, f.max + half_ulp):
            if v < 3.4e38:
                v32 = np.float32(v)
                special += [float(v32), float(np.nextafter(v32, np.float32(np.inf)))]
                special += [float(np.nextafter(v32, np.float32(0)))]
    return torch.cat([x, torch.tensor(special, dtype=torch.float32)])


@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_counts_equal_quantize(dtype, kernel):
    """Overflow / subnormal / flush counts equal those of mixprec.quantize, for every format."""
    layout = StatsLayout([get_format(n) for n in EXACT_FORMATS], kernel=kernel)
    x = _known_tensor().to(dtype)
    s = layout.summarize(layout.compute(x).numpy(), dtype)
    x64 = x.double()
    finite = torch.isfinite(x64)
    a = x64.abs()
    assert s.numel == x.numel()
    assert s.nonfinite == int((~finite).sum()) and s.nans == int(x64.isnan().sum())
    assert s.zeros == int((a == 0).sum())
    assert s.max_abs == math.inf  # the tensor holds an inf
    assert s.min_nonzero_abs == float(a[finite & (a > 0)].min())
    for name in EXACT_FORMATS:
        f = get_format(name)
        q = quantize(x64[finite], f).abs()
        xf = a[finite]
        got = s.formats[name]
        assert got.flush == int(((q == 0) & (xf != 0)).sum()), name
        assert got.subnormal == int(((q != 0) & (q < f.min_normal)).sum()), name
        if f.has_inf or f.has_nan:  # otherwise quantize saturates and cannot tell
            assert got.overflow == int((~torch.isfinite(q)).sum()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_c_kernel_matches_torch_ops(dtype):
    from mixprec.numerics import _cpu_kernel

    if _cpu_kernel.load() is None:
        pytest.skip("no C compiler: the torch path is the only path")
    fmts = [get_format(n) for n in ("fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")]
    fast, ref = StatsLayout(fmts), StatsLayout(fmts, kernel="torch")
    x = _known_tensor().to(dtype)
    for t in (x, x[:3000].view(60, 50).t(), torch.zeros(7, dtype=dtype), x[:0]):
        assert torch.equal(fast.compute(t), ref.compute(t))


@pytest.mark.parametrize("pool", ["library", "python threads"])
def test_c_kernel_split_over_threads(monkeypatch, pool):
    from mixprec.numerics import _cpu_kernel

    if _cpu_kernel.load() is None:
        pytest.skip("no C compiler: the torch path is the only path")
    if pool == "python threads":
        monkeypatch.setattr(_cpu_kernel, "_OPENMP", False)
    monkeypatch.setattr(_cpu_kernel, "PARALLEL_MIN", 100)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # 3 uneven chunks
    fmts = [get_format(n) for n in ("fp16", "fp8_e5m2")]
    fast, ref = StatsLayout(fmts), StatsLayout(fmts, kernel="torch")
    x = _known_tensor()
    for t in (x, x.bfloat16(), x[:1001]):
        assert torch.equal(fast.compute(t), ref.compute(t))


def test_portable_build_matches_torch_ops(tmp_path, monkeypatch):
    """The kernel built without -march=native and OpenMP (other CPUs) gives the same result."""
    import shutil

    from mixprec.numerics import _cpu_kernel

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    path = _cpu_kernel._compile(cc, tmp_path, ["-O3"])
    assert path is not None
    monkeypatch.setattr(_cpu_kernel, "_lib", _cpu_kernel._open(path))
    monkeypatch.setattr(_cpu_kernel, "_tried", True)
    monkeypatch.setattr(_cpu_kernel, "_OPENMP", False)
    monkeypatch.setattr(_cpu_kernel, "PARALLEL_MIN", 100)
    fmts = [get_format(n) for n in ("fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")]
    fast, ref = StatsLayout(fmts), StatsLayout(fmts, kernel="torch")
    x = _known_tensor()
    for t in (x, x.bfloat16(), x.half(), x[:1001]):
        assert torch.equal(fast.compute(t), ref.compute(t))


def test_histogram_and_max_by_hand():
    layout = StatsLayout([get_format("fp16")])
    x = torch.tensor([0.0, 1.0, 1.5, -3.0, 2.0**-130, 2.0**-20, 65520.0])
    s = layout.summarize(layout.compute(x).numpy(), torch.float32)
    assert s.max_abs == 65520.0 and s.min_nonzero_abs == 2.0**-130
    assert s.zero_fraction == 1 / 7
    hist = {i - 127: int(c) for i, c in enumerate(s.histogram) if c}
    assert hist == {-127: 1, -20: 1, 0: 2, 1: 1, 15: 1}
    assert (s.formats["fp16"].overflow, s.formats["fp16"].subnormal) == (1, 1)
    assert s.formats["fp16"].flush == 1  # 2**-130


def test_formats_with_wide_mantissa_use_the_exact_fallback():
    wide = FloatFormat.custom(6, 14)  # thresholds off the 12-bit grid: compared one by one
    layout = StatsLayout([wide, get_format("fp16")])
    assert not layout.fine_exact
    x = _known_tensor()
    s = layout.summarize(layout.compute(x).numpy(), torch.float32)
    finite = torch.isfinite(x)
    q = quantize(x.double()[finite], wide).abs()
    assert s.formats[wide.name].flush == int(((q == 0) & (x[finite] != 0)).sum())
    assert s.formats[wide.name].overflow == int((~torch.isfinite(q)).sum())


# -- hooks -----------------------------------------------------------------------------------
class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor, self.active = factor, False

    def forward(self, x):
        return x * self.factor if self.active else x


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class NanInBackward(nn.Module):
    def forward(self, x):
        return _NanGrad.apply(x)


def _train(model, monitor, steps, x, *, before=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        if before:
            before(step)
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        monitor.step()


def test_planted_overflow_found_in_forward_under_fp16_autocast():
    torch.manual_seed(0)
    scale = Scale(1e5)
    model = nn.Sequential(nn.Linear(4, 4), scale, nn.Linear(4, 2))
    x = torch.full((2, 4), 3.0)

    def before(step):
        scale.active = step == 2

    with Monitor(model, formats=["fp16"]) as monitor:
        with torch.autocast("cpu", dtype=torch.float16):
            _train(model, monitor, 4, x, before=before)
    first = monitor.first_nonfinite
    assert (first.step, first.phase, first.path, first.kind) == (2, "forward", "1", "output")
    assert "inf" in first.what
    assert monitor.first_nonfinite_in(1) is None
    assert monitor.stats("0", "output", step=2).nonfinite == 0  # the Linear before it is fine
    assert monitor.explain_step(2) == "first inf in the output of 1 (forward)"


def test_planted_nan_in_backward_found_in_backward():
    model = nn.Sequential(nn.Linear(3, 3), NanInBackward(), nn.Linear(3, 1))
    with Monitor(model, formats=["bf16"]) as monitor:
        _train(model, monitor, 2, torch.randn(4, 3))
    first = monitor.first_nonfinite
    assert (first.step, first.phase, first.path, first.kind) == (0, "backward", "1", "grad_input")
    assert first.what == "nan"
    assert monitor.stats("2", "grad_output", step=0).nonfinite == 0  # downstream: fine
    assert "step 0, backward: first nan in the gradient of 1's input" in first.message()


def test_raise_on_nonfinite_raises_at_that_moment():
    model = nn.Sequential(nn.Linear(3, 3), NanInBackward(), nn.Linear(3, 1))
    with Monitor(model, formats=["fp16"], raise_on_nonfinite=True):
        loss = model(torch.randn(2, 3)).sum()
        with pytest.raises(NonFiniteError, match="backward: first nan in the gradient of 1"):
            loss.backward()


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, 2 * y  # a tuple output


def test_tuple_outputs_and_weight_sharing():
    shared = nn.Linear(4, 4)
    heads = TwoHeads()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads, self.shared = heads, shared

        def forward(self, x):
            a, b = self.heads(x)
            return self.shared(self.shared(a + b))  # called twice in one forward

    model = Net()
    with Monitor(model, formats=["fp16"]) as monitor:
        _train(model, monitor, 1, torch.randn(5, 3))
    out = monitor.stats("heads", "output")
    assert out.numel == 2 * 5 * 4 and out.count == 2
    twice = monitor.stats("shared", "output")
    assert twice.count == 2 and twice.numel == 2 * 5 * 4
    assert monitor.stats("shared", "grad_output").count == 2
    assert monitor.stats("shared.weight", "param_grad").numel == 16


def test_a_gradient_reaching_several_tensors_is_measured_once(monkeypatch):
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.lin(x)  # the add hands its output's gradient on, unchanged

    model = Residual()
    monitor = Monitor(model, formats=["fp16"]).attach()
    measured = []
    compute = monitor.layout.compute
    monkeypatch.setattr(monitor.layout, "compute", lambda t: measured.append(t) or compute(t))
    out = model(torch.randn(5, 4))
    measured.clear()
    (out * torch.arange(20.0).view(5, 4)).sum().backward()
    # one gradient for both outputs, then the weight's and the bias's gradients
    assert len(measured) == 3
    root, lin = monitor.stats("", "grad_output"), monitor.stats("lin", "grad_output")
    assert root.count == lin.count == 1 and root.numel == 20
    assert (root.zeros, root.max_abs) == (lin.zeros, lin.max_abs) == (1, 19.0)
    monitor.detach()


def test_inplace_activation_gradients():
    lin, relu = nn.Linear(3, 6), nn.ReLU(inplace=True)
    model = nn.Sequential(lin, relu)
    x = torch.randn(8, 3)
    pre = lin(x).detach()
    with Monitor(model, formats=["fp16"]) as monitor:
        (model(x) * 3.0).sum().backward()  # d/d(relu out) = 3 everywhere
        monitor.step()
    # gradient of the Linear's output (before the in-place ReLU) is 3 * (pre > 0)
    g_lin = monitor.stats("0", "grad_output")
    assert g_lin.zeros == int((pre <= 0).sum()) and g_lin.max_abs == 3.0
    assert monitor.stats("1", "grad_output").zeros == 0  # after the ReLU: all 3s
    assert monitor.stats("1", "grad_input").zeros == int((pre <= 0).sum())
    assert monitor.stats("0", "output").zeros == 0  # measured before the ReLU changed it
    assert monitor.stats("1", "output").zeros == int((pre <= 0).sum())


def test_no_grad_evaluation_is_skipped_and_every():
    """Evaluation forwards (no gradients) are not merged into the training step."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    with Monitor(model, formats=["fp16"], every=2) as monitor:
        for _ in range(5):
            model(torch.randn(2, 3)).sum().backward()  # the training forward: 2 x 3 outputs
            with torch.no_grad():
                for _ in range(10):
                    model(torch.randn(2, 3))  # evaluation: 10 forwards, skipped
            monitor.step()
    assert monitor.steps == [0, 2, 4]
    assert monitor.stats("1", "output", step=2).numel == 6  # not 66
    assert monitor.skipped_forwards == 30  # 10 per measured step


def test_monitor_without_with_records():
    """Monitor(model) alone watches (no silent empty result); detach() stops it."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    monitor = Monitor(model, formats=["fp16"])
    model(torch.randn(2, 3)).sum().backward()
    monitor.step()
    assert monitor.stats("0", "output").numel == 6
    monitor.detach()
    assert _hook_count(model) == 0


def test_stats_before_anything_measured_says_why():
    model = nn.Sequential(nn.Linear(3, 3))
    monitor = Monitor(model, formats=["fp16"])
    with torch.no_grad():
        model(torch.randn(2, 3))
    with pytest.raises(KeyError, match="nothing was measured: the monitor records forward"):
        monitor.stats("0")


def _hook_count(model) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    for p in model.parameters():
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


def test_detach_removes_every_hook():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    assert _hook_count(model) == 0
    monitor = Monitor(model).attach()
    assert _hook_count(model) > 0
    loss = model(torch.randn(2, 3)).sum()  # tensor hooks now pending on this graph
    monitor.detach()
    assert _hook_count(model) == 0
    loss.backward()  # the pending tensor hooks were removed too
    assert {kind for _, kind in monitor.keys()} == {"output"}  # no gradient was measured


def test_hooks_only_on_measured_steps():
    """A step that every=N skips runs without a single hook; a measured step has them all."""
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    with Monitor(model, formats=["fp16"], every=3) as monitor:
        counts = []
        for _ in range(4):
            counts.append(_hook_count(model))
            model(torch.randn(2, 3)).sum().backward()
            monitor.step()
        assert counts[0] > 0 and counts[1:3] == [0, 0] and counts[3] == counts[0]
    assert _hook_count(model) == 0
    assert monitor.steps == [0, 3]
    assert monitor.stats("0.weight", "param_grad", step=3).numel == 9


def test_updates_are_the_parameter_differences():
    """The 'update' record of each step is exactly p_after - p_before (buffers are reused)."""
    lin = nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    diffs = []
    with Monitor(lin, formats=["fp16"], track=["updates"]) as monitor:
        for _ in range(3):
            before = lin.weight.detach().clone()
            lin(torch.randn(5, 4)).square().sum().backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
            diffs.append((lin.weight.detach() - before).abs())
    for step, d in enumerate(diffs):
        s = monitor.stats("weight", "update", step=step)
        assert s.max_abs == float(d.max()) and s.min_nonzero_abs == float(d[d > 0].min())


def _stats_of(x: torch.Tensor, names):
    layout = StatsLayout(tuple(get_format(n) for n in names))
    return layout.summarize(layout.compute(x).numpy(), x.dtype)


def _log_uniform(n: int, low: int, high: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * (high - low) + low).float()


@pytest.mark.parametrize("name", ["fp8_e4m3fn", "fp8_e5m2"])
def test_per_tensor_scaled_loss_matches_torchs_cast(name):
    """lost after amax -> max scaling, read from the histogram, vs torch's own fp8 cast."""
    from mixprec.numerics.verdicts import Scaling, lost_counts

    fmt = get_format(name)
    x = _log_uniform(20000, -45, 0) * 3e-3  # gradients far below fp8's plain range
    stats = _stats_of(x, [name])
    over, flush = lost_counts(stats, fmt, Scaling("per-tensor"))
    scale = fmt.max / float(x.abs().max())
    dtype = getattr(torch, name.replace("fp8_", "float8_"))
    oracle = ((x.double() * scale).float().to(dtype).float() == 0).double().mean().item()
    assert over == 0
    assert abs(flush / x.numel() - oracle) < 0.01  # binade-interpolated, within 1 point
    assert stats.flush_fraction(name) > flush / x.numel() + 0.1  # a plain cast loses more


def test_loss_scaled_fp16_gradients_match_torchs_cast():
    from mixprec.numerics.verdicts import Scaling, lost_counts

    fmt = get_format("fp16")
    g = _log_uniform(20000, -40, -10, seed=3)
    stats = _stats_of(g, ["fp16"])
    scale = 2.0**16
    over, flush = lost_counts(stats, fmt, Scaling("loss", scale))
    oracle = ((g * scale).half() == 0).double().mean().item()
    assert over == 0 and abs(flush / g.numel() - oracle) < 0.01
    assert stats.flush_fraction("fp16") > oracle + 0.2  # unscaled, many more would flush


def _tiny_gradient_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    x = torch.randn(64, 8)
    monitor = Monitor(model, formats=["fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"])
    (model(x).square().mean() * 1e-9).backward()  # gradients ~1e-10: below fp16 and fp8
    monitor.step()
    return monitor


def test_verdicts_judge_formats_as_they_are_used():
    monitor = _tiny_gradient_model()
    plain = {v.path: v for v in verdicts(monitor, 0.01)}
    scaled = {v.path: v for v in monitor.verdicts(loss_scale=2.0**30)}
    assert "" not in plain  # the model itself is not a layer to keep in a format
    # fp8 applies to Linear layers only, each fp8 format to the tensor kind it is used for
    assert plain["1"].fits["fp8_e5m2"] is None and plain["1"].fits["fp8_e4m3fn"] is None
    assert set(plain["2"].lost["fp8_e4m3fn"]) == {"activations"}
    assert set(plain["2"].lost["fp8_e5m2"]) == {"gradients"}
    # per-tensor scaling: the tiny gradients fit e5m2, though a plain cast flushes them
    assert plain["2"].fits["fp8_e5m2"] is True
    assert monitor.stats("2", "grad_output").flush_fraction("fp8_e5m2") > 0.5
    assert plain["2"].needs == {"activations": "fp8_e4m3fn", "gradients": "fp8_e5m2"}
    # fp16 gradients: lost without a loss scale, kept under the run's loss scale
    assert plain["1"].fits["fp16"] is False and plain["1"].needs["gradients"] == "bf16"
    assert plain["1"].recommendation.startswith("keep the gradients of 1 in bf16: ")
    assert "in fp16 (plain cast)" in plain["1"].recommendation
    assert "its activations fit fp16 (plain cast)" in plain["1"].recommendation
    assert scaled["1"].fits["fp16"] is True and scaled["1"].recommendation is None
    assert scaled["1"].scaling["fp16"]["gradients"] == "loss scale 1.07374e+09"
    assert plain["2"].scaling["fp8_e5m2"]["gradients"] == "per-tensor scaling (amax -> 57344)"


def test_report_files(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    with Monitor(model, formats=["fp16", "fp8_e4m3fn"]) as monitor:
        _train(model, monitor, 3, torch.randn(6, 4))
        monitor.step(scale=1024.0)
    files = write_report(monitor, tmp_path)
    data = json.loads(files["json"].read_text())
    assert data["formats"] == ["fp16", "fp8_e4m3fn"] and [s["step"] for s in data["steps"]] == [
        0,
        1,
        2,
        3,
    ]
    first = next(e for e in data["summary"] if e["path"] == "0" and e["kind"] == "output")
    assert sum(first["histogram"]["counts"]) + first["histogram"]["zeros"] == 3 * 24
    for name in ("histogram", "heatmap"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "numerics over steps" in files["table"].read_text()
    assert to_dict(monitor)["verdicts"]
    printed = capsys.readouterr().out  # not a terminal, as in a log: not squeezed to 80
    assert max(len(line) for line in printed.splitlines()) > 100


def test_bad_input():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fp16"):
        Monitor(model, formats=["fp7"])
    with pytest.raises(ValueError, match="activations"):
        Monitor(model, track=["activation"])
    with pytest.raises(ValueError, match="every"):
        Monitor(model, every=0)
    monitor = Monitor(model)
    with pytest.raises(KeyError, match="'0.weight'"):
        monitor.stats("0.weigth")
    with pytest.raises(ValueError, match="grad_output"):
        monitor.stats("0", "gradient")


def test_diagnose_command_writes_reports(tmp_path, capsys):
    from mixprec.cli import main

    out = tmp_path / "d"
    args = "diagnose --task mlp --size tiny --recipe fp16-mixed --steps 2"
    rc = main([*args.split(), "--format", "fp16", "--format", "fp8_e5m2", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "numerics.json").read_text())
    assert data["run"]["recipe"] == "fp16-mixed" and len(data["run"]["losses"]) == 2
    assert [s["step"] for s in data["steps"]] == [0, 1]
    assert data["steps"][0]["scale"] == 65536.0  # fp16-mixed: gradients measured scaled
    assert (out / "gradient_histogram.png").exists() and (out / "underflow_heatmap.png").exists()
    assert main(["diagnose", "--task", "mlp", "--recipe", "nope", "--out", str(out)]) == 2
    assert "unknown recipe" in capsys.readouterr().err


def test_needs_names_the_most_precise_format_that_fits():
    """fp16 losing 0.4% (under the 1% threshold) still fits: fp16 is named, not bf16."""
    model = nn.Sequential(Scale(1.0), nn.Tanh())
    monitor = Monitor(model, formats=["fp16", "bf16"], track=["activations"])
    x = torch.ones(256)
    x[0] = 1e-9  # flushes in fp16, kept in bf16: 1 of 256 values
    model(x)
    monitor.step()
    v = {v.path: v for v in monitor.verdicts()}
    assert v["0"].lost["fp16"]["activations"] == pytest.approx(1 / 256)
    assert v["0"].needs == {"activations": "fp16"} and v["0"].recommendation is None
