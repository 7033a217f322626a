"""No data lost: `compute`, `search` and `eval` interrupted in the middle (Ctrl-C) keep every finished file intact,
leave no partial or temporary file behind, and a rerun of the same command picks up where the first one stopped.

Each test runs the real entry point (``nsteer.cli.main``) on a tiny Llama saved to disk, raises KeyboardInterrupt
from inside the work (the second instruction's extraction, the third sweep batch, the second evaluation group, or
the rename that publishes a file), and counts the work a rerun does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import nsteer.evaluate.table as table_module
import nsteer.pipeline as pipeline_module
import nsteer.search as search_module
from nsteer.cli import main
from nsteer.vectors import load_vector

INSTRUCTIONS = ("shout", "whisper", "calm")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tiny import tiny_hf_model, tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama", seed=0).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def write_recipe(folder: Path, model_dir: Path, *, layer: str = "auto") -> Path:
    recipe = folder / "interrupt.yaml"
    recipe.write_text(
        f"""name: interrupt
model: {{id: "{model_dir}", device: cpu}}
prompts: {{base: "builtin:base-v1", seed: 0, max_pairs: 4}}
instructions:
  shout: {{phrasings: [Answer in capitals., Use only capital letters.], check: change_case:english_capital}}
  whisper: {{phrasings: [Answer in lowercase., Use no capital letters.], check: change_case:english_lowercase}}
  calm: {{phrasings: [Use no commas., Avoid commas entirely.], check: punctuation:no_comma}}
steer:
  - {{instruction: shout, layer: {layer}, mode: set}}
  - {{instruction: whisper, layer: {layer}, mode: set}}
