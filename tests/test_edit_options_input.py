"""Hostile and malformed input to the edit options (block, gate, clamp, skip-first, centered directions) and to the
numbers around them: the SDK, the searched setting a vector file records, llama.cpp import/export, and the search.

Each case is refused with an error that names the argument or the file's field, never a traceback (OverflowError on a
400-digit integer, AttributeError on a wrong type), a silent no-op, or a file that nsteer then cannot read.
"""

from __future__ import annotations

import json
import math
import struct
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from test_search import handle, make_recipe, setup  # noqa: F401 (fixtures)
from test_vector_integrity import write_gguf
from test_vectors import make_vector

from nsteer.edits import Edit, EditOptions, edit_from_vector, mean_vector, vector_edits
from nsteer.errors import ArgumentError, NsteerError, RecipeError, VectorFileError
from nsteer.evaluate.checkpoint import append_checkpoint
from nsteer.evaluate.quality import assess
from nsteer.evaluate.runner import Row, Unit, generate_units, unit_key
from nsteer.generate import GenerationConfig
from nsteer.interop import (
    MAX_CONTROL_VECTOR_BYTES,
    export_llama_cpp,
    export_weight_and_layers,
    read_control_vector,
)
from nsteer.limits import MAX_LAYERS, is_finite_number
from nsteer.pipeline import steer_vector_path
from nsteer.search import candidate_settings, search_recipe
from nsteer.searched import SearchedSetting
from nsteer.vectors import MAX_HEADER_BYTES, load_vector, save_vector

HUGE = 10**400  # a valid Python (and JSON) integer that float() cannot hold: math.isfinite raises OverflowError
UNIT = torch.nn.functional.normalize(torch.ones(64), dim=0)


def test_finite_numbers_are_real_finite_and_not_bool():
    assert is_finite_number(1) and is_finite_number(-2.5) and is_finite_number(Fraction(1, 3))
    assert is_finite_number(np.float32(0.5)) and is_finite_number(10**300)
    for value in (HUGE, -HUGE, math.nan, math.inf, True, "1", None, torch.tensor(1.0), [1]):
        assert not is_finite_number(value), value


# --- the SDK ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Edit(layer=0, direction=UNIT, weight=HUGE), "weight must be a finite number, got 1000"),
        (lambda: Edit(layer=0, direction=UNIT, target=-HUGE), "target must be a finite number"),
        (lambda: Edit(layer=0, direction=UNIT, mode="add", gate=HUGE), "the gate must be a finite number"),
        (lambda: Edit(layer=0, direction=UNIT, mode="add", bound=HUGE), "the bound must be a finite number"),
        (lambda: EditOptions(gate=HUGE), "gate must be a number from 0 to 1"),
        (lambda: EditOptions(clamp=-HUGE), "clamp must be a finite number"),
        # c x ||u_l|| overflowed a float (an Edit error naming a bound nobody gave); recipes have the same bound
        (lambda: EditOptions(clamp=1.7e308), "clamp must be a finite number from -1e\\+06 to 1e\\+06"),
        (lambda: EditOptions(block=HUGE), f"at most {MAX_LAYERS}"),
        (lambda: EditOptions(block=MAX_LAYERS + 1), f"at most {MAX_LAYERS}"),
        (lambda: GenerationConfig(temperature=HUGE), "temperature must be a finite number above 0"),
        # float64 values past float32's range are finite, and inf once the float32 plan holds them
        (lambda: Edit(layer=0, direction=torch.full((64,), 1e39, dtype=torch.float64)), "float32-overflowing"),
        (
            lambda: Edit(layer=0, direction=UNIT, mode="add", gate=0.0, gate_direction=UNIT.double() * 1e40),
            "gate direction holds NaN, infinite or float32-overflowing",
        ),
    ],
)
def test_numbers_past_float_range_are_argument_errors(build, message):
    with pytest.raises(ArgumentError, match=message):
        build()


