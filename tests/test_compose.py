"""Composition: a recipe's edits, composed, equal a plain forward-hook reference token for token; per-row batches equal
each row run alone; and composed-vs-alone evaluation scores exactly those generations.

The reference below shares no code with nsteer's edits or generation: it reads the vector files with
``safetensors`` directly, takes layers, modes and weights from the recipe dict, left-pads by itself, and registers
``register_forward_hook`` on the Hugging Face decoder blocks, applying DESIGN.md §2's formulas one after another in the
recipe's list order (``set``: h + w (z − h·u) u; ``add``: h + w u), then decodes greedily with Hugging Face
``generate`` (KV cache on, so each step after the prefill sees one new position).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from nsteer.errors import EvaluationError
from nsteer.evaluate.checkers import CheckSpec, check_all
from nsteer.evaluate.composition import composition_markdown, evaluate_composition, evaluate_recipe_composition
from nsteer.evaluate.inputs import instruction_edits, recipe_items
from nsteer.evaluate.quality import assess
from nsteer.generate import GenerationConfig, generate, generate_tokens
from nsteer.pipeline import compute_recipe_vectors, load_recipe_vectors, recipe_edits, vector_path
from nsteer.recipe import load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What are the pros and cons of working from home for a software engineer?",
    "Hi",
    "Describe the water cycle.",
    "Write a letter to a friend about a trip to the mountains.",
]
NEW_TOKENS = 16
CONFIG = GenerationConfig(max_new_tokens=NEW_TOKENS, batch_size=8)


def recipe_dict(tmp_path: Path, steer: list[dict]) -> dict:
    return {
        "name": "compose-test",
        "model": {"id": "tiny"},
        "prompts": {"base": "builtin:base-v1", "seed": 0, "max_pairs": 8},
        "instructions": {"lowercase": {}, "length_0": {}},
        "steer": steer,
        "output": {"dir": str(tmp_path / "out")},
        "generation": {"max_new_tokens": NEW_TOKENS, "batch_size": 8},
    }


@pytest.fixture(scope="module")
def vectors_dir(tmp_path_factory, tiny):
    """Vectors of both instructions computed once on the tiny llama."""
    folder = tmp_path_factory.mktemp("compose")
    recipe = recipe_from_dict(recipe_dict(folder, []))
    compute_recipe_vectors(recipe, tiny("llama"))
    return folder


def make_recipe(vectors_dir: Path, steer: list[dict]):
    return recipe_from_dict(recipe_dict(vectors_dir, steer))


# --- the reference ------------------------------------------------------------------------------------------------


def hook_generate(
    handle, prompts: Sequence[str], row_steer: Sequence[Sequence[dict[str, Any]]], files: dict[str, Path]
) -> list[list[int]]:
    """Greedy generation with each row's steer entries applied by forward hooks, in list order; new tokens per row."""
    hf_model, tokenizer = handle.hf_model, handle.tokenizer
    blocks = hf_model.get_submodule(handle.layers_path)
    raw = {name: load_file(str(path)) for name, path in files.items()}
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(len(s) for s in ids)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in ids])
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])

    def make_hook(layer: int):
        def hook(module, inputs, output):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            for row, entries in enumerate(row_steer):
                for entry in entries:  # sequential, in the recipe's list order
                    if entry["layer"] != layer:
                        continue
                    tensors = raw[entry["instruction"]]
                    u = tensors["directions"][layer].to(hidden.dtype)
                    z = float(tensors["mean_projections"][layer])
                    h = hidden[row]
                    if entry["mode"] == "set":
                        hidden[row] = h + entry["weight"] * (z - h @ u)[:, None] * u
                    else:
                        hidden[row] = h + entry["weight"] * u
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    layers = sorted({entry["layer"] for entries in row_steer for entry in entries})
    hooks = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        with torch.no_grad():
            output = hf_model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for row in range(len(prompts)):
        new = output[row, width:].tolist()
        rows.append(new[: new.index(eos)] if eos in new else new)
    return rows


def files_of(vectors_dir: Path, recipe) -> dict[str, Path]:
    return {name: vector_path(recipe, name) for name in ("lowercase", "length_0")}


