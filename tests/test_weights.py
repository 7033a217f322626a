"""Weights stay finite in the model's dtype: checked in the SDK (Edit, edit_from_vector, generate) and in recipes.

A weight that overflows turns every activation after the edit into inf and NaN: the answers come back empty and
the run exits 0. The reference for "overflows" is torch.finfo of the model's dtype.
"""

from __future__ import annotations

import pytest
import torch

from nsteer.edits import Edit, edit_from_vector
from nsteer.errors import ArgumentError, NsteerError, RecipeError
from nsteer.generate import GenerationConfig, generate
from nsteer.limits import LARGEST_FINITE
from nsteer.recipe import recipe_from_dict
from nsteer.vectors import SteeringVector, VectorMetadata


def unit(width: int = 64) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.ones(width), dim=0)


def test_the_dtype_table_is_torchs_own():
    for name, largest in LARGEST_FINITE.items():
        if name != "auto":
            assert largest == torch.finfo(getattr(torch, name)).max
    # auto opens bfloat16 or float32: a weight must fit both
    assert LARGEST_FINITE["auto"] == min(torch.finfo(torch.bfloat16).max, torch.finfo(torch.float32).max)


@pytest.mark.parametrize(
    "changes",
    [
        {"weight": float("nan")},
        {"weight": float("inf")},
        {"weight": True},
        {"target": float("-inf")},
        {"layer": -1},
        {"layer": 1.5},
        {"mode": "multiply"},
        {"positions": "end"},
        {"direction": torch.ones(2, 64)},
        {"direction": torch.ones(64, dtype=torch.long)},
        {"direction": torch.full((64,), float("nan"))},
    ],
)
def test_an_edit_refuses_what_it_cannot_apply(changes):
    settings = {"layer": 1, "direction": unit(), "mode": "add", "weight": 2.0, **changes}
    with pytest.raises(ArgumentError) as raised:
        Edit(**settings)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, NsteerError)


def test_edit_from_vector_refuses_a_nan_weight(tiny):
    handle = tiny("llama")
    metadata = VectorMetadata("0", handle.model_id, "", "", "LlamaForCausalLM", 64, 4, "shout")
    vector = SteeringVector(unit().repeat(4, 1), torch.ones(4), torch.ones(4), metadata)
    with pytest.raises(ArgumentError, match="weight must be a finite number, got nan"):
        edit_from_vector(vector, layer=1, mode="add", weight=float("nan"))
    assert edit_from_vector(vector, layer=1, mode="add", weight=3).weight == 3.0


@pytest.mark.parametrize(
    ("dtype", "weight"), [(torch.float16, 70_000.0), (torch.float32, 1e39), (torch.bfloat16, 1e39)]
)
def test_generation_refuses_a_weight_that_overflows_the_models_dtype(tiny, dtype, weight):
    handle = tiny("llama", dtype=dtype)
    edit = Edit(layer=1, direction=unit(), mode="add", weight=weight, name="loud")
    assert torch.isinf(torch.tensor(weight, dtype=dtype))  # the reference: the weight is inf in that dtype
    with pytest.raises(ArgumentError, match=f"Edit 'loud' has weight .* overflows the model's {str(dtype)[6:]}"):
        generate(handle, ["Hi"], [edit], config=GenerationConfig(max_new_tokens=2))
    largest = torch.finfo(dtype).max / 2
    safe = Edit(layer=1, direction=unit(), mode="add", weight=largest, name="loud")
    generate(handle, ["Hi"], [safe], config=GenerationConfig(max_new_tokens=2))  # finite: accepted (if unwise)


def test_a_set_edit_whose_target_overflows_is_refused(tiny):
    handle = tiny("llama", dtype=torch.float16)
    edit = Edit(layer=1, direction=unit(), mode="set", weight=1000.0, target=500.0, name="high")
    with pytest.raises(ArgumentError, match="overflows the model's float16"):
        generate(handle, ["Hi"], [edit], config=GenerationConfig(max_new_tokens=2))


@pytest.mark.parametrize(
    ("dtype", "weight", "accepted"),
    [("float32", 1.0e308, False), ("float16", 70000.0, False), ("float16", 60000.0, True), ("bfloat16", 1e38, True)],
)
def test_recipe_weights_must_fit_the_models_dtype(dtype, weight, accepted):
    data = {
        "model": {"dtype": dtype},
        "instructions": {"lowercase": {}},
        "steer": [{"instruction": "lowercase", "layer": 1, "mode": "add", "weight": weight}],
    }
    if accepted:
        assert recipe_from_dict(data).steer[0].weight == weight
    else:
        with pytest.raises(RecipeError, match=f"field steer\\[0\\].weight: .* overflows the model's {dtype}"):
            recipe_from_dict(data)
    data["steer"][0]["weight"] = 1.0
    data["search"] = {"weights": [1.0, weight]}
    if not accepted:
        with pytest.raises(RecipeError, match=f"field search.weights: a weight overflows the model's {dtype}"):
            recipe_from_dict(data)
