"""llama.cpp control vectors: export to GGUF, read back with the `gguf` package's own reader, import, and bad files.

The layout checked here is llama.cpp's (see nsteer/interop.py for the source lines): architecture "controlvector",
``controlvector.model_hint`` / ``controlvector.layer_count``, one float32 ``direction.N`` [H] per layer, N >= 1 being
the block whose output it is added to (nsteer's layer N). The behavioural check replays what llama.cpp does with the
file (add each tensor at its layer, every position) through nsteer and compares it with the original add edit.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from cli_runner import run_cli

from nsteer.edits import edit_from_vector
from nsteer.errors import NsteerError, VectorFileError
from nsteer.generate import GenerationConfig, generate_tokens
from nsteer.interop import control_vector_edits, export_llama_cpp, import_llama_cpp, read_control_vector
from nsteer.searched import SearchedSetting
from nsteer.vectors import SteeringVector, VectorMetadata, check_compatible, load_vector, save_vector

PROMPTS = ["Describe the water cycle.", "Hi", "What are the pros and cons of working from home?"]
CONFIG = GenerationConfig(max_new_tokens=12)


def make_vector(handle, *, seed: int = 0, chosen=None) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(
        torch.randn(handle.n_layers, handle.hidden_size, generator=generator), dim=-1
    )
    metadata = VectorMetadata(
        nsteer_version="0.1.0",
        model_id=handle.model_id,
        config_hash=handle.config_hash,
        weights_fingerprint=handle.weights_fingerprint,
        architecture=handle.architecture,
        hidden_size=handle.hidden_size,
        n_layers=handle.n_layers,
        instruction_id="length_0",
        category="length",
        check_id="length_constraints:number_sentences",
        check_kwargs={"relation": "less than", "num_sentences": 3},
        chosen=chosen,
    )
    return SteeringVector(
        directions, torch.randn(handle.n_layers, generator=generator), torch.rand(handle.n_layers) + 1, metadata
    )


def reader_tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    return {tensor.name: np.array(tensor.data, dtype=np.float32).reshape(-1) for tensor in reader.tensors}


def field(path: Path, key: str):
    found = gguf.GGUFReader(str(path)).get_field(key)
    return None if found is None else found.contents()


# --- export -------------------------------------------------------------------------------------------------------


def test_export_writes_llama_cpp_layout_read_back_by_gguf(tiny, tmp_path):
    handle = tiny("llama")
    vector = make_vector(handle)
    path = export_llama_cpp(vector, tmp_path / "concise.gguf", layers=[3, 1], weight=6.5)
    assert path.read_bytes()[:4] == b"GGUF"
    assert field(path, "general.architecture") == "controlvector"
    assert field(path, "controlvector.model_hint") == handle.model_id
    assert field(path, "controlvector.layer_count") == 2
    source = json.loads(field(path, "nsteer.source"))
    assert source["model_id"] == handle.model_id and source["layers"] == [1, 3] and source["weight"] == 6.5
    assert source["hidden_size"] == handle.hidden_size and source["n_layers"] == handle.n_layers
    tensors = reader_tensors(path)
    assert sorted(tensors) == ["direction.1", "direction.3"]
    reader = gguf.GGUFReader(str(path))
    assert all(
        t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [handle.hidden_size] for t in reader.tensors
    )
    for layer in (1, 3):  # scaled as an add edit of weight 6.5 acts: w * u_l
        expected = (6.5 * vector.directions[layer].double()).float().numpy()
        np.testing.assert_allclose(tensors[f"direction.{layer}"], expected, rtol=0, atol=1e-6)


def test_export_defaults_to_the_searched_add_setting(tiny, tmp_path):
    handle = tiny("llama")
    vector = make_vector(handle, chosen=SearchedSetting(layer=2, mode="add", weight=-4.0, positions="all"))
    tensors = reader_tensors(export_llama_cpp(vector, tmp_path / "v.gguf"))
    np.testing.assert_allclose(tensors["direction.2"], (-4.0 * vector.directions[2]).numpy(), atol=1e-6)


def test_export_refusals(tiny, tmp_path):
    handle = tiny("llama")
    searched_set = make_vector(handle, chosen=SearchedSetting(layer=2, mode="set", weight=1.0))
    with pytest.raises(NsteerError, match="llama.cpp can only add"):
        export_llama_cpp(searched_set, tmp_path / "v.gguf")
    with pytest.raises(NsteerError, match="layer 0"):
        export_llama_cpp(searched_set, tmp_path / "v.gguf", layers=[0, 2], weight=2.0)
    with pytest.raises(NsteerError, match="out of range"):
        export_llama_cpp(searched_set, tmp_path / "v.gguf", layers=[handle.n_layers], weight=2.0)
    with pytest.raises(NsteerError, match="no searched layer"):
        export_llama_cpp(make_vector(handle), tmp_path / "v.gguf", weight=2.0)
    with pytest.raises(NsteerError, match="non-zero"):
        export_llama_cpp(searched_set, tmp_path / "v.gguf", layers=[1], weight=0.0)
    assert not list(tmp_path.iterdir())  # nothing half-written


# --- import -------------------------------------------------------------------------------------------------------


def test_import_round_trip(tiny, tmp_path):
    handle = tiny("llama")
    vector = make_vector(handle)
    path = export_llama_cpp(vector, tmp_path / "v.gguf", layers=[1, 3], weight=-2.5)
    imported = import_llama_cpp(path)
    meta = imported.metadata
    assert meta.model_id == handle.model_id and meta.weights_fingerprint == handle.weights_fingerprint
    assert meta.hidden_size == handle.hidden_size and meta.n_layers == handle.n_layers
    assert meta.instruction_id == "length_0" and meta.check_id == "length_constraints:number_sentences"
    assert "llama.cpp" in meta.imported_from and meta.chosen.layers == (1, 3)
    for layer in (1, 3):  # a negative weight flips the unit direction; the norm is the scale
        torch.testing.assert_close(imported.directions[layer], -vector.directions[layer], atol=1e-6, rtol=0)
        assert imported.norms[layer].item() == pytest.approx(2.5, abs=1e-5)
    for layer in (0, 2):
        assert imported.norms[layer] == 0 and not imported.directions[layer].any()
    assert not imported.mean_projections.any()
    check_compatible(imported, handle)  # same model: no transfer needed
    saved = load_vector(save_vector(imported, tmp_path / "v.safetensors"))  # survives the nsteer file too
    assert saved.metadata.imported_from == meta.imported_from
    torch.testing.assert_close(saved.directions, imported.directions)


def test_imported_vector_refuses_set_and_replays_llama_cpp(tiny, tmp_path):
    handle = tiny("llama")
    vector = make_vector(handle)
    imported = import_llama_cpp(export_llama_cpp(vector, tmp_path / "v.gguf", layers=[1, 2], weight=7.0))
    with pytest.raises(NsteerError, match="no mean projection"):
        edit_from_vector(imported, layer=1, mode="set")
    with pytest.raises(NsteerError, match="no direction at layer 3"):
        edit_from_vector(imported, layer=3, mode="add", weight=1.0)
    replay = control_vector_edits(imported)  # llama.cpp at strength 1: add each tensor at its layer
    assert [(e.layer, e.mode, round(e.weight, 4)) for e in replay] == [(1, "add", 7.0), (2, "add", 7.0)]
    original = [edit_from_vector(vector, layer=layer, mode="add", weight=7.0) for layer in (1, 2)]
    steered = generate_tokens(handle, PROMPTS, replay, config=CONFIG)
    assert steered == generate_tokens(handle, PROMPTS, original, config=CONFIG)
    assert steered != generate_tokens(handle, PROMPTS, [], config=CONFIG)  # the edits do something


def write_foreign(
    path: Path, tensors: dict[str, np.ndarray], *, arch: str = "controlvector", hint: str = "llama"
) -> Path:
    """A control vector as repeng writes one (no nsteer metadata), through the gguf package's writer."""
    writer = gguf.GGUFWriter(str(path), arch)
    if arch == "controlvector":
        writer.add_string("controlvector.model_hint", hint)
        writer.add_uint32("controlvector.layer_count", len(tensors))
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_foreign_file_takes_the_identity_of_the_model_it_is_imported_for(tiny, tmp_path):
    handle = tiny("llama")
    data = np.arange(handle.hidden_size, dtype=np.float32)
    path = write_foreign(tmp_path / "repeng.gguf", {"direction.2": data})
    imported = import_llama_cpp(path, handle=handle)
    assert imported.metadata.model_id == handle.model_id and imported.metadata.n_layers == handle.n_layers
    assert imported.norms[2].item() == pytest.approx(float(np.linalg.norm(data)), rel=1e-6)
    torch.testing.assert_close(imported.directions[2] * imported.norms[2], torch.from_numpy(data), atol=1e-4, rtol=0)
    with pytest.raises(NsteerError, match="does not say which model"):
        import_llama_cpp(path)
    assert import_llama_cpp(path, model_id="x", n_layers=4).metadata.model_id == "x"


