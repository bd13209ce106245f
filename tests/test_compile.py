"""torch.compile (inductor, CPU): every recipe trains as eagerly; the Monitor works compiled.

Compiling is slow on a CPU (about 10-20 s per recipe for these tiny models), so the models
here are the smallest that still have a norm layer (kept fp32 by the 16-bit recipes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec import Precision
from mixprec.bench.models import GPT, TransformerConfig
from mixprec.numerics import Monitor
from mixprec.numerics.stats import StatsLayout
from mixprec.recipes import get_recipe
from tests.conftest import RECIPE_NAMES, TinyNet

pytestmark = pytest.mark.slow  # inductor compiles C++ for each recipe: 10-60 s a test


# Loss agreement of compiled and eager training, by compute dtype: inductor fuses and
# reorders the elementwise work, so the roundings of a 16-bit compute differ by a few ulp.
_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, None: 1e-5}


def _losses(name: str, *, compiled: bool, steps: int = 4) -> list[float]:
    torch.manual_seed(0)
    model = TinyNet(16, 32, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    precision = Precision(name)
    model, opt = precision.setup(model, opt)
    forward = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        with precision.autocast():
            loss = F.cross_entropy(forward(x).float(), y)
        precision.backward(loss)
        precision.step(opt)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_compiled_training_matches_eager(name):
    torch._dynamo.reset()
    eager = _losses(name, compiled=False)
    compiled = _losses(name, compiled=True)
    tol = _TOLERANCE[get_recipe(name).compute_dtype]
    assert all(map(lambda v: v == v, compiled)), (name, compiled)  # no NaN
    for step, (e, c) in enumerate(zip(eager, compiled, strict=True)):
        assert abs(e - c) <= tol * abs(e), (name, step, e, c)
    assert compiled[-1] < compiled[0]  # it trains


def _monitored(model, forward, precision, opt, batches, **kwargs) -> Monitor:
    monitor = Monitor(model, formats=["fp16", "fp8_e4m3fn"], **kwargs)
    with monitor:
        for x in batches:
            with precision.autocast():
                logits = forward(x)
                loss = F.cross_entropy(logits.flatten(0, -2).float(), x.flatten())
            precision.backward(loss)
            precision.step(opt)
            monitor.step(scale=precision.scaler.scale)
    return monitor


def _gpt_run(compiled: bool, **kwargs) -> Monitor:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=32, seq_len=8, n_layer=1, n_head=2, d_model=16)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    precision = Precision("bf16-mixed")
    model, opt = precision.setup(model, opt)
    forward = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 32, (2, 8), generator=g) for _ in range(2)]
    return _monitored(model, forward, precision, opt, batches, **kwargs)


def test_monitor_under_compile_measures_what_eager_measures():
    # nanoGPT-like model under bf16-mixed: Dynamo used to inline the hooks into the graph,
    # so the statistics code ran on fake tensors (KeyError(torch.uint32) from numpy, or a
    # malloc abort in the C kernel). The hooks now run eagerly between graph pieces.
    torch._dynamo.reset()
    eager = _gpt_run(compiled=False)
    compiled = _gpt_run(compiled=True)
    assert compiled.steps == eager.steps == [0, 1]
    for step in eager.steps:
        want = eager.results[step]
        got = compiled.results[step]
        assert set(got) == set(want)
        for key, stats in want.items():
            assert got[key].numel == stats.numel, key
            assert got[key].nonfinite == 0, key
    # the same tensors measured: an output's max |x| agrees to bf16's rounding
    key = ("blocks.0.fc", "output")
    assert compiled.results[0][key].max_abs == pytest.approx(
        eager.results[0][key].max_abs, rel=2e-2
    )


def test_stats_compute_refuses_to_be_traced():
    layout = StatsLayout(Monitor(nn.Linear(2, 2), formats=["fp16"]).formats)
    x = torch.randn(64)
    with pytest.raises(Exception, match="torch.compile"):
        torch.compile(layout.compute, fullgraph=True)(x)
    # without fullgraph Dynamo falls back to running it eagerly: the right answer
    torch._dynamo.reset()
    got = torch.compile(lambda t: layout.compute(t))(x)
    assert torch.equal(got, layout.compute(x))
