"""Tests of mixprec.scaling: parity with torch.amp.GradScaler, the other frameworks' rules
against independent re-implementations of their published code, sync-freedom, telemetry,
the floor error, checkpoints and GradScaler's state machine.
"""

from __future__ import annotations

import json
import math
import pathlib
import pickle
import random
import re
import warnings

import numpy as np
import pytest
import torch

import mixprec
from mixprec.scaling import GradScaler, LossScaler, ScaleFloorError, apply_rule_, preset_config
from tests.conftest import SyncCounter

INF, NAN = float("inf"), float("nan")


# -- helpers --------------------------------------------------------------------------------
def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    if kind == "adam-fused":
        return torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    if kind == "adamw-fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    raise ValueError(kind)


# step -> (parameter index, value written into its gradient)
INJECT = {3: (2, INF), 4: (0, NAN), 9: (3, -INF), 10: (1, NAN), 11: (2, NAN), 17: (0, INF)}
CLIP_STEPS = {5, 12}  # unscale_ + clip_grad_norm_ before step()


def _run_scripted(scaler_cls, kind: str, steps: int = 22, **scaler_kwargs):
    model = _mlp()
    opt = _optimizer(kind, model)
    scaler = scaler_cls("cpu", **scaler_kwargs)
    gen = torch.Generator().manual_seed(1)
    scales, params = [], []
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 6, generator=gen)
        loss = model(x).pow(2).mean()
        scaler.scale(loss).backward()
        if step in INJECT:
            index, value = INJECT[step]
            list(model.parameters())[index].grad.view(-1)[0] = value
        if step in CLIP_STEPS:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        params.append([p.detach().clone() for p in model.parameters()])
    return scales, params, scaler


# -- parity with torch.amp.GradScaler --------------------------------------------------------
@pytest.mark.parametrize("kind", ["sgd", "adam", "adam-fused", "adamw-fused"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(growth_interval=3),
        dict(growth_interval=2, init_scale=2.0**124),  # natural overflow; growth capped by inf
        dict(growth_interval=1, growth_factor=3.0, backoff_factor=0.3, init_scale=1000.0),
    ],
)
def test_parity_with_torch(kind, settings):
    ref_scales, ref_params, ref = _run_scripted(torch.amp.GradScaler, kind, **settings)
    scales, params, ours = _run_scripted(GradScaler, kind, **settings)
    assert scales == ref_scales
    for step, (a, b) in enumerate(zip(ref_params, params)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"parameters differ at step {step}"
    assert ours.state_dict() == ref.state_dict()
    # Skipped steps are exactly those whose parameters did not move.
    skipped = {s.step for s in ours.telemetry().skipped}
    unchanged = {
        step
        for step in range(1, len(params))
        if all(torch.equal(x, y) for x, y in zip(params[step - 1], params[step]))
    }
    assert skipped - {0} == unchanged
    assert set(INJECT) <= skipped


@pytest.mark.parametrize(
    "config",
    [
        preset_config("torch", growth_interval=2),
        preset_config("torch", growth_factor=3.0, backoff_factor=0.3, growth_interval=1),
        preset_config("torch", init_scale=2.0**125, growth_interval=1),
        preset_config("apex", init_scale=2.0**20, growth_interval=2, min_scale=2.0**10),
        preset_config("deepspeed", init_scale=2.0**8, growth_interval=3),
        preset_config("deepspeed", growth_interval=2, hysteresis=3, consecutive_hysteresis=True),
        preset_config("megatron", init_scale=2.0**8, growth_interval=1, backoff_factor=0.3),
    ],
    ids=lambda c: c.preset,
)
def test_fast_rule_matches_general_rule(config):
    # The general tensor-op rule (the docstring's pseudocode) is the reference for the fast
    # path built on torch._amp_update_scale_; with torch's settings the fast path *is*
    # torch's kernel, so this also checks the general rule against torch, including
    # non-power-of-two factors (rounded once from float64, as the C++ kernel does) and
    # growth refused once it would reach inf.
    traces = []
    for use_kernel in (True, False):
        rng = random.Random(0)
        scale = torch.tensor(config.init_scale)
        growth = torch.tensor(config.growth_tracker_start, dtype=torch.int32)
        hyst = torch.tensor(config.hysteresis, dtype=torch.int32)
        trace = []
        for _ in range(300):
            found = torch.tensor(float(rng.random() < 0.3))
            apply_rule_(scale, growth, hyst, found, config, use_torch_kernel=use_kernel)
            # With hysteresis 1 the tracker's value is irrelevant (torch's kernel keeps none).
            spare = hyst.item() if config.hysteresis > 1 else None
            trace.append((scale.item(), growth.item(), spare))
        traces.append(trace)
    assert traces[0] == traces[1]
    assert len({s for s, _, _ in traces[0]}) > 3  # the scale moved both ways


# -- the other frameworks' rules, re-implemented from their published source -------------------
class ApexReference:
    """apex.amp.scaler.LossScaler.update_scale (dynamic)."""

    def __init__(self, init_scale=2.0**16, scale_window=2000, min_loss_scale=None,
                 max_loss_scale=2.0**24):  # fmt: skip
        self.scale, self.window = init_scale, scale_window
        self.min, self.max, self.unskipped = min_loss_scale, max_loss_scale, 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.min, self.scale / 2.0) if self.min else self.scale / 2.0
            self.unskipped = 0
        else:
            self.unskipped += 1
        if self.unskipped == self.window:
            self.scale = min(self.max, self.scale * 2.0)
            self.unskipped = 0