search: {{layers: [1, 2], max_prompts: 2, condition: absent, min_perplexity_ratio: 0.0}}
evaluation: {{max_prompts: 2}}
generation: {{max_new_tokens: 2, batch_size: 4}}
extraction: {{batch_size: 8}}
output: {{dir: "{folder / "out"}"}}
"""
    )
    return recipe


def run(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["nsteer", *args])
    monkeypatch.setenv("COLUMNS", "250")
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


class Counting:
    """Wraps a function: counts calls (and their first arguments) and raises KeyboardInterrupt on call ``fail_on``."""

    def __init__(self, function, fail_on: int | None = None, describe=None) -> None:
        self.function, self.fail_on, self.describe = function, fail_on, describe
        self.calls: list = []

    def __call__(self, *args, **kwargs):
        self.calls.append(self.describe(*args, **kwargs) if self.describe else None)
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise KeyboardInterrupt
        return self.function(*args, **kwargs)


def leftovers(folder: Path) -> list[str]:
    """Temporary or hidden files under ``folder`` (what an interrupted atomic write would leave)."""
    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and (path.name.startswith(".") or path.suffix in (".tmp", ".part", ".partial"))
    )


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def assert_interrupted(code: int, output: str) -> None:
    assert code == 130, output
    assert "interrupted" in output and "rerun the same command" in output
    assert "Traceback" not in output


def test_interrupted_compute_keeps_finished_vectors_and_resumes(monkeypatch, capsys, tmp_path, model_dir) -> None:
    recipe = write_recipe(tmp_path, model_dir)
    out = tmp_path / "out"
    original = pipeline_module.compute_vector
    first = Counting(original, fail_on=2, describe=lambda handle, instruction, *a, **k: instruction.id)
    monkeypatch.setattr(pipeline_module, "compute_vector", first)
    assert_interrupted(*run(monkeypatch, capsys, "compute", str(recipe)))
    assert first.calls == ["shout", "whisper"]  # interrupted while extracting the second instruction

    assert sorted(p.name for p in out.iterdir()) == ["shout.safetensors"]  # finished, nothing partial
    assert leftovers(out) == []
    assert load_vector(out / "shout.safetensors").instruction_id == "shout"
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "shout.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # like any file, not private (0600)
    before = snapshot(out)

    again = Counting(original, describe=lambda handle, instruction, *a, **k: instruction.id)
    monkeypatch.setattr(pipeline_module, "compute_vector", again)
    code, output = run(monkeypatch, capsys, "compute", str(recipe))
    assert code == 0, output
    assert again.calls == ["whisper", "calm"]  # the finished vector is not recomputed
    after = snapshot(out)
    assert after["shout.safetensors"] == before["shout.safetensors"]  # same bytes, same mtime: untouched
    assert sorted(after) == [f"{name}.safetensors" for name in sorted(INSTRUCTIONS)]

    third = Counting(original)
    monkeypatch.setattr(pipeline_module, "compute_vector", third)
    assert run(monkeypatch, capsys, "compute", str(recipe))[0] == 0
    assert third.calls == [] and snapshot(out) == after  # all up to date: nothing recomputed or rewritten


def test_interrupt_while_publishing_a_file_keeps_the_old_one(monkeypatch, capsys, tmp_path, model_dir) -> None:
    """Ctrl-C between writing the temporary file and renaming it over the old vector: the old vector survives."""
    recipe = write_recipe(tmp_path, model_dir)
    out = tmp_path / "out"
    assert run(monkeypatch, capsys, "compute", str(recipe))[0] == 0
    before = snapshot(out)

    real_replace = os.replace

    def interrupted_replace(source, destination, *args, **kwargs):
        if str(destination).endswith("whisper.safetensors"):
            raise KeyboardInterrupt
        return real_replace(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    assert_interrupted(*run(monkeypatch, capsys, "compute", str(recipe), "--force"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert leftovers(out) == []  # the temporary file was removed
    after = snapshot(out)
    assert sorted(after) == sorted(before)
    assert after["whisper.safetensors"] == before["whisper.safetensors"]  # the old file, whole
    assert after["calm.safetensors"] == before["calm.safetensors"]  # never reached
    load_vector(out / "whisper.safetensors")


def sweep_describe(handle, prompts, *, row_edits, config, progress=None):
    """The (instruction, layer) of every row of a sweep batch; (None, None) for an unsteered row."""
    return tuple((edits[0].name, edits[0].layer) if edits else (None, None) for edits in row_edits)


def test_interrupted_search_keeps_finished_batches_and_resumes(monkeypatch, capsys, tmp_path, model_dir) -> None:
    recipe = write_recipe(tmp_path, model_dir)
    out = tmp_path / "out"
    assert run(monkeypatch, capsys, "compute", str(recipe))[0] == 0
    checkpoint = out / "search" / "cells.jsonl"
    original = search_module.generate

    # The same 2 base prompts (instruction absent) for both instructions: 2 unsteered rows, shared, and shout at
    # layers 1, 2 and whisper at layers 1, 2 on each: 10 rows, ordered by prompt length, in batches of 4; Ctrl-C in
    # the third batch.
    first = Counting(original, fail_on=3, describe=sweep_describe)
    monkeypatch.setattr(search_module, "generate", first)
    assert_interrupted(*run(monkeypatch, capsys, "search", str(recipe)))
    assert [len(call) for call in first.calls] == [4, 4, 2]
    lines = checkpoint.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 and all(line.endswith(b"\n") for line in lines)  # two whole batches, no partial line
    assert leftovers(out) == []
    assert not (out / "search" / "search.json").exists()  # the report is written only once the search is complete
    assert load_vector(out / "shout.safetensors").metadata.chosen is None  # winners are chosen at the end
    assert load_vector(out / "whisper.safetensors").metadata.chosen is None

    again = Counting(original, describe=sweep_describe)
    monkeypatch.setattr(search_module, "generate", again)
    code, output = run(monkeypatch, capsys, "search", str(recipe))
    assert code == 0, output
    # Only the batch that had not finished runs again, with the same rows; over both runs every row ran once
    # (the unsteered row of each prompt once, shared by both instructions).
    assert again.calls == [first.calls[2]]
    done = [row for call in (*first.calls[:2], *again.calls) for row in call]
    expected = [(None, None)] * 2 + [(name, layer) for name in ("shout", "whisper") for layer in (1, 2)] * 2
    assert sorted(done, key=repr) == sorted(expected, key=repr)
    assert len(checkpoint.read_bytes().splitlines()) == 3
    assert (out / "search" / "search.json").exists() and (out / "search" / "search.md").exists()
    assert load_vector(out / "shout.safetensors").metadata.chosen is not None
    assert load_vector(out / "whisper.safetensors").metadata.chosen is not None


def test_interrupted_eval_keeps_finished_groups_and_resumes(monkeypatch, capsys, tmp_path, model_dir) -> None:
    recipe = write_recipe(tmp_path, model_dir, layer="1")
    out = tmp_path / "out"
    assert run(monkeypatch, capsys, "compute", str(recipe))[0] == 0
    checkpoint = out / "eval" / "cells.jsonl"
    original = table_module.generate
    describe = lambda handle, prompts, **kwargs: len(prompts)  # noqa: E731

    first = Counting(original, fail_on=2, describe=describe)  # groups: shout, whisper, calm (one generation each)
    monkeypatch.setattr(table_module, "generate", first)
    assert_interrupted(*run(monkeypatch, capsys, "eval", str(recipe)))
    lines = checkpoint.read_bytes().splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].endswith(b"\n") and json.loads(lines[0])["label"] == "eval shout"
    assert not (out / "eval" / "eval.json").exists()
    assert leftovers(out) == []
    vectors_before = {name: (out / f"{name}.safetensors").read_bytes() for name in INSTRUCTIONS}

    again = Counting(original, describe=describe)
    monkeypatch.setattr(table_module, "generate", again)
    code, output = run(monkeypatch, capsys, "eval", str(recipe))
    assert code == 0, output
    assert len(again.calls) == 2  # whisper and calm; shout's answers come from the checkpoint
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert report  # a complete, parseable report
    assert {name: (out / f"{name}.safetensors").read_bytes() for name in INSTRUCTIONS} == vectors_before
    assert leftovers(out) == []
