"""Transfer: vectors computed on one model applied to another of the same architecture and width.

The guard: another model's vector loads only with ``transfer: true`` (recipe) or ``--allow-transfer`` (CLI), and a
different width or layer count is refused whatever the flag. The demonstration: a tiny "instruct" llama and its
"base" made by perturbing every instruct weight slightly (so, as with a real instruct/base pair, the two share most of
their geometry). The vector computed on the instruct model is close to the one the base model would give itself,
layer by layer, far closer than a vector from an unrelated model of the same shape, and the layer is searched again
on the base model with `nsteer search` machinery, writing the choice into the base model's copy of the file only.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import run_cli

from nsteer.errors import VectorFileError
from nsteer.generate import GenerationConfig, generate_tokens
from nsteer.models import wrap_model
from nsteer.pipeline import compute_recipe_vectors, load_recipe_vectors, recipe_edits, vector_path
from nsteer.recipe import recipe_from_dict
from nsteer.search import search_recipe
from nsteer.vectors import check_compatible, load_vector


def perturbed(handle, *, scale: float = 0.05, seed: int = 1, model_id: str = "tiny-llama-base"):
    """A "base" model: the instruct model's weights plus Gaussian noise of ``scale`` times each tensor's std."""
    model = copy.deepcopy(handle.hf_model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            std = parameter.float().std() if parameter.numel() > 1 else parameter.abs().float()
            noise = torch.randn(parameter.shape, generator=generator) * scale * std
            parameter.add_(noise.to(parameter.dtype))
    return wrap_model(model, handle.tokenizer, model_id=model_id)


@pytest.fixture(scope="module")
def pair(tiny):
    instruct = tiny("llama")
    return instruct, perturbed(instruct)


def recipe_for(output: Path, *, transfer: bool = False, steer=None, **extra):
    data = {
        "name": "transfer-test",
        "model": {"id": "tiny"},
        "prompts": {"base": "builtin:base-v1", "seed": 0, "max_pairs": 12},
        "instructions": {"lowercase": {}},
        "steer": steer if steer is not None else [{"instruction": "lowercase", "layer": 2, "mode": "set"}],
        "transfer": transfer,
        "output": {"dir": str(output)},
        **extra,
    }
    return recipe_from_dict(data)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory, pair):
    """The lowercase vector computed on the instruct model."""
    folder = tmp_path_factory.mktemp("instruct")
    compute_recipe_vectors(recipe_for(folder), pair[0])
    return folder


def target_copy(source_dir: Path, folder: Path) -> Path:
    """The documented step: copy the instruct model's vector into the base model's output folder."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(source_dir / "lowercase.safetensors", folder / "lowercase.safetensors")
    return folder


# --- the guard ----------------------------------------------------------------------------------------------------


def test_transfer_refused_without_the_flag_and_allowed_with_it(pair, source_dir, tmp_path):
    instruct, base = pair
    assert base.architecture == instruct.architecture and base.hidden_size == instruct.hidden_size
    assert base.weights_fingerprint != instruct.weights_fingerprint
    folder = target_copy(source_dir, tmp_path / "base")
    with pytest.raises(VectorFileError, match="another model") as error:
        load_recipe_vectors(recipe_for(folder), base)
    assert "transfer: true" in str(error.value) and "--allow-transfer" in str(error.value)
    assert (
        load_recipe_vectors(recipe_for(folder, transfer=True), base)["lowercase"].metadata.model_id == instruct.model_id
    )
    assert load_recipe_vectors(recipe_for(folder), base, allow_transfer=True)  # the CLI flag's path
    with pytest.raises(VectorFileError):  # the flag given as False overrides the recipe's true
        load_recipe_vectors(recipe_for(folder, transfer=True), base, allow_transfer=False)
    load_recipe_vectors(recipe_for(source_dir), instruct)  # its own model needs no flag


@pytest.mark.parametrize("shape", [{"hidden": 128}, {"layers": 6}], ids=["other-width", "other-layer-count"])
def test_other_shapes_are_refused_whatever_the_flag(tiny, source_dir, tmp_path, shape):
    other = tiny("llama", **shape)
    folder = target_copy(source_dir, tmp_path / "other")
    vector = load_vector(folder / "lowercase.safetensors")
    what = "width 128" if "hidden" in shape else "6 layers"
    for flag in (False, True):
        with pytest.raises(VectorFileError, match=what):
            check_compatible(vector, other, allow_transfer=flag)
        with pytest.raises(VectorFileError, match=what):
            load_recipe_vectors(recipe_for(folder, transfer=flag), other, allow_transfer=flag)