class DeepSpeedReference:
    """deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler.update_scale."""

    def __init__(self, init_scale=2.0**16, scale_window=1000, min_scale=1.0, delayed_shift=2,
                 consecutive_hysteresis=False):  # fmt: skip
        self.cur_scale, self.scale_window, self.min_scale = init_scale, scale_window, min_scale
        self.cur_iter, self.last_overflow_iter, self.scale_factor = 0, -1, 2.0
        self.delayed_shift = self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = consecutive_hysteresis

    @property
    def scale(self) -> float:
        return self.cur_scale

    def update(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                # DeepSpeed raises here when cur_scale == min_scale (raise_error_at_min_scale).
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            stable_interval = (self.cur_iter - self.last_overflow_iter) - 1
            if stable_interval > 0 and stable_interval % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1


class MegatronReference:
    """megatron.core.optimizer.grad_scaler.DynamicGradScaler.update."""

    def __init__(self, initial_scale=2.0**32, min_scale=1.0, growth_factor=2.0,
                 backoff_factor=0.5, growth_interval=1000, hysteresis=2):  # fmt: skip
        self.scale, self.min_scale = initial_scale, min_scale
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.growth_tracker, self.hysteresis_tracker = 0, hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale = self.scale * self.growth_factor


def _stream(seed: int, steps: int = 250) -> list[bool]:
    """Overflow flags with quiet stretches, isolated overflows and bursts."""
    rng = random.Random(seed)
    flags: list[bool] = []
    while len(flags) < steps:
        mode = rng.choice(["quiet", "sparse", "burst"])
        length = rng.randint(1, 12)
        p = {"quiet": 0.0, "sparse": 0.25, "burst": 0.9}[mode]
        flags += [rng.random() < p for _ in range(length)]
    return flags[:steps]


def _cases():
    for seed in range(2):
        for window in (1, 2, 3, 5):
            yield (
                "apex",
                dict(init_scale=2.0**20, growth_interval=window),
                ApexReference(init_scale=2.0**20, scale_window=window),
                seed,
            )
            yield (
                "apex",
                dict(growth_interval=window, min_scale=4.0),
                ApexReference(scale_window=window, min_loss_scale=4.0),
                seed,
            )
            for consecutive in (False, True):
                yield (
                    "deepspeed",
                    dict(
                        init_scale=16.0, growth_interval=window, consecutive_hysteresis=consecutive
                    ),
                    DeepSpeedReference(
                        init_scale=16.0, scale_window=window, consecutive_hysteresis=consecutive
                    ),
                    seed,
                )
            yield (
                "deepspeed",
                dict(init_scale=64.0, growth_interval=window, hysteresis=3),
                (DeepSpeedReference(init_scale=64.0, scale_window=window, delayed_shift=3)),
                seed,
            )
            yield (
                "megatron",
                dict(init_scale=2.0**6, growth_interval=window),
                MegatronReference(initial_scale=2.0**6, growth_interval=window),
                seed,
            )
            yield (
                "megatron",
                dict(init_scale=2.0**6, growth_interval=window, hysteresis=1),
                (MegatronReference(initial_scale=2.0**6, growth_interval=window, hysteresis=1)),
                seed,
            )


@pytest.mark.parametrize("preset", ["apex", "deepspeed", "megatron"])
def test_preset_rules_step_by_step(preset):
    checked = 0
    for name, overrides, reference, seed in _cases():
        if name != preset:
            continue
        scaler = LossScaler.from_preset(preset, check_interval=0, **overrides)
        for step, flag in enumerate(_stream(seed)):
            # As in training, a large enough scale overflows; this keeps the scale inside
            # fp32's range, where the frameworks' Python floats and fp32 agree exactly.
            overflow = flag or reference.scale > 2.0**40
            scaler.update(torch.tensor(float(overflow)))
            reference.update(overflow)
            assert scaler.get_scale() == reference.scale, (preset, overrides, seed, step)
            checked += 1
    assert checked >= 2 * 4 * 250


def test_preset_defaults():
    assert (preset_config("torch").init_scale, preset_config("torch").growth_interval) == (
        2.0**16,
        2000,
    )
    apex = preset_config("apex")
    assert (apex.init_scale, apex.max_scale, apex.growth_interval) == (2.0**16, 2.0**24, 2000)
    ds = preset_config("deepspeed")
    assert (ds.init_scale, ds.growth_interval, ds.hysteresis, ds.min_scale) == (
        2.0**16, 1000, 2, 1.0)  # fmt: skip
    mg = preset_config("megatron")
    assert (mg.init_scale, mg.growth_interval, mg.hysteresis, mg.min_scale) == (
        2.0**32, 1000, 2, 1.0)  # fmt: skip


def test_megatron_default_scale_survives_window():
    # With the real defaults: 1000 clean steps grow 2^32 to 2^33; two overflows back off once.
    scaler = LossScaler.from_preset("megatron", check_interval=0)
    reference = MegatronReference()
    for overflow in [False] * 1000 + [True, True, False]:
        scaler.update(torch.tensor(float(overflow)))
        reference.update(overflow)
    assert scaler.get_scale() == reference.scale == 2.0**32


# -- sync-freedom ------------------------------------------------------------------------------
def _grads_with_nan(model):
    model.zero_grad()
    model(torch.randn(4, 6)).sum().backward()
    list(model.parameters())[1].grad[0] = NAN
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("method", ["flags", "amax"])
@pytest.mark.parametrize("preset", ["torch", "apex", "deepspeed", "megatron"])
def test_unscale_and_update_do_not_sync(preset, method):
    model = _mlp()
    scaler = LossScaler.from_preset(preset, locate_method=method)
    with SyncCounter() as counter:
        for _ in range(5):
            model.zero_grad()
            scaler.scale_loss(model(torch.randn(4, 6)).sum()).backward()
            scaler.update(scaler.unscale_([p.grad for p in model.parameters()]))
            scaler.update(scaler.unscale_(_grads_with_nan(model)))
    assert counter.calls == []
    # The counter does see a host read (so the assertion above can fail).
    with SyncCounter() as counter:
        scaler.get_scale()
    assert counter.calls


@pytest.mark.parametrize("kind", ["adam-fused", "adamw-fused"])
def test_grad_scaler_fused_step_does_not_sync(kind):
    model = _mlp()
    opt = _optimizer(kind, model)
    scaler = GradScaler("cpu", preset="deepspeed")
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(model(torch.randn(4, 6)).sum()).backward()
        with SyncCounter() as counter:
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        assert counter.calls == []


def test_floor_check_runs_every_interval_and_costs_nothing_between():
    scaler = LossScaler.from_preset(
        "megatron", init_scale=1.0, floor_patience=2, check_interval=4, hysteresis=1
    )
    with SyncCounter() as counter:  # steps 0-2: no check, no host read
        for _ in range(3):
            scaler.update(torch.tensor(1.0))
    assert counter.calls == []
    with pytest.raises(ScaleFloorError, match=r"4 steps in a row overflowed \(steps 0 to 3\)"):
        scaler.update(torch.tensor(1.0))  # step 3 ends an interval: the check finds step 1
    assert scaler.steps == 4


# -- telemetry ----------------------------------------------------------------------------------
def test_telemetry_names_first_nonfinite_parameter():
    model = _mlp()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    scaler = GradScaler("cpu", growth_interval=100)
    for step in range(6):
        opt.zero_grad()
        scaler.scale(model(torch.randn(4, 6)).sum()).backward()
        if step == 2:
            model[2].weight.grad[1, 1] = INF
            model[0].bias.grad[0] = NAN  # earlier in parameter order: reported first
        if step == 4:  # located at unscale_, before clipping spreads the NaN everywhere
            model[2].bias.grad[0] = NAN
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            assert model[0].weight.grad.isnan().all()
        scaler.step(opt)
        scaler.update()
    report = scaler.telemetry()
    assert (report.steps, report.steps_skipped, report.steps_taken) == (6, 2, 4)
    assert [(s.step, s.first_nonfinite) for s in report.skipped] == [(2, "0.bias"), (4, "2.bias")]
    assert report.scale_history == (2.0**16,) * 3 + (2.0**15,) * 2 + (2.0**14,)
    assert report.scale == 2.0**14
    assert report.skipped[1].scale == 2.0**15


def test_telemetry_across_two_unscale_calls_and_ring_buffer():
    scaler = LossScaler(history_len=3, growth_interval=1000)
    a, b = torch.ones(3), torch.ones(2)
    for step in range(5):
        a.fill_(1.0)
        b.fill_(1.0)
        if step == 3:
            b[1] = NAN
        found = scaler.unscale_([a], names=["a"]) + scaler.unscale_([b], names=["b"])
        scaler.update(found)
    report = scaler.telemetry()
    assert report.history_start == 2 and len(report.scale_history) == 3
    assert [(s.step, s.first_nonfinite) for s in report.skipped] == [(3, "b")]
    assert int(scaler.steps_skipped) == 1 and int(scaler.steps_taken) == 4


# -- floor error ----------------------------------------------------------------------------------
def _overflowing_run(scaler, steps):
    weight = torch.ones(3)
    for _ in range(steps):
        weight.fill_(1.0)
        weight[2] = NAN
        scaler.update(scaler.unscale_([torch.ones(2), weight], names=["encoder.w", "head.w"]))


def test_floor_error_names_parameter():
    scaler = LossScaler.from_preset("deepspeed", init_scale=4.0, floor_patience=3, check_interval=1)
    expected = r"at its floor 1; the first non-finite gradient of step 0 was 'head\.w'"
    with pytest.raises(ScaleFloorError, match=expected):
        _overflowing_run(scaler, 20)
    # Steps run at scales 4, 4 (hysteresis), 2, then 1, 1, 1: the third at the floor raises.
    assert scaler.steps == 6


def test_floor_error_deferred_to_telemetry_when_periodic_check_off():
    scaler = LossScaler.from_preset("megatron", init_scale=2.0, floor_patience=2, check_interval=0)
    _overflowing_run(scaler, 10)  # no host read, no error on the hot path
    with pytest.raises(ScaleFloorError, match="head.w"):
        scaler.telemetry()
    assert scaler.telemetry().steps_skipped == 10  # reported once


def test_grad_scaler_floor_error_then_usable():
    model = _mlp()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    scaler = GradScaler(
        "cpu", init_scale=2.0, preset="megatron", floor_patience=2, check_interval=1
    )
    with pytest.raises(ScaleFloorError, match=r"'2\.weight'"):
        for _ in range(10):
            _scaled_backward(scaler, model)
            model[2].weight.grad[0, 0] = NAN
            scaler.step(opt)
            scaler.update()
    _scaled_backward(scaler, model)  # the scaler still works after the error
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 1.0


def test_no_floor_error_for_transient_overflows():
    scaler = LossScaler.from_preset("deepspeed", init_scale=1.0, floor_patience=3, check_interval=1)
    for step in range(30):
        scaler.update(torch.tensor(float(step % 3 != 0)))  # two overflows, then a clean step
    assert scaler.telemetry().steps_skipped == 20


# -- seed-style loop ------------------------------------------------------------------------------
def _seed_loop(scaler_cls, steps=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = scaler_cls("cpu")
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(steps):
        x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return [p.detach() for p in model.parameters()], scaler.get_scale()


def test_seed_style_loop_matches_torch():
    ref_params, ref_scale = _seed_loop(torch.amp.GradScaler)
    params, scale = _seed_loop(mixprec.GradScaler)
    assert scale == ref_scale
    assert all(torch.equal(a, b) for a, b in zip(ref_params, params))


# -- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["torch", "apex", "deepspeed", "megatron"])
def test_loss_scaler_state_dict_resumes_exactly(preset):
    flags = _stream(7, steps=60)
    whole = LossScaler.from_preset(preset, growth_interval=3, check_interval=0)
    first = LossScaler.from_preset(preset, growth_interval=3, check_interval=0)
    for flag in flags[:25]:
        whole.update(torch.tensor(float(flag)))
        first.update(torch.tensor(float(flag)))
    resumed = LossScaler(preset="torch")  # settings come from the state dict
    resumed.load_state_dict(first.state_dict())
    for flag in flags[25:]:
        whole.update(torch.tensor(float(flag)))
        resumed.update(torch.tensor(float(flag)))
        assert resumed.get_scale() == whole.get_scale()
    assert resumed.state_dict() == whole.state_dict()
    report, full = resumed.telemetry(), whole.telemetry()
    assert (report.steps, report.steps_skipped) == (full.steps, full.steps_skipped)
    assert report.history_start == 25 and report.scale_history == full.scale_history[25:]


def test_grad_scaler_state_dict_round_trip_and_torch_interchange():
    _, _, ours = _run_scripted(GradScaler, "sgd", growth_interval=3)
    _, _, ref = _run_scripted(torch.amp.GradScaler, "sgd", growth_interval=3)
    loaded = GradScaler("cpu")
    loaded.load_state_dict(ref.state_dict())
    assert loaded.state_dict() == ref.state_dict()
    back = torch.amp.GradScaler("cpu")
    back.load_state_dict(ours.state_dict())
    assert back.state_dict() == ours.state_dict()

    _, _, ds = _run_scripted(GradScaler, "sgd", preset="deepspeed", growth_interval=3)
    copy = GradScaler("cpu")
    copy.load_state_dict(ds.state_dict())
    assert copy.state_dict() == ds.state_dict()
    assert copy.loss_scaler.config == ds.loss_scaler.config.replace(init_scale=ds.get_scale())


# -- GradScaler's state machine and enabled=False -------------------------------------------------
def _scaled_backward(scaler, model):
    model.zero_grad()
    scaler.scale(model(torch.randn(4, 6)).sum()).backward()


def test_misuse_raises_exact_runtime_errors():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu")
    with pytest.raises(RuntimeError, match=r"step\(\) was called before the scale exists"):
        scaler.step(opt)
    _scaled_backward(scaler, model)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError) as twice:
        scaler.unscale_(opt)
    assert str(twice.value) == (
        "unscale_() has already been called on this optimizer since the last update()."
    )
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"^unscale_\(\) is being called after step\(\)\.$"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"^step\(\) has already been called since the last"):
        scaler.step(opt)
    scaler.update()
    with pytest.raises(RuntimeError, match="No inf checks were recorded prior to update"):
        scaler.update()
    _scaled_backward(scaler, model)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: None)