def test_edit_options_hold_plain_numbers():
    options = EditOptions(block=np.int64(2), clamp=Fraction(1, 3), gate=Fraction(1, 2))
    assert (type(options.block), type(options.clamp), type(options.gate)) == (int, float, float)
    assert options.label == "block 2, gate 0.5, clamp 0.333333"  # a Fraction could not be formatted with :g


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"layer": True}, "layer must be a layer number of 'lowercase' \\(0..3\\), got True"),
        ({"layer": 1.5}, "layer must be a layer number"),
        ({"layer": "1"}, "layer must be a layer number"),
        ({"layer": -1}, "layer must be a layer number"),
        ({"layer": HUGE}, "layer must be a layer number"),
        ({"options": None}, "options must be EditOptions, got NoneType"),
        ({"options": {"block": 2}}, "options must be EditOptions, got dict"),
        ({"weight_relative": "2"}, "weight_relative must be a finite number or None"),
        ({"weight_relative": math.nan}, "weight_relative must be a finite number or None"),
        ({"options": EditOptions(centered=True), "center": [[0.0]]}, "center must be a float tensor"),
        ({"options": EditOptions(centered=True), "center": torch.full((4, 64), math.nan)}, "center must be a float"),
        ({"options": EditOptions(centered=True), "center": torch.full((4, 64), math.inf)}, "center must be a float"),
        ({"options": EditOptions(centered=True), "center": torch.ones(4, 64, dtype=torch.long)}, "center must be"),
    ],
)
def test_vector_edits_names_a_bad_argument(arguments, message):
    kwargs = {"layer": 1, "mode": "add", "weight": 1.0, "positions": "all", **arguments}
    with pytest.raises(ArgumentError, match=message):
        vector_edits(make_vector(), **kwargs)


def test_a_center_that_overflows_is_refused_not_applied_as_a_zero_direction():
    vector = make_vector()
    with pytest.raises(NsteerError, match="the centered direction overflows float32"):  # was a zero direction
        vector_edits(
            vector, layer=1, mode="add", weight=1.0, positions="all", options=EditOptions(centered=True),
            center=torch.full((4, 64), 3e38),
        )  # fmt: skip


@pytest.mark.parametrize("vectors", [(v for v in ()), ["a", "b", "c"], None])
def test_mean_vector_refuses_what_is_not_a_list_of_vectors(vectors):
    with pytest.raises(ArgumentError, match="vectors must be|each of vectors must be SteeringVector"):
        mean_vector(vectors)


# --- the searched setting a vector file records -------------------------------------------------------------------


