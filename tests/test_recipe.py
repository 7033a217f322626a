"""Recipes: every bad recipe raises a RecipeError naming the file, line and field; every shipped recipe loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nsteer.errors import NsteerError, RecipeError
from nsteer.recipe import Recipe, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent

# (id, YAML text, line, field path, a fragment of the message)
BAD_RECIPES = [
    (
        "unknown-top-level-key",
        "name: x\ninstructions:\n  lowercase: {}\ninstrucions: {}\n",
        4,
        "instrucions",
        "unknown key 'instrucions'. Allowed here: name, model, prompts, instructions",
    ),
    (
        "unknown-nested-key",
        "name: x\nmodel:\n  id: foo\n  dtyp: float32\ninstructions:\n  lowercase: {}\n",
        4,
        "model.dtyp",
        "unknown key 'dtyp'. Allowed here: id, backend, dtype",
    ),
    (
        "unknown-key-in-steer-entry",
        "instructions:\n  lowercase: {}\nsteer:\n  - instruction: lowercase\n    layr: 3\n",
        5,
        "steer[0].layr",
        "unknown key 'layr'. Allowed here: instruction, layer, mode, weight, positions",
    ),
    (
        "unknown-key-in-instruction",
        "instructions:\n  lowercase:\n    phrasing: [a]\n",
        3,
        "instructions.lowercase.phrasing",
        "unknown key 'phrasing'. Allowed here: phrasings, check, category",
    ),
    (
        "weight-not-a-number",
        "instructions:\n  lowercase: {}\nsteer:\n  - instruction: lowercase\n    layer: 2\n    weight: big\n",
        6,
        "steer[0].weight",
        "valid number",
    ),
    (
        "weight-not-finite",
        "instructions:\n  lowercase: {}\nsteer:\n  - {instruction: lowercase, layer: 1, weight: .nan}\n",
        4,
        "steer[0].weight",
        "finite",
    ),
    (
        "negative-layer",
        "instructions:\n  lowercase: {}\nsteer:\n  - instruction: lowercase\n    layer: -1\n",
        5,
        "steer[0].layer",
        "layer must be 0 or more",
    ),
    (
        "layer-not-a-number",
        "instructions:\n  lowercase: {}\nsteer:\n  - {instruction: lowercase, layer: middle}\n",
        4,
        "steer[0].layer",
        "valid integer",
    ),
    (
        "unknown-instruction-in-steer",
        "instructions:\n  lowercase: {}\nsteer:\n"
        "  - {instruction: lowercase, layer: 1}\n  - {instruction: uppercase, layer: 1}\n",
        5,
        "steer[1].instruction",
        "'uppercase' is not one of the recipe's instructions (lowercase)",
    ),
    (
        "missing-prompt-file",
        "prompts:\n  base: nothere.jsonl\ninstructions:\n  lowercase: {}\n",
        2,
        "prompts.base",
        "Prompt file not found",
    ),
    (
        "negative-max-new-tokens",
        "instructions:\n  lowercase: {}\ngeneration:\n  max_new_tokens: -1\n",
        4,
        "generation.max_new_tokens",
        "greater than 0 (got -1)",
    ),
    (
        "zero-batch-size",
        "instructions:\n  lowercase: {}\nextraction: {batch_size: 0}\n",
        3,
        "extraction.batch_size",
        "greater than 0 (got 0)",
    ),
    (
        "zero-generation-batch-size",
        "instructions:\n  lowercase: {}\ngeneration:\n  batch_size: 0\n",
        4,
        "generation.batch_size",
        "greater than 0 (got 0)",
    ),
    (
        "bad-mode",
        "instructions:\n  lowercase: {}\nsteer:\n  - instruction: lowercase\n    mode: multiply\n",
        5,
        "steer[0].mode",
        "'set', 'add' or 'ablate' (got 'multiply')",
    ),
    (
        "bad-positions",
        "instructions:\n  lowercase: {}\nsteer:\n  - instruction: lowercase\n    positions: middle\n",
        5,
        "steer[0].positions",
        "'all', 'prompt' or 'generated' (got 'middle')",
    ),
    (
        "top-level-list",
        "- instructions\n- steer\n",
        1,
        "(top level)",
        "a recipe must be a mapping of sections, got list",
    ),
    (
        "split-fractions-over-one",
        "prompts:\n  split:\n    train: 0.8\n    validation: 0.3\n    test: 0.2\ninstructions:\n  lowercase: {}\n",
        2,
        "prompts.split",
        "must not exceed 1",
    ),
    (
        "negative-split-fraction",
        "prompts:\n  split: {train: 0.5, validation: -0.1}\ninstructions:\n  lowercase: {}\n",
        2,
        "prompts.split.validation",
        "greater than or equal to 0",
    ),
    (
        "unknown-builtin-instruction",
        "name: x\ninstructions:\n  lowercse: {}\n",
        3,
        "instructions.lowercse.phrasings",
        "Unknown built-in instruction 'lowercse'",
    ),
    (
        "unknown-builtin-phrasings",
        "instructions:\n  mine:\n    phrasings: builtin:nope\n",
        3,
        "instructions.mine.phrasings",
        "Unknown built-in instruction 'nope'",
    ),
    (
        "bad-check-id",
        "instructions:\n  mine:\n    phrasings: [Be brief.]\n    check: change_case:lowercase\n",
        4,
        "instructions.mine.check",
        "Did you mean 'change_case:english_lowercase'?",
    ),
    (
        "bad-check-kwarg",
        "instructions:\n  mine:\n    phrasings: [Be brief.]\n"
        "    check: {id: length_constraints:number_sentences, kwargs: {relation: fewer, num_sentences: 2}}\n",
        4,
        "instructions.mine.check",
        "relation='fewer' is invalid",
    ),
    (
        "phrasings-empty-list",
        "instructions:\n  mine:\n    phrasings: []\n    check: change_case:english_lowercase\n",
        3,
        "instructions.mine.phrasings",
        "non-empty list",
    ),
    (
        "dtype-not-allowed",
        "model:\n  id: x\n  dtype: float64\ninstructions:\n  lowercase: {}\n",
        3,
        "model.dtype",
        "'float32', 'bfloat16' or 'float16' (got 'float64')",
    ),
    (
        "bad-device",
        "model: {device: gpu}\ninstructions:\n  lowercase: {}\n",
        1,
        "model.device",
        "(got 'gpu')",
    ),
    (
        "no-instructions",
        "name: x\n",
        1,
        "instructions",
        "this field is required",
    ),
    (
        "empty-instructions",
        "name: x\ninstructions: {}\n",
        2,
        "instructions",
        "at least 1 item",
    ),
    (
        "bad-name",
        "name: my recipe\ninstructions:\n  lowercase: {}\n",
        1,
        "name",
        "(got 'my recipe')",
    ),
    (
        "negative-seed",
        "instructions:\n  lowercase: {}\nprompts: {seed: -3}\n",
        3,
        "prompts.seed",
        "greater than or equal to 0",
    ),
    (
        "transfer-not-a-boolean",
        "instructions:\n  lowercase: {}\ntransfer: maybe\n",
        3,
        "transfer",
        "valid boolean",
    ),
    (
        "steer-not-a-list",
        "instructions:\n  lowercase: {}\nsteer: {instruction: lowercase}\n",
        3,
        "steer",
        "valid list",
    ),
    (
        "missing-vector-file",
        "instructions:\n  lowercase: {}\nsteer:\n  - {instruction: lowercase, layer: 1, vector: nothere.safetensors}\n",
        4,
        "steer[0].vector",
        "vector file 'nothere.safetensors' not found",
    ),
    (
        "duplicate-key",
        "instructions:\n  lowercase: {}\nsteer: []\ninstructions:\n  uppercase: {}\n",
        4,
        "instructions",
        "appears twice (first on line 1)",
    ),
    (
        "duplicate-nested-key",
        "instructions:\n  lowercase: {}\nsteer:\n  - instruction: lowercase\n    weight: 2\n    weight: 3\n",
        6,
        "steer[0].weight",
        "appears twice (first on line 5)",
    ),
]


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "text, line, field, fragment", [case[1:] for case in BAD_RECIPES], ids=[case[0] for case in BAD_RECIPES]
)
def test_bad_recipe_names_file_line_and_field(tmp_path, text, line, field, fragment):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert message.startswith(f"{path}, line {line}, field {field}: "), message
    assert fragment in message
    assert "\n" not in message  # one paragraph
    assert error.value.exit_code == 2


def test_there_are_at_least_twelve_distinct_bad_recipes():
    assert len({case[0] for case in BAD_RECIPES}) == len(BAD_RECIPES) >= 12
    assert len({case[1] for case in BAD_RECIPES}) == len(BAD_RECIPES)


@pytest.mark.parametrize(
    "text, line, column",
    [
        ("name: x\ninstructions:\n  lowercase: {phrasings: [a, b}\n", 3, 31),
        ("name: x\ninstructions:\n  lowercase: {}\n   steer: []\n", 4, 4),
        ("instructions:\n\tlowercase: {}\n", 2, 1),
    ],
    ids=["unclosed-bracket", "bad-indentation", "tab"],
)
def test_yaml_syntax_error_names_file_line_and_column(tmp_path, text, line, column):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert message.startswith(f"{path}, line {line}, column {column}: invalid YAML (")
    assert "Check indentation" in message


def test_layer_out_of_range_for_the_model(tmp_path):
    path = write(
        tmp_path,
        "instructions:\n  lowercase: {}\nsteer:\n"
        "  - {instruction: lowercase, layer: 3}\n  - instruction: lowercase\n    layer: 7\n",
    )
    recipe = load_recipe(path)  # the layer count is only known once the model is open
    recipe.check_layers(8)
    with pytest.raises(RecipeError) as error:
        recipe.check_layers(4)
    message = str(error.value)
    assert message.startswith(f"{path}, line 6, field steer[1].layer: layer 7 is out of range")
    assert "4 layers (0..3)" in message
    with pytest.raises(RecipeError, match=r"steer\[0\].layer: layer 3"):
        recipe.check_layers(3)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"], ids=["empty", "comment", "document-marker"])
def test_empty_recipe(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=re.escape(f"{path}: the recipe is empty")):
        load_recipe(path)


def test_scalar_recipe(tmp_path):
    path = write(tmp_path, "hello\n")
    with pytest.raises(RecipeError, match=re.escape(f"{path}, line 1, field (top level): a recipe must be a mapping")):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="Recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_recipe_that_is_not_text(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(RecipeError, match="not UTF-8 text"):
        load_recipe(path)


def test_relative_prompt_file_is_resolved_from_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "mine.jsonl").write_text('{"text": "Why is the sky blue?"}\n{"text": "Name a fruit."}\n')
    path = write(folder, "prompts:\n  base: mine.jsonl\ninstructions:\n  lowercase: {}\n")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    recipe = load_recipe(path)
    assert recipe.base_dir == folder


# --- good recipes -------------------------------------------------------------------------------------------------


SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def test_recipes_folder_is_not_empty():
    assert SHIPPED, "recipes/ should hold ready recipes"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.instructions
    for entry in recipe.steer:
        assert entry.instruction in recipe.instructions


def test_full_recipe_loads_with_its_values(tmp_path):
    (tmp_path / "phrasings.txt.yaml").write_text("- Be brief.\n- Answer in one sentence.\n")
    path = write(
        tmp_path,
        """