def test_scale_of_nested_outputs_and_manual_new_scale_match_torch():
    outputs = [torch.tensor(1.5), (torch.tensor([2.0, 3.0]), torch.tensor(-1.0))]
    results = []
    for cls in (torch.amp.GradScaler, GradScaler):
        scaler = cls("cpu", init_scale=8.0)
        scaled = scaler.scale(outputs)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _scaled_backward(scaler, model)
        scaler.step(opt)
        scaler.update(new_scale=3.0)
        first = scaler.get_scale()
        _scaled_backward(scaler, model)
        scaler.step(opt)
        scaler.update(new_scale=torch.tensor(5.0))
        results.append((scaled, first, scaler.get_scale(), scaler.state_dict()))
    (ref_out, *ref_rest), (out, *rest) = results
    assert type(out) is list and type(out[1]) is tuple
    assert torch.equal(out[0], ref_out[0]) and torch.equal(out[1][0], ref_out[1][0])
    assert torch.equal(out[1][1], ref_out[1][1]) and rest == ref_rest


def test_fp16_gradients_are_refused_like_torch():
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = torch.optim.SGD([param], lr=0.1)
    scaler = GradScaler("cpu")
    scaler.scale(param.float().sum()).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients."):
        scaler.unscale_(opt)


def test_disabled_grad_scaler_is_a_no_op():
    plain_model, model = _mlp(), _mlp()
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", enabled=False)
    for _ in range(3):
        x = torch.randn(4, 6)
        plain_opt.zero_grad()
        plain_model(x).sum().backward()
        plain_opt.step()
        opt.zero_grad()
        loss = model(x).sum()
        assert scaler.scale(loss) is loss
        loss.backward()
        assert scaler.unscale_(opt) is None
        scaler.step(opt)
        scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), model.parameters()))
    assert (scaler.get_scale(), scaler.state_dict(), scaler.is_enabled()) == (1.0, {}, False)
    scaler.load_state_dict({})  # no-op, as in torch