def _rewrite_chosen(path, tmp_path, name, raw_changes: dict[str, str]):
    """A copy of vector file ``path`` whose metadata's ``chosen`` has fields replaced by raw JSON text."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    meta = json.loads(header["__metadata__"]["nsteer"])
    text = json.dumps({**meta, "chosen": {**meta["chosen"], **{key: f"@{key}@" for key in raw_changes}}})
    for key, raw in raw_changes.items():
        text = text.replace(f'"@{key}@"', raw)
    header["__metadata__"]["nsteer"] = text
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    out = tmp_path / f"{name}.safetensors"
    out.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])
    return out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clamp": "1" + "0" * 400}, "field chosen.clamp: expected a finite number, got 1000"),
        ({"weight": "-1" + "0" * 400}, "field chosen.weight: expected a finite number"),
        ({"gate": "1" + "0" * 400}, "field chosen.gate: expected a finite number"),
        ({"clamp": "NaN"}, "field chosen.clamp: expected a finite number, got nan"),
        ({"clamp": "1e300"}, "field chosen.clamp: expected a value from -1000000.0 to 1000000.0"),
        ({"block": "1000000000"}, f"field chosen.block: expected a value from 1 to {MAX_LAYERS}"),
        ({"block": "1" + "0" * 400}, "field chosen.block: expected a value from 1"),
        ({"block": "true"}, "field chosen.block: expected an integer"),
        ({"layer": "3", "block": "2"}, "field chosen.block: a block of 2 layers from layer 3 ends past"),
        ({"centered": "true", "mode": '"set"'}, "field chosen.centered: a centered direction is searched with"),
        ({"centered": "true", "clamp": "0.5"}, "field chosen.centered"),
    ],
)
def test_a_crafted_searched_setting_is_refused_naming_its_field(tmp_path, changes, message):
    good = save_vector(
        make_vector(chosen=SearchedSetting(layer=1, mode="add", weight=2.0)), tmp_path / "good.safetensors"
    )
    with pytest.raises(VectorFileError, match=message):
        load_vector(_rewrite_chosen(good, tmp_path, "crafted", changes))


def test_a_vector_file_with_a_huge_header_is_refused_before_safetensors_parses_it(tmp_path, monkeypatch):
    """A 24 MB header of 12 million searched weights took 26 s and 1 GB to load (100 MB, safetensors' own limit:
    minutes and several GB), in every `nsteer list` of its folder."""
    import safetensors

    good = save_vector(make_vector(chosen=SearchedSetting(layer=1, mode="add", weight=2.0)), tmp_path / "g.safetensors")
    big = _rewrite_chosen(good, tmp_path, "big", {"weights_searched": "[" + ",".join(["1"] * 2_500_000) + "]"})
    assert big.stat().st_size > MAX_HEADER_BYTES
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("the header was parsed"))
    with pytest.raises(
        VectorFileError, match=r"not a readable .* declares a 5,.*-byte header; .* at most 4 MiB is read\)"
    ):
        load_vector(big)


@pytest.mark.parametrize(
    ("chosen", "message"),
    [
        (SearchedSetting(layer=1, mode="add", weight=math.nan), "field chosen.weight: expected a finite number"),
        (SearchedSetting(layer=1, mode="add", weight=HUGE), "field chosen.weight: expected a finite number"),
        (SearchedSetting(layer=3, mode="add", block=2), "a block of 2 layers from layer 3 ends past"),
        (SearchedSetting(layer=1, mode="add", gate=5.0), "field chosen.gate: expected a value from 0.0 to 1.0"),
        (SearchedSetting(layer=1, mode="sideways"), "field chosen.mode"),
    ],
)
def test_a_setting_that_would_not_read_back_is_never_written(tmp_path, chosen, message):
    """A setting built in code is checked when saved: writing it would leave a file load_vector refuses (and
    record_choice writes over the vector file that was there)."""
    path = save_vector(make_vector(), tmp_path / "v.safetensors")
    before = path.read_bytes()
    with pytest.raises(VectorFileError, match=f"cannot be saved: its metadata would not read back .*{message}"):
        save_vector(make_vector().with_choice(chosen), path)
    assert path.read_bytes() == before
    load_vector(path)


def test_a_searched_setting_with_options_is_not_half_applied_by_edit_from_vector_or_export(tmp_path):
    chosen = SearchedSetting(layer=1, mode="add", weight=2.0, block=2, gate=0.5)
    vector = make_vector(chosen=chosen)
    with pytest.raises(ArgumentError, match="searched with block 2, gate 0.5, which one Edit cannot hold"):
        edit_from_vector(vector)  # would put the block's whole weight at layer 1, ungated
    assert edit_from_vector(vector, layer=1, weight=1.0).weight == 1.0  # given explicitly: a plain edit
    with pytest.raises(ArgumentError, match="a llama.cpp control vector cannot express"):
        export_weight_and_layers(vector, None, None)
    with pytest.raises(ArgumentError, match="cannot express"):
        export_weight_and_layers(vector, [1], None)
    assert export_weight_and_layers(vector, [1, 2], 1.0) == ([1, 2], 1.0)


@pytest.mark.parametrize("weight", [HUGE, "2", True, math.nan, 0])
def test_export_refuses_a_weight_that_is_not_a_finite_non_zero_number(tmp_path, weight):
    with pytest.raises(ArgumentError, match="--weight must be a finite, non-zero number"):
        export_llama_cpp(make_vector(), tmp_path / "out.gguf", layers=[1], weight=weight)
    assert not (tmp_path / "out.gguf").exists()


def test_a_control_vector_whose_source_weight_is_a_400_digit_number_is_refused(tmp_path):
    source = '{"n_layers": 4, "hidden_size": 64, "model_id": "m", "weight": 1' + "0" * 400 + "}"
    path = write_gguf(tmp_path / "w.gguf", {"direction.1": np.ones(64, np.float32)}, source=source)
    with pytest.raises(VectorFileError, match="nsteer.source field weight is 1000.*, not a finite number"):
        read_control_vector(path)


def test_a_control_vector_larger_than_any_control_vector_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """`nsteer import model.gguf` by mistake: every float32 tensor was copied out of the file."""
    import gguf

    path = tmp_path / "model.gguf"
    with path.open("wb") as stream:  # sparse: no disk is used
        stream.write(b"GGUF")
        stream.truncate(MAX_CONTROL_VECTOR_BYTES + 1)
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: pytest.fail("the file was read"))
    with pytest.raises(VectorFileError, match="a control vector holds at most 1024 layers .* Is it a model GGUF?"):
        read_control_vector(path)


def test_a_control_vector_whose_source_record_is_huge_is_refused(tmp_path):
    source = json.dumps({"n_layers": 4, "hidden_size": 64, "model_id": "m", "note": "x" * (1 << 20)})
    path = write_gguf(tmp_path / "w.gguf", {"direction.1": np.ones(64, np.float32)}, source=source)
    with pytest.raises(VectorFileError, match="nsteer.source metadata is 1,048,.* characters"):
        read_control_vector(path)


# --- the search ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "layers", "message"),
    [
        (2, [3], "a block of 2 layers fits after none of the searched layers \\[3\\].* starts at layer 2 or earlier"),
        (5, None, "a block of 5 layers fits after none of the searched layers .* Make the block 4 layers or shorter"),
    ],
)
def test_a_block_that_fits_after_no_searched_layer_is_refused_not_recorded_as_no_steering(
    setup,  # noqa: F811
    handle,  # noqa: F811
    block,
    layers,
    message,
) -> None:
    """It used to sweep nothing and record "no steering" as the searched winner (so `layer: auto` steered nothing)."""
    recipe = setup(
        steer=[{"instruction": "lowercase", "layer": "auto", "mode": "add", "block": block}],
        search={"layers": layers, "weights": {"relative": [1.0]}, "max_prompts": 2},
    )
    path = steer_vector_path(recipe, 0)
    before = path.read_bytes()

    def generator(h, prompts, *, row_edits, config, progress=None):
        pytest.fail("the search generated")

    with pytest.raises(RecipeError, match=r"steer\[0\]\.block: " + message):
        search_recipe(recipe, handle, generator=generator, reference=None)
    assert path.read_bytes() == before and load_vector(path).metadata.chosen is None


@pytest.mark.parametrize("clamp", [1.0e7, -1.0e300])
def test_a_recipe_clamp_is_bounded_like_the_sdks(tmp_path, clamp):
    """A clamp of 1e308 loaded, and failed as an edit 'bound' of inf after the model had opened."""
    with pytest.raises(RecipeError, match=r"steer\[0\]\.clamp: Input should be (less|greater) than or equal to"):
        make_recipe(tmp_path, steer=[{"instruction": "lowercase", "layer": 1, "mode": "add", "clamp": clamp}])


def test_a_value_listed_twice_in_the_search_is_swept_once(tmp_path):
    """weights [1, 1.0, 1] with modes [add, add] made 12 settings of 2 distinct ones: 6x the generation."""
    recipe = make_recipe(
        tmp_path,
        steer=[{"instruction": "lowercase", "layer": "auto", "mode": "add"}],
        search={"layers": [1, 2], "weights": [1.0, 1.0, 1], "modes": ["add", "add"]},
    )
    assert [s.label for s in candidate_settings(recipe, 0, make_vector(), [1, 2])] == [
        "layer 1 add w=1",
        "layer 2 add w=1",
    ]
    recipe = make_recipe(
        tmp_path,
        steer=[{"instruction": "lowercase", "layer": "auto", "mode": "set"}],
        search={"layers": [1], "target_scales": [1.0, 1.0, 0.5]},
    )
    assert len(candidate_settings(recipe, 0, make_vector(), [1])) == 2


# --- eval's quality measure on hostile answers --------------------------------------------------------------------


def test_the_quality_measure_stays_linear_on_long_hostile_answers():
    """Degeneracy, hollowness and echo on 200 kB answers that are one word, symbol loops, unclosed markup and a long
    echo: each takes about a second on a loaded 2-core machine (1 MB: 1-5 s); quadratic work would take hours."""
    rng = np.random.default_rng(0)
    letters = "".join(chr(ord("a") + int(i)) for i in rng.integers(0, 26, 200_000))
    words = " ".join(letters[i : i + 5] for i in range(0, 200_000, 6))
    answers = [
        letters,  # one 200 kB word: no spaces at all
        "abcdefg" * 30_000,  # a 7-letter unit repeated inside one word
        "| --- " * 20_000 + words,  # a table border loop beside words
        "*" + letters + "\n<<" + letters,  # unclosed highlight and title
        "\x00\x1b[2J" + "\x07".join(letters[i : i + 3] for i in range(0, 60_000, 3)),  # control characters
    ]
    started = time.perf_counter()
    for answer in answers:
        assess(answer, words)  # echo against a prompt as long as the answer
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize(("length", "reused"), [(4 * 256, True), (4 * 256 + 1, False)])
def test_a_cached_answer_longer_than_the_model_could_give_is_generated_again(
    handle,  # noqa: F811
    tmp_path,
    length,
    reused,
):
    """A checkpoint line may be 256 MiB; an answer longer than max_new_tokens x 256 characters is not the model's."""
    unit = Unit("x", (Row("What is a cat?"),))
    config = GenerationConfig(max_new_tokens=4)
    path = tmp_path / "cells.jsonl"
    append_checkpoint(path, {"key": unit_key(handle, unit, config, "eval"), "answers": ["a" * length]})
    calls = []

    def generator(h, prompts, *, row_edits, config, progress=None):
        calls.append(prompts)
        return ["fresh"] * len(prompts)

    answers = generate_units(handle, [unit], kind="eval", config=config, generator=generator, checkpoint=path)
    assert answers == ([["a" * length]] if reused else [["fresh"]]) and bool(calls) != reused
