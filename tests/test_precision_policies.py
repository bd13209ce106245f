"""Precision's policies: clipping as torch does it, non-finite gradients, TF32, bad calls."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec import Precision
from mixprec.precision.nonfinite import NonFiniteGradientError
from tests.conftest import RECIPE_NAMES, SyncCounter

# recipe -> (autocast dtype, GradScaler on): the recipes a torch.amp loop can write by hand
TORCH_AMP = {
    "fp32": (None, False),
    "tf32": (None, False),
    "fp16-mixed": (torch.float16, True),
    "bf16-mixed": (torch.bfloat16, False),
}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 8))


def _batches(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 16, generator=g), torch.randint(0, 8, (16,), generator=g))
            for _ in range(n)]  # fmt: skip


def _flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


# -- clipping: bit for bit the hand-written torch.amp loop ---------------------------------
def _groups(model: nn.Module) -> list[dict]:
    """nanoGPT's param groups: matrices decay, vectors do not (another order than the model's)."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip


@pytest.mark.parametrize("name", list(TORCH_AMP))
def test_clipping_matches_the_hand_written_torch_amp_loop_bit_for_bit(name):
    dtype, scaling = TORCH_AMP[name]
    torch.manual_seed(0)
    ref = _mlp()
    model = copy.deepcopy(ref)
    max_norm = 0.05  # small enough that every step clips

    opt_ref = torch.optim.AdamW(_groups(ref), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=scaling)
    ref_losses = []
    for x, y in _batches():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(ref(x), y)
        ref_losses.append(loss.detach())
        scaler.scale(loss).backward()
        scaler.unscale_(opt_ref)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        scaler.step(opt_ref)
        scaler.update()
        opt_ref.zero_grad()

    opt = torch.optim.AdamW(_groups(model), lr=1e-2)
    with Precision(name) as precision:
        model, opt = precision.setup(model, opt)
        losses = []
        for x, y in _batches():
            with precision.autocast():
                loss = F.cross_entropy(model(x), y)
            losses.append(loss.detach())
            precision.backward(loss)
            precision.step(opt, max_grad_norm=max_norm)
    assert torch.equal(torch.stack(losses), torch.stack(ref_losses))
    for got, want in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(got, want)


# -- non-finite gradients, every recipe ---------------------------------------------------
def _setup(name, *, fused=False, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 16))  # fp8-able
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    precision = Precision(name, **kwargs)
    model, opt = precision.setup(model, opt)
    return model, opt, precision


def _backward(model, precision, *, poison: bool):
    x = torch.randn(4, 16)
    handle = None
    if poison:  # a NaN in the last Linear's weight gradient only
        handle = model[2].weight.register_hook(lambda g: g * float("nan"))
    with precision.autocast():
        loss = model(x).float().square().mean()
    precision.backward(loss)
    if handle is not None:
        handle.remove()


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_default_policy_skips_a_nan_step_and_counts_it(name):
    model, opt, precision = _setup(name)
    before = _weights(model)
    _backward(model, precision, poison=True)
    assert not precision.step(opt)
    for got, want in zip(model.parameters(), before, strict=True):
        assert torch.equal(got, want)
    assert precision.skipped_steps == 1
    _backward(model, precision, poison=False)
    assert precision.step(opt)
    assert precision.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_raise_policy_names_the_parameter_and_changes_no_weight(name):
    model, opt, precision = _setup(name, nonfinite="raise")
    before = _weights(model)
    _backward(model, precision, poison=True)
    with pytest.raises(NonFiniteGradientError, match=r"'2\.weight'"):
        precision.step(opt)
    for got, want in zip(model.parameters(), before, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["bf16-mixed", "bf16-true"])
def test_ignore_policy_applies_the_nan_as_asked(name):
    model, opt, precision = _setup(name, nonfinite="ignore")
    _backward(model, precision, poison=True)
    assert precision.step(opt)
    assert not torch.isfinite(model[2].weight).all()


@pytest.mark.parametrize("name", ["fp16-mixed", "fp16-master"])
def test_ignore_policy_is_refused_with_loss_scaling(name):
    with pytest.raises(ValueError, match="nonfinite='ignore' cannot be used with loss scaling"):
        Precision(name, nonfinite="ignore")


@pytest.mark.parametrize(
    "kwargs, error",
    [({"nonfinite": "drop"}, ValueError), ({"max_consecutive_skips": 0}, ValueError),
     ({"max_consecutive_skips": 2.5}, TypeError)],  # fmt: skip
)
def test_bad_policy_arguments_name_the_value(kwargs, error):
    (value,) = kwargs.values()
    with pytest.raises(error, match=f"={value!r}"):
        Precision("bf16-mixed", **kwargs)


def test_consecutive_skips_raise_naming_the_parameter_and_the_count():
    model, opt, precision = _setup("bf16-mixed", max_consecutive_skips=5)
    with pytest.raises(NonFiniteGradientError, match=r"100 steps in a row.*'2\.weight'"):
        for _ in range(100):  # checked every 100 steps: one host read per 100 steps
            _backward(model, precision, poison=True)
            precision.step(opt)
    assert precision.skipped_steps == 99  # the 100th raised before it was counted


