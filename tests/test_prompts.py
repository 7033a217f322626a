"""Prompt data: the built-in sets, seeded splits without leakage, user prompt files and their errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nsteer.errors import PromptDataError
from nsteer.evaluate.checkers import CheckSpec, validate_spec
from nsteer.prompts import (
    BasePrompt,
    builtin_instruction,
    builtin_instructions,
    load_base_prompts,
    load_phrasings,
    make_pairs,
    split_items,
    split_pairs,
)

FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}


@pytest.fixture(scope="module")
def builtin_base():
    return load_base_prompts("builtin:base-v1")


# --- built-in sets ------------------------------------------------------------------------------------------------


def test_builtin_base_set_has_at_least_300_unique_prompts(builtin_base):
    texts = [" ".join(p.text.lower().split()) for p in builtin_base]
    assert len(builtin_base) >= 300
    assert len(set(texts)) == len(texts)
    assert len({p.id for p in builtin_base}) == len(builtin_base)
    assert all(len(p.text) > 10 for p in builtin_base)


def test_builtin_base_prompts_carry_no_instruction(builtin_base):
    phrasings = {p.lower() for i in builtin_instructions().values() for p in i.phrasings}
    for prompt in builtin_base:
        assert not any(p in prompt.text.lower() for p in phrasings), prompt


def test_every_builtin_instruction_has_at_least_five_distinct_phrasings():
    instructions = builtin_instructions()
    assert {"lowercase", "uppercase", "no_comma", "json_format", "length_0", "length_4"} <= set(instructions)
    for name, instruction in instructions.items():
        assert len(set(instruction.phrasings)) >= 5, name
        assert len(set(instruction.phrasings)) == len(instruction.phrasings), name
        assert all(p.strip() == p and p for p in instruction.phrasings), name


def test_every_builtin_check_is_a_valid_ifeval_check():
    for _name, instruction in builtin_instructions().items():
        validate_spec(CheckSpec(instruction.check_id, dict(instruction.check_kwargs)))


def test_word_instructions_fill_in_the_word():
    instruction = builtin_instruction("include:zeppelin")
    assert instruction.check_id == "keywords:existence" and instruction.check_kwargs == {"keywords": ["zeppelin"]}
    assert len(instruction.phrasings) >= 5 and all("zeppelin" in p and "{word}" not in p for p in instruction.phrasings)


def test_unknown_builtin_instruction():
    with pytest.raises(PromptDataError, match="Unknown built-in instruction 'nope'.*lowercase"):
        builtin_instruction("nope")
    with pytest.raises(PromptDataError, match="Unknown built-in prompt set 'base-v9'"):
        load_base_prompts("builtin:base-v9")


# --- splits -------------------------------------------------------------------------------------------------------


def test_same_seed_same_split_different_seed_different(builtin_base):
    first = split_items(builtin_base, FRACTIONS, seed=0)
    again = split_items(builtin_base, FRACTIONS, seed=0)
    other = split_items(builtin_base, FRACTIONS, seed=1)
    assert first == again
    assert first.train != other.train and set(first.test) != set(other.test)


def test_no_base_prompt_in_two_splits_and_none_lost(builtin_base):
    split = split_items(builtin_base, FRACTIONS, seed=5)
    train, validation, test = ({p.id for p in part} for part in (split.train, split.validation, split.test))
    assert not train & validation and not train & test and not validation & test
    assert train | validation | test == {p.id for p in builtin_base}


@pytest.mark.parametrize(
    "fractions",
    [
        FRACTIONS,
        {"train": 0.8, "validation": 0.1, "test": 0.1},
        {"train": 0.5, "validation": 0.5, "test": 0.0},
        {"train": 0.5, "validation": 0.1, "test": 0.1},
    ],
)
def test_fractions_are_respected(builtin_base, fractions):
    n = len(builtin_base)
    split = split_items(builtin_base, fractions, seed=0)
    total = sum(fractions.values())  # fractions that sum to less than 1 are taken as proportions
    for name in ("validation", "test"):
        assert abs(len(split.part(name)) - n * fractions[name] / total) <= 1, name
    assert len(split.train) + len(split.validation) + len(split.test) == n


def test_small_sets_give_every_nonempty_split_an_item():
    split = split_items(list("abcde"), FRACTIONS, seed=0)
    assert all(len(split.part(name)) >= 1 for name in ("train", "validation", "test"))


def test_unknown_split_name():
    with pytest.raises(PromptDataError, match="Unknown split 'dev'"):
        split_items(list("abc"), FRACTIONS, 0).part("dev")


def test_pairs_never_leak_base_prompts_or_phrasings_across_splits(builtin_base):
    phrasings = builtin_instruction("lowercase").phrasings
    split = split_pairs(builtin_base, phrasings, FRACTIONS, seed=0)
    bases = [{pair.base_id for pair in split.part(name)} for name in ("train", "validation", "test")]
    assert not bases[0] & bases[1] and not bases[0] & bases[2] and not bases[1] & bases[2]
    used = [{pair.phrasing for pair in split.part(name)} for name in ("train", "validation", "test")]
    assert not used[0] & used[1] and not used[0] & used[2] and not used[1] & used[2]
    assert split_pairs(builtin_base, phrasings, FRACTIONS, seed=0) == split
    for pair in split.train:
        assert pair.with_instruction == f"{pair.base} {pair.phrasing}" and pair.without_instruction == pair.base


def test_make_pairs_uses_every_phrasing():
    prompts = [BasePrompt(f"b{i}", f"Question {i}?") for i in range(12)]
    pairs = make_pairs(prompts, ["A.", "B.", "C."], seed=0)
    assert [p.base_id for p in pairs] == [p.id for p in prompts]
    assert {p.phrasing for p in pairs} == {"A.", "B.", "C."}
    with pytest.raises(PromptDataError, match="at least one phrasing"):
        make_pairs(prompts, [], seed=0)


# --- user files ---------------------------------------------------------------------------------------------------


def test_user_jsonl_loads(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"id": "q1", "text": "  Why is the sky blue?  "})
        + "\n\n"
        + json.dumps({"prompt": "Name three rivers."})
        + "\n"
        + json.dumps("A bare string prompt.")
        + "\n",
        encoding="utf-8",
    )
    prompts = load_base_prompts(str(path))
    assert [p.text for p in prompts] == ["Why is the sky blue?", "Name three rivers.", "A bare string prompt."]
    assert prompts[0].id == "q1" and len({p.id for p in prompts}) == 3


def test_user_yaml_and_json_load(tmp_path):
    (tmp_path / "p.yaml").write_text("- Why is the sky blue?\n- {text: Name three rivers., id: r}\n")
    (tmp_path / "q.yaml").write_text("prompts:\n  - Why is the sky blue?\n")
    (tmp_path / "p.json").write_text(json.dumps([{"text": "Hi there"}]))
    assert [p.text for p in load_base_prompts("p.yaml", tmp_path)] == ["Why is the sky blue?", "Name three rivers."]
    assert load_base_prompts(str(tmp_path / "q.yaml"))[0].text == "Why is the sky blue?"
    assert load_base_prompts(str(tmp_path / "p.json"))[0].text == "Hi there"


def test_phrasings_from_a_file_and_inline(tmp_path):
    (tmp_path / "ph.jsonl").write_text('{"text": "Be brief."}\n{"text": "Keep it short."}\n')
    assert load_phrasings("ph.jsonl", tmp_path) == ("Be brief.", "Keep it short.")
    assert load_phrasings([" Be brief. "]) == ("Be brief.",)
    assert load_phrasings("builtin:lowercase") == builtin_instruction("lowercase").phrasings
    with pytest.raises(PromptDataError, match="empty"):
        load_phrasings([])


@pytest.mark.parametrize(
    "content, where, fragment",
    [
        ('{"text": "ok"}\n{"text": "broken"\n', "line 2", "not valid JSON"),
        ('{"text": "ok"}\n\n\n{"id": "x"}\n', "line 4", "missing a non-empty 'text'"),
        ('{"text": "ok"}\n{"text": "   "}\n', "line 2", "missing a non-empty 'text'"),
        ('{"text": "ok"}\n[1, 2]\n', "line 2", "missing a non-empty 'text'"),
        ('{"text": 3}\n', "line 1", "missing a non-empty 'text'"),
    ],
    ids=["bad-json", "missing-field-after-blank-lines", "blank-text", "not-an-object", "text-not-a-string"],
)
def test_bad_jsonl_names_the_line(tmp_path, content, where, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(PromptDataError) as error:
        load_base_prompts(str(path))
    assert str(error.value).startswith(f"{path}, {where}: ")
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    "name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("empty.yaml", ""), ("empty.json", "[]")]
)
def test_empty_prompt_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptDataError, match=re.escape(str(path))):
        load_base_prompts(str(path))


def test_bad_yaml_record_names_the_record(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("- fine\n- {text: also fine}\n- {foo: 1}\n")
    with pytest.raises(PromptDataError, match=re.escape(f"{path}, record 3: missing")):
        load_base_prompts(str(path))


def test_prompt_file_that_is_not_a_list(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("a: 1\n")
    with pytest.raises(PromptDataError, match="expected a list of prompts"):
        load_base_prompts(str(path))
    path.write_text("[unclosed\n")
    with pytest.raises(PromptDataError, match="cannot be parsed"):
        load_base_prompts(str(path))


def test_missing_prompt_file_and_duplicate_ids(tmp_path):
    with pytest.raises(PromptDataError, match="Prompt file not found"):
        load_base_prompts(str(tmp_path / "none.jsonl"))
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(PromptDataError, match="ids are not unique: a"):
        load_base_prompts(str(path))


def test_relative_paths_resolve_from_base_dir(tmp_path, monkeypatch):
    (tmp_path / "p.jsonl").write_text('{"text": "Hello?"}\n')
    monkeypatch.chdir(Path("/"))
    assert load_base_prompts("p.jsonl", tmp_path)[0].text == "Hello?"
