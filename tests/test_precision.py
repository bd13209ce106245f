"""Precision: every recipe trains, resumes bit-exactly, stays sync-free, and rejects misuse."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec import RECIPES, Precision, Recipe
from mixprec.scaling import LossScaler
from tests.conftest import RECIPE_NAMES, SyncCounter

# bf16-true with stochastic rounding instead of Kahan summation
BF16_TRUE_SR = RECIPES["bf16-true"].replace(name="bf16-true-sr", update="stochastic")


def _recipes():
    """Every built-in recipe, plus bf16-true with stochastic rounding."""
    return [*RECIPE_NAMES, pytest.param(BF16_TRUE_SR, id="bf16-true-sr")]


# -- data and model -----------------------------------------------------------------------
@functools.cache
def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # (1797, 64) in [0, 1]
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]  # fixed split: 1400 train, 397 test
    return x[train], y[train], x[test], y[test]


def _mlp(hidden: int = 64) -> nn.Module:
    # 64-64-10 with a LayerNorm, so the master-weight recipes keep a norm in fp32
    return nn.Sequential(
        nn.Linear(64, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )  # fmt: skip


def _train(name, *, epochs, batch=50, seed=0, fused=True):
    torch.manual_seed(seed)
    x, y, xt, yt = _digits()
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    steps = epochs * -(-len(x) // batch)
    # linear decay to 0: the end point is converged, so recipes differ by numerics, not noise
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    precision = Precision(name)
    model, opt = precision.setup(model, opt)  # the scheduler keeps working: same optimizer
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            with precision.autocast():
                loss = F.cross_entropy(model(x[idx]), y[idx])
            precision.backward(loss)
            precision.step(opt)
            schedule.step()
    with torch.no_grad(), precision.autocast():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item() * 100
    return accuracy


@functools.cache
def _fp32_accuracy(epochs: int) -> float:
    return _train("fp32", epochs=epochs)


@pytest.mark.parametrize("name", _recipes())
def test_every_recipe_trains_digits_to_fp32_accuracy(name):
    epochs = 12
    reference = _fp32_accuracy(epochs)
    accuracy = _train(name, epochs=epochs)
    assert reference > 95.0  # the fp32 run itself learned the task
    assert abs(accuracy - reference) <= 1.5, (name, accuracy, reference)


# -- bit-exact resume ---------------------------------------------------------------------
def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y, _, _ = _digits()
    idx = torch.randint(0, len(x), (n, 32), generator=g)
    return [(x[i], y[i]) for i in idx]


def _fresh(name, *, fused):
    torch.manual_seed(0)
    model = _mlp(32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, fused=fused)
    precision = Precision(name)
    model, opt = precision.setup(model, opt)
    return model, opt, precision


def _run(model, opt, precision, batches):
    for x, y in batches:
        with precision.autocast():
            loss = F.cross_entropy(model(x), y)
        precision.backward(loss)
        precision.step(opt)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", _recipes())
def test_checkpoint_resume_is_bit_exact(name, fused):
    k, n = 4, 8
    batches = _batches(n)
    model, opt, precision = _fresh(name, fused=fused)
    _run(model, opt, precision, batches)
    expected = [p.detach().clone() for p in model.parameters()]

    model, opt, precision = _fresh(name, fused=fused)
    _run(model, opt, precision, batches[:k])
    checkpoint = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "precision": precision.state_dict()}
    )
    _run(model, opt, precision, batches[k : k + 2])  # this process goes on, then "dies"

    torch.manual_seed(123)  # a fresh setup: different init, then load
    model, opt, precision = _fresh(name, fused=fused)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    precision.load_state_dict(checkpoint["precision"])
    _run(model, opt, precision, batches[k:])
    for got, want in zip(model.parameters(), expected, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got.detach(), want), name


# -- sync-free ----------------------------------------------------------------------------


def _tiny(name, *, fused):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    precision = Precision(name)
    model, opt = precision.setup(model, opt)
    return model, opt, precision


def _loss(model, precision, batch=4):
    with precision.autocast():
        return model(torch.randn(batch, 8)).float().square().mean()


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_fp16_mixed_step_with_fused_adamw_is_sync_free(max_grad_norm):
    model, opt, precision = _tiny("fp16-mixed", fused=True)
    for _ in range(3):
        loss = _loss(model, precision)
        with SyncCounter() as backward_syncs:
            precision.backward(loss)
        with SyncCounter() as step_syncs:
            result = precision.step(opt, max_grad_norm=max_grad_norm)
        assert backward_syncs.count == 0
        assert step_syncs.count == 0
    with SyncCounter() as read:
        assert bool(result) is True  # reading the answer is the (one, requested) sync
    assert read.count == 1


def test_fp16_mixed_step_with_unfused_optimizer_syncs_once():
    # SGD: unfused Adam reads its own step counters on the host, which would count here
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    precision = Precision("fp16-mixed")
    model, opt = precision.setup(model, opt)
    precision.backward(_loss(model, precision))
    with SyncCounter() as syncs:
        result = precision.step(opt)
    assert syncs.count == 1
    with SyncCounter() as read:
        assert bool(result) is True
    assert read.count == 0  # already known


# -- skipping, clipping, accumulation -----------------------------------------------------
def _inject_inf(model):
    first = next(model.parameters())
    first.grad[0, 0] = float("inf")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", ["fp16-mixed", "fp16-master"])
def test_step_is_skipped_on_injected_inf_and_the_scale_backs_off(name, fused):
    model, opt, precision = _tiny(name, fused=fused)
    precision.backward(_loss(model, precision))
    before = [p.detach().clone() for p in model.parameters()]
    scale = precision.scaler.get_scale()
    _inject_inf(model)
    result = precision.step(opt)
    assert bool(result) is False
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert precision.scaler.get_scale() == scale * 0.5  # torch preset backoff
    assert all(p.grad is None for p in model.parameters())
    assert all(not s or s["step"].item() == 0 for s in opt.state.values())
    precision.backward(_loss(model, precision))  # the next, finite step is taken
    assert bool(precision.step(opt)) is True
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_clipping_sees_unscaled_grads():
    # fp32 compute with a static scale of 2**10: scaling by a power of two is exact, so
    # clipping the unscaled grads matches torch's clip_grad_norm_ on a plain fp32 run.
    recipe = Recipe("scaled-fp32", loss_scaling="static", static_scale=1024.0)
    x = torch.randn(16, 8)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model.load_state_dict(ref.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    precision = Precision(recipe)
    model, opt = precision.setup(model, opt)
    precision.backward(model(x).square().mean())
    precision.step(opt, max_grad_norm=0.05)
    ref(x).square().mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    ref_opt.step()
    assert norm > 0.05  # clipping was active
    assert torch.allclose(precision.last_grad_norm, norm, rtol=1e-6)
    for p, r in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["fp32", "bf16-master", "fp16-mixed"])
def test_gradient_accumulation_matches_one_big_batch(name):
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    results = []
    for micro in (1, 4):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        precision = Precision(name)
        model, opt = precision.setup(model, opt)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            with precision.autocast():
                loss = F.cross_entropy(model(xs), ys) / micro
            precision.backward(loss)
        assert bool(precision.step(opt))
        results.append([p.detach().float().clone() for p in model.parameters()])
    tol = {"fp32": 1e-6, "bf16-master": 1e-2, "fp16-mixed": 2e-3}[name]
    for one, many in zip(*results):
        assert torch.allclose(one, many, atol=tol), (one - many).abs().max()


def test_bf16_master_accumulation_beats_bf16_grads():
    # 64 micro-batches of a small gradient on top of a large one: bf16-master sums them
    # in fp32 (post-accumulate-grad hooks), a bf16 .grad would lose each of them.
    w = nn.Linear(1, 1, bias=False)
    w.weight.data.fill_(0.0)
    opt = torch.optim.SGD(w.parameters(), lr=1.0)
    precision = Precision("bf16-master")
    w, opt = precision.setup(w, opt)
    precision.backward(w(torch.ones(1, 1)).sum())  # grad 1.0
    for _ in range(64):
        precision.backward(w(torch.full((1, 1), 1e-3)).sum())  # grad 1e-3 each
    precision.step(opt)
    master = opt.param_groups[0]["params"][0]
    expected = -(1.0 + 64 * torch.tensor(1e-3).bfloat16().float().item())
    assert master.item() == pytest.approx(expected, rel=1e-6)  # bf16 grads: -1.0


def test_multiple_optimizers_and_losses_update_the_scale_once():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    model = nn.ModuleDict({"a": a, "b": b})
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1, fused=True)
    precision = Precision("fp16-mixed")
    model, (opt_a, opt_b) = precision.setup(model, [opt_a, opt_b])
    x = torch.randn(4, 8)
    with precision.autocast():
        loss_a = a(x).float().square().mean()
        loss_b = b(x).float().abs().mean()
    precision.backward(loss_a)
    precision.backward(loss_b)
    b_before = [p.detach().clone() for p in b.parameters()]
    a.weight.grad[0, 0] = float("nan")
    scale = precision.scaler.get_scale()
    assert bool(precision.step(opt_a)) is False
    assert precision.scaler.get_scale() == scale  # not yet: opt_b has not stepped
    assert bool(precision.step(opt_b)) is True
    assert precision.scaler.get_scale() == scale * 0.5  # once, for the whole iteration
    assert not torch.equal(b.weight.detach(), b_before[0])


# -- autocast -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "dtype"),
    [("fp32", torch.float32), ("bf16-mixed", torch.bfloat16), ("bf16-true", torch.float32)],
)
def test_autocast_context_and_decorator(name, dtype):
    precision = Precision(name)
    a = torch.ones(4, 4)
    with precision.autocast():
        assert (a @ a).dtype == dtype

    @precision.autocast()
    def matmul(x):
        return x @ x

    assert matmul(a).dtype == dtype
    assert (a @ a).dtype == torch.float32  # nothing leaks out


# -- errors -------------------------------------------------------------------------------
def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(ValueError, match="bf16-mixed"):
        Precision("fp12-mixed")


def test_fp16_mixed_on_fp16_model_points_to_fp16_master():
    model = nn.Linear(4, 4).half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = Precision("fp16-mixed")
    with pytest.raises(ValueError, match="fp16-master"):
        precision.setup(model, opt)


def test_step_without_backward():
    model, opt, precision = _tiny("bf16-mixed", fused=False)
    with pytest.raises(RuntimeError, match="before any backward"):
        precision.step(opt)


def test_step_twice():
    model, opt, precision = _tiny("bf16-mixed", fused=False)
    precision.backward(_loss(model, precision))
    precision.step(opt)
    with pytest.raises(RuntimeError, match="twice"):
        precision.step(opt)


def test_backward_on_non_scalar_loss():
    model, opt, precision = _tiny("fp16-mixed", fused=False)
    with precision.autocast():
        out = model(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="scalar loss"):
        precision.backward(out)


def test_step_with_unknown_optimizer():
    model, _, precision = _tiny("fp32", fused=False)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="setup"):
        precision.step(other)


def test_custom_scaler_overrides_recipe():
    scaler = LossScaler.static(8.0)
    precision = Precision("bf16-mixed", scaler=scaler)
    assert precision.scaler is scaler


# -- fp8 and device handling --------------------------------------------------------------
def test_fp8_recipe_swaps_linear_layers():
    from mixprec.float8 import Float8Linear

    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    model, opt = Precision("fp8-mixed").setup(model, opt)
    assert isinstance(model[0], Float8Linear) and isinstance(model[2], Float8Linear)
    assert list(model.parameters()) == params  # the optimizer's params are still the model's


def test_cuda_context_sets_and_restores_tf32():
    from mixprec.precision.parts import CudaContext

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for allow in (True, False):
        with CudaContext(None, allow):
            assert torch.backends.cuda.matmul.allow_tf32 is allow
            assert torch.backends.cudnn.allow_tf32 is allow
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_load_state_dict_rejects_another_recipe():
    _, _, saved = _tiny("fp16-mixed", fused=False)
    _, _, other = _tiny("bf16-mixed", fused=False)
    with pytest.raises(ValueError, match="fp16-mixed"):
        other.load_state_dict(saved.state_dict())


def test_param_group_added_after_setup_is_unscaled_too():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    model = nn.Sequential(a, b)
    opt = torch.optim.SGD(a.parameters(), lr=0.0)
    precision = Precision(Recipe("scaled", loss_scaling="static", static_scale=64.0))
    model, opt = precision.setup(model, opt)
    opt.add_param_group({"params": list(b.parameters()), "lr": 0.0})
    x = torch.randn(2, 4)
    precision.backward(model(x).sum())
    expected = torch.autograd.grad(model(x).sum(), b.weight)[0]
    grads = {}
    opt.step = lambda: grads.setdefault("b", b.weight.grad.clone())  # see what step sees
    precision.step(opt)
    assert torch.equal(grads["b"], expected)  # unscaled, not 64x


def test_param_group_added_after_setup_with_masters_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    precision = Precision("bf16-master")
    model, opt = precision.setup(model, opt)
    opt.add_param_group({"params": list(model[1].parameters())})
    precision.backward(model(torch.randn(2, 4)).sum())
    with pytest.raises(RuntimeError, match="before precision.setup"):
        precision.step(opt)