def test_bad_files_are_clear_errors(tiny, tmp_path):
    handle = tiny("llama")
    good = export_llama_cpp(make_vector(handle), tmp_path / "good.gguf", layers=[1, 2], weight=3.0)
    cases = {}
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) - 100])
    cases[truncated] = "truncated"
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(good.read_bytes()[:40])
    cases[header_only] = "not a readable GGUF"
    not_gguf = tmp_path / "v.safetensors"
    save_vector(make_vector(handle), not_gguf)
    cases[not_gguf] = "not a GGUF file"
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    cases[empty] = "not a GGUF file"
    model_file = write_foreign(tmp_path / "model.gguf", {"token_embd.weight": np.ones(4, np.float32)}, arch="llama")
    cases[model_file] = "not a llama.cpp control vector"
    mixed = write_foreign(
        tmp_path / "mixed.gguf", {"direction.1": np.ones(8, np.float32), "direction.2": np.ones(9, np.float32)}
    )
    cases[mixed] = "different widths"
    half = write_foreign(tmp_path / "half.gguf", {"direction.1": np.ones(8, np.float16)})
    cases[half] = "not float32"
    zero = write_foreign(tmp_path / "zero.gguf", {"direction.0": np.ones(8, np.float32)})
    cases[zero] = "layer N from 1 to 1023"
    nothing = write_foreign(tmp_path / "nothing.gguf", {"other.1": np.ones(8, np.float32)})
    cases[nothing] = "no direction.N"
    cases[tmp_path / "missing.gguf"] = "not found"
    for path, fragment in cases.items():
        with pytest.raises(VectorFileError, match=fragment):
            read_control_vector(path)
    wide = tiny("llama", hidden=128)
    with pytest.raises(VectorFileError, match="width 64 but .* width 128"):
        import_llama_cpp(good, handle=wide)
    deep = tiny("llama", layers=6)
    with pytest.raises(VectorFileError, match="4 layers"):
        import_llama_cpp(good, handle=deep)
    foreign = write_foreign(tmp_path / "far.gguf", {"direction.9": np.ones(handle.hidden_size, np.float32)})
    with pytest.raises(VectorFileError, match=r"layer\(s\) \[9\]"):
        import_llama_cpp(foreign, handle=handle)


