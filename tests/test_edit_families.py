"""Gate, clamp, skip-first, layer blocks and centered directions: steered generation equals the plain forward-hook
reference of ``test_generate`` token for token (fp32, a batch of unequal prompts, KV cache on), each option does what
its formula says, and bad values are refused with a message that says what to use.

The reference applies the options in plain PyTorch, one row and one edit at a time: the gate compares the last prompt
token's float32 projection at the prefill with the threshold and skips the row's edit for the whole generation when it
is not below; the clamp replaces the change ``d`` by ``min(d, max(bound - h.u, 0))``; skip-first zeroes the change on
the row's first real token at the prefill.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_generate import CONFIG, LAYER, MANY_PROMPTS, PROMPTS, hook_generate, unit_vector
from test_vectors import make_vector

from nsteer.edits import Edit, EditOptions, compile_plan, mean_vector, vector_edits
from nsteer.errors import NsteerError
from nsteer.extract import chat_token_ids
from nsteer.generate import generate_tokens

FAMILIES = ("llama", "gpt2")


def last_token_projections(handle, prompts, layer: int, direction: torch.Tensor) -> list[float]:
    """``h.v`` at each prompt's last token after block ``layer``, unsteered, each prompt alone (no padding)."""
    captured = []
    block = handle.hf_model.get_submodule(handle.layers_path)[layer]
    hook = block.register_forward_hook(lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o)[0, -1]))
    try:
        with torch.no_grad():
            for prompt in prompts:
                handle.hf_model(input_ids=torch.tensor([chat_token_ids(handle.tokenizer, prompt)]))
    finally:
        hook.remove()
    return [float(state.float() @ direction) for state in captured]


# --- parity with the hook reference -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_gate_steers_only_the_prompts_whose_last_token_projects_below_it(tiny, family):
    handle = tiny(family)
    detector = unit_vector(handle.hidden_size, 40)
    projections = last_token_projections(handle, PROMPTS, LAYER, detector)
    low, high = sorted(projections)[:2]
    assert high - low > 1e-2  # a threshold between them is far from both
    add = Edit(layer=LAYER, direction=unit_vector(handle.hidden_size, 2), mode="add", weight=8.0)
    gated = dataclasses.replace(add, gate=(low + high) / 2, gate_direction=detector)
    tokens = generate_tokens(handle, PROMPTS, [gated], config=CONFIG)
    assert tokens == hook_generate(handle, PROMPTS, [[gated]] * len(PROMPTS))
    steered = generate_tokens(handle, PROMPTS, [add], config=CONFIG)
    plain = generate_tokens(handle, PROMPTS, [], config=CONFIG)
    opened = projections.index(low)
    assert steered[opened] != plain[opened]  # the edit acts where the gate lets it
    for row in range(len(PROMPTS)):
        assert tokens[row] == (steered[row] if row == opened else plain[row])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_clamp_caps_the_lift_and_a_bound_out_of_reach_changes_nothing(tiny, family):
    handle = tiny(family)
    u = unit_vector(handle.hidden_size, 2)
    add = Edit(layer=LAYER, direction=u, mode="add", weight=8.0)
    projections = last_token_projections(handle, PROMPTS, LAYER, u)
    capped = dataclasses.replace(add, bound=max(projections) + 2.0)  # some room, less than the full weight
    tokens = generate_tokens(handle, PROMPTS, [capped], config=CONFIG)
    assert tokens == hook_generate(handle, PROMPTS, [[capped]] * len(PROMPTS))
    steered = generate_tokens(handle, PROMPTS, [add], config=CONFIG)
    plain = generate_tokens(handle, PROMPTS, [], config=CONFIG)
    assert tokens != steered and tokens != plain
    out_of_reach = dataclasses.replace(add, bound=1e6)
    assert generate_tokens(handle, PROMPTS, [out_of_reach], config=CONFIG) == steered
    closed = dataclasses.replace(add, bound=-1e6)  # every projection is above it already: no room to lift
    assert generate_tokens(handle, PROMPTS, [closed], config=CONFIG) == plain


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_first_leaves_each_rows_first_token_alone(tiny, family):
    handle = tiny(family)
    strong = Edit(layer=LAYER, direction=unit_vector(handle.hidden_size, 1), mode="set", target=8.0)
    skipping = dataclasses.replace(strong, skip_first=True)
    tokens = generate_tokens(handle, PROMPTS, [skipping], config=CONFIG)
    assert tokens == hook_generate(handle, PROMPTS, [[skipping]] * len(PROMPTS))
    # Causal attention: the first real token's state one block later depends on that token alone, so with skip-first
    # it is the unsteered state (each prompt run alone through the plain model), and without it the edit moves it.
    skipped, moved = prefill_states(handle, [skipping]), prefill_states(handle, [strong])
    block = handle.hf_model.get_submodule(handle.layers_path)[LAYER + 1]
    encoded = [chat_token_ids(handle.tokenizer, prompt) for prompt in PROMPTS]
    by_length = sorted(range(len(PROMPTS)), key=lambda i: (len(encoded[i]), i))  # the batch's row order
    for row, ids in enumerate(encoded[i] for i in by_length):
        captured = []
        hook = block.register_forward_hook(
            lambda m, i, o, found=captured: found.append(o[0] if isinstance(o, tuple) else o)
        )
        try:
            with torch.no_grad():
                handle.hf_model(input_ids=torch.tensor([ids]))
        finally:
            hook.remove()
        plain = captured[0][0, 0]
        assert torch.allclose(skipped[row, -len(ids)], plain, atol=1e-5)
        assert not torch.allclose(moved[row, -len(ids)], plain, atol=1e-2)


