"""nsteer.fileio: bounded reads that say what stands at a path, YAML whose aliases cannot explode, atomic writes."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from nsteer.errors import FileError, PromptDataError, RecipeError
from nsteer.fileio import (
    MAX_ALIAS_NODES,
    MAX_LINE_CHARS,
    MAX_NESTING,
    STALE_TEMP_SECONDS,
    TEMP_SUFFIX,
    atomic_write,
    atomic_write_bytes,
    parse_json,
    parse_yaml,
    path_kind,
    read_text,
    text_lines,
)
from nsteer.prompts import load_base_prompts
from nsteer.recipe import load_recipe


def alias_bomb(levels: int, fan_out: int = 9) -> str:
    """The "billion laughs" document: each level lists the previous one ``fan_out`` times, by alias."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * fan_out)}]"]
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * fan_out)}]")
    return "\n".join(lines) + "\n"


def expanded_nodes(levels: int, fan_out: int = 9) -> int:
    """How many values the bomb's last level stands for once its aliases are expanded (an independent count)."""
    size = 1 + fan_out  # a0: the list and its scalars
    for _ in range(levels):
        size = 1 + fan_out * size
    return size


# ------------------------------------------------------------------------------------------------------------ YAML


def test_alias_bomb_is_refused_while_it_is_still_small():
    text = alias_bomb(9)  # about 500 bytes that would expand to 9**10 ~ 3.5e9 values
    assert len(text) < 600 and expanded_nodes(9) > 10**9
    with pytest.raises(yaml.YAMLError) as raised:
        parse_yaml(text)
    assert "aliases" in str(raised.value) and f"{MAX_ALIAS_NODES:,}" in str(raised.value)
    assert raised.value.problem_mark is not None  # the message can name the line


def test_aliases_within_the_bound_are_expanded_like_yaml_does():
    text = alias_bomb(3) + "shared: &p [Be brief., Answer briefly.]\nagain: *p\n"
    assert expanded_nodes(3) < MAX_ALIAS_NODES
    data, node = parse_yaml(text)
    assert data == yaml.safe_load(text)  # the reference: PyYAML's own safe loader
    assert node is not None and data["again"] == ["Be brief.", "Answer briefly."]


def test_the_alias_bound_counts_every_copy():
    """Exactly the bound is read, one copy more is refused: the count is the expanded size, not a guess."""
    below = f"a: &a [{', '.join(['x'] * 99)}]\nb: [{', '.join(['*a'] * (MAX_ALIAS_NODES // 100))}]\n"
    above = below.replace("b: [", "b: [*a, ")
    assert parse_yaml(below)[0]["b"][0][0] == "x"
    with pytest.raises(yaml.YAMLError, match="aliases"):
        parse_yaml(above)


@pytest.mark.parametrize(
    "text",
    [
        "a: &a [*a]\n",  # a list that contains itself
        "a: &a\n  b: *a\n",  # a mapping that contains itself
        "a: &a\n  - x\n  - {deeper: [*a]}\n",  # the cycle two levels down
    ],
)
def test_an_alias_to_a_node_that_contains_it_is_refused(text):
    with pytest.raises(yaml.YAMLError, match="endless cycle"):
        parse_yaml(text)


def test_nesting_beyond_the_bound_is_refused_before_composition():
    ok = "[" * MAX_NESTING + "]" * MAX_NESTING
    assert parse_yaml(ok)[0] is not None
    deep = "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)
    with pytest.raises(yaml.YAMLError, match=f"nested more than {MAX_NESTING} levels"):
        parse_yaml(deep)
    with pytest.raises(yaml.YAMLError, match="nested more than"):
        parse_yaml("[" * 50_000)  # what made the composer recurse past the interpreter's limit


def test_a_huge_integer_is_a_yaml_error_not_a_value_error():
    with pytest.raises(yaml.YAMLError, match="more than 4300 digits"):
        parse_yaml("seed: " + "9" * 5000 + "\n")


