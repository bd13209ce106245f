"""Master weights in flat buffers, and compensated (Kahan / stochastic-rounding) bf16 updates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixprec.master import (
    CompensatedUpdate,
    MasterWeights,
    cast_module_,
    is_norm_module,
    stochastic_round_to_bf16,
)
from tests.conftest import SyncCounter


class MyRMSNorm(nn.Module):  # a hand-written norm: recognised by its class name
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), MyRMSNorm(16),
        nn.Linear(16, 4),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.LayerNorm(4), True),
        (nn.BatchNorm1d(4), True),
        (nn.BatchNorm2d(4), True),
        (nn.GroupNorm(2, 4), True),
        (nn.InstanceNorm2d(4), True),
        (nn.RMSNorm(4), True),
        (MyRMSNorm(4), True),
        (nn.Linear(4, 4), False),
        (nn.Conv2d(4, 4, 3), False),
        (nn.Embedding(4, 4), False),
    ],
)
def test_is_norm_module(module, expected):
    assert is_norm_module(module) is expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_module_keeps_norms_fp32_and_casts_io(dtype):
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    reference = [p.detach().clone() for p in model.parameters()]
    cast_module_(model, dtype)
    assert model[0].weight.dtype == dtype and model[2].bias.dtype == dtype
    assert model[1].weight.dtype == torch.float32
    assert model[1].running_mean.dtype == torch.float32
    for p, ref in zip(model.parameters(), reference):
        assert torch.equal(p.detach(), ref.to(p.dtype))  # torch's own cast is the oracle
    out = model(torch.randn(4, 8))  # fp32 in, fp32 out, 16-bit inside
    assert out.dtype == torch.float32


def test_cast_module_without_keeping_norms():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    cast_module_(model, torch.bfloat16, keep_norms_fp32=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _adamw(groups):
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.8, 0.95))


def _setup_masters(dtype, *, accumulate_fp32: bool, make_opt=_adamw):
    model = _model()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    cast_module_(model, dtype)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = make_opt([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}])
    masters = MasterWeights(opt, accumulate_fp32=accumulate_fp32)
    return model, opt, masters, reference


def test_masters_live_in_one_flat_fp32_buffer_and_keep_hyperparameters():
    model, opt, masters, reference = _setup_masters(torch.bfloat16, accumulate_fp32=True)
    assert len(masters.master_flats) == 1  # one (device, dtype) group
    flat = masters.master_flats[0]
    assert flat.dtype == torch.float32 and flat.is_contiguous()
    n_low = sum(p.numel() for p in model.parameters() if p.dtype == torch.bfloat16)
    assert flat.numel() == n_low
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * 4
    for m in masters.masters:
        assert start <= m.data_ptr() < end  # a view of the flat buffer
    # hyperparameters and the group structure are kept
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.8, 0.95) and g["lr"] == 1e-3 for g in opt.param_groups)
    stepped = [p for g in opt.param_groups for p in g["params"]]
    low = [p for p in stepped if p.dtype == torch.bfloat16]
    assert low == []  # the optimizer steps fp32 masters (and the fp32 norm params)
    # masters start as the 16-bit values (the fp32 init is rounded once, as the model is)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in masters.groups:
        for p in g.params:
            assert torch.equal(p.detach(), reference[names[id(p)]].to(torch.bfloat16))


OPTIMIZERS = {
    "adamw": _adamw,
    "adamw-fused": lambda g: torch.optim.AdamW(g, lr=1e-3, fused=True),
    "adam-foreach": lambda g: torch.optim.Adam(g, lr=1e-3, foreach=True),
    "sgd-nesterov": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True),
    "sgd-fused": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, fused=True),
    "rmsprop": lambda g: torch.optim.RMSprop(g, lr=1e-3),
    "adagrad": lambda g: torch.optim.Adagrad(g, lr=1e-2),
    "nadam": lambda g: torch.optim.NAdam(g, lr=1e-3),
    "radam": lambda g: torch.optim.RAdam(g, lr=1e-3),
    "adamax": lambda g: torch.optim.Adamax(g, lr=1e-3),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize(
    ("dtype", "accumulate_fp32"), [(torch.bfloat16, True), (torch.float16, False)]
)
def test_master_step_matches_fp32_optimizer_on_the_same_grads(dtype, accumulate_fp32, optimizer):
    make_opt = OPTIMIZERS[optimizer]
    model, opt, masters, _ = _setup_masters(
        dtype, accumulate_fp32=accumulate_fp32, make_opt=make_opt
    )
    # Oracle: the same optimizer and groups on fp32 copies, fed the same fp32 grads.
    copies = {id(p): p.detach().clone().requires_grad_() for g in opt.param_groups
              for p in g["params"]}  # fmt: skip
    oracle_opt = type(opt)(
        [{**g, "params": [copies[id(p)] for p in g["params"]]} for g in opt.param_groups]
    )
    x = torch.randn(16, 8)
    for _ in range(3):
        model(x).square().mean().backward()
        masters.gather_grads()
        for g in opt.param_groups:
            for p in g["params"]:
                copies[id(p)].grad = p.grad.clone()
        opt.step()
        oracle_opt.step()
        masters.copy_back()
        masters.zero_grad()
    for g in opt.param_groups:
        for p in g["params"]:
            assert torch.equal(p.detach(), copies[id(p)].detach())
    low = [p for g in masters.groups for p in g.params]
    assert low and all(p.dtype == dtype for p in low)
    for p, m in zip(low, masters.masters):
        assert torch.equal(p.detach(), m.detach().to(dtype))  # copy-back rounds the masters
    assert all(p.grad is None for p in model.parameters())


def test_bf16_master_accumulates_grads_in_fp32():
    w = nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
    opt = torch.optim.SGD([w], lr=1.0)
    masters = MasterWeights(opt, accumulate_fp32=True)
    for value in (1.0, 1e-3, 1e-3):  # three micro-batches
        (w * value).sum().backward()
    masters.gather_grads()
    exact = torch.tensor(1.0) + torch.tensor(1e-3).bfloat16().float() * 2  # fp32 sums
    assert masters.masters[0].grad.item() == exact.item()
    bf16_sum = (torch.tensor(1.0).bfloat16() + torch.tensor(1e-3).bfloat16()).item()
    assert bf16_sum == 1.0  # what a bf16 .grad would have kept


def test_master_state_dict_roundtrip():
    _, opt, masters, _ = _setup_masters(torch.bfloat16, accumulate_fp32=True)
    state = masters.state_dict()
    with torch.no_grad():
        masters.master_flats[0].add_(1.0)
    masters.load_state_dict(state)
    assert torch.equal(masters.master_flats[0], state["masters"][0])
    assert torch.equal(masters.groups[0].low, state["masters"][0].to(torch.bfloat16))


def test_master_state_from_a_model_with_other_shapes_is_refused():
    def build(n_in, n_out):  # 32 elements either way, in another shape
        model = nn.Linear(n_in, n_out, bias=False).to(torch.bfloat16)
        return MasterWeights(torch.optim.SGD(model.parameters(), lr=0.1))

    saved = build(8, 4).state_dict()
    masters = build(4, 8)
    before = masters.master_flats[0].clone()
    with pytest.raises(ValueError, match=r"other parameter shapes \(parameter 0 is \(4, 8\)"):
        masters.load_state_dict(saved)
    assert torch.equal(masters.master_flats[0], before)  # nothing changed
    with pytest.raises(ValueError, match="'masters' and 'shapes'"):
        masters.load_state_dict({"masters": saved["masters"]})


def _updates(method: str | None, n: int = 10_000, size: int = 1, *, native: bool = True):
    """``size`` weights of 1.0, each getting ``n`` updates of +1e-4 (SGD lr 1e-4, grad -1).

    ``native``: the bf16-state step (:func:`mixprec.master.bf16_step.bf16_step`); else the
    generic fp32-view path (``begin(); opt.step(); end()``).
    """
    w = nn.Parameter(torch.ones(size, dtype=torch.bfloat16))
    opt = torch.optim.SGD([w], lr=1e-4)
    upd = CompensatedUpdate(opt, method=method, seed=0, native=native) if method else None
    assert upd is None or upd.native is native
    grad = -torch.ones_like(w)
    for _ in range(n):
        w.grad = grad.clone()
        if upd is None:
            opt.step()
        elif native:
            upd.step()
        else:
            upd.begin()
            opt.step()
            upd.end()
    return w.detach().float()


def test_plain_bf16_loses_small_updates():
    assert torch.equal(_updates(None), torch.ones(1))


@pytest.mark.parametrize("native", [True, False])
def test_kahan_keeps_small_updates(native):
    result = _updates("kahan", native=native).item()
    # The bf16 compensation buffer rounds c each step: with a constant update that
    # rounding is biased, about +3e-6 a step here (measured: 2.03), hence 0.05.
    assert abs(result - 2.0) < 0.05, result


@pytest.mark.parametrize("native", [True, False])
def test_stochastic_rounding_keeps_small_updates_on_average(native):
    result = _updates("stochastic", size=2048, native=native)
    # each weight moves by whole ulps (2**-7 in [1, 2)), ~128 +- 11 of them
    assert torch.all((result - 1.0) * 128 == ((result - 1.0) * 128).round())
    assert abs(result.mean().item() - 2.0) < 0.01, result.mean()
    assert result.std().item() > 0  # the weights took different paths


def test_stochastic_round_to_bf16_is_unbiased_and_picks_neighbours():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([1.0 + 2**-9, -3.3, 1e-30, 5.0], dtype=torch.float32).repeat(20000, 1)
    y = stochastic_round_to_bf16(x, g)
    nearest = x.bfloat16()  # torch's own cast
    toward = torch.where(x > nearest.float(), float("inf"), -float("inf")).bfloat16()
    other = torch.nextafter(nearest, toward)  # the neighbour on x's other side
    assert torch.all((y == nearest) | (y == other))
    ulp = (nearest.float() - other.float()).abs()[0].double()
    mean = y.double().mean(0)
    assert torch.all((mean - x[0].double()).abs() < 0.02 * ulp)  # unbiased (~5 sigma)
    assert y[:, 3].eq(5.0).all()  # exact values stay
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    out = stochastic_round_to_bf16(special, g)
    assert out[0].isposinf() and out[1].isneginf() and out[2].isnan()


def test_stochastic_round_to_bf16_rejects_non_fp32():
    with pytest.raises(TypeError, match="fp32"):
        stochastic_round_to_bf16(torch.ones(2, dtype=torch.float64))


def test_compensated_update_state_dict_resumes_exactly():
    def run(steps, state=None, start=0):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(64).bfloat16())
        opt = torch.optim.SGD([w], lr=1e-3, momentum=0.9)
        upd = CompensatedUpdate(opt, method="stochastic", seed=3)
        if state is not None:
            w.data.copy_(state["w"])
            opt.load_state_dict(state["opt"])
            upd.load_state_dict(state["upd"])
        for i in range(start, start + steps):
            w.grad = torch.full_like(w, 0.5 + i * 1e-3)
            upd.step()
        return w, {"w": w.detach().clone(), "opt": opt.state_dict(), "upd": upd.state_dict()}

    full, _ = run(20)
    _, half = run(10)
    resumed, _ = run(10, state=half, start=10)
    assert torch.equal(full.detach(), resumed.detach())


def test_compensated_update_rejects_unknown_method():
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1, dtype=torch.bfloat16))], lr=1.0)
    with pytest.raises(ValueError, match="'kahan', 'stochastic'"):
        CompensatedUpdate(opt, method="round")


# -- bf16-state compensated step (AdamW / Adam / SGD) -------------------------------------
BF16_STEP_OPTIMIZERS = {  # name: (factory, states equal the oracle's bit for bit)
    # Adam: m = beta1 m + (1 - beta1) g (torch: lerp, rounded differently in fp32), and
    # L2 decay reads p + c where the oracle reads its fp32 param: states within an ulp
    "adamw": (lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1), False),
    "adam-l2-maximize-lr-tensor": (
        lambda g: torch.optim.Adam(g, lr=torch.tensor(1e-2), weight_decay=0.1, maximize=True),
        False,
    ),
    "sgd-nesterov": (
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        True,
    ),
    "sgd-dampening-maximize": (
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, dampening=0.1, maximize=True),
        True,
    ),
    "sgd-plain": (lambda g: torch.optim.SGD(g, lr=0.1), True),
    "sgd-wd-lr-tensor": (
        lambda g: torch.optim.SGD(g, lr=torch.tensor(0.1), weight_decay=0.1),
        True,
    ),
}


@pytest.mark.parametrize("name", list(BF16_STEP_OPTIMIZERS))
def test_bf16_step_matches_torch_on_fp32_copies_with_bf16_rounded_states(name):
    make, exact_states = BF16_STEP_OPTIMIZERS[name]
    w = nn.Parameter(torch.randn(48, 40).bfloat16())
    norm = nn.Parameter(torch.randn(40))  # an fp32 param: stepped by torch itself
    opt = make([{"params": [w]}, {"params": [norm]}])
    upd = CompensatedUpdate(opt, method="kahan")
    assert upd.native
    # Oracle: torch's optimizer on fp32 copies; after each step its states are rounded
    # to bf16 (nearest), as the bf16 step stores them.
    ref_w, ref_norm = (nn.Parameter(t.detach().float().clone()) for t in (w, norm))
    oracle = make([{"params": [ref_w]}, {"params": [ref_norm]}])
    steps = 5
    for _ in range(steps):
        g, gn = torch.randn(48, 40).bfloat16(), torch.randn(40)
        w.grad, ref_w.grad, norm.grad, ref_norm.grad = g, g.float(), gn, gn.clone()
        upd.step()
        oracle.step()
        for key, t in oracle.state[ref_w].items():
            if key != "step":
                t.copy_(t.bfloat16())
    state, ref_state = opt.state[w], oracle.state[ref_w]
    assert set(state) == set(ref_state)  # torch's own key names
    for key, t in state.items():
        if key == "step":
            assert t.dtype == torch.float32 and t.dim() == 0 and t.item() == steps
            continue
        assert t.dtype == torch.bfloat16, key
        if exact_states:
            assert torch.equal(t.float(), ref_state[key]), key
        else:
            torch.testing.assert_close(t.float(), ref_state[key], rtol=2**-7, atol=1e-6)
    value = w.detach().float() + upd._comp_of[id(w)].float()  # p + c
    ref = ref_w.detach()
    # c is rounded to bf16 each step: <= 2**-9 of |v - p| <= 2**-9 ulp(p), a step
    assert (value - ref).abs().max() <= 1e-4
    assert (w.detach().float() - ref).abs().max() > 1e-3  # p alone is off by ~ulp/4
    assert torch.equal(norm.detach(), ref_norm.detach())
    # the optimizer's own state_dict round trip keeps bf16 states
    w2 = nn.Parameter(w.detach().clone())
    opt2 = make([{"params": [w2]}, {"params": [nn.Parameter(norm.detach().clone())]}])
    opt2.load_state_dict(opt.state_dict())
    assert all(
        t.dtype == (torch.float32 if k == "step" else torch.bfloat16)
        for k, t in opt2.state[w2].items()
    )


def test_bf16_step_stochastic_rounds_states_to_bf16():
    w = nn.Parameter(torch.randn(256).bfloat16())
    opt = torch.optim.AdamW([w], lr=1e-3)
    upd = CompensatedUpdate(opt, method="stochastic", seed=1)
    assert upd.native and upd.comps == [None]
    for _ in range(3):
        w.grad = torch.randn(256).bfloat16()
        upd.step()
    assert opt.state[w]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[w]["exp_avg_sq"].dtype == torch.bfloat16


def test_bf16_step_in_chunks_equals_one_tensor_at_a_time(monkeypatch):
    import mixprec.master.bf16_step as bf16_step

    def run():
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(50, 3).bfloat16())
        opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1)
        upd = CompensatedUpdate(opt, method="kahan")
        for _ in range(3):
            w.grad = torch.randn(50, 3).bfloat16()
            upd.step()
        return w.detach().clone(), upd.comps[0].clone(), opt.state[w]["exp_avg_sq"].clone()

    whole = run()
    monkeypatch.setattr(bf16_step, "CHUNK", 7)  # 150 elements: 22 chunks, the last short
    for got, want in zip(run(), whole, strict=True):
        assert torch.equal(got, want)


def test_bf16_step_falls_back_for_other_optimizers():
    w = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    assert not CompensatedUpdate(torch.optim.NAdam([w])).native
    assert not CompensatedUpdate(torch.optim.AdamW([w], amsgrad=True)).native
    native = CompensatedUpdate(torch.optim.AdamW([w]))
    with pytest.raises(RuntimeError, match="step()"):
        native.begin()  # a plain opt.step() in between would lose small updates




@pytest.mark.parametrize(
    ("max_grad_norm", "norm"), [(None, False), (1.0, False), (None, True), (1.0, True)]
)
@pytest.mark.parametrize(("nonfinite", "expected_syncs"), [("ignore", 0), ("skip", 1)])
def test_bf16_true_adamw_step_syncs_only_for_the_skip_decision(
    max_grad_norm, norm, nonfinite, expected_syncs
):
    from mixprec import Precision

    # An fp32 LayerNorm is stepped by torch's AdamW itself: its single-tensor CPU path
    # reads the step counter on the host, its fused path does not. On the CPU the skip of
    # a non-finite step (the default) is decided by one host read of found_inf (no device
    # to wait for); the device-side skip is tested on bf16_step above.
    middle = nn.LayerNorm(16) if norm else nn.ReLU()
    model = nn.Sequential(nn.Linear(8, 16), middle, nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=norm)
    precision = Precision("bf16-true", nonfinite=nonfinite)
    model, opt = precision.setup(model, opt)
    x = torch.randn(8, 8)
    for _ in range(2):  # the first step creates the states
        with precision.autocast():
            loss = model(x.bfloat16()).float().square().mean()
        precision.backward(loss)
        with SyncCounter() as syncs:
            precision.step(opt, max_grad_norm=max_grad_norm)
        assert syncs.count == expected_syncs, syncs.calls
    assert all(
        t.dtype == p.dtype for p, s in opt.state.items() for k, t in s.items() if k != "step"
    )  # bf16 states for bf16 params (fp32 for the fp32 norm)
    assert {p.dtype for p in opt.state} == ({torch.bfloat16, torch.float32} if norm else
                                            {torch.bfloat16})  # fmt: skip


# -- skipping a non-finite step on the device (found_inf) --------------------------------
def _bf16_setup(name: str, method: str, *, fused_norm: bool | None):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(24, 10).bfloat16())
    params = [{"params": [w]}]
    norm = None
    if fused_norm is not None:  # an fp32 param, stepped by torch's optimizer itself
        norm = nn.Parameter(torch.randn(10))
        params.append({"params": [norm]})
    extra = {"fused": True} if fused_norm else {}
    make = {
        "adamw": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1, **extra),
        "adam-l2": lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=0.1, **extra),
        "sgd-momentum": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, dampening=0.1),
    }[name]
    opt = make(params)
    return w, norm, opt, CompensatedUpdate(opt, method=method, seed=3)


def _snapshot(w, norm, opt, upd):
    tensors = [w.detach(), *(c for c in upd.comps if c is not None)]
    if norm is not None:
        tensors.append(norm.detach())
    tensors += [t for s in opt.state.values() for t in s.values()]
    return [t.clone() for t in tensors]


def _grads(w, norm, bad: bool):
    w.grad = torch.randn(24, 10).bfloat16()
    if bad:
        w.grad[3, 4] = float("nan")
    if norm is not None:
        norm.grad = torch.randn(10)
        if bad:
            norm.grad[0] = float("inf")


@pytest.mark.parametrize("method", ["kahan", "stochastic"])
@pytest.mark.parametrize(
    ("name", "fused_norm"), [("adamw", None), ("adamw", True), ("adam-l2", True),
                             ("sgd-momentum", None)]  # fmt: skip
)
def test_bf16_step_skips_on_the_device_when_found_inf_is_set(name, fused_norm, method):
    w, norm, opt, upd = _bf16_setup(name, method, fused_norm=fused_norm)
    # the reference takes only the kept steps, without found_inf
    ref_w, ref_norm, ref_opt, ref_upd = _bf16_setup(name, method, fused_norm=fused_norm)
    for i, bad in enumerate((False, True, False, True, False)):
        _grads(w, norm, bad)
        before = _snapshot(w, norm, opt, upd)
        if not bad:
            ref_w.grad = w.grad.clone()
            if norm is not None:
                ref_norm.grad = norm.grad.clone()
            for dev, gen in upd.generators.items():  # stochastic rounding draws alike
                ref_upd.generators[dev].set_state(gen.get_state())
        with SyncCounter() as syncs:
            upd.step(found_inf=torch.tensor(float(bad)))
        # SGD's first momentum step is decided on the host (see bf16_step)
        assert syncs.count == (i == 0 and name.startswith("sgd")), syncs.calls
        after = _snapshot(w, norm, opt, upd)
        if bad:  # every bit as it was: params, Kahan buffers, states, step counters
            assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
        else:  # a kept step is exactly the step without found_inf
            ref_upd.step()
            ref = _snapshot(ref_w, ref_norm, ref_opt, ref_upd)
            assert all(torch.equal(a, b) for a, b in zip(after, ref, strict=True))


@pytest.mark.parametrize("case", ["unfused fp32 param", "sgd first momentum step"])
def test_bf16_step_reads_found_inf_on_the_host_where_the_device_cannot_skip(case):
    name, fused = ("adamw", False) if case == "unfused fp32 param" else ("sgd-momentum", None)
    w, norm, opt, upd = _bf16_setup(name, "kahan", fused_norm=fused)
    _grads(w, norm, True)
    before = _snapshot(w, norm, opt, upd)
    with SyncCounter() as syncs:
        upd.step(found_inf=torch.ones(()))
    assert syncs.count == 1, syncs.calls
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(w, norm, opt, upd), before, strict=True))
    assert not any(opt.state.values())  # nothing created: the next step is torch's first