def prefill_states(handle, edits) -> torch.Tensor:
    """The block after the edited one's output at the prefill ``[B, T, H]`` of nsteer's generation of PROMPTS."""
    captured = []
    block = handle.hf_model.get_submodule(handle.layers_path)[LAYER + 1]
    hook = block.register_forward_hook(lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o).clone()))
    try:
        generate_tokens(handle, PROMPTS, edits, config=dataclasses.replace(CONFIG, max_new_tokens=2))
    finally:
        hook.remove()
    return captured[0]


def mixed_rows(handle) -> list[list[Edit]]:
    """Eight rows mixing gates, clamps and skip-first with plain edits, two slots in some rows, two layers."""
    width = handle.hidden_size
    u, v, w = unit_vector(width, 21), unit_vector(width, 22), unit_vector(width, 23)
    projections = last_token_projections(handle, MANY_PROMPTS, LAYER, v)
    middle = sorted(projections)[len(projections) // 2]
    return [
        [Edit(layer=1, direction=u, mode="add", weight=8.0, gate=middle, gate_direction=v)],
        [],
        [Edit(layer=1, direction=v, mode="set", target=7.0, positions="prompt", gate=middle)],
        [Edit(layer=1, direction=u, mode="add", weight=9.0, bound=2.0, skip_first=True)],
        [
            Edit(layer=1, direction=u, mode="add", weight=6.0, gate=middle, gate_direction=v, positions="generated"),
            Edit(layer=1, direction=w, mode="set", target=-4.0, skip_first=True),
        ],
        [Edit(layer=1, direction=u, mode="add", weight=8.0, gate=middle, gate_direction=v, bound=1.0)],
        [
            Edit(layer=2, direction=w, mode="add", weight=9.0, skip_first=True, positions="prompt"),
            Edit(layer=1, direction=v, mode="set", weight=0.5, target=9.0, bound=0.0),
        ],
        [Edit(layer=1, direction=u, mode="add", weight=8.0)],
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_many_rows_with_gates_clamps_and_skips_equal_the_hook_reference(tiny, family):
    handle = tiny(family)
    rows = mixed_rows(handle)
    tokens = generate_tokens(handle, MANY_PROMPTS, row_edits=rows, config=CONFIG)
    assert tokens == hook_generate(handle, MANY_PROMPTS, rows)
    plain = generate_tokens(handle, MANY_PROMPTS, [], config=CONFIG)
    assert tokens[1] == plain[1]
    assert sum(tokens[row] != plain[row] for row in range(len(rows))) >= 4


def test_the_plan_holds_gates_bounds_and_skips_per_row():
    width = 8
    u, v = unit_vector(width, 1), unit_vector(width, 2)
    rows = [
        [Edit(layer=3, direction=u, mode="add", weight=2.0, gate=-1.5, gate_direction=v, bound=4.0)],
        [Edit(layer=3, direction=u, mode="add", weight=2.0, skip_first=True)],
    ]
    (layer,) = compile_plan(rows)
    assert layer.directions.shape == (2, width)  # the gate's direction is stored with the edit directions
    assert torch.equal(layer.directions[layer.gate_index[0, 0]], v)
    assert layer.gate[0].tolist() == [-1.5, math.inf] and layer.bound[0].tolist() == [4.0, math.inf]
    assert layer.skip_first[0].tolist() == [0.0, 1.0]
    payload = layer.payload()
    assert payload["gated"] and payload["clamped"] and payload["skips"]
    (plain,) = compile_plan([[Edit(layer=3, direction=u, mode="add", weight=2.0)]])
    assert not (plain.payload()["gated"] or plain.payload()["clamped"] or plain.payload()["skips"])


# --- a vector's edits: blocks, gate and clamp statistics, centered directions ---------------------------------------


def test_a_block_splits_the_weight_evenly_over_its_layers():
    vector = make_vector(layers=6)
    absolute = vector_edits(vector, layer=1, mode="add", weight=9.0, positions="prompt", options=EditOptions(block=3))
    assert [edit.layer for edit in absolute] == [1, 2, 3]
    assert [edit.weight for edit in absolute] == [3.0, 3.0, 3.0]
    relative = vector_edits(
        vector, layer=2, mode="add", weight=0.0, weight_relative=2.0, positions="all", options=EditOptions(block=2)
    )
    assert [edit.weight for edit in relative] == pytest.approx([float(vector.norms[2]), float(vector.norms[3])])
    for edit, layer in zip(relative, (2, 3)):
        assert torch.equal(edit.direction, vector.directions[layer])
    with pytest.raises(NsteerError, match="ends at layer 6; the model has layers 0..5. Start the block at layer 3"):
        vector_edits(vector, layer=4, mode="add", weight=1.0, positions="all", options=EditOptions(block=3))


def test_gate_and_clamp_come_from_the_training_statistics():
    vector = make_vector(layers=4)
    (edit,) = vector_edits(
        vector, layer=2, mode="add", weight=5.0, positions="prompt", options=EditOptions(gate=0.5, clamp=0.25)
    )
    z, norm = float(vector.mean_projections[2]), float(vector.norms[2])
    assert edit.gate == pytest.approx(z - 0.5 * norm)  # midway between the means with and without the instruction
    assert edit.bound == pytest.approx(z + 0.25 * norm)
    assert torch.equal(edit.gate_direction, vector.directions[2])
    imported = make_vector(layers=4, imported_from="control.gguf")
    with pytest.raises(NsteerError, match="carries no mean projection"):
        vector_edits(imported, layer=2, mode="add", weight=1.0, positions="all", options=EditOptions(gate=0.5))


def test_a_centered_direction_is_the_instructions_specific_part():
    vectors = [make_vector(layers=3, seed=seed) for seed in range(4)]
    center = mean_vector(vectors)
    own = vectors[1]
    (edit,) = vector_edits(
        own, layer=1, mode="add", weight=3.0, positions="prompt", options=EditOptions(centered=True, gate=0.5),
        center=center,
    )  # fmt: skip
    specific = own.directions[1] * own.norms[1] - torch.stack([v.directions[1] * v.norms[1] for v in vectors]).mean(0)
    assert torch.allclose(edit.direction, specific / specific.norm(), atol=1e-6)
    assert torch.equal(edit.gate_direction, own.directions[1])  # the gate still reads the instruction's own direction
    with pytest.raises(NsteerError, match="3 or more instructions, got 2"):
        mean_vector(vectors[:2])
    with pytest.raises(NsteerError, match="Use mode add"):
        vector_edits(own, layer=1, mode="set", weight=1.0, positions="all", options=EditOptions(centered=True),
                     center=center)  # fmt: skip
    with pytest.raises(NsteerError, match="needs the mean vector"):
        vector_edits(own, layer=1, mode="add", weight=1.0, positions="all", options=EditOptions(centered=True))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block": 0}, "block must be a whole number of layers, 1 or more"),
        ({"block": 2.0}, "block must be a whole number"),
        ({"gate": -0.1}, "gate must be a number from 0 to 1"),
        ({"gate": 1.5}, "gate must be a number from 0 to 1"),
        ({"gate": math.nan}, "gate must be a number from 0 to 1"),
        ({"clamp": math.inf}, "clamp must be a finite number"),
        ({"clamp": math.nan}, "clamp must be a finite number"),
        ({"gate": "0.5"}, "gate must be a number from 0 to 1"),
        ({"skip_first": 1}, "skip_first and centered must be true or false"),
        ({"clamp": 0.0, "centered": True}, "a centered direction has none"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(NsteerError, match=message):
        EditOptions(**options)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gate": math.nan}, "the gate must be a finite number"),
        ({"gate": -math.inf}, "the gate must be a finite number"),
        ({"bound": math.inf}, "the bound must be a finite number"),
        ({"gate": 1.0, "gate_direction": torch.ones(3)}, "the gate direction has shape"),
    ],
)
def test_bad_edit_thresholds_are_refused(change, message):
    with pytest.raises(NsteerError, match=message):
        Edit(layer=0, direction=unit_vector(8, 0), mode="add", **change)
