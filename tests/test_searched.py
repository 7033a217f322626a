"""The searched-setting record: shipped files read and write back byte for byte, every malformed field is a
VectorFileError that names it, and a newer format version is refused while an older one is upgraded."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import save_file

import nsteer.vectors as vectors
from nsteer.errors import VectorFileError
from nsteer.records import read_record, record_dict
from nsteer.searched import SearchedSetting, SharedSearch
from nsteer.vectors import FORMAT, SteeringVector, VectorMetadata, load_vector, save_vector

SHIPPED = Path(__file__).resolve().parent.parent / "vectors"
N_LAYERS = 6

SEARCHED = {
    "layer": 2,
    "mode": "add",
    "weight": 30.0,
    "positions": "all",
    "no_steering": False,
    "score": 0.75,
    "strict_score": 0.5,
    "degenerate_share": 0.0,
    "baseline_score": 0.25,
    "baseline_degenerate_share": 0.0,
    "split": "validation",
    "condition": "absent",
    "n_prompts": 12,
    "layers_searched": [2, 4],
    "weights_searched": [30.0, 60.0],
    "rule": "best loose accuracy wins",
    "shared_search": {"words": ["ocean"], "note": "pooled"},
}


def metadata_dict(**fields) -> dict:
    data = dict(
        nsteer_version="0.1.0",
        model_id="tiny",
        config_hash="c",
        weights_fingerprint="f",
        architecture="LlamaForCausalLM",
        hidden_size=8,
        n_layers=N_LAYERS,
        instruction_id="lowercase",
        chosen=dict(SEARCHED),
    )
    data.update(fields)
    return data


def write(path: Path, metadata: dict, fmt: str = FORMAT) -> Path:
    tensors = {
        "directions": torch.nn.functional.normalize(torch.randn(N_LAYERS, 8), dim=-1),
        "mean_projections": torch.zeros(N_LAYERS),
        "norms": torch.ones(N_LAYERS),
    }
    save_file(tensors, str(path), metadata={"format": fmt, "nsteer": json.dumps(metadata)})
    return path


def test_every_shipped_file_reads_into_records_and_writes_back_byte_for_byte(tmp_path):
    files = sorted(SHIPPED.rglob("*.safetensors"))
    assert len(files) >= 50
    for path in files:
        vector = load_vector(path)
        assert isinstance(vector.metadata.chosen, SearchedSetting), path.name
        again = save_vector(vector, tmp_path / path.name)
        assert again.read_bytes() == path.read_bytes(), path.name


def test_a_full_setting_round_trips_through_a_file(tmp_path):
    path = write(tmp_path / "v.safetensors", metadata_dict())
    chosen = load_vector(path).metadata.chosen
    assert chosen == SearchedSetting(
        layer=2,
        mode="add",
        weight=30.0,
        positions="all",
        score=0.75,
        strict_score=0.5,
        degenerate_share=0.0,
        baseline_score=0.25,
        baseline_degenerate_share=0.0,
        split="validation",
        condition="absent",
        n_prompts=12,
        layers_searched=(2, 4),
        weights_searched=(30.0, 60.0),
        rule="best loose accuracy wins",
        shared_search=SharedSearch(words=("ocean",), note="pooled"),
    )
    assert chosen.to_dict() == SEARCHED  # what was read is what is written, key for key


def test_a_no_steering_setting_keeps_its_null_layer(tmp_path):
    data = metadata_dict(chosen={"layer": None, "mode": "set", "weight": 0.0, "positions": "all", "no_steering": True})
    chosen = load_vector(write(tmp_path / "v.safetensors", data)).metadata.chosen
    assert chosen.no_steering and chosen.layer is None and chosen.label == "no steering"
    assert chosen.to_dict() == data["chosen"]


BAD_SETTINGS = [
    ({"layer": "3"}, "chosen.layer: expected an integer, got '3'"),
    ({"layer": True}, "chosen.layer: expected an integer, got True"),
    ({"layer": 6}, "chosen.layer: layer 6 is out of range: the vector has layers 0..5"),
    ({"layer": -1}, "chosen.layer: layer -1 is out of range"),
    ({"mode": "push"}, "chosen.mode: expected one of set, add, ablate, got 'push'"),
    ({"positions": ["all"]}, "chosen.positions: expected a string"),
    ({"weight": "60"}, "chosen.weight: expected a number, got '60'"),
    ({"weight": math.nan}, "chosen.weight: expected a finite number, got nan"),
    ({"weight": math.inf}, "chosen.weight: expected a finite number, got inf"),
    ({"score": 1.5}, "chosen.score: expected a value from 0.0 to 1.0, got 1.5"),
    ({"substantive_score": -0.1}, "chosen.substantive_score: expected a value from 0.0 to 1.0, got -0.1"),
    ({"baseline_substantive_score": math.nan}, "chosen.baseline_substantive_score: expected a finite number"),
    ({"n_prompts": -2}, "chosen.n_prompts: expected a value from 0 to inf, got -2"),
    ({"n_prompts": 2.5}, "chosen.n_prompts: expected an integer, got 2.5"),
    ({"condition": "sometimes"}, "chosen.condition: expected one of absent, present, both"),
    ({"layers_searched": [2, "x"]}, r"chosen.layers_searched\[1\]: expected an integer"),
    ({"layers_searched": [2, 40]}, r"chosen.layers_searched\[1\]: layer 40 is out of range"),
    ({"weights_searched": 30.0}, "chosen.weights_searched: expected a list, got float"),
    ({"rule": 7}, "chosen.rule: expected a string, got 7"),
    ({"shared_search": {"words": "ocean"}}, "chosen.shared_search.words: expected a list, got str"),
    ({"shared_search": {"note": "x"}}, "chosen.shared_search.words: this field is required but missing"),
    ({"no_steering": "no"}, "chosen.no_steering: expected true or false, got 'no'"),
    ({"no_steering": True}, "chosen.no_steering: true contradicts layer 2"),
    ({"sparkle": 0.5}, r"chosen.sparkle: this nsteer does not know this field \(written by a newer nsteer\?\)"),
    ({"imported": "yes"}, "chosen.imported: expected true or false"),
    ({"imported": True}, "chosen.imported: only an imported control vector's setting, with its layers, says so"),
    ({"centered_on": ["a", "b", "c"]}, "chosen.centered_on: only a centered setting names the vectors"),
    ({"centered": True, "centered_on": ["a", "b"]}, "chosen.centered_on: .* 3 or more vectors, not 2"),
    ({"centered": True, "centered_on": [1, 2, 3]}, r"chosen.centered_on\[0\]: expected a string"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SETTINGS, ids=[str(change) for change, _ in BAD_SETTINGS])
def test_a_malformed_setting_is_a_vector_file_error_naming_its_field(tmp_path, change, message):
    path = write(tmp_path / "v.safetensors", metadata_dict(chosen={**SEARCHED, **change}))
    with pytest.raises(VectorFileError, match=message) as caught:
        load_vector(path)
    assert str(caught.value).startswith(f"{path}, field chosen.")
    assert "rerun `nsteer search`" in str(caught.value)


def test_a_setting_that_is_not_an_object_or_lacks_its_layer_is_named(tmp_path):
    for chosen, message in (([2, "add"], "field chosen: expected a JSON object, got list"), ({}, "chosen.layer: this")):
        with pytest.raises(VectorFileError, match=message):
            load_vector(write(tmp_path / "v.safetensors", metadata_dict(chosen=chosen)))


def test_a_borrowers_malformed_setting_names_the_instruction(tmp_path):
    data = metadata_dict(chosen_for={"exclude:ocean": {**SEARCHED, "weight": None}})
    with pytest.raises(
        VectorFileError, match=r"field chosen_for\['exclude:ocean'\].weight: expected a number, got None"
    ):
        load_vector(write(tmp_path / "v.safetensors", data))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_layers", "6", "field n_layers: expected an integer, got '6'"),
        ("hidden_size", 8.0, "field hidden_size: expected an integer, got 8.0"),
        ("phrasings", "Answer in lowercase.", "field phrasings: expected a list, got str"),
        ("phrasings", ["ok", 3], r"field phrasings\[1\]: expected a string, got 3"),
        ("model_id", None, "field model_id: expected a string, got None"),
        ("check_kwargs", [1], "field check_kwargs: expected an object with string keys, got list"),
    ],
)
def test_malformed_metadata_fields_are_named(tmp_path, field, value, message):
    with pytest.raises(VectorFileError, match=message):
        load_vector(write(tmp_path / "v.safetensors", metadata_dict(**{field: value})))


def test_the_cli_reports_a_malformed_setting_in_one_sentence(monkeypatch, capsys, tmp_path):
    path = write(tmp_path / "v.safetensors", metadata_dict(chosen={**SEARCHED, "layer": "16"}))
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(path))
    assert code == 2 and "Traceback" not in err
    assert "field chosen.layer: expected an integer, got '16'" in " ".join(err.split())


def test_a_setting_built_in_code_is_checked_against_the_vector_before_it_is_recorded(tmp_path):
    vector = load_vector(write(tmp_path / "v.safetensors", metadata_dict()))
    with pytest.raises(VectorFileError, match="layer 9 is out of range"):
        vector.with_choice(SearchedSetting(layer=1, layers_searched=(1, 9)))


def test_a_newer_format_version_is_refused_and_an_older_one_is_upgraded(tmp_path, monkeypatch):
    path = write(tmp_path / "v2.safetensors", metadata_dict(), fmt="nsteer.vector/2")
    with pytest.raises(VectorFileError, match="format version 2, and this nsteer reads versions 1 to 1: upgrade"):
        load_vector(path)
    for fmt in ("nsteer.vector/0", "nsteer.vector/x", "other/1"):
        with pytest.raises(VectorFileError):
            load_vector(write(tmp_path / "bad.safetensors", metadata_dict(), fmt=fmt))
    # A reader of version 2 reads a version-1 file through the upgrade registered for version 1.
    old = metadata_dict(instruction_id="old-name")
    path = write(tmp_path / "v1.safetensors", old)
    monkeypatch.setattr(vectors, "FORMAT_VERSION", 2)
    monkeypatch.setitem(vectors.UPGRADES, 1, lambda data: {**data, "instruction_id": "upgraded"})
    assert load_vector(path).metadata.instruction_id == "upgraded"


@dataclasses.dataclass(frozen=True)
class _Before:
    layer: int | None
    mode: str = "set"


@dataclasses.dataclass(frozen=True)
class _After:  # the same record with one field added: the declaration is the whole change
    layer: int | None
    mode: str = "set"
    weight_relative: float | None = None


def test_adding_a_field_keeps_old_data_readable_and_its_bytes_unchanged():
    old = record_dict(_Before(layer=3), always=("layer", "mode"))
    read = read_record(_After, old, where="f", error=VectorFileError, hint="")
    assert read == _After(layer=3) and read.weight_relative is None
    assert record_dict(read, always=("layer", "mode")) == old  # a field at its default is not written
    new = _After(layer=3, weight_relative=1.5)
    assert read_record(_After, record_dict(new), where="f", error=VectorFileError, hint="") == new
    with pytest.raises(VectorFileError, match="field weight_relative: this nsteer does not know this field"):
        read_record(_Before, record_dict(new), where="f", error=VectorFileError, hint="")


def test_a_vector_in_memory_keeps_its_typed_setting():
    metadata = VectorMetadata.from_json(json.dumps(metadata_dict()), Path("m"))
    vector = SteeringVector(torch.zeros(N_LAYERS, 8), torch.zeros(N_LAYERS), torch.ones(N_LAYERS), metadata)
    assert vector.choice().weight == 30.0 and vector.choice("exclude:ocean") is None
