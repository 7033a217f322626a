"""Vector files that cannot be mixed up, silently replaced or trusted beyond what they hold.

llama.cpp control vectors (GGUF) are read as data: what their metadata claims is checked against what the file
holds before anything is allocated; weights must stay finite in float32; imports and exports do not replace existing
files without --force, and an imported file's llama.cpp scale never becomes a recomputed vector's searched setting.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from cli_runner import run_cli

from nsteer.errors import NsteerError, VectorFileError
from nsteer.interop import export_llama_cpp, import_llama_cpp, read_control_vector
from nsteer.limits import MAX_LAYERS
from nsteer.vectors import SteeringVector, VectorMetadata, carry_choices, load_vector, save_vector

FLOAT32_MAX = float(np.finfo(np.float32).max)


def make_vector(handle, *, instruction: str = "length_0", chosen=None) -> SteeringVector:
    generator = torch.Generator().manual_seed(0)
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
        instruction_id=instruction,
        category="length",
        chosen=chosen,
    )
    return SteeringVector(directions, torch.randn(handle.n_layers), torch.rand(handle.n_layers) + 1, metadata)


def write_gguf(path: Path, tensors: dict, *, source: object = None, layer_count: object = None) -> Path:
    """A control vector through the gguf package's own writer, with whatever metadata a test wants to lie with."""
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "tiny")
    if isinstance(layer_count, str):
        writer.add_string("controlvector.layer_count", layer_count)
    else:
        writer.add_uint32("controlvector.layer_count", len(tensors) if layer_count is None else layer_count)
    if source is not None:
        writer.add_string("nsteer.source", source if isinstance(source, str) else json.dumps(source))
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_claimed_layer_count_the_file_cannot_back_is_refused_before_allocation(tmp_path):
    """A 576-byte file claiming 100 million layers: a [1e8, 64] vector (25 GB) must not be allocated."""
    path = write_gguf(
        tmp_path / "liar.gguf",
        {"direction.1": np.ones(64, np.float32)},
        source={"n_layers": 10**8, "hidden_size": 64, "model_id": "m"},
    )
    assert path.stat().st_size < 1024
    tracemalloc.start()
    try:
        with pytest.raises(
            VectorFileError, match=f"field n_layers is 100000000, not a layer count from 1 to {MAX_LAYERS}"
        ):
            import_llama_cpp(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20  # nothing near the claim was ever allocated


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("not json", "not a JSON object"),
        ([1, 2], "not a JSON object"),
        ({"n_layers": "4"}, "field n_layers is '4'"),
        ({"n_layers": True}, "field n_layers is True"),
        ({"hidden_size": 0}, "field hidden_size is 0"),
        ({"hidden_size": 10**12}, "field hidden_size is 1000000000000"),
        ({"check_kwargs": ["a"]}, "field check_kwargs is ['a'], not an object"),
        ({"layers": [1, "x"]}, "field layers is [1, 'x']"),
        ({"weight": "NaN"}, "field weight is 'NaN'"),
        ({"model_id": {"a": 1}}, "field model_id is {'a': 1}, not a string"),
        ({"n_layers": 2, "model_id": "m"}, "steers layer(s) [3] but its metadata says the model has 2 layers"),
    ],
)
def test_every_field_of_the_nsteer_record_is_checked(tmp_path, source, fragment):
    path = write_gguf(tmp_path / "cv.gguf", {"direction.3": np.ones(8, np.float32)}, source=source)
    with pytest.raises(VectorFileError, match=re.escape(fragment)):
        read_control_vector(path)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("direction." + "9" * 5000, "is not direction.N"),  # int() of it would be a ValueError traceback
        ("direction.²", "is not direction.N"),  # str.isdigit() says yes, int() says no
        ("direction.01", "is not direction.N"),  # a second name for layer 1
        (f"direction.{MAX_LAYERS}", f"from 1 to {MAX_LAYERS - 1}"),
    ],
)
def test_direction_names_are_plain_layer_numbers(tmp_path, name, fragment):
    try:
        path = write_gguf(tmp_path / "cv.gguf", {name: np.ones(8, np.float32)})
    except ValueError:  # the gguf writer's own limits on names
        pytest.skip("the gguf writer refuses this name")
    with pytest.raises(VectorFileError, match=fragment):
        read_control_vector(path)


