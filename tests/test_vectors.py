"""Vector files: round trip, atomic writes, metadata checks against a model, and every kind of broken file."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import nsteer.vectors as vectors
from nsteer.errors import VectorFileError
from nsteer.searched import SearchedSetting
from nsteer.vectors import FORMAT, SteeringVector, VectorMetadata, check_compatible, load_vector, save_vector


def make_vector(handle=None, *, hidden: int = 64, layers: int = 4, seed: int = 0, **meta) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(layers, hidden, generator=generator)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    fields = dict(
        nsteer_version="0.1.0",
        model_id=handle.model_id if handle else "tiny-llama-0",
        config_hash=handle.config_hash if handle else "c0ffee",
        weights_fingerprint=handle.weights_fingerprint if handle else "f00d",
        architecture=handle.architecture if handle else "LlamaForCausalLM",
        hidden_size=hidden,
        n_layers=layers,
        instruction_id="lowercase",
        category="format",
        description="Answer entirely in lowercase letters.",
        check_id="change_case:english_lowercase",
        check_kwargs={"a": [1, 2], "b": "x"},
        phrasings=("Answer in lowercase.", "No capitals — none at all, ünïcode too."),
        prompt_set_hash="abc123",
        n_pairs=42,
        chat_template_hash="t3mpl",
        seed=7,
        chosen=SearchedSetting(layer=2, mode="add", weight=4.5, positions="prompt", score=0.5),
    )
    fields.update(meta)
    return SteeringVector(
        directions,
        torch.randn(layers, generator=generator),
        torch.rand(layers, generator=generator) + 0.5,
        VectorMetadata(**fields),
    )


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    vector = make_vector()
    path = save_vector(vector, tmp_path / "sub" / "lowercase.safetensors")
    loaded = load_vector(path)
    assert torch.equal(loaded.directions, vector.directions)
    assert torch.equal(loaded.mean_projections, vector.mean_projections)
    assert torch.equal(loaded.norms, vector.norms)
    assert loaded.metadata == vector.metadata
    assert loaded.metadata.phrasings == vector.metadata.phrasings and isinstance(loaded.metadata.phrasings, tuple)
    assert loaded.metadata.chosen == vector.metadata.chosen


def test_settings_searched_for_borrowing_instructions_are_kept_apart(tmp_path):
    vector = make_vector()  # instruction lowercase, with its own searched setting
    own = vector.metadata.chosen
    assert "chosen_for" not in json.loads(vector.metadata.to_json())  # absent until used: old files keep their bytes
    borrowed = vector.with_choice(SearchedSetting(layer=2, mode="add", weight=-3.0), "exclude:lowercase")
    assert borrowed.choice() == own and borrowed.choice("lowercase") == own
    assert borrowed.choice("exclude:lowercase").weight == -3.0
    assert borrowed.choice("another") is None
    loaded = load_vector(save_vector(borrowed, tmp_path / "v.safetensors"))
    assert loaded.metadata == borrowed.metadata
    assert loaded.metadata.chosen == own
    replaced = loaded.with_choice(SearchedSetting(layer=1), "exclude:lowercase").with_choice(None, "another")
    assert dict(replaced.metadata.chosen_for) == {"exclude:lowercase": SearchedSetting(layer=1)}
    own_again = replaced.with_choice(SearchedSetting(layer=3))
    assert own_again.choice() == SearchedSetting(layer=3)  # the vector's own setting, borrowers untouched
    assert own_again.choice("exclude:lowercase") == SearchedSetting(layer=1)


def test_a_recomputed_vector_carries_the_files_searched_settings(tmp_path):
    path = tmp_path / "v.safetensors"
    save_vector(make_vector().with_choice(SearchedSetting(layer=2, weight=-3.0), "exclude:lowercase"), path)
    fresh = make_vector(seed=1, chosen=None)
    carried = vectors.carry_choices(path, fresh)
    assert torch.equal(carried.directions, fresh.directions)  # the new tensors ...
    assert carried.metadata.chosen == load_vector(path).metadata.chosen  # ... with the old searched settings
    assert carried.metadata.chosen_for == {"exclude:lowercase": SearchedSetting(layer=2, weight=-3.0)}
    other = make_vector(seed=1, chosen=None, instruction_id="uppercase")
    assert vectors.carry_choices(path, other) is other  # another instruction's file: nothing carried
    assert vectors.carry_choices(tmp_path / "missing.safetensors", fresh) is fresh
    path.write_bytes(b"truncated")
    assert vectors.carry_choices(path, fresh) is fresh


def test_malformed_borrowed_settings_are_refused(tmp_path):
    vector = make_vector()
    data = json.loads(vector.metadata.to_json())
    data["chosen_for"] = ["layer", 3]
    path = tmp_path / "v.safetensors"
    _write(path, _tensors(vector), json.dumps(data))
    with pytest.raises(VectorFileError, match="field chosen_for: expected a mapping of instruction to setting"):
        load_vector(path)


def test_round_trip_of_an_unsearched_bf16_vector(tmp_path):
    vector = make_vector(chosen=None)
    vector = dataclasses.replace(vector, directions=vector.directions.to(torch.bfloat16))
    loaded = load_vector(save_vector(vector, tmp_path / "v.safetensors"))
    assert loaded.metadata.chosen is None
    assert loaded.directions.dtype == torch.float32  # stored as fp32
    assert torch.equal(loaded.directions, vector.directions.float())


def test_file_is_plain_safetensors_with_readable_metadata(tmp_path):
    """Other tools can read the file: a standard safetensors header holding the format tag and JSON metadata."""
    from safetensors import safe_open

    path = save_vector(make_vector(), tmp_path / "v.safetensors")
    with safe_open(str(path), framework="pt") as stream:
        header = stream.metadata()
        assert set(stream.keys()) == {"directions", "mean_projections", "norms"}
    assert header["format"] == FORMAT
    assert json.loads(header["nsteer"])["instruction_id"] == "lowercase"
    assert b"pickle" not in path.read_bytes()[:8]


def test_equal_vectors_give_equal_bytes(tmp_path):
    """The header is written key-sorted: safetensors' own order varies between writes, which breaks checksums."""
    vector = make_vector()
    payloads = {save_vector(vector, tmp_path / f"v{i}.safetensors").read_bytes() for i in range(12)}
    assert len(payloads) == 1
    (payload,) = payloads
    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + size])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == ["format", "nsteer"]
    assert size % 8 == 0