def test_python_tags_stay_refused():
    with pytest.raises(yaml.YAMLError):
        parse_yaml("a: !!python/object/apply:os.system [echo owned]\n")


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_alias_bomb_gets_a_recipe_error_naming_the_line(tmp_path):
    path = write_recipe(tmp_path, alias_bomb(9) + "instructions:\n  lowercase: {}\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml, line \d+, column \d+: invalid YAML \(its aliases"):
        load_recipe(path)


def test_recipe_alias_cycle_gets_a_recipe_error(tmp_path):
    path = write_recipe(tmp_path, "instructions: &a\n  lowercase: {}\n  again: *a\n")
    with pytest.raises(RecipeError, match="line 3.*endless cycle"):
        load_recipe(path)


def test_recipe_merge_keys_and_duplicate_detection_still_work(tmp_path):
    anchored = write_recipe(
        tmp_path,
        "name: merged\n"
        "instructions: {lowercase: {}}\n"
        "steer:\n"
        "  - &first {instruction: lowercase, mode: add, weight: 2.0, layer: 1}\n"
        "  - {<<: *first, layer: 2, weight: 3.0}\n"
        "  - {<<: *first, positons: prompt}\n",
    )
    with pytest.raises(RecipeError, match=r"line 6, field steer\[2\].positons: unknown key"):
        load_recipe(anchored)  # line numbers still point at what was written
    anchored.write_text(anchored.read_text().replace("positons", "positions"))
    recipe = load_recipe(anchored)
    settings = [(entry.layer, entry.weight, entry.mode, entry.positions) for entry in recipe.steer]
    assert settings == [(1, 2.0, "add", "all"), (2, 3.0, "add", "all"), (1, 2.0, "add", "prompt")]
    duplicate = write_recipe(tmp_path, "name: a\ninstructions:\n  lowercase: {}\nname: b\n")
    with pytest.raises(RecipeError, match="line 4, field name: the key 'name' appears twice"):
        load_recipe(duplicate)


def test_prompt_files_in_yaml_get_the_same_bounds(tmp_path):
    (tmp_path / "bomb.yaml").write_text(alias_bomb(9) + "prompts: [a]\n")
    with pytest.raises(PromptDataError, match="bomb.yaml: cannot be parsed.*aliases"):
        load_base_prompts("bomb.yaml", tmp_path)
    (tmp_path / "cycle.yaml").write_text("prompts: &p [*p]\n")
    with pytest.raises(PromptDataError, match="endless cycle"):
        load_base_prompts("cycle.yaml", tmp_path)


# ------------------------------------------------------------------------------------------------------------ JSON


