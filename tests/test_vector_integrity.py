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
from nsteer.searched import SearchedSetting
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


def test_a_tensor_larger_than_its_metadata_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A vector file whose directions are [4096, 4096] (64 MiB) while its metadata says 2 layers of width 8: the
    shapes are compared from the header, and no tensor is read into memory."""
    import safetensors
    from safetensors.torch import save_file

    metadata = VectorMetadata("0.1.0", "m", "c", "f", "LlamaForCausalLM", 8, 2, "shout")
    good = save_vector(
        SteeringVector(torch.nn.functional.normalize(torch.ones(2, 8), dim=-1), torch.ones(2), torch.ones(2), metadata),
        tmp_path / "good.safetensors",
    )
    with safetensors.safe_open(str(good), framework="pt") as stream:
        header = stream.metadata()
    path = tmp_path / "big.safetensors"
    save_file(
        {"directions": torch.zeros(4096, 4096), "mean_projections": torch.ones(2), "norms": torch.ones(2)},
        str(path),
        metadata=header,
    )
    real_open, read = safetensors.safe_open, []

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.stream = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.stream.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    with pytest.raises(VectorFileError, match=r"tensor shapes \(4096, 4096\), \(2,\), \(2,\) do not match"):
        load_vector(path)
    assert read == []
    assert load_vector(good).metadata.instruction_id == "shout" and read == ["directions", "mean_projections", "norms"]


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
    searched = SearchedSetting(layer=2, mode="add", weight=3.0)
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


# --- a running search and a recompute of the same file ---------------------------------------------------------


def search_setup(tiny, tmp_path):
    from nsteer.pipeline import compute_recipe_vectors, vector_path
    from nsteer.recipe import recipe_from_dict

    handle = tiny("llama")
    recipe = recipe_from_dict(
        {
            "name": "race",
            "prompts": {"max_pairs": 4},
            "instructions": {"lowercase": {}},
            "steer": [{"instruction": "lowercase", "layer": "auto", "mode": "set"}],
            "search": {"layers": [1, 2], "max_prompts": 2},
            "generation": {"max_new_tokens": 4, "batch_size": 4},
            "output": {"dir": str(tmp_path / "out")},
        }
    )
    compute_recipe_vectors(recipe, handle)
    return handle, recipe, vector_path(recipe, "lowercase")


def recomputed(vector: SteeringVector, seed: int = 1) -> SteeringVector:
    """The same instruction's vector computed again (other pairs, say): other tensors, no searched setting."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(vector.directions.shape, generator=generator), dim=-1)
    return SteeringVector(directions, vector.mean_projections + 1, vector.norms, vector.metadata)


def test_a_search_never_reverts_a_vector_recomputed_while_it_ran(tiny, tmp_path):
    from nsteer.search import search_recipe
    from nsteer.vectors import replace_vector

    handle, recipe, path = search_setup(tiny, tmp_path)
    original = load_vector(path)
    calls = []

    def generator(h, prompts, *, row_edits, config, progress=None):
        if not calls:  # a `nsteer compute --force` finishes while the sweep runs
            replace_vector(path, recomputed(original), keep_choices=False)
        calls.append(1)
        return ["this is a lowercase answer."] * len(prompts)

    newer = path.read_bytes()
    with pytest.raises(VectorFileError, match="changed while the search ran .* was not written"):
        search_recipe(recipe, handle, generator=generator, reference=None)
    assert path.read_bytes() != newer  # (the recompute did happen)
    after = load_vector(path)
    assert torch.equal(after.directions, recomputed(original).directions)  # the recomputed vector stays
    assert after.metadata.chosen is None  # and carries no setting searched on the old one


def test_a_recompute_keeps_a_setting_recorded_while_it_ran(tiny, tmp_path):
    from nsteer.vectors import record_choice, replace_vector

    handle, recipe, path = search_setup(tiny, tmp_path)
    original = load_vector(path)
    fresh = recomputed(original)  # compute started from the file as it was, and is about to write
    record_choice(path, original, SearchedSetting(layer=2))  # a search finishes first
    replace_vector(path, fresh)
    after = load_vector(path)
    assert torch.equal(after.directions, fresh.directions) and after.metadata.chosen.layer == 2


def test_two_searches_of_one_file_for_different_instructions_both_land(tiny, tmp_path):
    from nsteer.vectors import record_choice

    handle, recipe, path = search_setup(tiny, tmp_path)
    loaded_by_first = load_vector(path)
    loaded_by_second = load_vector(path)
    record_choice(path, loaded_by_first, SearchedSetting(layer=1))
    record_choice(path, loaded_by_second, SearchedSetting(layer=2, mode="add", weight=-3.0), "exclude:lower")
    after = load_vector(path)
    assert after.metadata.chosen.layer == 1 and after.choice("exclude:lower").weight == -3.0


