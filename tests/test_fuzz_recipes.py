"""Fuzzing the recipe loader: whatever YAML text or dict it is given, it returns a valid Recipe or raises RecipeError.

Four generators, each bounded (the file runs in a few seconds):

- arbitrary text, and text assembled from YAML-ish fragments (anchors, aliases, tags, tabs, flow collections,
  duplicate keys), written to a file and handed to ``load_recipe``;
- structured documents: random nested dicts / lists / scalars whose keys are mostly recipe field names, dumped as
  YAML and loaded from a file, and also handed to ``recipe_from_dict`` directly;
- mutations of a valid recipe: one value replaced (by a random scalar or structure), deleted, or a key added.

Nothing else may escape: no TypeError, KeyError, OSError, RuntimeError ... Any accepted recipe must satisfy the
cross-field rule (every steer entry names an instruction of the recipe).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nsteer.errors import RecipeError
from nsteer.recipe import (
    CheckSection,
    EvaluationSection,
    ExtractionSection,
    GenerationSection,
    InstructionSection,
    ModelSection,
    OutputSection,
    PromptsSection,
    Recipe,
    SearchSection,
    SplitSection,
    SteerEntry,
    load_recipe,
    recipe_from_dict,
)

FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

SECTIONS = (
    Recipe,
    ModelSection,
    PromptsSection,
    SplitSection,
    InstructionSection,
    CheckSection,
    SteerEntry,
    ExtractionSection,
    GenerationSection,
    SearchSection,
    EvaluationSection,
    OutputSection,
)
FIELD_NAMES = sorted({name for section in SECTIONS for name in section.model_fields})
BUILTIN_NAMES = ["lowercase", "uppercase", "length_0", "no_comma", "include:ocean", "title"]

# Strings a recipe author (or a typo) plausibly writes, including ones that once crashed the loader.
INTERESTING_STRINGS = [
    "auto",
    "set",
    "add",
    "ablate",
    "all",
    "prompt",
    "generated",
    "local",
    "ndif",
    "float32",
    "bfloat16",
    "cpu",
    "cuda:0",
    "builtin:base-v1",
    "builtin:lowercase",
    "builtin:",
    "builtin:nope",
    "include:",
    "include:ocean",
    "change_case:english_lowercase",
    "keywords:existence",
    "embedded:smollm2-135m-instruct",
    "runs/{name}",
    "~nosuchuser_nsteer/file.jsonl",
    "~",
    "a" * 300,
    "dir/" * 80 + "x",
    "/",
    ".",
    "..",
    "",
    " ",
    "\x00",
    "\t",
    "yes",
    "no",
    "on",
    "null",
    "1e400",
    "-0",
    "NaN",
    "{",
    "[",
    "'",
    '"',
    "#",
    "*alias",
    "&anchor",
    "!!python/object",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(INTERESTING_STRINGS),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES + BUILTIN_NAMES), st.text(max_size=8), st.integers(-3, 3))


def nested(leaves: st.SearchStrategy) -> st.SearchStrategy:
    """Random nested lists and dicts (keys mostly recipe field names) over ``leaves``."""
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
        max_leaves=24,
    )


values = nested(scalars)


def instruction_sections() -> st.SearchStrategy:
    phrasings = st.one_of(
        st.none(), st.lists(st.text(max_size=10), max_size=3), st.sampled_from(INTERESTING_STRINGS), values
    )
    check = st.one_of(
        st.none(),
        st.sampled_from(["change_case:english_lowercase", "keywords:existence", "nope:nope", ""]),
        st.fixed_dictionaries(
            {"id": st.sampled_from(["keywords:existence", "length_constraints:number_sentences"])},
            optional={
                "kwargs": st.dictionaries(
                    st.sampled_from(["keywords", "num_sentences", "relation", "x"]), values, max_size=3
                )
            },
        ),
        values,
    )
    return st.one_of(
        st.fixed_dictionaries({}, optional={"phrasings": phrasings, "check": check, "category": scalars}),
        values,
    )


def steer_entries(names: list[str]) -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {"instruction": st.sampled_from(names + ["missing"]) | scalars},
        optional={
            "layer": st.one_of(st.integers(-2, 40), st.just("auto"), scalars),
            "mode": st.sampled_from(["set", "add", "ablate", "sett"]) | scalars,
            "weight": st.floats(allow_nan=True, allow_infinity=True) | scalars,
            "positions": st.sampled_from(["all", "prompt", "generated", "every"]) | scalars,
            "vector": st.sampled_from(names + INTERESTING_STRINGS) | scalars,
        },
    )


SECTION_MODELS = {
    "model": ModelSection,
    "prompts": PromptsSection,
    "generation": GenerationSection,
    "search": SearchSection,
    "extraction": ExtractionSection,
    "evaluation": EvaluationSection,
    "output": OutputSection,
}


@st.composite
def recipe_dicts(draw) -> dict[str, Any]:
    """Recipe-shaped dicts: the right sections, with values that are often right and often not."""
    names = draw(
        st.lists(st.sampled_from(BUILTIN_NAMES) | st.text(min_size=1, max_size=6), min_size=0, max_size=3, unique=True)
    )
    data: dict[str, Any] = {"instructions": {name: draw(instruction_sections()) for name in names}}
    if draw(st.booleans()):
        data["steer"] = draw(st.lists(steer_entries(names), max_size=3))
    for section, model in SECTION_MODELS.items():
        if draw(st.integers(0, 2)) == 0:
            own_keys = st.sampled_from(sorted(model.model_fields)) | st.sampled_from(FIELD_NAMES)
            data[section] = draw(
                st.dictionaries(own_keys, st.sampled_from(INTERESTING_STRINGS) | values, max_size=4) | values
            )
    for key in ("name", "transfer", "demo_prompts"):
        if draw(st.integers(0, 3)) == 0:
            data[key] = draw(values)
    if draw(st.integers(0, 4)) == 0:
        data[draw(keys)] = draw(values)
    return data


VALID = {
    "name": "fuzz",
    "model": {"id": "embedded:smollm2-135m-instruct", "dtype": "float32", "device": "cpu"},
    "prompts": {
        "base": "builtin:base-v1",
        "seed": 0,
        "max_pairs": 8,
        "split": {"train": 0.6, "validation": 0.2, "test": 0.2},
    },
    "instructions": {
        "lowercase": {},
        "mine": {
            "phrasings": ["Answer in French.", "Reply in French."],
            "check": {"id": "language:response_language", "kwargs": {"language": "fr"}},
        },
    },
    "steer": [
        {"instruction": "lowercase", "layer": 3, "mode": "set", "weight": 1.0, "positions": "all"},
        {"instruction": "mine", "layer": "auto", "mode": "add", "vector": "lowercase"},
    ],
    "generation": {"max_new_tokens": 8, "batch_size": 2},
    "search": {"layers": [1, 2], "weights": [2.0]},
    "demo_prompts": ["Hi"],
}


def paths_of(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key / index path in a nested structure."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths_of(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += paths_of(value, prefix + (index,))
    return found


PATHS = paths_of(VALID)


@st.composite
def mutated_recipes(draw) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        candidates = paths_of(data)
        if not candidates:
            break
        path = draw(st.sampled_from(candidates))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        else:
            parent.append(draw(values))
    return data


def check_outcome(call) -> Recipe | None:
    """Run ``call``: a Recipe or a RecipeError with a one-paragraph message; anything else fails the test."""
    try:
        recipe = call()
    except RecipeError as error:
        message = str(error)
        assert message.strip(), "a RecipeError must say what is wrong"
        assert "\n\n" not in message
        return None
    assert isinstance(recipe, Recipe)
    for entry in recipe.steer:  # the cross-field rule held
        assert entry.instruction in recipe.instructions
        assert math.isfinite(entry.weight)
        assert entry.layer == "auto" or (isinstance(entry.layer, int) and entry.layer >= 0)
    assert recipe.instructions
    return recipe


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


def test_the_valid_base_recipe_loads(recipe_file) -> None:
    assert isinstance(recipe_from_dict(copy.deepcopy(VALID)), Recipe)
    recipe_file.write_text(yaml.safe_dump(VALID))
    assert load_recipe(recipe_file).steer[1].vector == "lowercase"


@FUZZ
@given(text=st.text(max_size=300))
def test_arbitrary_text(recipe_file, text) -> None:
    recipe_file.write_text(text, encoding="utf-8")
    check_outcome(lambda: load_recipe(recipe_file))


YAML_FRAGMENTS = [
    "name: x",
    "instructions:",
    "  lowercase: {}",
    "  lowercase:",
    "    phrasings: [a, b]",
    "    check: nope",
    "steer:",
    "  - {instruction: lowercase, layer: 2}",
    "  - instruction: lowercase",
    "    layer: yes",
    "    weight: .inf",
    "model: {id: embedded:smollm2-135m-instruct}",
    "model:",
    "  dtype: float64",
    "prompts: {base: nope.jsonl}",
    "base: &a {x: 1}",
    "other: *a",
    "<<: *a",
    "merged: {<<: *a}",
    "? [a, b]\n: c",
    "? {a: 1}\n: c",
    "tag: !!python/object:os.system {}",
    "bin: !!binary aGk=",
    "date: 2024-01-01",
    "big: 1e400",
    "\tindented: tab",
    "- top level list item",
    "...",
    "---",
    "%YAML 1.1",
    "key: 'unterminated",
    'key: "\\x00"',
    "dup: 1",
    "dup: 2",
    "instructions: [a, b]",
    "instructions: ~",
    "search: {layers: []}",
    "generation: {max_new_tokens: 0}",
    "name: ../../etc",
    "name: " + "n" * 300,
    "&x y: *x",
    "instructions: {x: {phrasings: ~nosuchuser_nsteer/p.txt}}",
    "prompts: {base: " + "b" * 300 + "}",
]


@FUZZ
@given(lines=st.lists(st.sampled_from(YAML_FRAGMENTS) | st.text(max_size=20), min_size=1, max_size=12))
def test_yaml_fragments(recipe_file, lines) -> None:
    recipe_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    check_outcome(lambda: load_recipe(recipe_file))


@FUZZ
@given(document=st.dictionaries(st.sampled_from(FIELD_NAMES) | keys, values, max_size=6) | values)
def test_structured_yaml_documents(recipe_file, document) -> None:
    try:
        text = yaml.safe_dump(document, allow_unicode=True)
    except yaml.YAMLError:
        assume(False)
    recipe_file.write_text(text, encoding="utf-8")
    check_outcome(lambda: load_recipe(recipe_file))
    check_outcome(lambda: recipe_from_dict(document))


@FUZZ
@given(data=recipe_dicts())
def test_recipe_shaped_dicts(recipe_file, data) -> None:
    check_outcome(lambda: recipe_from_dict(data))
    recipe_file.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    check_outcome(lambda: load_recipe(recipe_file))


@FUZZ
@given(data=mutated_recipes())
def test_mutations_of_a_valid_recipe(data) -> None:
    check_outcome(lambda: recipe_from_dict(data))


path_strings = st.one_of(
    st.text(alphabet="ab~/. -_:\x00\u00e9\\", max_size=30),
    st.builds(
        lambda part, count: part * count,
        st.sampled_from(["a", "dir/", "~nosuchuser_nsteer/", "../", "\u00e9"]),
        st.integers(1, 300),
    ),
    st.builds(
        lambda head, tail: head + tail,
        st.sampled_from(["~", "~nosuchuser_nsteer/", "/", "./", "builtin:", "include:"]),
        st.text(max_size=12),
    ),
)
STRING_FIELDS = [
    ("prompts", "base"),
    ("instructions", "mine", "phrasings"),
    ("steer", 1, "vector"),
    ("name",),
    ("output", "dir"),
    ("model", "id"),
    ("instructions", "mine", "check", "id"),
    ("evaluation", "reference_model"),
]


@FUZZ
@given(field=st.sampled_from(STRING_FIELDS), text=path_strings)
def test_path_like_strings_in_a_valid_recipe(field, text) -> None:
    """Only a recipe that is otherwise valid reaches the file and name checks, so fuzz those fields one at a time."""
    data = copy.deepcopy(VALID)
    data.setdefault("output", {})
    data.setdefault("evaluation", {})
    parent = data
    for part in field[:-1]:
        parent = parent[part]
    parent[field[-1]] = text
    check_outcome(lambda: recipe_from_dict(data))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            {"instructions": {"x": {"phrasings": ["a"]}}, "prompts": {"base": "a" * 300}}, id="base-name-too-long"
        ),
        pytest.param(
            {"instructions": {"x": {"phrasings": ["a"]}}, "prompts": {"base": "~nosuchuser_nsteer/x.jsonl"}},
            id="base-unknown-home",
        ),
        pytest.param({"instructions": {"x": {"phrasings": "~nosuchuser_nsteer/p.txt"}}}, id="phrasings-unknown-home"),
        pytest.param(
            {
                "instructions": {"lowercase": {}},
                "steer": [{"instruction": "lowercase", "vector": "~nosuchuser_nsteer/v"}],
            },
            id="vector-unknown-home",
        ),
        pytest.param(
            {"instructions": {"lowercase": {}}, "steer": [{"instruction": "lowercase", "vector": "v" * 300}]},
            id="vector-name-too-long",
        ),
        pytest.param({"instructions": {"lowercase": {}}, "name": "n" * 300}, id="name-too-long"),
        pytest.param(
            {"instructions": {"lowercase": {}}, "steer": [{"instruction": "lowercase", "layer": True}]}, id="bool-layer"
        ),
        pytest.param({"instructions": {"lowercase": {}}, "generation": {"max_new_tokens": True}}, id="bool-count"),
        pytest.param(
            {"instructions": {"lowercase": {}}, "steer": [{"instruction": "lowercase", "weight": "8"}]},
            id="string-weight",
        ),
        pytest.param({"instructions": {"include:": {}}}, id="include-no-word"),
    ],
)
def test_inputs_that_once_crashed_or_slipped_through(data) -> None:
    """Found by the fuzzers above (or beside them): each must be a RecipeError now, not a crash or silent coercion."""
    with pytest.raises(RecipeError):
        recipe_from_dict(data)


def test_a_file_that_is_not_utf8_text(recipe_file, tmp_path) -> None:
    binary = tmp_path / "phrasings.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage\xd0")
    with pytest.raises(RecipeError, match="phrasings"):
        recipe_from_dict({"instructions": {"x": {"phrasings": str(binary)}}})
    with pytest.raises(RecipeError, match="prompts.base"):
        recipe_from_dict({"instructions": {"x": {"phrasings": ["a"]}}, "prompts": {"base": str(binary)}})