name: full_recipe
model: {id: some/model, backend: local, dtype: bfloat16, device: auto, timeout: 30}
prompts:
  base: builtin:base-v1
  split: {train: 0.5, validation: 0.25, test: 0.25}
  seed: 3
  max_pairs: 10
instructions:
  lowercase: {}
  short:
    phrasings: phrasings.txt.yaml
    check: {id: length_constraints:number_sentences, kwargs: {relation: less than, num_sentences: 3}}
    category: length
  brief:
    phrasings: [Be brief., Keep it short.]
    check: {id: length_constraints:number_words, kwargs: {relation: less than, num_words: 50}}
steer:
  - {instruction: lowercase, layer: auto, mode: set}
  - {instruction: short, layer: 2, mode: add, weight: -4.5, positions: generated}
transfer: true
extraction: {batch_size: 8}
generation: {max_new_tokens: 16, batch_size: 2, do_sample: true, temperature: 0.7, top_p: 0.9, seed: 1}
output: {dir: "out/{name}"}
demo_prompts: [Hi]
""",
    )
    recipe = load_recipe(path)
    assert recipe.model.dtype == "bfloat16" and recipe.prompts.seed == 3 and recipe.prompts.max_pairs == 10
    assert recipe.steer[0].layer == "auto" and recipe.steer[1].layer == 2 and recipe.steer[1].weight == -4.5
    assert recipe.steer[1].positions == "generated" and recipe.transfer is True
    assert recipe.output_dir == Path("out/full_recipe")
    assert recipe.base_dir == tmp_path


def test_bad_check_kwargs_in_a_full_recipe_are_refused(tmp_path):
    path = write(
        tmp_path,
        "instructions:\n  brief:\n    phrasings: [Be brief.]\n"
        "    check: {id: length_constraints:number_words, kwargs: {bogus: 1}}\n",
    )
    with pytest.raises(RecipeError, match=re.escape(f"{path}, line 4, field instructions.brief.check: ")):
        load_recipe(path)


# --- recipe_from_dict (the SDK path) ------------------------------------------------------------------------------


def test_recipe_from_dict_accepts_a_minimal_recipe():
    recipe = recipe_from_dict({"instructions": {"lowercase": {}}, "steer": [{"instruction": "lowercase", "layer": 1}]})
    assert recipe.steer[0].mode == "set" and recipe.model.id.startswith("embedded:")


@pytest.mark.parametrize(
    "data, field, fragment",
    [
        ([{"instructions": {}}], "(top level)", "got list"),
        (None, "(top level)", "got NoneType"),
        ("instructions: {}", "(top level)", "got str"),
        ({"instructions": {"lowercase": {}}, "bogus": 1}, "bogus", "unknown key 'bogus'"),
        (
            {"instructions": {"lowercase": {}}, "steer": [{"instruction": "lowercase", "weight": "big"}]},
            "steer[0].weight",
            "valid number",
        ),
        (
            {"instructions": {"lowercase": {}}, "steer": [{"instruction": "nope"}]},
            "steer[0].instruction",
            "'nope' is not one of",
        ),
        ({"instructions": {"lowercase": {}}, "model": {"dtype": "int8"}}, "model.dtype", "(got 'int8')"),
        (
            {"instructions": {"lowercase": {}}, "generation": {"max_new_tokens": 0}},
            "generation.max_new_tokens",
            "greater than 0",
        ),
        ({"instructions": {"nope": {}}}, "instructions.nope.phrasings", "Unknown built-in instruction 'nope'"),
        ({}, "instructions", "this field is required"),
    ],
)
def test_recipe_from_dict_errors_name_the_field(data, field, fragment):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(data)
    message = str(error.value)
    assert message.startswith(f"recipe, field {field}: "), message
    assert fragment in message


def test_recipe_error_is_an_nsteer_error():
    with pytest.raises(NsteerError):
        recipe_from_dict({"instructions": {}})


# --- several problems at once -------------------------------------------------------------------------------------


def test_every_problem_of_a_recipe_is_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        "name: x\nmodel:\n  dtyp: float32\ninstructions:\n  lowercase: {}\n"
        "steer:\n  - instruction: lowercase\n    weight: big\n    mode: push\n",
    )
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    first, second, third = error.value.problems
    assert first.startswith(f"{path}, line 3, field model.dtyp: unknown key 'dtyp'. Allowed here: id, backend")
    assert second == f"{path}, line 9, field steer[0].mode: Input should be 'set', 'add' or 'ablate' (got 'push')."
    assert third.startswith(f"{path}, line 8, field steer[0].weight: Input should be a valid number (got 'big')")
    assert str(error.value) == "\n".join(error.value.problems)


def test_every_missing_file_and_unknown_check_is_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        "prompts: {base: nowhere.jsonl}\ninstructions:\n  mine: {phrasings: gone.txt, check: no_such:check}\n"
        "steer:\n  - {instruction: mine, vector: lost.safetensors}\n",
    )
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    fields = [problem.split(": ")[0].split("field ")[1] for problem in error.value.problems]
    assert fields == ["prompts.base", "instructions.mine.phrasings", "instructions.mine.check", "steer[0].vector"]


def test_layers_beyond_the_model_are_all_reported(tmp_path):
    path = write(
        tmp_path,
        "instructions:\n  lowercase: {}\nsteer:\n  - {instruction: lowercase, layer: 5}\n"
        "  - {instruction: lowercase, layer: 7}\nsearch: {layers: [9]}\n",
    )
    with pytest.raises(RecipeError) as error:
        load_recipe(path).check_layers(4)
    assert [problem.split(": ")[0] for problem in error.value.problems] == [
        f"{path}, line 4, field steer[0].layer",
        f"{path}, line 5, field steer[1].layer",
        f"{path}, line 6, field search.layers",
    ]


# --- overrides: fields set from outside the file, judged by the same rules ------------------------------------------


def two_entry_recipe(tmp_path) -> Recipe:
    return load_recipe(
        write(
            tmp_path,
            "instructions:\n  lowercase: {}\n  length_0: {}\nsteer:\n"
            "  - {instruction: lowercase, layer: 3, mode: set}\n"
            "  - {instruction: length_0, layer: 4, mode: add, weight: 8.0}\n",
        )
    )


def test_overrides_replace_fields_and_keep_the_rest(tmp_path):
    from nsteer.recipe import Override, override_recipe

    recipe = two_entry_recipe(tmp_path)
    changed = override_recipe(
        recipe,
        [
            Override(("model", "dtype"), "bfloat16", "--dtype bfloat16"),
            Override(("prompts", "seed"), 7, "--seed 7"),
            Override(("steer", None, "layer"), 12, "--layer 12"),
            Override(("steer", "length_0", "weight"), -2.5, "--weight length_0=-2.5"),
        ],
    )
    assert changed.model.dtype == "bfloat16" and changed.prompts.seed == 7
    assert [(e.layer, e.mode, e.weight) for e in changed.steer] == [(12, "set", 1.0), (12, "add", -2.5)]
    assert "weight" not in changed.steer[0].model_fields_set  # an unset weight stays unset (layer: auto takes its own)
    assert changed.source == recipe.source and recipe.steer[0].layer == 3  # the original is untouched


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            (("model", "dtype"), "float64"),
            "--x: Input should be 'auto', 'float32', 'bfloat16' or 'float16' (got 'float64').",
        ),
        ((("model", "device"), "mps"), "--x: String should match pattern"),
        ((("steer", None, "weight"), float("nan")), "--x: Input should be a finite number (got nan)"),
        ((("steer", None, "layer"), -1), "--x: layer must be 0 or more (or auto)."),
        ((("steer", None, "layer"), "top"), "--x: Input should be a valid integer"),
        ((("steer", None, "mode"), "push"), "--x: Input should be 'set', 'add' or 'ablate' (got 'push')."),
        ((("steer", "uppercase", "mode"), "add"), "--x: no steer entry steers 'uppercase' (the entries steer: "),
        ((("generation", "max_new_tokens"), 10**6), "--x: Input should be less than or equal to 8192"),
        ((("prompts", "seed"), -3), "--x: Input should be greater than or equal to 0"),
    ],
)
def test_a_bad_override_is_refused_by_the_recipe_rules_naming_its_origin(tmp_path, override, message):
    from nsteer.recipe import Override, override_recipe

    with pytest.raises(RecipeError) as error:
        override_recipe(two_entry_recipe(tmp_path), [Override(*override, "--x")])
    assert len(error.value.problems) == 1 and error.value.problems[0].startswith(message), error.value.problems


def test_bad_overrides_and_file_problems_later_found_name_their_origin(tmp_path):
    from nsteer.recipe import Override, override_recipe

    recipe = two_entry_recipe(tmp_path)
    with pytest.raises(RecipeError) as error:
        override_recipe(
            recipe,
            [
                Override(("steer", "nobody", "layer"), 1, "--layer nobody=1"),
                Override(("model", "dtype"), "int8", "--dtype int8"),
                Override(("steer", None, "weight"), "heavy", "--weight heavy"),
            ],
        )
    assert [problem.split(":")[0] for problem in error.value.problems] == [
        "--layer nobody=1",
        "--dtype int8",
        "--weight heavy",  # once, though it set both entries
    ]
    changed = override_recipe(recipe, [Override(("steer", None, "layer"), 9, "--layer 9")])
    with pytest.raises(RecipeError) as error:
        changed.check_layers(5)  # known only once the model is open: still named by the option
    assert error.value.problems[0].startswith("--layer 9: layer 9 is out of range")


def test_an_override_on_a_recipe_without_steer_entries_says_so(tmp_path):
    from nsteer.recipe import Override, override_recipe

    recipe = load_recipe(write(tmp_path, "instructions:\n  lowercase: {}\n"))
    with pytest.raises(RecipeError, match="--layer 3: the recipe has no steer entries"):
        override_recipe(recipe, [Override(("steer", None, "layer"), 3, "--layer 3")])


# --- model.id: a relative path is resolved from the recipe's folder -------------------------------------------------


def test_relative_model_path_is_resolved_from_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    (folder / "models" / "tiny").mkdir(parents=True)
    (folder / "models" / "small.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    for written, expected in [
        ("models/tiny", folder / "models" / "tiny"),
        ("./models/tiny", folder / "models" / "tiny"),
        ("models/small.gguf", folder / "models" / "small.gguf"),
    ]:
        path = write(folder, f"model: {{id: {written}}}\ninstructions:\n  lowercase: {{}}\n")
        assert load_recipe(path).model_location == str(expected)
    for hub_id in ("embedded:smollm2-135m-instruct", "meta-llama/Llama-3.1-8B-Instruct", "gpt2"):
        path = write(folder, f"model: {{id: {hub_id}}}\ninstructions:\n  lowercase: {{}}\n")
        assert load_recipe(path).model_location == hub_id


@pytest.mark.parametrize("written", ["./models/none", "../none", "missing.gguf", "/no/such/folder"])
def test_a_model_path_that_is_not_there_is_refused_at_load(tmp_path, written):
    path = write(tmp_path, f"model: {{id: '{written}'}}\ninstructions:\n  lowercase: {{}}\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    (problem,) = error.value.problems
    assert problem.startswith(f"{path}, line 1, field model.id: '{written}' names no file or folder")
    if not written.startswith("/"):
        assert f"relative paths are resolved from {tmp_path}" in problem