SET = {"instruction": "lowercase", "mode": "set", "weight": 1.0}
ADD = {"instruction": "length_0", "mode": "add", "weight": 12.0}


def steer(entry: dict, layer: int) -> dict:
    return {**entry, "layer": layer, "positions": "all"}


# --- composed steering equals the hook reference ------------------------------------------------------------------


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param([steer(ADD, 1), steer(SET, 1)], id="same-layer-add-then-set"),
        pytest.param([steer(SET, 1), steer(ADD, 1)], id="same-layer-set-then-add"),
        pytest.param([steer(ADD, 3), steer(SET, 1)], id="different-layers-listed-late-first"),
    ],
)
def test_composed_recipe_equals_hook_reference(tiny, vectors_dir, entries):
    handle = tiny("llama")
    recipe = make_recipe(vectors_dir, entries)
    edits = recipe_edits(recipe, load_recipe_vectors(recipe, handle))
    assert [(e.name, e.layer, e.mode) for e in edits] == [(e["instruction"], e["layer"], e["mode"]) for e in entries]
    composed = generate_tokens(handle, PROMPTS, edits, config=CONFIG)
    expected = hook_generate(handle, PROMPTS, [entries] * len(PROMPTS), files_of(vectors_dir, recipe))
    assert composed == expected
    assert max(len(row) for row in composed) >= 12  # it really generated
    plain = hook_generate(handle, PROMPTS, [[]] * len(PROMPTS), {})
    assert composed != plain, "steering must change tokens, or the parity is vacuous"
    for single in entries:  # and both edits matter: the composition is neither edit alone
        alone = hook_generate(handle, PROMPTS, [[single]] * len(PROMPTS), files_of(vectors_dir, recipe))
        assert composed != alone, f"{single['instruction']} alone gives the same tokens as the composition"


def test_list_order_decides_at_a_shared_layer(tiny, vectors_dir):
    """The recipe's order is the order of application: add-then-set and set-then-add give different tokens."""
    handle = tiny("llama")
    first = make_recipe(vectors_dir, [steer(ADD, 1), steer(SET, 1)])
    second = make_recipe(vectors_dir, [steer(SET, 1), steer(ADD, 1)])
    a = generate_tokens(handle, PROMPTS, recipe_edits(first, load_recipe_vectors(first, handle)), config=CONFIG)
    b = generate_tokens(handle, PROMPTS, recipe_edits(second, load_recipe_vectors(second, handle)), config=CONFIG)
    assert a != b


# --- per-row batches ----------------------------------------------------------------------------------------------


def test_per_row_batch_equals_each_row_alone(tiny, vectors_dir):
    handle = tiny("llama")
    entries = [steer(SET, 1), steer(ADD, 3)]
    recipe = make_recipe(vectors_dir, entries)
    both = recipe_edits(recipe, load_recipe_vectors(recipe, handle))
    rows = [both, [], [both[0]], [both[1]]]  # composed, none, format alone, length alone
    row_steer = [entries, [], [entries[0]], [entries[1]]]
    batched = generate_tokens(handle, PROMPTS, row_edits=rows, config=CONFIG)
    files = files_of(vectors_dir, recipe)
    for row, prompt in enumerate(PROMPTS):
        alone = generate_tokens(handle, [prompt], rows[row], config=CONFIG)[0]
        assert batched[row] == alone, f"row {row}"
        assert batched[row] == hook_generate(handle, [prompt], [row_steer[row]], files)[0], f"row {row}"
    plain = hook_generate(handle, PROMPTS, [[]] * len(PROMPTS), {})
    assert batched[1] == plain[1]  # the row without edits is untouched by its neighbours' edits
    assert all(batched[row] != plain[row] for row in (0, 2, 3))


# --- composed vs alone evaluation ---------------------------------------------------------------------------------