def test_writers_of_one_folder_take_turns(tmp_path):
    """While one process holds the folder's lock (reading and writing a vector), another waits."""
    import threading
    import time

    from nsteer.fileio import folder_lock
    from nsteer.vectors import replace_vector

    path = tmp_path / "v.safetensors"
    vector = make_vector(types_handle())
    done = threading.Event()
    with folder_lock(path):
        worker = threading.Thread(target=lambda: (replace_vector(path, vector), done.set()))
        worker.start()
        time.sleep(0.3)
        assert not done.is_set() and not path.exists()  # blocked behind the lock
    worker.join(timeout=30)
    assert done.is_set() and load_vector(path).instruction_id == "length_0"


def types_handle():
    import types

    return types.SimpleNamespace(
        model_id="m",
        config_hash="c",
        weights_fingerprint="f",
        architecture="LlamaForCausalLM",
        hidden_size=8,
        n_layers=3,
    )


# --- a vector file renamed or copied onto another instruction ---------------------------------------------------


def test_a_renamed_vector_is_not_used_for_another_instruction(tiny, tmp_path):
    from nsteer.errors import RecipeError
    from nsteer.pipeline import read_recipe_vectors
    from nsteer.recipe import recipe_from_dict

    handle = tiny("llama")
    folder = tmp_path / "out"
    save_vector(make_vector(handle, instruction="lowercase"), folder / "uppercase.safetensors")

    def recipe(steer):
        data = {
            "instructions": {"uppercase": {}, "lowercase": {}},
            "steer": [steer],
            "output": {"dir": str(folder)},
        }
        return recipe_from_dict(data)

    with pytest.raises(RecipeError, match="holds the vector of 'lowercase', not of 'uppercase'"):
        read_recipe_vectors(recipe({"instruction": "uppercase", "layer": 1}))
    with pytest.raises(RecipeError, match="holds the vector of 'lowercase', not of 'uppercase'"):
        read_recipe_vectors(recipe({"instruction": "lowercase", "layer": 1, "vector": "uppercase"}))
    named = recipe({"instruction": "uppercase", "layer": 1, "vector": str(folder / "uppercase.safetensors")})
    (vector,) = read_recipe_vectors(named).values()  # borrowed on purpose: named as a file in the entry
    assert vector.instruction_id == "lowercase"


# --- tensors that are not a vector ------------------------------------------------------------------------------


def raw_file(tmp_path: Path, handle, **tensors) -> Path:
    from safetensors.torch import save_file

    from nsteer.vectors import FORMAT

    good = make_vector(handle)
    data = {"directions": good.directions, "mean_projections": good.mean_projections, "norms": good.norms, **tensors}
    path = tmp_path / "v.safetensors"
    save_file(data, str(path), metadata={"format": FORMAT, "nsteer": good.metadata.to_json()})
    return path


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: {"directions": d.to(torch.float64)}, "'directions' is float64, not float32"),
        (lambda d: {"norms": torch.ones(d.shape[0], dtype=torch.int32)}, "'norms' is int32"),
        (lambda d: {"directions": d * 36.0}, "are not unit length"),  # the raw mean difference, not û
        (lambda d: {"norms": -torch.ones(d.shape[0])}, "are negative"),
        (lambda d: {"directions": torch.cat([torch.zeros(1, d.shape[1]), d[1:]])}, "zero direction with a non-zero"),
        (lambda d: {"directions": torch.zeros_like(d), "norms": torch.zeros(d.shape[0])}, "every direction is zero"),
    ],
)
def test_tensors_that_are_not_a_vector_are_refused_on_load(tiny, tmp_path, change, fragment):
    handle = tiny("llama")
    path = raw_file(tmp_path, handle, **change(make_vector(handle).directions))
    with pytest.raises(VectorFileError, match=re.escape(fragment)):
        load_vector(path)


def test_a_zero_or_non_finite_vector_is_never_saved(tiny, tmp_path):
    import dataclasses

    from nsteer.extract import MeanDifference, direction_statistics

    handle = tiny("llama")
    vector = make_vector(handle)
    nan = vector.directions.clone()
    nan[0, 0] = float("nan")
    for broken in (
        dataclasses.replace(vector, directions=nan),
        dataclasses.replace(vector, directions=torch.zeros_like(nan), norms=torch.zeros(handle.n_layers)),
    ):
        with pytest.raises(VectorFileError, match="cannot be saved"):
            save_vector(broken, tmp_path / "v.safetensors")
    assert not (tmp_path / "v.safetensors").exists()
    same = torch.ones(handle.n_layers, handle.hidden_size, dtype=torch.float64)
    with pytest.raises(NsteerError, match=r"No direction can be computed at layer\(s\) \[0, 1, 2, 3\]"):
        direction_statistics(MeanDifference(same, same.clone(), 4))  # e.g. an all-zero result in place of sums


def test_metadata_nested_too_deeply_is_a_vector_file_error(tiny, tmp_path):
    from safetensors.torch import save_file

    from nsteer.vectors import FORMAT

    good = make_vector(tiny("llama"))
    tensors = {"directions": good.directions, "mean_projections": good.mean_projections, "norms": good.norms}
    save_file(tensors, str(tmp_path / "v.safetensors"), metadata={"format": FORMAT, "nsteer": "[" * 50_000})
    with pytest.raises(VectorFileError, match="not valid JSON .*nested too deeply"):
        load_vector(tmp_path / "v.safetensors")