def test_cli_generate_needs_allow_transfer(pair, source_dir, tmp_path, monkeypatch, capsys):
    """End to end from the shell: a base model directory, a recipe pointing at the instruct model's vector file."""
    from tiny import tiny_tokenizer

    _, base = pair
    model_dir = tmp_path / "base-model"
    base.hf_model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    recipe = {
        "name": "base",
        "model": {"id": str(model_dir)},
        "instructions": {"lowercase": {}},
        "steer": [
            {"instruction": "lowercase", "layer": 2, "mode": "set", "vector": str(source_dir / "lowercase.safetensors")}
        ],
        "generation": {"max_new_tokens": 4},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(path), "--prompt", "Hi")
    assert code == 2 and "--allow-transfer" in " ".join(err.split()) and "Traceback" not in err
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(path), "--prompt", "Hi", "--allow-transfer")
    assert code == 0, err
    path.write_text(yaml.safe_dump({**recipe, "transfer": True}))
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(path), "--prompt", "Hi")
    assert code == 0, err


# --- the demonstration --------------------------------------------------------------------------------------------


def test_instruct_vector_transfers_to_its_perturbed_base(pair, source_dir, tmp_path, tiny):
    instruct, base = pair
    transferred = load_vector(source_dir / "lowercase.safetensors")
    native_dir = tmp_path / "native"
    compute_recipe_vectors(recipe_for(native_dir), base)  # what the base model would give itself
    native = load_vector(vector_path(recipe_for(native_dir), "lowercase"))
    unrelated_dir = tmp_path / "unrelated"
    compute_recipe_vectors(recipe_for(unrelated_dir), tiny("llama", seed=1))
    unrelated = load_vector(vector_path(recipe_for(unrelated_dir), "lowercase"))
    cos_native = torch.nn.functional.cosine_similarity(transferred.directions, native.directions, dim=-1)
    cos_unrelated = torch.nn.functional.cosine_similarity(transferred.directions, unrelated.directions, dim=-1)
    assert (cos_native > 0.9).all(), cos_native
    assert (cos_native > cos_unrelated + 0.3).all(), (cos_native, cos_unrelated)
    # The target projections z_l carry over less exactly (about 20-45% off at this perturbation: a projection moves
    # with the mean of the states, not only their direction), which is one reason the layer is searched again.
    assert (torch.sign(transferred.mean_projections) == torch.sign(native.mean_projections)).all()
    relative = (transferred.mean_projections - native.mean_projections).abs() / native.mean_projections.abs()
    assert (relative < 0.6).all(), relative


def test_layer_is_searched_again_on_the_base_model(pair, source_dir, tmp_path):
    instruct, base = pair
    folder = target_copy(source_dir, tmp_path / "base")
    steer = [{"instruction": "lowercase", "layer": "auto", "mode": "set"}]
    search = {"layers": [1, 2, 3], "max_prompts": 3, "max_new_tokens": 6, "condition": "absent"}
    recipe = recipe_for(folder, transfer=True, steer=steer, search=search, generation={"max_new_tokens": 6})
    with pytest.raises(VectorFileError, match="another model"):
        search_recipe(recipe_for(folder, steer=steer, search=search), base, out_dir=tmp_path / "s0")
    result = search_recipe(recipe, base, out_dir=tmp_path / "search")
    (sweep,) = result.sweeps
    assert [cell.setting.layer for cell in sweep.cells] == [1, 2, 3]
    assert result.model_id == base.model_id
    searched = load_vector(folder / "lowercase.safetensors")
    assert searched.metadata.chosen is not None and searched.metadata.chosen.layers_searched == (1, 2, 3)
    assert searched.metadata.model_id == instruct.model_id  # the file still says where the vector came from
    assert load_vector(source_dir / "lowercase.safetensors").metadata.chosen is None  # the source is untouched
    # With a searched layer (or the search's "no steering"), the recipe generates on the base model.
    edits = recipe_edits(recipe, load_recipe_vectors(recipe, base))
    tokens = generate_tokens(base, ["Describe the water cycle."], edits, config=GenerationConfig(max_new_tokens=6))
    assert len(tokens) == 1


def test_compute_keeps_a_copied_vector_when_the_recipe_says_transfer(pair, source_dir, tmp_path):
    instruct, base = pair
    folder = target_copy(source_dir, tmp_path / "base")
    before = (folder / "lowercase.safetensors").read_bytes()
    compute_recipe_vectors(recipe_for(folder, transfer=True), base)
    assert (folder / "lowercase.safetensors").read_bytes() == before  # kept: it is there to be transferred
    compute_recipe_vectors(recipe_for(folder), base)  # without transfer, the base model computes its own
    assert load_vector(folder / "lowercase.safetensors").metadata.model_id == base.model_id


def test_the_documented_gemma_recipes_are_valid():
    """docs/transfer.md's two recipes validate, differ only where they should, and the target says transfer: true."""
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "transfer.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    source, target = (recipe_from_dict(block) for block in blocks)
    assert (source.model.id, target.model.id) == ("google/gemma-2-2b-it", "google/gemma-2-2b")
    assert target.transfer and not source.transfer
    assert source.steer == target.steer and list(source.instructions) == list(target.instructions)
    assert f"runs/{target.name}" in text and f"runs/{source.name}/lowercase.safetensors" in text