def test_composition_evaluation_scores_the_right_generations(tiny, vectors_dir):
    handle = tiny("llama")
    recipe = make_recipe(vectors_dir, [steer(SET, 1), steer(ADD, 3)])
    vectors = load_recipe_vectors(recipe, handle)
    calls = []

    def recording_generator(handle, prompts, *, row_edits, config, progress=None):
        calls.append(len({tuple(id(e) for e in edits) for edits in row_edits}))
        return generate(handle, prompts, row_edits=row_edits, config=config)

    result = evaluate_recipe_composition(recipe, handle, vectors=vectors, limit=2, generator=recording_generator)
    assert calls == [3, 3]  # one batched generation per instruction, mixing three steering states per row
    composed = recipe_edits(recipe, vectors)
    alone = instruction_edits(recipe, vectors)
    assert result.instructions == ("lowercase", "length_0")
    for name in result.instructions:
        picked = [a for a in result.answers if a.instruction == name]
        assert len(picked) == 2 * 2 * 3  # prompts x (absent, present) x steering states
        for state, edits in (("unsteered", []), ("alone", list(alone[name])), ("composed", composed)):
            answers = [a for a in picked if a.steering == state]
            assert [a.answer for a in answers] == generate(handle, [a.prompt for a in answers], edits, config=CONFIG)
        for answer in picked:  # scores are the checkers' verdicts on those answers
            own = check_all((CheckSpec(*_check(name)),), answer.answer, answer.prompt)
            joint = check_all(
                (CheckSpec(*_check("lowercase")), CheckSpec(*_check("length_0"))), answer.answer, answer.prompt
            )
            assert answer.loose == own[0].loose and answer.joint_loose == all(r.loose for r in joint)
            quality = assess(answer.answer)  # degeneracy and hollowness do not depend on the prompt
            if answer.substantive:  # a substantive pass is a loose pass on an answer neither degenerate nor hollow
                assert answer.loose and quality.degenerate is None and quality.hollow is None
    rows = result.rows()
    assert len(rows) == 2 * 2 * 3 and all(row.n == 2 for row in rows)
    for row in rows:
        picked = [
            a
            for a in result.answers
            if (a.instruction, a.instruction_in_prompt, a.steering)
            == (row.instruction, row.instruction_in_prompt, row.steering)
        ]
        assert row.substantive == sum(a.substantive for a in picked) / len(picked) <= row.loose
    assert "| substantive |" in composition_markdown(result)
    assert result.to_dict()["composed"].startswith("lowercase@1 set")


def test_composition_counts_a_looping_pass_as_loose_but_not_substantive(tiny, vectors_dir):
    handle = tiny("llama")
    recipe = make_recipe(vectors_dir, [steer(SET, 1), steer(ADD, 3)])
    loop = "the cat sat on the mat " * 8  # all lowercase: the lowercase checker passes it

    def looping(handle, prompts, *, row_edits, config, progress=None):
        return [loop for _ in prompts]

    result = evaluate_recipe_composition(recipe, handle, limit=2, generator=looping)
    lowercase = [row for row in result.rows() if row.instruction == "lowercase"]
    assert lowercase and all(row.loose == 1.0 and row.substantive == 0.0 for row in lowercase)
    assert "| 1.00 (1.00) | 0.00 |" in composition_markdown(result)


def _check(name: str) -> tuple[str, dict]:
    from nsteer.prompts import builtin_instruction

    instruction = builtin_instruction(name)
    return instruction.check_id, dict(instruction.check_kwargs)


def test_composition_needs_two_steered_instructions(tiny, vectors_dir):
    handle = tiny("llama")
    recipe = make_recipe(vectors_dir, [steer(SET, 1)])
    vectors = load_recipe_vectors(recipe, handle)
    items = recipe_items(recipe, "test", 1)
    with pytest.raises(EvaluationError, match="at least two instructions"):
        evaluate_composition(handle, items, instruction_edits(recipe, vectors), recipe_edits(recipe, vectors))


def test_compose_format_length_recipe():
    recipe = load_recipe(REPO / "recipes" / "compose-format-length.yaml")
    entries = [(e.instruction, e.mode, e.layer) for e in recipe.steer]
    assert [e[:2] for e in entries] == [("lowercase", "set"), ("length_0", "add")]
    assert entries[0][2] != entries[1][2]  # two layers