# --- atomic writes ------------------------------------------------------------------------------------------------


def _leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


def test_failed_rename_keeps_the_previous_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "v.safetensors"
    old = make_vector(seed=1)
    save_vector(old, path)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(vectors.os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        save_vector(make_vector(seed=2), path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, path.name) == []
    monkeypatch.undo()
    assert torch.equal(load_vector(path).directions, old.directions)


def test_failure_mid_write_keeps_the_previous_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "v.safetensors"
    save_vector(make_vector(seed=1), path)
    before = path.read_bytes()
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        raise OSError("I/O error mid-write (simulated)")

    monkeypatch.setattr(vectors.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        save_vector(make_vector(seed=2), path)
    assert calls, "the writer should fsync before renaming"
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, path.name) == []
    monkeypatch.setattr(vectors.os, "fsync", real_fsync)


def test_interrupted_write_of_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(vectors.os, "replace", lambda src, dst: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_vector(make_vector(), tmp_path / "new.safetensors")
    assert list(tmp_path.iterdir()) == []


# --- metadata against a model -------------------------------------------------------------------------------------


def test_vector_for_another_width_is_refused_naming_both_widths(tiny):
    handle = tiny("llama", hidden=128)
    vector = make_vector(hidden=64, layers=handle.n_layers)
    with pytest.raises(VectorFileError) as error:
        check_compatible(vector, handle)
    message = str(error.value)
    assert "width 64" in message and "width 128" in message
    with pytest.raises(VectorFileError, match="width 64"):
        check_compatible(vector, handle, allow_transfer=True)  # transfer never crosses widths


def test_vector_for_another_depth_is_refused(tiny):
    handle = tiny("llama")
    vector = make_vector(hidden=handle.hidden_size, layers=handle.n_layers + 2)
    with pytest.raises(VectorFileError, match=f"{handle.n_layers + 2} layers"):
        check_compatible(vector, handle, allow_transfer=True)


def test_vector_from_the_same_model_is_accepted(tiny):
    handle = tiny("llama")
    check_compatible(make_vector(handle, hidden=handle.hidden_size, layers=handle.n_layers), handle)


def test_same_shape_other_model_needs_allow_transfer(tiny):
    source, target = tiny("llama", seed=0), tiny("llama", seed=1)
    assert source.hidden_size == target.hidden_size and source.weights_fingerprint != target.weights_fingerprint
    vector = make_vector(source, hidden=source.hidden_size, layers=source.n_layers)
    with pytest.raises(VectorFileError) as error:
        check_compatible(vector, target)
    message = str(error.value)
    assert "another model" in message and "allow-transfer" in message
    assert "tiny-llama-0" in message and "tiny-llama-1" in message
    check_compatible(vector, target, allow_transfer=True)


def test_same_id_but_other_weights_is_refused(tiny):
    """A fingerprint mismatch is caught even when the model id matches (e.g. a base model saved under one name)."""
    source, target = tiny("llama", seed=0), tiny("llama", seed=1)
    vector = make_vector(source, hidden=source.hidden_size, layers=source.n_layers, model_id=target.model_id)
    with pytest.raises(VectorFileError, match="the weights"):
        check_compatible(vector, target)


# --- broken files -------------------------------------------------------------------------------------------------


def test_truncated_file_is_a_clear_error(tmp_path):
    path = save_vector(make_vector(), tmp_path / "v.safetensors")
    data = path.read_bytes()
    for cut in (len(data) - 10, len(data) // 2, 20, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(VectorFileError) as error:
            load_vector(path)
        assert str(path) in str(error.value)
        assert "truncated" in str(error.value)


def test_empty_file(tmp_path):
    path = tmp_path / "v.safetensors"
    path.write_bytes(b"")
    with pytest.raises(VectorFileError, match="not a readable safetensors"):
        load_vector(path)


def test_not_safetensors_bytes(tmp_path):
    path = tmp_path / "v.safetensors"
    path.write_bytes(b"\x80\x04\x95 this is a pickle, not a vector" * 10)
    with pytest.raises(VectorFileError, match="not a readable safetensors"):
        load_vector(path)
    path.write_text("model: {id: x}\n")  # a YAML file given by mistake
    with pytest.raises(VectorFileError, match=str(path).replace("\\", "\\\\")):
        load_vector(path)


def test_missing_file(tmp_path):
    with pytest.raises(VectorFileError, match="not found"):
        load_vector(tmp_path / "nope.safetensors")


def test_safetensors_without_nsteer_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"directions": torch.zeros(4, 64), "mean_projections": torch.zeros(4), "norms": torch.ones(4)}, str(path))
    with pytest.raises(VectorFileError, match="not an nsteer vector"):
        load_vector(path)
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(VectorFileError, match="not an nsteer vector"):
        load_vector(path)


def _write(path: Path, tensors: dict, metadata_json: str) -> None:
    save_file(tensors, str(path), metadata={"format": FORMAT, "nsteer": metadata_json})


def _tensors(vector: SteeringVector) -> dict:
    return {"directions": vector.directions, "mean_projections": vector.mean_projections, "norms": vector.norms}


@pytest.mark.parametrize("name", ["directions", "mean_projections", "norms"])
def test_nan_tensors_are_refused(tmp_path, name):
    vector = make_vector()
    tensors = _tensors(vector)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[1] = float("nan")
    path = tmp_path / "v.safetensors"
    _write(path, tensors, vector.metadata.to_json())
    with pytest.raises(VectorFileError, match=f"'{name}' holds NaN"):
        load_vector(path)


def test_infinite_tensor_is_refused(tmp_path):
    vector = make_vector()
    tensors = _tensors(vector)
    tensors["norms"] = torch.tensor([1.0, float("inf"), 1.0, 1.0])
    path = tmp_path / "v.safetensors"
    _write(path, tensors, vector.metadata.to_json())
    with pytest.raises(VectorFileError, match="NaN or infinite"):
        load_vector(path)


@pytest.mark.parametrize("name", ["directions", "mean_projections", "norms"])
def test_missing_tensor_is_named(tmp_path, name):
    vector = make_vector()
    tensors = _tensors(vector)
    del tensors[name]
    path = tmp_path / "v.safetensors"
    _write(path, tensors, vector.metadata.to_json())
    with pytest.raises(VectorFileError, match=f"lacks the tensor\\(s\\) {name}"):
        load_vector(path)


def test_shapes_that_contradict_the_metadata(tmp_path):
    vector = make_vector()
    tensors = _tensors(vector)
    tensors["directions"] = torch.zeros(4, 32)
    path = tmp_path / "v.safetensors"
    _write(path, tensors, vector.metadata.to_json())
    with pytest.raises(VectorFileError, match="do not match the metadata"):
        load_vector(path)


def test_metadata_that_is_not_json_or_lacks_fields(tmp_path):
    vector = make_vector()
    path = tmp_path / "v.safetensors"
    _write(path, _tensors(vector), "{not json")
    with pytest.raises(VectorFileError, match="not valid JSON"):
        load_vector(path)
    data = json.loads(vector.metadata.to_json())
    del data["hidden_size"], data["model_id"]
    _write(path, _tensors(vector), json.dumps(data))
    with pytest.raises(VectorFileError, match="lacks hidden_size, model_id"):
        load_vector(path)


def test_unknown_metadata_fields_from_a_newer_version_are_ignored(tmp_path):
    vector = make_vector()
    data = json.loads(vector.metadata.to_json())
    data["a_field_from_the_future"] = 1
    path = tmp_path / "v.safetensors"
    _write(path, _tensors(vector), json.dumps(data))
    assert load_vector(path).metadata == vector.metadata