# --- command line -------------------------------------------------------------------------------------------------


def test_cli_export_and_import(tiny, tmp_path, monkeypatch, capsys):
    handle = tiny("llama")
    vector = make_vector(handle, chosen=SearchedSetting(layer=2, mode="set", weight=1.0))
    source = save_vector(vector, tmp_path / "length_0.safetensors")
    out = tmp_path / "cv.gguf"
    code, stdout, err = run_cli(
        monkeypatch,
        capsys,
        "export",
        str(source),
        "--format",
        "llama-cpp",
        "--layers",
        "1,3",
        "--weight",
        "-4",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "llama.cpp can only add" in " ".join(err.split())
    np.testing.assert_allclose(reader_tensors(out)["direction.3"], (-4 * vector.directions[3]).numpy(), atol=1e-6)
    back = tmp_path / "back.safetensors"
    code, stdout, err = run_cli(monkeypatch, capsys, "import", str(out), "--out", str(back))
    assert code == 0, err
    assert load_vector(back).metadata.chosen.layers == (1, 3)
    code, _, err = run_cli(monkeypatch, capsys, "export", str(source), "--out", str(out))
    assert code == 2 and "Give --weight" in err and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, "export", str(source), "--format", "onnx", "--weight", "1")
    assert code == 2 and "only export format is llama-cpp" in " ".join(err.split())
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    code, _, err = run_cli(monkeypatch, capsys, "import", str(bad), "--out", str(back))
    assert code == 2 and "not a readable GGUF" in " ".join(err.split()) and "Traceback" not in err


def test_cli_import_of_a_foreign_file_opens_the_model(tiny, tmp_path, monkeypatch, capsys):
    from tiny import tiny_hf_model, tiny_tokenizer

    model_dir = tmp_path / "model"
    tiny_hf_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    foreign = write_foreign(tmp_path / "repeng.gguf", {"direction.1": np.ones(64, np.float32)})
    back = tmp_path / "v.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "import", str(foreign), "--out", str(back))
    assert code == 2 and "--model-id" in err
    code, _, err = run_cli(
        monkeypatch, capsys, "import", str(foreign), "--out", str(back), "--model-id", str(model_dir)
    )
    assert code == 0, err
    vector = load_vector(back)
    assert vector.metadata.model_id == str(model_dir) and vector.metadata.n_layers == 4
    assert vector.norms[1].item() == pytest.approx(8.0)  # sqrt(64)
