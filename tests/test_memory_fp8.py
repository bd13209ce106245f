"""The memory planner counts the fp8 weight-cast policy that is chosen (Float8Config).

``recompute_weight_cast=False`` saves each fp8 layer's W in fp8 for backward (N·K bytes);
True (the default) recasts it in backward. Estimates are checked against
:func:`mixprec.memory.measure` on the CPU (allocator events), both settings.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mixprec.float8 import Float8Config, Float8Linear, convert_to_float8
from mixprec.memory import estimate, get_spec, measure
from mixprec.memory.fp8 import spec_linear_shapes
from mixprec.memory.specs import PRESETS
from mixprec.precision import Precision

SETTINGS = [True, False]


def _cfg(recompute: bool) -> Float8Config:
    return Float8Config(recompute_weight_cast=recompute)


@pytest.mark.parametrize("recompute", SETTINGS)
def test_traced_estimate_follows_the_chosen_weight_cast(recompute):
    from mixprec.bench.tasks import get_task

    task = get_task("mlp", "tiny")
    model, batch = task.build_model(), task.example_batch()
    probe = task.build_model()
    report = convert_to_float8(probe, config=_cfg(recompute))
    converted = sum(d.in_features * d.out_features for d in report.layers if d.converted)
    assert converted > 0
    optimizer = task.build_optimizer(model)
    cfg = _cfg(recompute)
    e = estimate(model, "fp8-mixed", optimizer=optimizer, batch=batch, loss_fn=task.loss,
                 fp8_config=cfg)  # fmt: skip
    m = measure(model, optimizer, "fp8-mixed", batch, steps=2, loss_fn=task.loss, fp8_config=cfg)
    assert all(layer.config == cfg for layer in model.modules() if isinstance(layer, Float8Linear))
    assert abs(e.total - m.peak) <= 0.01 * m.peak
    # the fp8 weights saved for backward: every converted W with False, none with True
    saved = e.fp8_copies - sum(b.nbytes for b in _fp8_buffers(model))
    assert saved == (0 if recompute else converted)


def _fp8_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, Float8Linear) for b in m.buffers()]


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=256, n_head=4)
    return cfg, transformers.GPT2LMHeadModel(cfg)


@pytest.mark.slow
def test_config_estimate_counts_the_saved_fp8_weights_as_measured():
    # GPT-2 from its config.json: 2 layers x (c_attn 256x768, c_proj 256x256, c_fc 256x1024,
    # c_proj 1024x256) converted; the LM head (vocab 50257, not a multiple of 16) is not.
    B, S = 4, 128
    runs = {}
    for recompute in SETTINGS:
        cfg, model = _gpt2()
        x = torch.randint(cfg.vocab_size, (B, S))
        fp8 = _cfg(recompute)
        e = estimate(cfg.to_dict(), "fp8-mixed", batch_size=B, seq_len=S, device="cpu",
                     fp8_config=fp8)  # fmt: skip
        m = measure(model, torch.optim.AdamW(model.parameters()), "fp8-mixed",
                    ({"input_ids": x, "labels": x}, None), 2, fp8_config=fp8)  # fmt: skip
        assert m.peak_phase == e.peak_phase == "backward"  # where the saved copies count
        assert 0.90 <= e.total / m.peak <= 1.10, (recompute, e.parts, m.breakdown)
        runs[recompute] = e, m
    weights = 2 * (256 * 768 + 256 * 256 + 2 * 256 * 1024)
    (e_re, m_re), (e_save, m_save) = runs[True], runs[False]
    assert m_save.peak - m_re.peak == weights  # measured: the saved fp8 copies of W
    assert e_save.total - e_re.total == weights
    assert e_save.fp8_copies - e_re.fp8_copies == weights


@pytest.mark.parametrize(("device", "upcast"), [("cuda", 0), ("cpu", 4)])
def test_recompute_counts_one_layers_cast_not_every_copy(device, upcast):
    # Without a batch nothing else is counted in backward: the transient is the cast of
    # the largest fp8 layer's W (1 B an element when recomputed; on a CPU the emulation
    # also upcasts it to float32, 4 B). The 3-wide layer is not converted.
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128), nn.Linear(128, 3))
    re = estimate(model, "fp8-mixed", device=device, fp8_config=_cfg(True))
    save = estimate(model, "fp8-mixed", device=device, fp8_config=_cfg(False))
    assert save.fp8_copies - re.fp8_copies == 256 * 512 + 512 * 128
    assert re.backward_transient == 256 * 512 * (1 + upcast)
    assert save.backward_transient == 256 * 512 * upcast
    assert estimate(model, "fp8-mixed", device=device).total == re.total  # the default
    # llama-2-7b: the saved copies are every Linear weight, the LM head's included
    re = estimate("llama-2-7b", "fp8-mixed", seq_len=4096, fp8_config=_cfg(True))
    save = estimate("llama-2-7b", "fp8-mixed", seq_len=4096, fp8_config=_cfg(False))
    linear = get_spec("llama-2-7b").param_counts().linear_weights
    assert save.fp8_copies - re.fp8_copies == linear


def test_bare_parameter_count_says_the_cast_is_not_counted():
    e = estimate(1_000_000, "fp8-mixed", fp8_config=_cfg(False))
    assert e.fp8_copies >= 1_000_000
    assert "not counted" in dict(e.formulas)["backward_transient"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_spec_linear_shapes_sum_to_the_linear_weights(name):
    spec = get_spec(name)
    shapes = spec_linear_shapes(spec)
    assert sum(k * n * c for k, n, c in shapes) == spec.param_counts().linear_weights


def test_fp8_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="'bf16-mixed' has none"):
        estimate("gpt2", "bf16-mixed", fp8_config=Float8Config())
    with pytest.raises(TypeError, match="Float8Config, got dict"):
        estimate("gpt2", "fp8-mixed", fp8_config={"recompute_weight_cast": False})
    model = nn.Sequential(nn.Linear(32, 32))
    convert_to_float8(model, config=_cfg(False))
    with pytest.raises(ValueError, match="already a Float8Linear"):
        estimate(model, "fp8-mixed", fp8_config=_cfg(True))


def test_precision_keeps_a_callers_fp8_conversion():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    convert_to_float8(model, config=_cfg(False), module_filter_fn=lambda m, name: name == "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "found no eligible nn.Linear" warning
        Precision("fp8-mixed").setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(model[0], Float8Linear) and model[0].config == _cfg(False)
    assert type(model[2]) is nn.Linear  # the caller's filter left it out: setup keeps that