def test_cuda_scaler_without_cuda_disables_like_torch():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaler = GradScaler()
    assert not scaler.is_enabled() and any(
        "CUDA is not available" in str(w.message) for w in caught
    )


def test_disabled_loss_scaler_is_a_no_op():
    scaler = LossScaler.disabled()
    loss = torch.tensor(3.0)
    grad = torch.tensor([1.0, NAN])
    assert scaler.scale_loss(loss) is loss
    found = scaler.unscale_([grad])
    assert found.item() == 0.0 and math.isnan(grad[1]) and grad[0] == 1.0
    scaler.update(found)
    assert scaler.get_scale() == 1.0 and scaler.telemetry().steps == 0


def test_static_scaler_unscales_checks_and_keeps_scale():
    scaler = LossScaler.static(8.0)
    grad = torch.tensor([8.0, 16.0])
    found = scaler.unscale_([grad])
    assert grad.tolist() == [1.0, 2.0] and found.item() == 0.0
    scaler.update(scaler.unscale_([torch.tensor([INF])]))
    assert scaler.get_scale() == 8.0 and scaler.telemetry().steps_skipped == 1


def test_bad_settings_name_the_value_and_choices():
    choices = "'torch', 'apex', 'deepspeed', 'deepspeed-legacy', 'deepspeed-fp16-optimizer'"
    with pytest.raises(ValueError, match=choices):
        LossScaler.from_preset("jax")
    with pytest.raises(ValueError, match=r"growth_factor=1\.0 must be > 1\.0"):
        LossScaler(growth_factor=1.0)
    with pytest.raises(ValueError, match="min_scale <= init_scale"):
        LossScaler.from_preset("deepspeed", init_scale=0.5)


