import dataclasses

import pytest
import torch

import mixprec as mp
from mixprec.recipes import RECIPES, Recipe, get_recipe

from .conftest import RECIPE_NAMES


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_str_round_trips(name):
    recipe = RECIPES[name]
    assert str(recipe) == name
    assert get_recipe(str(recipe)) is recipe
    assert get_recipe(recipe.to_string()) == recipe


def test_custom_recipe_round_trips_through_its_string():
    custom = RECIPES["bf16-master"].replace(name="mine", master_dtype=torch.float16)
    text = str(custom)
    assert "master=fp16" in text
    assert get_recipe(text) == custom


def test_table_matches_design():
    # (params, compute, master, grads, loss scaling) as in the README's recipe table
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    expected = {
        "fp32": (f32, None, None, f32, "none"),
        "tf32": (f32, None, None, f32, "none"),
        "fp16-mixed": (f32, f16, None, f32, "dynamic"),
        "bf16-mixed": (f32, bf16, None, f32, "none"),
        "fp16-master": (f16, f16, f32, f16, "dynamic"),
        "bf16-master": (bf16, bf16, f32, f32, "none"),
        "bf16-true": (bf16, bf16, None, bf16, "none"),
        "fp8-mixed": (f32, bf16, None, f32, "none"),
    }
    assert list(expected) == RECIPE_NAMES
    for name, row in expected.items():
        r = RECIPES[name]
        assert (r.param_dtype, r.compute_dtype, r.master_dtype, r.grad_dtype, r.loss_scaling) == row
    assert RECIPES["tf32"].allow_tf32 and not RECIPES["fp32"].allow_tf32
    assert RECIPES["bf16-true"].update == "kahan"
    assert RECIPES["fp8-mixed"].fp8 == "current"


def test_unknown_recipe_lists_the_choices():
    with pytest.raises(ValueError, match="unknown recipe 'fp17'.*'bf16-mixed'"):
        get_recipe("fp17")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"param_dtype": torch.int8}, "param_dtype"),
        ({"loss_scaling": "sometimes"}, "loss_scaling='sometimes'"),
        ({"scaler_preset": "keras"}, "scaler_preset='keras'"),
        ({"static_scale": 0.0}, "static_scale"),
        ({"update": "kahan"}, "only matters for 16-bit"),
        ({"fp8": "yes"}, "fp8='yes'"),
    ],
)
def test_bad_fields_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        Recipe("x", **changes)


def test_bad_string_names_the_key():
    with pytest.raises(ValueError, match="'color=red'"):
        get_recipe("params=fp32,color=red")


def test_recipe_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RECIPES["fp32"].param_dtype = torch.float16  # type: ignore[misc]


def test_public_api_exports_recipes():
    assert mp.get_recipe("bf16") is RECIPES["bf16-mixed"]
    assert len(mp.__all__) == len(set(mp.__all__))
