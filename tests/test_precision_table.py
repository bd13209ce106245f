"""What each recipe promises (the recipe table of README.md), checked after one step.

The expected values are written out here, one row per recipe, and are NOT derived from the
recipe object: a Precision that silently ran every recipe as fp32 fails every row but fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mixprec import Precision
from tests.conftest import RECIPE_NAMES

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@dataclass(frozen=True)
class Row:
    params: torch.dtype  # Linear weights after setup
    norms: torch.dtype  # LayerNorm weight after setup
    grad: torch.dtype  # gradient the optimizer reads (the master's for master recipes)
    master: torch.dtype | None  # dtype of the tensor the optimizer steps, when not the param
    state: torch.dtype  # Adam exp_avg
    compute: torch.dtype  # output dtype of a Linear under precision.autocast()
    loss_scaling: bool
    fp8: bool
    tf32: bool  # TF32 flags seen while backward runs


TABLE: dict[str, Row] = {
    "fp32": Row(F32, F32, F32, None, F32, F32, False, False, False),
    "tf32": Row(F32, F32, F32, None, F32, F32, False, False, True),
    "fp16-mixed": Row(F32, F32, F32, None, F32, F16, True, False, False),
    "bf16-mixed": Row(F32, F32, F32, None, F32, BF16, False, False, False),
    "fp16-master": Row(F16, F32, F32, F32, F32, F16, True, False, False),
    "bf16-master": Row(BF16, F32, F32, F32, F32, BF16, False, False, False),
    "bf16-true": Row(BF16, F32, BF16, None, BF16, BF16, False, False, False),
    "fp8-mixed": Row(F32, F32, F32, None, F32, BF16, False, True, False),
}


def test_table_covers_every_recipe():
    assert sorted(TABLE) == sorted(RECIPE_NAMES)


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipe_places_every_piece_of_state_where_the_table_says(name):
    want = TABLE[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Precision(name) as precision:
        model, opt = precision.setup(model, opt)
        first = next(m for m in model.modules() if isinstance(m, nn.Linear))
        norm = next(m for m in model.modules() if isinstance(m, nn.LayerNorm))
        x = torch.randn(8, 16)
        with precision.autocast():
            out = first(x.to(first.weight.dtype))  # the root model casts inputs itself
            loss = model(x).float().square().mean()
        seen_in_backward = []
        loss.register_hook(lambda g: seen_in_backward.append(_tf32_flags()))
        precision.backward(loss)
        model_grad = first.weight.grad  # None where it was accumulated into an fp32 master

        stepped = opt.param_groups[0]["params"][0]  # what the optimizer steps for first.weight
        grads_read = {}

        def read_grad(o, args, kwargs):
            grad = o.param_groups[0]["params"][0].grad
            if grad is not None:  # bf16-true has stepped its bf16 params itself by now
                grads_read["g"] = grad.dtype

        opt.register_step_pre_hook(read_grad)
        assert bool(precision.step(opt))
        assert first.weight.dtype == want.params
        assert norm.weight.dtype == want.norms
        if want.master is None:
            assert stepped is first.weight
        else:  # the master lives in the optimizer, not in the model
            assert stepped is not first.weight and stepped.dtype == want.master
            assert all(stepped is not p for p in model.parameters())
        # bf16-true steps AdamW itself (bf16 states); its grads are the model's own .grad
        assert grads_read.get("g", getattr(model_grad, "dtype", None)) == want.grad
        assert opt.state[stepped]["exp_avg"].dtype == want.state
        assert out.dtype == want.compute
        assert precision.scaler.enabled is want.loss_scaling
        if want.loss_scaling:
            assert precision.scaler.get_scale() > 1.0
        is_fp8 = any(type(m).__name__ == "Float8Linear" for m in model.modules())
        assert is_fp8 is want.fp8
        assert seen_in_backward == [(want.tf32, want.tf32)]