# -- loss-scale collapse (issue 13 section 3) ---------------------------------------------------
SMALLEST_NORMAL = float.fromhex("0x1p-126")


@pytest.mark.parametrize("recipe", ["fp16-mixed", "fp16-master"])
def test_persistent_overflow_raises_and_never_writes_nan(recipe):
    # torch's rule halves the scale 150+ times to exactly 0.0; 0 * (1/0) = NaN then went
    # into every weight on the next clean step.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    precision = mixprec.Precision(recipe)
    model, opt = precision.setup(model, opt)
    x = torch.randn(16, 8)
    errors, taken = [], 0
    for step in range(220):
        with precision.autocast():
            loss = model(x).float().pow(2).mean()
        precision.backward(loss * float("inf") if step < 200 else loss)
        try:
            taken += bool(precision.step(opt))
        except ScaleFloorError as error:
            errors.append(str(error))
        assert precision.scaler.get_scale() >= SMALLEST_NORMAL
    assert len(errors) == 1
    assert "200 steps in a row overflowed (steps 0 to 199)" in errors[0]
    assert "the first non-finite gradient of step 0 was '0.weight'" in errors[0]
    assert taken == 20
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scale_floor_is_smallest_normal_unless_framework_exact():
    safe = LossScaler(check_interval=0)
    exact = LossScaler(check_interval=0, framework_exact=True)
    for _ in range(200):
        safe.update(torch.tensor(1.0))
        exact.update(torch.tensor(1.0))
    assert safe.get_scale() == SMALLEST_NORMAL and exact.get_scale() == 0.0
    exact.telemetry()  # framework_exact: no floor error
    with pytest.raises(ScaleFloorError, match="200 steps in a row"):
        safe.telemetry()
    # Even at torch's scale 0.0, a clean gradient is not unscaled into NaN and applied.
    grad = torch.ones(3)
    assert exact.unscale_([grad]).item() != 0.0


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    ("dtype", "value"), [(torch.float16, 4096.0), (torch.float32, 3e38)]
)
def test_unscale_overflow_below_scale_one_is_an_overflow(dtype, value, fused):
    # At scale 2^-5, unscaling multiplies by 32: 4096 -> 131072 > fp16's 65504 (inf), and
    # 3e38 * 32 > fp32's max. The values were finite before unscaling; the check must see
    # what the step would apply. A fused optimizer (check_) divides in fp32 and keeps the
    # fp32 result, so there only the fp32 gradient overflows.
    scaler = LossScaler(init_scale=2.0**-5)
    grads = [torch.ones(4, dtype=dtype), torch.tensor([1.0, value], dtype=dtype)]
    check = scaler.check_ if fused else scaler.unscale_
    found = check(grads, names=["a", "b"])
    if fused and dtype == torch.float16:
        assert found.item() == 0.0
        return
    assert found.item() != 0.0
    scaler.update(found)
    assert scaler.telemetry().skipped[0].first_nonfinite == "b"
    fine = LossScaler(init_scale=2.0**-5)  # a gradient that stays finite is not flagged
    assert fine.unscale_([torch.tensor([1.0, 1000.0], dtype=dtype)]).item() == 0.0


def test_grad_scaler_below_scale_one_never_applies_inf():
    torch.manual_seed(0)
    for kind in ("sgd", "adam-fused"):
        model = _mlp()
        opt = _optimizer(kind, model)
        scaler = GradScaler("cpu", init_scale=2.0**-10)
        _scaled_backward(scaler, model)
        model[0].weight.grad[0, 0] = 3e38  # finite, but 3e38 * 2^10 is not
        scaler.step(opt)
        scaler.update()
        assert all(torch.isfinite(p).all() for p in model.parameters()), kind
        assert scaler.telemetry().steps_skipped == 1, kind


# -- bad scaler inputs are refused with the value named (issue 13 section 3) ---------------------
@pytest.mark.parametrize("bad", [NAN, INF, 0.0, -3.0, 1e-40])
def test_bad_scales_are_refused_with_the_value_named(bad):
    named = re.escape(f"scale={bad!r} is not a usable loss scale")
    scaler = LossScaler()
    with pytest.raises(ValueError, match=named):
        scaler.set_scale(bad)
    with pytest.raises(ValueError, match=r"scale=\S+ is not a usable"):  # read as fp32
        scaler.set_scale(torch.tensor(bad))
    with pytest.raises(ValueError, match=named):
        scaler.update(torch.tensor(0.0), new_scale=bad)
    assert scaler.steps == 0  # refused before anything was recorded
    state = scaler.state_dict()
    with pytest.raises(ValueError, match=named):
        scaler.load_state_dict({**state, "scale": bad})
    assert scaler.state_dict() == state  # nothing changed
    torch_state = torch.amp.GradScaler("cpu").state_dict()
    grad_scaler = GradScaler("cpu")
    with pytest.raises(ValueError, match=named):
        grad_scaler.load_state_dict({**torch_state, "scale": bad})
    assert grad_scaler.state_dict() == torch_state
    _scaled_backward(grad_scaler, _mlp())
    with pytest.raises(ValueError, match=named):
        grad_scaler.update(new_scale=bad)