def test_skip_counters_over_many_steps_match_a_plain_count():
    """The guard takes found_inf in batches (FOLD_EVERY); the counts stay exact."""
    import random

    from mixprec.precision.nonfinite import FOLD_EVERY, NonFiniteGuard

    rng = random.Random(7)
    hits = [rng.random() < 0.4 for _ in range(3 * FOLD_EVERY + 5)]
    hits[-12:] = [True] * 12  # a run of skips across a fold boundary
    guard = NonFiniteGuard("skip", check_grads=True, check_interval=0)
    skipped = streak = 0
    for i, hit in enumerate(hits):
        guard.record(torch.tensor(float(hit)))
        skipped, streak = skipped + hit, (streak + 1) * hit
        if i % 17 == 0 or i == len(hits) - 1:  # read mid-batch and at the end
            state = guard.state_dict()
            assert (state["skipped"], state["streak"]) == (skipped, streak), i
    assert guard.skipped_steps == skipped and guard.steps == len(hits)
    resumed = NonFiniteGuard("skip", check_grads=True)
    resumed.load_state_dict(guard.state_dict())
    resumed.record(torch.tensor(1.0))
    assert resumed.state_dict() == {"steps": len(hits) + 1, "skipped": skipped + 1,
                                    "streak": streak + 1}  # fmt: skip


def test_skip_with_a_fused_optimizer_is_sync_free():
    model, opt, precision = _setup("bf16-mixed", fused=True)
    before = _weights(model)
    _backward(model, precision, poison=True)
    with SyncCounter() as counter:
        result = precision.step(opt)
    assert counter.count == 0, counter.calls
    assert not result  # reading it is the sync, after the fact
    for got, want in zip(model.parameters(), before, strict=True):
        assert torch.equal(got, want)


# -- TF32: the recipe governs forward and backward, the user's flags come back -------------
@pytest.mark.parametrize("name, allow", [("fp32", False), ("tf32", True)])
def test_tf32_flags_hold_during_backward_and_are_restored_on_close(name, allow):
    torch.backends.cuda.matmul.allow_tf32 = not allow  # the user's own choice
    torch.backends.cudnn.allow_tf32 = not allow
    model, opt, precision = _setup(name)
    seen = []
    with precision.autocast():
        loss = model(torch.randn(4, 16)).square().mean()
    loss.register_hook(lambda g: seen.append(_flags()))
    model[0].weight.register_hook(lambda g: seen.append(_flags()))  # the last grad computed
    precision.backward(loss)
    precision.step(opt)
    assert seen == [(allow, allow)] * 2
    precision.close()
    assert _flags() == (not allow, not allow)
    with pytest.raises(RuntimeError, match="closed Precision"):
        precision.backward(loss)


def test_context_manager_restores_the_flags():
    torch.set_float32_matmul_precision("medium")
    with Precision("fp32") as precision:
        precision.setup(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
        assert _flags() == (False, False)
    assert torch.get_float32_matmul_precision() == "medium"


# -- bad calls get clear errors ------------------------------------------------------------
@pytest.mark.parametrize(
    "value, error",
    [(-1.0, ValueError), (0.0, ValueError), (math.nan, ValueError), (math.inf, ValueError),
     ("1.0", TypeError), (True, TypeError)],  # fmt: skip
)
def test_bad_max_grad_norm_is_refused_before_anything_changes(value, error):
    model, opt, precision = _setup("bf16-mixed")
    _backward(model, precision, poison=False)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(error, match=rf"max_grad_norm={value!r}".replace("(", r"\(")):
        precision.step(opt, max_grad_norm=value)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    assert precision.step(opt, max_grad_norm=1.0)  # the loop can go on


def test_backward_of_a_number_is_a_type_error():
    _, _, precision = _setup("fp32")
    with pytest.raises(TypeError, match="got float 3.0"):
        precision.backward(3.0)


def test_backward_fn_runs_the_backward_on_the_scaled_loss():
    model, opt, precision = _setup("fp16-mixed")
    x = torch.randn(4, 16)
    with precision.autocast():
        loss = model(x).float().square().mean()
    seen = []
    precision.backward(loss, backward_fn=lambda scaled: (seen.append(scaled), scaled.backward()))
    assert torch.equal(seen[0], loss * precision.scaler.scale)  # scaled, then run by the fn
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(TypeError, match="retain_graph"):
        precision.backward(loss, backward_fn=lambda s: s.backward(), retain_graph=True)


@pytest.mark.parametrize("name", ["bf16-master", "fp32"])
def test_second_setup_of_the_same_model_is_refused(name):
    model, opt, precision = _setup(name)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="setup\\(\\) was already called"):
        precision.setup(model, other)
    _backward(model, precision, poison=False)  # the first setup still trains
    assert precision.step(opt)