def test_json_nested_too_deeply_is_a_value_error_with_a_message():
    with pytest.raises(ValueError) as raised:
        parse_json("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in raised.value.msg
    with pytest.raises(ValueError) as raised:
        parse_json('{"n": ' + "9" * 5000 + "}")
    assert "more than 4300 digits" in raised.value.msg
    with pytest.raises(json.JSONDecodeError):
        parse_json("{broken")
    assert parse_json('{"a": [1, 2]}') == {"a": [1, 2]}


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_prompt_files_nested_too_deeply(tmp_path, suffix):
    (tmp_path / f"deep{suffix}").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(PromptDataError, match="nested too deeply"):
        load_base_prompts(f"deep{suffix}", tmp_path)


def test_prompt_lines_and_prompts_are_bounded(tmp_path):
    long_line = json.dumps({"text": "a" * (MAX_LINE_CHARS + 1)})
    (tmp_path / "long.jsonl").write_text('{"text": "fine"}\n' + long_line + "\n")
    with pytest.raises(PromptDataError, match="long.jsonl, line 2: the line is .* characters long"):
        load_base_prompts("long.jsonl", tmp_path)
    (tmp_path / "long.json").write_text(json.dumps(["fine", "a" * (MAX_LINE_CHARS + 1)]))
    with pytest.raises(PromptDataError, match="long.json, record 2: the prompt is .* characters long"):
        load_base_prompts("long.json", tmp_path)


def test_text_lines_skips_blank_lines_and_counts_them():
    assert list(text_lines("a\n\n  \nb\n", Path("f"), "file", FileError)) == [(1, "a"), (4, "b")]


# ----------------------------------------------------------------------------------------------------------- reads


def test_what_stands_at_a_path_is_named(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert path_kind(tmp_path / "file") == "a file"
    assert path_kind(tmp_path) == "a folder"
    assert path_kind(fifo) == "a named pipe (FIFO)"
    assert path_kind("/dev/null") == "a character device"
    assert path_kind(tmp_path / "missing") == "nothing"
    assert path_kind(tmp_path / "dangling") == "a broken symbolic link"
    assert path_kind(tmp_path / "file" / "below") == "nothing"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: tmp, "is a folder, not a recipe file"),
        (lambda tmp: (os.mkfifo(tmp / "p.yaml"), tmp / "p.yaml")[1], "is a named pipe (FIFO), not a recipe file"),
        (lambda tmp: Path("/dev/zero"), "is a character device, not a recipe file"),
        (lambda tmp: tmp / "missing.yaml", "Recipe file not found"),
    ],
)
def test_reading_what_is_not_a_file_says_what_it_is(tmp_path, make, expected):
    with pytest.raises(RecipeError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_text(make(tmp_path), "recipe file", RecipeError, limit=1024)  # a FIFO or /dev/zero must not hang


def test_reads_stop_at_their_bound(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"a" * 1025)
    with pytest.raises(RecipeError, match="larger than 1024 bytes"):
        read_text(path, "recipe file", RecipeError, limit=1024)
    path.write_bytes(b"a" * 1024)
    assert read_text(path, "recipe file", RecipeError, limit=1024) == "a" * 1024


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: x\ninstructions: {}\ncaf\xe9\n")
    with pytest.raises(RecipeError, match=r"line 3: the recipe file is not UTF-8 text"):
        read_text(path, "recipe file", RecipeError, limit=1024)


def test_recipe_larger_than_a_megabyte_is_refused(tmp_path):
    path = write_recipe(tmp_path, "instructions: {lowercase: {}}\n" + "# padding\n" * 200_000)
    with pytest.raises(RecipeError, match="larger than 1 MiB"):
        load_recipe(path)


# ---------------------------------------------------------------------------------------------------------- writes


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "v.safetensors"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(os.listdir(target.parent)) == ["v.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "v.bin"
    target.write_bytes(b"old")

    def fail(temporary: Path) -> None:
        temporary.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["v.bin"]


def test_temporaries_are_named_as_ours_and_locked_while_written(tmp_path):
    seen = {}

    def inspect(temporary: Path) -> None:
        seen["name"] = temporary.name
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # the writer holds the lock
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(descriptor)
        temporary.write_bytes(b"x")

    atomic_write(tmp_path / "report.json", inspect)
    assert seen["name"].startswith(".report.json.") and seen["name"].endswith(TEMP_SUFFIX)


def test_stale_temporaries_of_killed_writes_are_removed_and_live_ones_kept(tmp_path):
    old = time.time() - STALE_TEMP_SECONDS - 10
    stale = tmp_path / f".v.safetensors.abc123{TEMP_SUFFIX}"  # a write killed long ago
    fresh = tmp_path / f".v.safetensors.def456{TEMP_SUFFIX}"  # created a moment ago
    live = tmp_path / f".other.json.ghi789{TEMP_SUFFIX}"  # old, but another process still writes it
    foreign = tmp_path / ".v.safetensors.user.tmp"  # not ours by name
    for path in (stale, fresh, live, foreign):
        path.write_bytes(b"partial")
    for path in (stale, live, foreign):
        os.utime(path, (old, old))
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        atomic_write_bytes(tmp_path / "v.safetensors", b"new")
    finally:
        os.close(holder)
    assert not stale.exists()
    assert fresh.exists() and live.exists() and foreign.exists()


def test_writing_onto_a_folder_names_the_folder(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileError, match="taken is a folder; give the path of the file to write"):
        atomic_write_bytes(tmp_path / "taken", b"x")
    assert os.listdir(tmp_path / "taken") == [] and os.listdir(tmp_path) == ["taken"]