def test_static_and_init_scale_messages_name_the_value():
    with pytest.raises(ValueError, match=r"init_scale=0\.0 must be positive and finite"):
        LossScaler.static(0.0)
    with pytest.raises(ValueError, match=r"init_scale=1e-40 is below 2\^-126"):
        LossScaler(init_scale=1e-40)
    assert LossScaler(init_scale=1e-40, framework_exact=True).get_scale() == 1e-40
    with pytest.raises(ValueError, match="must be a real number"):
        LossScaler().set_scale(True)
    numpy_scaler = LossScaler(init_scale=np.float32(1024.0))  # any real number type
    numpy_scaler.set_scale(np.float32(8.0))
    assert numpy_scaler.get_scale() == 8.0


def test_bad_checkpoint_states_name_the_key():
    scaler = LossScaler.from_preset("deepspeed")
    state = scaler.state_dict()
    cases = [
        ({k: v for k, v in state.items() if k != "scale"}, "lacks 'scale'"),
        ({**state, "growth_tracker": 1000}, r"growth_tracker=1000 .* \[-1, 999\]"),
        ({**state, "hysteresis_tracker": -1}, r"hysteresis_tracker=-1 .* \[0, 2\]"),
        ({**state, "steps_skipped": 5}, r"steps_skipped=5 .* \[0, 0\]"),
        ({**state, "config": {**state["config"], "hysteresis": 0}}, "hysteresis=0"),
        ({**state, "config": {**state["config"], "extra": 1}}, r"unknown keys \['extra'\]"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            scaler.load_state_dict(bad)
        assert scaler.state_dict() == state
    torch_state = torch.amp.GradScaler("cpu").state_dict()
    del torch_state["growth_interval"]
    with pytest.raises(ValueError, match="lacks 'growth_interval'"):
        GradScaler("cpu").load_state_dict(torch_state)


# -- GradScaler where other libraries look (issue 13 section 5) ----------------------------------
def test_grad_scaler_is_a_torch_grad_scaler_with_its_private_attributes():
    ours, ref = GradScaler("cpu", growth_interval=7), torch.amp.GradScaler("cpu", growth_interval=7)
    assert isinstance(ours, torch.amp.GradScaler)
    names = ("_enabled", "_device", "_init_scale", "_growth_factor", "_backoff_factor",
             "_growth_interval", "_init_growth_tracker", "_scale", "_growth_tracker")
    assert {n: getattr(ours, n) for n in names} == {n: getattr(ref, n) for n in names}
    models = [_mlp(), _mlp()]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for scaler, model, opt in zip((ours, ref), models, opts):
        _scaled_backward(scaler, model)
        scaler.unscale_(opt)
        assert scaler._per_optimizer_states[id(opt)]["stage"].name == "UNSCALED"
        assert scaler._scale.item() == 2.0**16 and scaler._growth_tracker.item() == 0
        found = scaler._unscale_grads_(opt, torch.ones(()), torch.zeros(()), False)
        assert list(found) == [torch.device("cpu")] and found[torch.device("cpu")].item() == 0
        assert scaler._check_inf_per_device(opt)[torch.device("cpu")].item() == 0
    with pytest.raises(AttributeError, match=r"_scale is read-only .* update\(new_scale=...\)"):
        ours._scale = torch.tensor(1.0)
    # What Lightning / accelerate / training scripts do with a torch scaler now reaches ours.
    saved = ref.state_dict()
    if isinstance(ours, torch.amp.GradScaler):
        ours.load_state_dict({**saved, "scale": 1024.0})
    assert ours.get_scale() == 1024.0


def _raised(action):
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return error
    raise AssertionError("no error was raised")


def _misuses():
    def no_update_before_scale(cls):
        cls("cpu").update()

    def update_without_step(cls):
        scaler = cls("cpu")
        _scaled_backward(scaler, _mlp())
        scaler.update()

    def step_without_grads(cls):
        scaler = cls("cpu")
        scaler.scale(torch.ones(()))
        scaler.step(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))

    def bad_new_scale_tensor(cls):
        scaler = cls("cpu")
        model, opt = _mlp(), None
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _scaled_backward(scaler, model)
        scaler.step(opt)
        scaler.update(new_scale=torch.ones(2))

    def pickle_mid_iteration(cls):
        scaler = cls("cpu")
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _scaled_backward(scaler, model)
        scaler.unscale_(opt)
        pickle.dumps(scaler)

    return {
        "growth_factor": lambda cls: cls("cpu", growth_factor=1.0),
        "backoff_factor": lambda cls: cls("cpu", backoff_factor=1.0),
        "update_before_scale": no_update_before_scale,
        "update_without_step": update_without_step,
        "step_without_grads": step_without_grads,
        "bad_new_scale_tensor": bad_new_scale_tensor,
        "pickle_mid_iteration": pickle_mid_iteration,
        "empty_state": lambda cls: cls("cpu").load_state_dict({}),
        "scale_an_int": lambda cls: cls("cpu").scale(3),
    }


@pytest.mark.parametrize("misuse", list(_misuses()))
def test_misuse_raises_torchs_exception_type(misuse):
    action = _misuses()[misuse]
    theirs = _raised(lambda: action(torch.amp.GradScaler))
    ours = _raised(lambda: action(GradScaler))
    assert isinstance(ours, type(theirs)), (type(ours), type(theirs))


def test_pickle_is_small_device_free_and_resumes():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", growth_interval=2)
    for _ in range(3):
        _scaled_backward(scaler, model)
        scaler.step(opt)
        scaler.update()
    data = pickle.dumps(scaler)
    assert len(data) < 1024  # torch's: ~332 B; ours ~590 B; with the telemetry rings ~60 KB
    assert b"_rebuild_tensor" not in data and b"storage" not in data  # no device-bound tensor
    loaded = pickle.loads(data)
    assert isinstance(loaded, torch.amp.GradScaler)
    assert loaded.state_dict() == scaler.state_dict()
    for each in (scaler, loaded):
        _scaled_backward(each, model)
        each.step(opt)
        each.update()
    assert loaded.state_dict() == scaler.state_dict()
    pending = LossScaler()
    pending.unscale_([torch.ones(2)])
    with pytest.raises(RuntimeError, match="only be pickled between iterations"):
        pickle.dumps(pending)


# -- presets replay the frameworks' recorded trajectories (issue 13 section 6) ------------------
TRAJECTORIES = json.loads(
    (pathlib.Path(__file__).parent / "data" / "scaler_trajectories.json").read_text()
)


def _decode_moves(moves: str) -> str:
    """'3.+-' -> '...+-' (the run-length code of tests/data/scaler_trajectories.json)."""
    return re.sub(r"(\d+)(\D)", lambda m: m.group(2) * int(m.group(1)), moves)


def _replayed_moves(scaler: LossScaler, stream: dict) -> str:
    overflow = set(stream["overflow_steps"])
    before = scaler.get_scale()
    for step in range(stream["steps"]):
        scaler.update(1.0 if step in overflow else 0.0)
    after = [*scaler.telemetry().scale_history[1:], scaler.get_scale()]
    moves = []
    for scale in after:
        moves.append({2 * before: "+", before / 2: "-", before: "."}.get(scale, "?"))
        before = scale
    return "".join(moves)


@pytest.mark.parametrize("preset", sorted({c["preset"] for c in TRAJECTORIES["cases"]}))
def test_presets_replay_recorded_framework_trajectories(preset):
    # Recorded by running each framework's own scaler code (header of the JSON file).
    cases = [c for c in TRAJECTORIES["cases"] if c["preset"] == preset]
    assert len(cases) >= 15 and preset in TRAJECTORIES["header"]["sources"]
    for case in cases:
        stream = TRAJECTORIES["streams"][case["stream"]]
        scaler = LossScaler.from_preset(
            preset,
            **case["settings"],
            framework_exact=True,
            check_interval=0,
            locate_nonfinite=False,
            history_len=stream["steps"],
        )
        assert _replayed_moves(scaler, stream) == _decode_moves(case["moves"]), case


def test_recorded_deepspeed_versions_differ_where_the_presets_do():
    # DeepSpeed <= 0.17.0 grows one step earlier than >= 0.17.1 (stable_interval), and
    # FP16_Optimizer has no hysteresis: the recorded data tells the three apart.
    by_key = {}
    for case in TRAJECTORIES["cases"]:
        key = (case["stream"], json.dumps({**case["settings"], "hysteresis": None}))
        by_key.setdefault(key, {})[case["preset"]] = case["moves"]
    pairs = [v for v in by_key.values() if "deepspeed" in v and "deepspeed-legacy" in v]
    assert any(v["deepspeed"] != v["deepspeed-legacy"] for v in pairs)
    assert preset_config("deepspeed-legacy").growth_tracker_start == 0
    assert preset_config("deepspeed").growth_tracker_start == -1
    assert preset_config("deepspeed-fp16-optimizer").hysteresis == 1


@pytest.mark.parametrize("preset", ["apex", "deepspeed", "megatron", "deepspeed-fp16-optimizer"])
def test_floor_error_is_the_deliberate_difference_from_the_framework(preset):
    # 30 overflows in a row from the start: the frameworks clamp at their minimum (DeepSpeed
    # with raise_error_at_min_scale=False); mixprec adds an error, off with framework_exact.
    stream = {"steps": 30, "overflow_steps": list(range(30))}
    settings = {"init_scale": 2.0**8, "min_scale": 4.0 if preset == "apex" else 1.0}
    exact = LossScaler.from_preset(preset, **settings, framework_exact=True, check_interval=0)
    _replayed_moves(exact, stream)
    assert exact.get_scale() == settings["min_scale"]
    safe = LossScaler.from_preset(preset, **settings, check_interval=0)
    with pytest.raises(ScaleFloorError, match="30 steps in a row overflowed"):
        _replayed_moves(safe, stream)


@pytest.mark.parametrize("preset", ["torch", "apex", "deepspeed", "megatron"])
def test_host_bound_on_the_scale_never_exceeds_it(preset):
    # The check of unscaled values is skipped while a host-side lower bound on the scale is
    # >= 1; the bound must never be above the real scale, whatever the steps did.
    rng = random.Random(5)
    floor = 0.0 if preset in ("torch", "apex") else 1.0
    scaler = LossScaler.from_preset(
        preset, init_scale=8.0, min_scale=floor, growth_interval=3, check_interval=7
    )
    for step in range(120):
        found = torch.tensor(float(rng.random() < 0.4))
        if step % 37 == 36:
            scaler.update(found, new_scale=rng.choice([0.25, 4.0]))
        else:
            scaler.update(found if step % 2 else float(found))
        if step == 50:  # a checkpoint loaded between an update and the next unscale
            scaler.load_state_dict({**scaler.state_dict(), "scale": 0.5})
        if step % 3 == 0 or step == 50:
            scaler.scale_state.may_be_below_one()  # takes in the host copy of the scale
        assert scaler.scale_state.lower_bound <= scaler.get_scale(), step
    assert scaler.scale_state.may_be_below_one() == (scaler.get_scale() < 1.0)  # exact on CPU


# -- composition: each part owns its data (issue 19) ---------------------------------------------
SCALING_DIR = pathlib.Path(mixprec.__file__).parent / "scaling"


def test_loss_scaler_holds_its_parts_instead_of_inheriting_them():
    from mixprec.scaling.record import ScalerRecord
    from mixprec.scaling.scale_state import ScaleState

    assert LossScaler.__bases__ == (object,)  # no mixin reading the scaler's private state
    assert GradScaler.__bases__ == (torch.amp.GradScaler,)
    scaler = LossScaler(init_scale=4.0, growth_interval=2, history_len=8)
    for found in (0.0, 1.0, 0.0, 0.0):
        scaler.update(torch.tensor(found))
    record, state = scaler._record, scaler.scale_state
    assert isinstance(record, ScalerRecord) and isinstance(state, ScaleState)
    # What the scaler answers is what its parts hold.
    assert (scaler.steps, int(scaler.steps_skipped)) == (record.steps, record.skipped_count())
    assert scaler.get_scale() == state.values()[0] == 4.0  # 4 -> 4 -> 2 -> 2 -> 4
    assert scaler.telemetry().scale_history == record.read(4.0).scale_history
    own = {"_scale", "_log", "_steps", "_pending", "_low", "_mirror", "_init_state"}
    assert not own & set(vars(scaler)), "the parts' data lives on the scaler again"


def _private_reads(path: pathlib.Path, allowed) -> list[str]:
    """`owner._name` reads (and getattr(owner, "_name")) in ``path`` where ``allowed(owner)``
    is false; ``owner`` is the source text of the object read from."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            owner, name = ast.unparse(node.value), node.attr
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "getattr":
            if len(node.args) < 2 or not isinstance(node.args[1], ast.Constant):
                continue
            owner, name = ast.unparse(node.args[0]), str(node.args[1].value)
        else:
            continue
        if name.startswith("_") and not name.startswith("__") and not allowed(owner):
            found.append(f"{path.name}:{node.lineno} {owner}.{name}")
    return found


def test_no_object_reaches_into_a_scalers_private_state():
    # Outside mixprec.scaling: nothing reads a private attribute of a scaler. Inside it,
    # each object reads only its own (self) and torch's private API: the parts are held
    # and asked through their public methods, not inherited or reached into.
    own = ("self", "cls", "torch", "param.grad", "optimizer")  # the last three: torch's API
    offenders = []
    for path in sorted(SCALING_DIR.parent.rglob("*.py")):
        if SCALING_DIR in path.parents:
            offenders += _private_reads(path, lambda o: o in own)
        else:
            offenders += _private_reads(path, lambda o: "scaler" not in o.rsplit(".")[-1].lower())
    assert offenders == []


def test_scaling_modules_stay_under_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in SCALING_DIR.glob("*.py")}
    assert max(sizes.values()) < 400, sizes


def test_state_bytes_follow_the_formula_and_reach_the_memory_estimate():
    from mixprec.memory.parts import _scaler_bytes
    from mixprec.recipes import get_recipe

    scaler = LossScaler(history_len=16)
    assert scaler.nbytes == 0  # nothing is allocated before the first use
    scaler.materialize("cpu")
    tensors = [scaler.scale, scaler.growth_tracker, scaler.hysteresis_tracker]
    assert scaler.nbytes == 12 + 13 * 16 + 8
    assert sum(t.numel() * t.element_size() for t in tensors) == 12
    assert LossScaler.disabled().nbytes == 0
    # The memory estimate counts the default scaler's tensors (4096 steps of record).
    assert _scaler_bytes(get_recipe("fp16-mixed")) == 12 + 13 * 4096 + 8


def test_materialize_creates_the_state_once_where_asked():
    scaler = LossScaler(init_scale=8.0)
    assert scaler.scale_state.scale is None and scaler.scale_state.initial == (8.0, 0, 1)
    scale = scaler.materialize(torch.device("meta"))
    assert scale.device.type == "meta" and scaler.materialize("cpu") is scale  # made once
    assert LossScaler(device="cpu").materialize("meta").device.type == "cpu"  # device wins


def test_floor_check_still_sees_steps_after_loading_an_earlier_checkpoint():
    scaler = LossScaler.from_preset(
        "megatron", init_scale=1.0, hysteresis=1, floor_patience=3, check_interval=0
    )
    start = scaler.state_dict()
    for _ in range(20):  # clean steps, all checked
        scaler.update(0.0)
    scaler.check()
    scaler.load_state_dict(start)  # back to step 0
    for _ in range(5):
        scaler.update(1.0)  # overflows at the floor (1.0)
    with pytest.raises(ScaleFloorError, match=r"5 steps in a row overflowed \(steps 0 to 4\)"):
        scaler.check()


@pytest.mark.parametrize(
    "module",
    [
        "checks", "grad_scaler", "kernels", "loss_scaler", "optimizer_checks", "record", "rules",
        "scale_state", "torch_face",
    ],
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"mixprec.scaling.{module}")
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_a_step_without_gradients_finds_nothing():
    """No parameter got a gradient (all None): nothing is non-finite, nothing is refused."""
    from mixprec.precision.nonfinite import NonFiniteGuard

    scaler = LossScaler.from_preset("torch")
    found = scaler.unscale_([None, None])
    assert found.item() == 0.0
    assert NonFiniteGuard("skip", check_grads=True).check([None]).item() == 0.0
