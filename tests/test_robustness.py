"""Failures found early and kept small: unwritable outputs before the model runs, one bad vector file among many,
SDK arguments that are errors of nsteer's own family (and ValueErrors), not tracebacks from deep inside."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

import nsteer
import nsteer.evaluate.checkpoint as checkpoint_module
import nsteer.pipeline
from nsteer.errors import ArgumentError, FileError, NsteerError
from nsteer.evaluate.checkpoint import append_checkpoint, read_checkpoint
from nsteer.extract import compute_vector, mean_difference
from nsteer.prompts import Instruction, PromptPair
from nsteer.vectors import SteeringVector, VectorMetadata, save_vector, scan_vectors, shipped_vectors

UNWRITABLE = "/proc/nsteer-cannot-write-here"  # no process can create a folder here, root included


def vector_file(path: Path, instruction: str = "shout") -> Path:
    metadata = VectorMetadata("0.1.0", "m", "c", "f", "LlamaForCausalLM", 8, 2, instruction)
    directions = torch.nn.functional.normalize(torch.ones(2, 8), dim=-1)
    return save_vector(SteeringVector(directions, torch.ones(2), torch.ones(2), metadata), path)


def recipe(tmp_path: Path, output: str, layer: str = "1") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(
        "instructions:\n  shout: {phrasings: [Answer in capitals.], check: change_case:english_capital}\n"
        f"steer:\n  - {{instruction: shout, layer: {layer}}}\noutput: {{dir: {output}}}\n"
    )
    return path


@pytest.mark.parametrize(
    "argv",
    [
        lambda tmp: ["compute", str(recipe(tmp, UNWRITABLE))],
        lambda tmp: ["eval", str(recipe(tmp, str(tmp / "out"))), "--out", UNWRITABLE],
        lambda tmp: ["eval-composition", str(recipe(tmp, str(tmp / "out"))), "--out", UNWRITABLE],
        lambda tmp: [
            vector_file(tmp / "out" / "shout.safetensors") and "search",
            str(recipe(tmp, str(tmp / "out"), layer="auto")),
            "--out",
            UNWRITABLE,
        ],
    ],
    ids=["compute", "eval", "eval-composition", "search"],
)
def test_an_unwritable_output_is_found_before_the_model_is_opened(tmp_path, monkeypatch, capsys, argv):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was opened although the output cannot be written")

    monkeypatch.setattr(nsteer.pipeline, "open_recipe_model", must_not_run)
    code, _, err = run_cli(monkeypatch, capsys, *argv(tmp_path))
    message = " ".join(err.split())
    assert code == 2 and f"The output folder {UNWRITABLE}" in message and "cannot be written" in message, message
    assert "Opening" not in err


@pytest.mark.parametrize(
    ("argv", "blocked"),
    [
        (lambda tmp: ["eval", str(recipe(tmp, str(tmp / "o"))), "--out", str(tmp / "rep")], "eval.json"),
        (lambda tmp: ["eval", str(recipe(tmp, str(tmp / "o"))), "--out", str(tmp / "rep")], "cells.jsonl"),
        (
            lambda tmp: ["eval-composition", str(recipe(tmp, str(tmp / "o"))), "--out", str(tmp / "rep")],
            "composition.md",
        ),
        (
            lambda tmp: [
                vector_file(tmp / "o" / "shout.safetensors") and "search",
                str(recipe(tmp, str(tmp / "o"), layer="auto")),
                "--out",
                str(tmp / "rep"),
            ],
            "search-layers.png",
        ),
    ],
    ids=["eval-report", "eval-checkpoint", "composition-report", "search-report"],
)
def test_a_folder_where_a_report_or_checkpoint_goes_is_found_before_the_model_is_opened(
    tmp_path, monkeypatch, capsys, argv, blocked
):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was opened although a report cannot be written")

    monkeypatch.setattr(nsteer.pipeline, "open_recipe_model", must_not_run)
    command = argv(tmp_path)
    (tmp_path / "rep" / blocked).mkdir(parents=True)
    code, _, err = run_cli(monkeypatch, capsys, *command)
    message = " ".join(err.split())
    assert code == 2 and f"{blocked} is a folder" in message, message


def test_a_checkpoint_that_is_not_a_file_is_refused_without_blocking(tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(FileError, match="is a folder, not a file"):
        read_checkpoint(tmp_path / "folder.jsonl")
    os.mkfifo(tmp_path / "pipe.jsonl")  # opening it to read would wait for a writer forever
    with pytest.raises(FileError, match="is a named pipe"):
        read_checkpoint(tmp_path / "pipe.jsonl")


def test_an_over_long_checkpoint_line_is_skipped_and_the_records_after_it_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "MAX_RECORD_BYTES", 64)
    path = tmp_path / "cells.jsonl"
    append_checkpoint(path, {"key": "before", "answers": ["a"]})
    with path.open("ab") as stream:
        stream.write(b'{"key": "huge", "answers": ["' + b"x" * 1000 + b'"]}\n')
    append_checkpoint(path, {"key": "after", "answers": ["b"]})
    assert sorted(read_checkpoint(path)) == ["after", "before"]


def test_list_reports_a_bad_file_and_lists_the_others(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "vectors"
    vector_file(folder / "a" / "shout.safetensors")
    vector_file(folder / "b" / "whisper.safetensors", "whisper")
    (folder / "b" / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    found, unreadable = scan_vectors(folder)
    assert [item.metadata.instruction_id for item in found] == ["shout", "whisper"]
    assert [path.name for path, _ in unreadable] == ["broken.safetensors"]
    with pytest.raises(NsteerError, match="broken.safetensors"):
        shipped_vectors(folder)  # the strict reader still refuses
    code, out, err = run_cli(monkeypatch, capsys, "list", "--vectors", str(folder), "--json")
    assert code == 0
    listed = json.loads(out)
    assert [row["instruction"] for row in listed["vectors"]] == ["shout", "whisper"]
    assert [Path(row["file"]).name for row in listed["unreadable"]] == ["broken.safetensors"]
    assert "skipped:" in err and "broken.safetensors" in err
    code, out, err = run_cli(monkeypatch, capsys, "list", "--vectors", str(folder))
    assert code == 0 and "whisper" in out and "shout" in out and "broken.safetensors" in " ".join(err.split())


def test_compute_vector_arguments_are_checked(tiny):
    handle = tiny("llama")
    instruction = Instruction("shout", "format", "", "change_case:english_capital", {}, ("Use capitals.",))
    pairs = [PromptPair("b", "Hi", "Use capitals.")]
    cases = [
        ({"instruction": "shout", "pairs": pairs}, "instruction must be an Instruction"),
        ({"instruction": instruction, "pairs": "Hi"}, "pairs must be a list of PromptPair"),
        ({"instruction": instruction, "pairs": [("Hi", "Use capitals.")]}, "pairs must be a list of PromptPair"),
    ]
    for arguments, fragment in cases:
        with pytest.raises(ArgumentError, match=fragment) as raised:
            compute_vector(handle, **arguments)
        assert isinstance(raised.value, ValueError)
    with pytest.raises(ArgumentError, match="at least one prompt pair"):
        mean_difference(handle, [])


@pytest.mark.parametrize("path", ["__class__", "model.__dict__", "_modules", "model._modules", "model..layers", "1x"])
def test_layers_path_follows_attribute_names_only(tiny, path):
    from nsteer.errors import ModelError
    from nsteer.models import find_layers_path

    module = tiny("llama").hf_model
    with pytest.raises(ModelError, match="not a dotted path of attribute names"):
        find_layers_path(module, path)
    assert find_layers_path(module, "model.layers") == "model.layers"


SDK_MISUSE = {
    "open_model(None)": (lambda h: nsteer.open_model(None), "model_id must be str"),
    "builtin_instruction(5)": (lambda h: nsteer.builtin_instruction(5), "name must be str"),
    "instruction_pairs(a name)": (lambda h: nsteer.instruction_pairs("lowercase"), "instruction must be Instruction"),
    "instruction_pairs(seed=-1)": (
        lambda h: nsteer.instruction_pairs(nsteer.builtin_instruction("lowercase"), seed=-1),
        "seed must be a whole number from 0 to 9223372036854775807",
    ),
    "instruction_pairs(seed=2**64)": (
        lambda h: nsteer.instruction_pairs(nsteer.builtin_instruction("lowercase"), seed=2**64),
        "seed must be a whole number from 0 to 9223372036854775807",
    ),
    "instruction_pairs(no train share)": (
        lambda h: nsteer.instruction_pairs(nsteer.builtin_instruction("lowercase"), fractions={"train": 0}),
        "train fraction must be positive",  # a ZeroDivisionError before
    ),
    "instruction_pairs(unknown split)": (
        lambda h: nsteer.instruction_pairs(nsteer.builtin_instruction("lowercase"), fractions={"tran": 1}),
        "Unknown split(s) 'tran'",
    ),
    "load_base_prompts(5)": (lambda h: nsteer.load_base_prompts(5), "source must be str"),
    "load_vector(5)": (lambda h: nsteer.load_vector(5), "path must be str or PathLike"),
    "save_vector(a string)": (lambda h: nsteer.save_vector("x", "x.safetensors"), "vector must be SteeringVector"),
    "edit_from_vector(a path)": (lambda h: nsteer.edit_from_vector("v.safetensors", layer=1), "vector must be"),
    "check_compatible(a path)": (lambda h: nsteer.check_compatible("v.safetensors", h), "vector must be"),
    "load_recipe(None)": (lambda h: nsteer.load_recipe(None), "path must be str or PathLike"),
    "wrap_model(None)": (lambda h: nsteer.wrap_model(None, None, model_id="x"), "hf_model must be Module"),
    "generate(no handle)": (lambda h: nsteer.generate(None, ["hi"]), "handle must be ModelHandle"),
    "compute_vector(no handle)": (
        lambda h: nsteer.compute_vector(None, nsteer.builtin_instruction("lowercase"), []),
        "handle must be ModelHandle",
    ),
    "export_llama_cpp(a path)": (
        lambda h: nsteer.export_llama_cpp("v.safetensors", "a.gguf", layers=[1], weight=1.0),
        "vector must be SteeringVector",
    ),
    "import_llama_cpp(5)": (lambda h: nsteer.import_llama_cpp(5), "path must be str or PathLike"),
}


@pytest.mark.parametrize("case", list(SDK_MISUSE), ids=list(SDK_MISUSE))
def test_sdk_misuse_is_an_argument_error_that_names_the_argument(tiny, tmp_path, monkeypatch, case):
    """Each of these was an AttributeError, TypeError or ZeroDivisionError from deep inside."""
    monkeypatch.chdir(tmp_path)
    call, fragment = SDK_MISUSE[case]
    with pytest.raises(ArgumentError, match=re.escape(fragment)) as raised:
        call(tiny("llama"))
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, NsteerError)