def test_layer_count_and_model_hint_of_the_wrong_type(tmp_path):
    path = write_gguf(tmp_path / "cv.gguf", {"direction.1": np.ones(8, np.float32)}, layer_count="four")
    with pytest.raises(VectorFileError, match="controlvector.layer_count is 'four', not a layer count"):
        read_control_vector(path)


def test_a_direction_too_long_for_float32_is_refused_on_import(tiny, tmp_path):
    handle = tiny("llama")
    huge = np.full(handle.hidden_size, FLOAT32_MAX / 2, np.float32)  # every value finite, the length is not
    path = write_gguf(tmp_path / "cv.gguf", {"direction.1": huge})
    with pytest.raises(VectorFileError, match="direction.1 has length .* beyond float32"):
        import_llama_cpp(path, handle=handle)


def test_export_weights_must_stay_finite_in_float32(tiny, tmp_path):
    vector = make_vector(tiny("llama"))
    with pytest.raises(NsteerError, match="--weight 1e\\+39 overflows float32"):
        export_llama_cpp(vector, tmp_path / "cv.gguf", layers=[1], weight=1e39)
    assert not (tmp_path / "cv.gguf").exists()
    path = export_llama_cpp(vector, tmp_path / "cv.gguf", layers=[1], weight=-3e38)  # large, but representable
    assert np.isfinite(read_control_vector(path).directions[1]).all()


def test_an_imported_setting_never_survives_a_recompute(tiny, tmp_path):
    handle = tiny("llama")
    gguf_path = export_llama_cpp(make_vector(handle), tmp_path / "cv.gguf", layers=[1, 2], weight=5.0)
    imported = import_llama_cpp(gguf_path, handle=handle)
    assert imported.metadata.chosen is not None  # llama.cpp's scale, recorded as the imported file's setting
    target = save_vector(imported, tmp_path / "length_0.safetensors")
    recomputed = make_vector(handle)  # what `nsteer compute` would write for the same instruction
    assert carry_choices(target, recomputed).metadata.chosen is None
    searched = {"layer": 2, "mode": "add", "weight": 3.0, "positions": "all"}
    save_vector(make_vector(handle, chosen=searched), target)  # a searched, computed vector: its setting is kept
    assert carry_choices(target, recomputed).metadata.chosen is not None


# --- command line: existing files are not replaced without --force --------------------------------------------


def test_import_does_not_replace_a_vector_without_force(tiny, tmp_path, monkeypatch, capsys):
    handle = tiny("llama")
    computed = save_vector(make_vector(handle), tmp_path / "length_0.safetensors")
    before = computed.read_bytes()
    gguf_path = export_llama_cpp(make_vector(handle), tmp_path / "cv.gguf", layers=[1], weight=5.0)
    code, _, err = run_cli(monkeypatch, capsys, "import", str(gguf_path), "--out", str(computed))
    assert code == 2 and "already exists; pass --force" in " ".join(err.split())
    assert computed.read_bytes() == before
    code, _, err = run_cli(monkeypatch, capsys, "import", str(gguf_path), "--out", str(computed), "--force")
    assert code == 0, err
    assert load_vector(computed).metadata.imported_from


def test_export_does_not_replace_a_control_vector_without_force(tiny, tmp_path, monkeypatch, capsys):
    """`import a.gguf --out a.safetensors` then `export a.safetensors` would write over the original a.gguf."""
    handle = tiny("llama")
    original = write_gguf(tmp_path / "a.gguf", {"direction.1": np.ones(handle.hidden_size, np.float32)})
    before = original.read_bytes()
    save_vector(import_llama_cpp(original, handle=handle), tmp_path / "a.safetensors")
    code, _, err = run_cli(monkeypatch, capsys, "export", str(tmp_path / "a.safetensors"))
    assert code == 2 and "a.gguf already exists; pass --force" in " ".join(err.split())
    assert original.read_bytes() == before
    code, _, err = run_cli(monkeypatch, capsys, "export", str(tmp_path / "a.safetensors"), "--force")
    assert code == 0, err


def test_output_that_is_a_folder_is_named_before_any_work(tiny, tmp_path, monkeypatch, capsys):
    handle = tiny("llama")
    gguf_path = export_llama_cpp(make_vector(handle), tmp_path / "cv.gguf", layers=[1], weight=5.0)
    (tmp_path / "folder").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "import", str(gguf_path), "--out", str(tmp_path / "folder"))
    message = " ".join(err.split())
    assert code == 2 and "folder is a folder; give the path of the vector file to write" in message
    assert ".nsteer-tmp" not in message and list((tmp_path / "folder").iterdir()) == []
