"""Layer / weight search: the quality guard, "no steering" as a winner, validation-only prompts, resume, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nsteer.errors import EvaluationError, RecipeError, VectorFileError
from nsteer.evaluate.runner import Reference
from nsteer.execution.backend import Execution
from nsteer.pipeline import (
    compute_recipe_vectors,
    instruction_splits,
    load_recipe_vectors,
    read_recipe_vectors,
    recipe_edits,
    vector_path,
)
from nsteer.recipe import recipe_from_dict
from nsteer.report import write_search_report
from nsteer.search import CHECKPOINT_NAME, Setting, SweepCell, candidate_layers, guard, search_recipe
from nsteer.vectors import load_vector

PASS_LOWER = "this is a short lowercase answer about the weather today."
LOOP_LOWER = "the cat sat on the mat " * 8  # passes the lowercase checker, and is a repetition loop
TITLE = "The Answer Is Here In Title Case For Everyone."


def make_recipe(tmp_path: Path, *, steer=None, search=None, instructions=None):
    return recipe_from_dict(
        {
            "name": "s",
            "prompts": {"max_pairs": 4},
            "instructions": instructions or {"lowercase": {}},
            "steer": steer if steer is not None else [{"instruction": "lowercase", "layer": "auto", "mode": "set"}],
            "search": {"layers": [1, 2, 3], "max_prompts": 3, "condition": "both", **(search or {})},
            "generation": {"max_new_tokens": 8, "batch_size": 4},
            "output": {"dir": str(tmp_path / "out")},
        }
    )


@pytest.fixture(scope="module")
def handle(tiny):
    return tiny("llama")


@pytest.fixture()
def setup(handle, tmp_path):
    def make(**kwargs):
        recipe = make_recipe(tmp_path, **kwargs)
        compute_recipe_vectors(recipe, handle)
        return recipe

    return make


def per_row(answer):
    """A stand-in generator answering each row with ``answer(prompt, edit)`` (edit None: no steering)."""

    def generator(h, prompts, *, row_edits, config, progress=None):
        return [answer(prompt, edits[0] if edits else None) for prompt, edits in zip(prompts, row_edits)]

    return generator


class ByLayer:
    """A stand-in generator whose answer depends only on each row's steered layer (None: no steering); records the
    prompts and edits of every row and the number of calls."""

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.prompts: list[str] = []
        self.edits: list[list] = []
        self.calls = 0

    def __call__(self, handle, prompts, *, row_edits, config, progress=None):
        self.calls += 1
        self.prompts.extend(prompts)
        self.edits.extend(list(edits) for edits in row_edits)
        return [self.answers.get(edits[0].layer if edits else None, TITLE) for edits in row_edits]


def reference_of(handle) -> Reference:
    return Reference(handle.hf_model, handle.tokenizer, "tiny")


def test_a_degenerate_layer_that_passes_the_checker_is_rejected(setup, handle) -> None:
    recipe = setup(search={"min_perplexity_ratio": 0.0})
    generator = ByLayer({None: TITLE, 1: TITLE, 2: LOOP_LOWER, 3: TITLE})
    result = search_recipe(recipe, handle, generator=generator, reference=reference_of(handle))
    (sweep,) = result.sweeps
    layer2 = next(c for c in sweep.cells if c.setting.layer == 2)
    assert layer2.loose == 1.0 and layer2.degenerate_share == 1.0  # the checker loves it ...
    assert layer2.substantive == 0.0  # ... but not one pass is substantive
    assert layer2.rejected and "degenerate 100% > baseline 0%" in layer2.rejected  # ... the guard does not
    assert sweep.winner.setting.no_steering
    chosen = load_vector(vector_path(recipe, "lowercase")).metadata.chosen
    assert chosen.no_steering and chosen.layer is None
    assert recipe_edits(recipe, load_recipe_vectors(recipe, handle)) == []  # layer: auto now means no edit


def test_an_accepted_better_layer_wins_and_is_used_by_layer_auto(setup, handle, tmp_path) -> None:
    recipe = setup()
    generator = ByLayer({None: TITLE, 3: PASS_LOWER})
    result = search_recipe(recipe, handle, generator=generator, reference=reference_of(handle))
    (sweep,) = result.sweeps
    assert sweep.winner.setting == Setting(3, "set", 1.0, "all") and sweep.winner.loose == 1.0
    chosen = load_vector(vector_path(recipe, "lowercase")).metadata.chosen
    assert chosen.layer == 3 and chosen.split == "validation" and chosen.baseline_score == 0.0
    assert (chosen.substantive_score, chosen.baseline_substantive_score) == (sweep.winner.substantive, 0.0)
    assert chosen.layers_searched == (1, 2, 3)
    (edit,) = recipe_edits(recipe, load_recipe_vectors(recipe, handle))
    assert (edit.layer, edit.mode, edit.weight) == (3, "set", 1.0)
    paths = write_search_report(result, tmp_path / "report")
    data = json.loads(paths["json"].read_text())
    assert data["sweeps"][0]["winner"] == "layer 3 set w=1"
    assert len(data["sweeps"][0]["cells"]) == 4 and len(data["sweeps"][0]["cells"][0]["answers"]) == 6
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lowercase | layer 3 set w=1 | 1.00 | 1.00 | 0% | 1.00 |" in paths["markdown"].read_text()


def test_perplexity_is_scored_only_for_settings_that_can_win(setup, handle, monkeypatch) -> None:
    """The perplexity rule only rejects: answers of settings other rules already keep from winning are not scored."""
    import nsteer.search as search_module

    scored: list[str] = []
    original = search_module.with_perplexity

    def recording(groups, reference):
        scored.extend(answer.answer for group in groups for answer in group)
        return original(groups, reference)

    monkeypatch.setattr(search_module, "with_perplexity", recording)
    recipe = setup()  # min_perplexity_ratio 0.5 by default
    other = "this other lowercase answer talks about the weather in a different way."
    generator = ByLayer({None: TITLE, 1: TITLE, 2: LOOP_LOWER, 3: other})  # 1 no better, 2 loops, 3 can win
    (sweep,) = search_recipe(recipe, handle, generator=generator, reference=reference_of(handle)).sweeps
    assert sorted(set(scored)) == sorted({TITLE, other}) and len(scored) == 12  # baseline and layer 3, 6 answers each
    by_layer = {cell.setting.layer: cell for cell in sweep.cells}
    assert math.isfinite(sweep.baseline.median_perplexity) and math.isfinite(by_layer[3].median_perplexity)
    assert math.isnan(by_layer[1].median_perplexity) and math.isnan(by_layer[2].median_perplexity)
    assert sweep.winner.setting.layer == 3


def test_the_perplexity_rule_still_rejects_a_setting_that_would_win(setup, handle, monkeypatch) -> None:
    import dataclasses

    import nsteer.search as search_module

    def fixed(groups, reference):  # the baseline's answers 10, the steered answers 4: below 0.5 x 10
        return [
            tuple(dataclasses.replace(a, perplexity=10.0 if a.answer == TITLE else 4.0) for a in group)
            for group in groups
        ]

    monkeypatch.setattr(search_module, "with_perplexity", fixed)
    recipe = setup()
    generator = ByLayer({None: TITLE, 3: PASS_LOWER})
    (sweep,) = search_recipe(recipe, handle, generator=generator, reference=reference_of(handle)).sweeps
    layer3 = next(cell for cell in sweep.cells if cell.setting.layer == 3)
    assert layer3.rejected == "median perplexity 4.00 < 0.5 x baseline 10.00"
    assert sweep.winner.setting.no_steering


def test_perplexity_is_scored_best_first_until_a_setting_passes(setup, handle, monkeypatch) -> None:
    """Best-ranked setting first, with the baseline; scoring stops at the first setting the rule accepts, and the
    winner is the one scoring every answer gives."""
    import nsteer.search as search_module

    other = "this other lowercase answer talks about the weather in a different way."
    # All three steered settings pass everything, so they tie and rank 1, 2, 3 (the first of equals wins).
    values = {TITLE: 10.0, PASS_LOWER: 4.0, other: 8.0}  # layer 1 falls below 0.5 x the baseline, 2 and 3 do not
    calls: list[list[str]] = []

    def fixed(groups, reference):
        calls.append(sorted({a.answer for group in groups for a in group}))
        return [tuple(dataclasses.replace(a, perplexity=values[a.answer]) for a in group) for group in groups]

    monkeypatch.setattr(search_module, "with_perplexity", fixed)
    recipe = setup()
    generator = ByLayer({None: TITLE, 1: PASS_LOWER, 2: other, 3: other})
    (sweep,) = search_recipe(recipe, handle, generator=generator, reference=reference_of(handle)).sweeps
    assert calls == [sorted([TITLE, PASS_LOWER]), [other]]  # layer 3 (tied with 2, which comes first) never scored
    by_layer = {cell.setting.layer: cell for cell in sweep.cells}
    assert by_layer[1].rejected == "median perplexity 4.00 < 0.5 x baseline 10.00"
    assert by_layer[2].median_perplexity == 8.0 and math.isnan(by_layer[3].median_perplexity)
    assert sweep.winner.setting.layer == 2


@pytest.mark.parametrize("seed", range(16))
def test_perplexity_best_first_chooses_what_scoring_every_setting_chooses(setup, handle, monkeypatch, seed) -> None:
    """Against the rule applied from first principles to every setting's full perplexities: settings that pass on
    different shares of the prompts, each answer with its own perplexity, some below half the baseline's."""
    import random
    import statistics

    import nsteer.search as search_module

    rng = random.Random(seed)
    texts = {layer: f"this lowercase answer number {layer} talks about the weather today." for layer in (1, 2, 3)}
    shares = {layer: rng.choice([0, 1, 2, 3]) for layer in texts}  # passes where len(prompt) % 3 < share
    values = {
        TITLE: rng.choice([4.0, 8.0, 10.0]),
        **{text: rng.choice([1.0, 3.0, 5.0, 9.0]) for text in texts.values()},
    }

    def answer(prompt, edit):
        if edit is None or len(prompt) % 3 >= shares[edit.layer]:
            return TITLE
        return texts[edit.layer]

    def fixed(groups, reference):
        return [tuple(dataclasses.replace(a, perplexity=values[a.answer]) for a in group) for group in groups]

    monkeypatch.setattr(search_module, "with_perplexity", fixed)
    recipe = setup()
    (sweep,) = search_recipe(recipe, handle, generator=per_row(answer), reference=reference_of(handle)).sweeps
    base = sweep.baseline

    def median(cell):
        return statistics.median(values[text] for text in cell.answers)

    eligible = [
        cell
        for cell in sweep.cells
        if cell.substantive > base.substantive
        and cell.degenerate_share <= base.degenerate_share + 0.1
        and median(cell) >= 0.5 * median(base)
    ]
    best = max(eligible, key=lambda c: (c.substantive, c.loose, c.strict, -c.setting.layer), default=base)
    assert sweep.winner.setting == best.setting


def test_no_steering_wins_when_every_setting_is_worse(setup, handle) -> None:
    recipe = setup()

    absent = {pair.without_instruction for pair in instruction_splits(recipe, "lowercase").validation}
    # Unsteered: passes without the instruction (half the prompts); steered: never.
    generator = per_row(lambda prompt, edit: PASS_LOWER if edit is None and prompt in absent else TITLE)
    result = search_recipe(recipe, handle, generator=generator, reference=None)
    (sweep,) = result.sweeps
    assert sweep.baseline.loose == pytest.approx(0.5)
    assert all(c.loose == 0.0 and c.rejected is None for c in sweep.cells)
    assert sweep.winner is sweep.baseline
    assert load_vector(vector_path(recipe, "lowercase")).metadata.chosen.no_steering


def test_a_tie_goes_to_no_steering(setup, handle) -> None:
    recipe = setup()
    result = search_recipe(recipe, handle, generator=ByLayer({}), reference=None)
    assert result.sweeps[0].winner.setting.no_steering


def test_search_never_reads_the_test_split(setup, handle) -> None:
    recipe = setup(search={"max_prompts": 50, "layers": [1]})
    generator = ByLayer({})
    search_recipe(recipe, handle, generator=generator, reference=None)
    split = instruction_splits(recipe, "lowercase")
    test_prompts = {p for pair in split.test for p in (pair.with_instruction, pair.without_instruction)}
    validation = {p for pair in split.validation[:50] for p in (pair.with_instruction, pair.without_instruction)}
    seen = set(generator.prompts)
    assert seen == validation  # condition both: every validation prompt, with and without the instruction
    assert not seen & test_prompts
    assert not {pair.base for pair in split.test} & {pair.base for pair in split.validation}


def test_add_entries_sweep_weights_and_layer_auto_takes_the_searched_weight(setup, handle) -> None:
    recipe = setup(
        steer=[{"instruction": "lowercase", "layer": "auto", "mode": "add"}],
        search={"layers": [1, 2], "weights": [2.0, -3.0], "max_prompts": 2},
    )

    generator = per_row(
        lambda prompt, edit: PASS_LOWER if edit is not None and (edit.layer, edit.weight) == (2, -3.0) else TITLE
    )

    (sweep,) = search_recipe(recipe, handle, generator=generator, reference=None).sweeps
    assert [(c.setting.layer, c.setting.weight) for c in sweep.cells] == [(1, 2.0), (1, -3.0), (2, 2.0), (2, -3.0)]
    assert (sweep.winner.setting.layer, sweep.winner.setting.weight) == (2, -3.0)
    (edit,) = recipe_edits(recipe, load_recipe_vectors(recipe, handle))
    assert (edit.layer, edit.mode, edit.weight) == (2, "add", -3.0)


def test_add_entries_sweep_weights_relative_to_the_layer_norm_by_default(setup, handle) -> None:
    recipe = setup(
        steer=[{"instruction": "lowercase", "layer": "auto", "mode": "add"}],
        search={"layers": [1, 2], "max_prompts": 2},
    )
    vector = load_recipe_vectors(recipe, handle)["lowercase"]
    norms = {layer: float(vector.norms[layer]) for layer in (1, 2)}
    assert norms[1] != norms[2]
    applied: set[tuple[int, float]] = set()

    def answer(prompt, edit):
        if edit is not None:
            applied.add((edit.layer, edit.weight))
        good = edit is not None and edit.layer == 2 and edit.weight == pytest.approx(2.0 * norms[2])
        return PASS_LOWER if good else TITLE

    generator = per_row(answer)

    (sweep,) = search_recipe(recipe, handle, generator=generator, reference=None).sweeps
    expected = {(layer, round(k * norms[layer], 4)) for layer in (1, 2) for k in (0.5, 1.0, 2.0)}  # the default ks
    assert {(layer, round(weight, 4)) for layer, weight in applied} == expected
    winner = sweep.winner.setting
    assert (winner.layer, winner.relative, winner.weight) == (2, 2.0, pytest.approx(2.0 * norms[2]))
    assert winner.label == f"layer 2 add w=2×‖u‖={2.0 * norms[2]:.3g}"
    chosen = load_vector(vector_path(recipe, "lowercase")).metadata.chosen
    assert chosen.weight == pytest.approx(2.0 * norms[2]) and chosen.weight_relative == 2.0
    assert chosen.weights_searched == (0.5, 1.0, 2.0) and chosen.weights_relative is True
    (edit,) = recipe_edits(recipe, load_recipe_vectors(recipe, handle))
    assert (edit.layer, edit.mode, edit.weight) == (2, "add", chosen.weight)


def test_set_entries_can_sweep_target_scales(setup, handle) -> None:
    recipe = setup(search={"layers": [2], "target_scales": [0.5, 1.5], "max_prompts": 2})
    vector = load_recipe_vectors(recipe, handle)["lowercase"]
    z = float(vector.mean_projections[2])

    generator = per_row(
        lambda prompt, edit: (
            PASS_LOWER if edit is not None and edit.target == pytest.approx(1.5 * z) and edit.weight == 1.0 else TITLE
        )
    )

    (sweep,) = search_recipe(recipe, handle, generator=generator, reference=None).sweeps
    assert [c.setting.target_scale for c in sweep.cells] == [0.5, 1.5]
    assert sweep.winner.setting.target_scale == 1.5 and sweep.winner.setting.label == "layer 2 set w=1 z×1.5"
    chosen = load_vector(vector_path(recipe, "lowercase")).metadata.chosen
    assert chosen.target_scale == 1.5 and chosen.target_scales_searched == (0.5, 1.5)
    (edit,) = recipe_edits(recipe, load_recipe_vectors(recipe, handle))
    assert (edit.layer, edit.mode, edit.weight, edit.target) == (2, "set", 1.0, pytest.approx(1.5 * z))


def test_steer_entries_take_weights_on_the_vector_scale_and_scaled_targets(setup, handle) -> None:
    recipe = setup(
        steer=[
            {"instruction": "lowercase", "layer": 1, "mode": "add", "weight": {"relative": 1.5}},
            {"instruction": "lowercase", "layer": 3, "mode": "set", "target_scale": 0.8},
        ]
    )
    vector = load_recipe_vectors(recipe, handle)["lowercase"]
    add, set_ = recipe_edits(recipe, {"lowercase": vector})
    assert (add.layer, add.mode, add.weight) == (1, "add", pytest.approx(1.5 * float(vector.norms[1])))
    assert (set_.layer, set_.weight) == (3, 1.0)
    assert set_.target == pytest.approx(0.8 * float(vector.mean_projections[3]))
    with pytest.raises(RecipeError, match="target_scale applies to mode set only"):
        setup(steer=[{"instruction": "lowercase", "layer": 1, "mode": "add", "target_scale": 2.0}])
    with pytest.raises(RecipeError, match=r"steer\[0\].weight.relative: Input should be a finite number"):
        setup(steer=[{"instruction": "lowercase", "layer": 1, "mode": "add", "weight": {"relative": math.inf}}])


def test_word_exclusion_searches_the_borrowed_inclusion_vector_without_touching_its_own_setting(setup, handle) -> None:
    recipe = setup(
        instructions={"include:ocean": {}, "exclude:ocean": {}},
        steer=[
            {"instruction": "include:ocean", "layer": "auto", "mode": "add"},
            {"instruction": "exclude:ocean", "vector": "include:ocean", "layer": "auto", "mode": "add", "weight": -3.0},
        ],
        search={"layers": [1, 2], "weights": [2.0], "max_prompts": 2, "condition": "present"},
    )
    exclusion_prompts = {pair.with_instruction for pair in instruction_splits(recipe, "exclude:ocean").validation}

    def answer(prompt, edit):
        # Inclusion prompts: only layer 1 (w=2) says "ocean". Exclusion prompts: only layer 2 (w=-3) avoids it.
        setting = (edit.layer, edit.weight) if edit else None
        if prompt in exclusion_prompts:
            return "A calm day by the sea." if setting == (2, -3.0) else "The ocean is calm."
        return "The ocean is calm." if setting == (1, 2.0) else "A calm day by the sea."

    generator = per_row(answer)

    result = search_recipe(recipe, handle, generator=generator, reference=None)
    assert [(s.instruction, s.winner.setting.label) for s in result.sweeps] == [
        ("include:ocean", "layer 1 add w=2"),
        ("exclude:ocean", "layer 2 add w=-3"),
    ]
    metadata = load_vector(vector_path(recipe, "include:ocean")).metadata
    assert (metadata.chosen.layer, metadata.chosen.weight) == (1, 2.0)  # the inclusion's own, not overwritten
    assert (metadata.chosen_for["exclude:ocean"].layer, metadata.chosen_for["exclude:ocean"].weight) == (2, -3.0)
    vectors = load_recipe_vectors(recipe, handle)
    include, exclude = recipe_edits(recipe, vectors)
    assert (include.layer, include.weight) == (1, 2.0)
    assert (exclude.layer, exclude.weight) == (2, -3.0)
    assert torch.equal(exclude.direction, vectors["include:ocean"].directions[2])  # the inclusion vector, borrowed
    # Recomputing the vector (other training pairs, no --force) keeps both searched settings.
    changed = recipe_from_dict({**recipe.model_dump(exclude_unset=True), "prompts": {"max_pairs": 3}})
    compute_recipe_vectors(changed, handle)
    recomputed = load_vector(vector_path(recipe, "include:ocean"))
    assert recomputed.metadata.prompt_set_hash != metadata.prompt_set_hash
    assert recomputed.metadata.chosen == metadata.chosen and recomputed.metadata.chosen_for == metadata.chosen_for


def test_layer_auto_never_takes_a_setting_searched_for_another_instruction(setup, handle) -> None:
    recipe = setup(
        instructions={"include:ocean": {}, "exclude:ocean": {}},
        steer=[{"instruction": "include:ocean", "layer": "auto", "mode": "add"}],
        search={"layers": [1], "weights": [2.0], "max_prompts": 2},
    )
    search_recipe(
        recipe,
        handle,
        generator=per_row(lambda prompt, edit: "The ocean is calm." if edit else "A calm day."),
        reference=None,
    )
    assert load_vector(vector_path(recipe, "include:ocean")).metadata.chosen.weight == 2.0
    borrower = recipe_from_dict(
        {
            **recipe.model_dump(exclude_unset=True),
            "steer": [{"instruction": "exclude:ocean", "vector": "include:ocean", "layer": "auto", "mode": "add"}],
        }
    )
    with pytest.raises(
        RecipeError,
        match=r"no searched layer for 'exclude:ocean' on the borrowed 'include:ocean' vector "
        r"\(a setting searched for one instruction is not used for another; its own search chose layer 1 add w=2.0\)",
    ):
        recipe_edits(borrower, load_recipe_vectors(borrower, handle))


def test_a_remote_sweep_generates_every_setting_in_one_call_with_the_same_result(setup, handle, tmp_path) -> None:
    recipe = setup()
    answers = {None: TITLE, 1: TITLE, 2: LOOP_LOWER, 3: PASS_LOWER}
    calls: list[list[int | None]] = []

    def generator(h, prompts, *, row_edits, config, progress=None):
        layers = [edits[0].layer if edits else None for edits in row_edits]
        calls.append(layers)
        return [answers[layer] for layer in layers]

    one_by_one = search_recipe(recipe, handle, generator=ByLayer(answers), reference=None, out_dir=tmp_path / "a")
    # Only decides how cells are grouped: the generator is fake.
    remote_handle = dataclasses.replace(handle, execution=Execution(remote=True))
    together = search_recipe(recipe, remote_handle, generator=generator, reference=None, out_dir=tmp_path / "b")
    (sweep,) = together.sweeps
    assert len(calls) == 1 and len(calls[0]) == 4 * len(sweep.baseline.prompts)  # baseline + 3 layers, one generation
    assert sorted(set(calls[0]), key=str) == sorted([None, 1, 2, 3], key=str)
    assert [(c.setting, c.loose, c.degenerate_share, c.answers) for c in sweep.cells] == [
        (c.setting, c.loose, c.degenerate_share, c.answers) for c in one_by_one.sweeps[0].cells
    ]
    assert sweep.winner.setting == one_by_one.sweeps[0].winner.setting == Setting(3, "set", 1.0, "all")
    again = search_recipe(recipe, remote_handle, generator=generator, reference=None, out_dir=tmp_path / "b")
    assert len(calls) == 1 and again.sweeps[0].winner.setting == sweep.winner.setting  # resumed from the checkpoint


def test_an_interrupted_sweep_resumes_without_redoing_finished_batches(setup, handle, tmp_path) -> None:
    recipe = setup()  # 3 prompt pairs, both conditions: 6 prompts; no steering + 3 layers = 24 rows, batches of 4
    full = ByLayer({2: PASS_LOWER})
    expected = search_recipe(recipe, handle, generator=full, reference=None, out_dir=tmp_path / "full", write=False)
    assert full.calls == 6 and len(full.prompts) == 24

    class Killed(ByLayer):
        def __call__(self, handle, prompts, **kwargs):
            if self.calls == 2:
                raise KeyboardInterrupt  # Ctrl-C during the third batch
            return super().__call__(handle, prompts, **kwargs)

    killed = Killed({2: PASS_LOWER})
    with pytest.raises(KeyboardInterrupt):
        search_recipe(recipe, handle, generator=killed, reference=None, out_dir=tmp_path / "run", write=False)
    done = list(zip(killed.prompts, (tuple(id(e) for e in edits) for edits in killed.edits)))
    assert len(done) == 8
    resumed = ByLayer({2: PASS_LOWER})
    result = search_recipe(recipe, handle, generator=resumed, reference=None, out_dir=tmp_path / "run", write=False)
    assert resumed.calls == 4 and len(resumed.prompts) == 16  # only the batches that had not finished
    assert [c.answers for c in result.sweeps[0].cells] == [c.answers for c in expected.sweeps[0].cells]
    assert result.sweeps[0].winner.setting.layer == 2
    again = ByLayer({2: PASS_LOWER})
    search_recipe(recipe, handle, generator=again, reference=None, out_dir=tmp_path / "run", write=False)
    assert again.calls == 0
    # A kill in the middle of writing the last batch's line: that batch alone is generated again.
    checkpoint = tmp_path / "run" / CHECKPOINT_NAME
    lines = checkpoint.read_bytes().splitlines(keepends=True)
    assert len(lines) == 6
    checkpoint.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    last = ByLayer({2: PASS_LOWER})
    search_recipe(recipe, handle, generator=last, reference=None, out_dir=tmp_path / "run", write=False)
    assert last.calls == 1 and len(last.prompts) == 4


def test_guard_rules() -> None:
    def cell(layer, degenerate, ppl):
        return SweepCell(Setting(layer), 1.0, 1.0, degenerate, ppl, (), (), ())

    baseline = cell(None, 0.2, 10.0)
    assert guard(cell(1, 0.3, 10.0), baseline, 0.1, 0.5) is None  # exactly at the margin passes
    assert "degenerate" in guard(cell(1, 0.31, 10.0), baseline, 0.1, 0.5)
    assert "perplexity 4.00 < 0.5 x baseline 10.00" in guard(cell(1, 0.0, 4.0), baseline, 0.1, 0.5)
    assert guard(cell(1, 0.0, 4.0), baseline, 0.1, 0.0) is None  # ratio 0 switches the perplexity rule off
    assert guard(cell(1, 0.0, math.nan), baseline, 0.1, 0.5) is None


def test_the_winner_is_ranked_by_substantive_passes_before_loose_accuracy() -> None:
    """A setting whose extra passes are loops, hollow headings or echoes does not beat one with fewer, real passes."""
    from nsteer.search import choose

    def cell(layer, loose, substantive, **changes):
        base = SweepCell(Setting(layer), loose, loose, 0.0, math.nan, (), (), (), substantive=substantive)
        return dataclasses.replace(base, **changes)

    baseline = cell(None, 0.25, 0.25)
    hollow, real = cell(1, 0.75, 0.25), cell(2, 0.5, 0.5)
    assert choose(baseline, [hollow, real]) is real
    assert choose(baseline, [hollow]) is baseline  # more loose passes, no more substantive ones: a tie, no steering
    assert choose(baseline, [cell(3, 0.5, 0.5, rejected="degenerate")]) is baseline
    assert choose(baseline, [cell(3, 0.5, 0.5, dropped="round 1")]) is baseline
    assert choose(baseline, [cell(3, 0.5, 0.5), cell(4, 0.75, 0.5)]).setting.layer == 4  # then loose
    assert choose(baseline, [cell(5, 1.0, math.nan)]).setting.layer == 5  # unmeasured: more loose passes decide
    unmeasured = cell(None, 0.5, math.nan)
    assert choose(unmeasured, [cell(6, 0.0, 0.0)]) is unmeasured  # 0 passes never beat a baseline's 0.5


def test_the_shared_word_search_pools_substantive_passes_so_a_pooled_setting_can_win() -> None:
    """make_vectors pools the word sweeps' cells; a pooled cell without its substantive share could never win."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from make_vectors import pooled_cell

    from nsteer.search import choose

    def cell(layer, share):
        return SweepCell(Setting(layer), share, share, 0.0, 10.0, ("p",), ("a",), (10.0,), substantive=share)

    baseline = pooled_cell([cell(None, 0.1), cell(None, 0.2)])
    steered = pooled_cell([cell(12, 0.9), cell(12, 0.8)])
    assert steered.substantive == pytest.approx(0.85) and baseline.substantive == pytest.approx(0.15)
    assert choose(baseline, [steered]) is steered


def test_search_settings_errors(setup, handle, tmp_path) -> None:
    assert candidate_layers(30) == list(range(6, 30, 2))
    with pytest.raises(EvaluationError, match="out of range"):
        candidate_layers(4, [1, 9])
    recipe = setup(steer=[{"instruction": "lowercase", "layer": 1}])
    with pytest.raises(RecipeError, match="no steer entry has `layer: auto`"):
        search_recipe(recipe, handle, generator=ByLayer({}), reference=None)
    with pytest.raises(RecipeError, match=r"field search.weights\[0\]: Input should be a finite number"):
        make_recipe(tmp_path, search={"weights": [float("nan")]})
    with pytest.raises(RecipeError, match=r"unknown key 'layer'. Allowed here: layers"):
        make_recipe(tmp_path, search={"layer": [1]})
    with pytest.raises(RecipeError, match=r"search.layers: layer 7 is out of range"):
        make_recipe(tmp_path, search={"layers": [7]}).check_layers(4)


def test_cli_compute_search_eval_end_to_end(handle, tmp_path, monkeypatch) -> None:
    """The real path on a tiny model saved to disk: compute, search (twice: the second resumes), eval."""
    from nsteer.cli import app

    model_dir = tmp_path / "tiny-model"
    handle.hf_model.save_pretrained(model_dir)
    handle.tokenizer.save_pretrained(model_dir)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        f"name: cli\nmodel: {{id: {model_dir}}}\nprompts: {{max_pairs: 4}}\ninstructions: {{lowercase: {{}}}}\n"
        "steer: [{instruction: lowercase, layer: auto}]\n"
        "search: {layers: [1, 3], max_prompts: 2}\nevaluation: {max_prompts: 2}\n"
        "generation: {max_new_tokens: 6, batch_size: 4}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    monkeypatch.setenv("NSTEER_CACHE_DIR", str(tmp_path / "cache"))  # no generation rate recorded yet
    runner = CliRunner()
    outputs = []
    for command in (["compute"], ["search"], ["search"], ["eval"]):
        outcome = runner.invoke(app, [*command, str(recipe_path)], catch_exceptions=False)
        assert outcome.exit_code == 0, outcome.output
        outputs.append(outcome.output)
    # 3 settings (no steering, layers 1 and 3) x 2 validation prompts; the first search measures the rate ...
    assert "plan: 3 settings × 2 prompts = 6 answers (no rate recorded" in outputs[1].replace("\n", " ")
    assert "plan: 3 settings × 2 prompts = 6 answers (≈ " in outputs[2].replace("\n", " ")  # ... the second uses it
    assert "plan: 2 prompts × up to 4 cells = 8 answers" in outputs[3] and "(≈ " in outputs[3]  # eval: the same rate
    checkpoint = tmp_path / "out" / "search" / CHECKPOINT_NAME
    # no steering + 2 layers on 2 prompts = 6 rows in batches of 4: 2 lines, not redone by the second search
    assert len(checkpoint.read_text().splitlines()) == 2
    assert (tmp_path / "out" / "search" / "search.md").read_text().count("WINNER") == 1
    data = json.loads((tmp_path / "out" / "eval" / "eval.json").read_text())
    assert len(data["answers"]) == 2 * 4  # two test prompts, four cells
    assert (tmp_path / "out" / "eval" / "eval-cells.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "search" / "search-layers.png").exists()


def _cell(layer, weight, loose, rejected=None) -> SweepCell:
    setting = Setting(layer, "add", weight, "all")
    return SweepCell(setting, loose, loose, 0.0, math.nan, ("p",), ("a",), (math.nan,), rejected)


def test_the_plot_keeps_the_winner_and_a_rejected_setting_with_the_same_score_apart() -> None:
    from nsteer.report import sweep_png, sweep_points
    from nsteer.search import InstructionSweep, SearchResult

    baseline = _cell(None, 0.0, 0.25)
    winner = _cell(3, 4.0, 0.5)
    cells = (_cell(1, 4.0, 0.0), _cell(1, 8.0, 0.0), winner, _cell(3, 8.0, 0.5, rejected="degenerate"))
    sweep = InstructionSweep("lowercase", 0, "v.safetensors", "absent", baseline, cells, winner, "rule")
    points = sweep_points(sweep)
    (rejected,) = points.rejected
    assert points.winner is not None and rejected != points.winner and rejected[1] == points.winner[1] == 0.5
    assert 1 < points.winner[0] < rejected[0] < 4  # one layer's weights sit side by side, before the next layer
    assert [label for label, _ in points.lines] == ["w=4", "w=8"]
    assert all(len(line) == 2 for _, line in points.lines)
    # The plot shows what the search ranks by: substantive passes where measured, not the loose passes of loops.
    hollow = dataclasses.replace(winner, substantive=0.25)
    hollow_sweep = dataclasses.replace(sweep, cells=(cells[0], cells[1], hollow, cells[3]), winner=hollow)
    assert sweep_points(hollow_sweep).winner[1] == 0.25
    no_steering = dataclasses.replace(sweep, winner=baseline)
    assert sweep_points(no_steering).winner is None
    scaled = tuple(
        dataclasses.replace(c, setting=dataclasses.replace(c.setting, relative=c.setting.weight / 4, weight=w))
        for c, w in zip(cells, (10.0, 20.0, 31.0, 62.0))  # one k means another weight at every layer
    )
    relative = dataclasses.replace(sweep, cells=scaled, winner=scaled[2])
    assert [(label, len(line)) for label, line in sweep_points(relative).lines] == [("w=1×‖u‖", 2), ("w=2×‖u‖", 2)]
    png = sweep_png(SearchResult("tiny", "", (sweep, no_steering, relative)))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_panel_title_stays_within_its_panel() -> None:
    from nsteer.report import panel_title

    title = panel_title("highlighted_sections", "layer 27 add w=2×‖u‖=360 (centered)")
    assert title == "highlighted_sections\n→ layer 27 add w=2×‖u‖=360 (centered)"
    long = panel_title("x" * 300, "layer 24 add w=1×‖u‖=156 (centered) " * 5)
    assert len(long.splitlines()) <= 4 and all(len(line) <= 46 for line in long.splitlines())
    assert panel_title("a$b\x1b", "no steering").splitlines()[0] == "a\\$b\\x1b"  # literal, as every plotted text


def test_dry_run_prints_the_plan_without_opening_the_model(setup, handle, tmp_path, monkeypatch) -> None:
    import nsteer.pipeline
    from nsteer.cli import app

    recipe = setup(  # vectors computed; the recipe file below points at them
        steer=[
            {"instruction": "lowercase", "layer": "auto", "mode": "add"},
            {"instruction": "uppercase", "layer": "auto"},
        ],
        instructions={"lowercase": {}, "uppercase": {}},
        search={"layers": [1, 2, 3], "max_prompts": 3, "condition": "absent", "weights": {"relative": [1, 2]}},
    )
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        "name: s\nprompts: {max_pairs: 4}\ninstructions: {lowercase: {}, uppercase: {}}\n"
        "steer: [{instruction: lowercase, layer: auto, mode: add}, {instruction: uppercase, layer: auto}]\n"
        "search: {layers: [1, 2, 3], max_prompts: 3, condition: absent, weights: {relative: [1, 2]}}\n"
        f"generation: {{max_new_tokens: 8, batch_size: 4}}\noutput: {{dir: {recipe.output_dir}}}\n"
    )

    def no_model(*args, **kwargs):
        raise AssertionError("--dry-run opened the model")

    monkeypatch.setattr(nsteer.pipeline, "open_model", no_model)
    outcome = CliRunner().invoke(app, ["search", str(recipe_path), "--dry-run"], catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output
    text = outcome.output.replace("\n", " ")
    # lowercase: 3 layers x 2 ks + no steering = 7; uppercase (set): 3 layers + no steering = 4; 3 prompts each,
    # the same base prompts (instruction absent), so the 3 no-steering answers are generated once: 27 - 3 = 24.
    assert "plan: 11 settings × 3 prompts = 33 answers, 30 to generate" in text
    assert "lowercase: 7 settings × 3 prompts = 21 answers" in text
    assert "uppercase: 4 settings × 3 prompts = 12 answers" in text
    assert not (recipe.output_dir / "search").exists()


def test_the_plan_counts_what_the_search_generates(setup, handle) -> None:
    from nsteer.search import plan_search

    recipe = setup(
        steer=[{"instruction": "lowercase", "layer": "auto", "mode": "add"}],
        search={"layers": [1, 2], "max_prompts": 2, "modes": ["add", "set"], "target_scales": [1.0, 1.5]},
    )
    generated: list[str] = []

    def generator(h, prompts, *, row_edits, config, progress=None):
        generated.extend(prompts)
        return [TITLE] * len(prompts)

    plan = plan_search(recipe, read_recipe_vectors(recipe))
    (sweep,) = search_recipe(recipe, handle, generator=generator, reference=None).sweeps
    # add: 2 layers x 3 default ks; set: 2 layers x 2 target scales (weight 1)
    assert [(c.setting.mode, c.setting.layer) for c in sweep.cells].count(("set", 1)) == 2
    assert plan.entries[0].settings == len(sweep.cells) == 10
    assert plan.answers == len(generated) == 11 * 4  # both conditions: 2 prompts without, 2 with the instruction


@pytest.fixture()
def planned(setup, tmp_path):
    """A recipe file whose vectors exist, for search commands that stop at the plan."""
    recipe = setup(steer=[{"instruction": "lowercase", "layer": "auto", "mode": "add"}])
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "name: s\nprompts: {max_pairs: 4}\ninstructions: {lowercase: {}}\n"
        "steer: [{instruction: lowercase, layer: auto, mode: add}]\n"
        "search: {layers: [1, 2, 3], max_prompts: 3, condition: absent}\n"
        f"generation: {{max_new_tokens: 8, batch_size: 4}}\noutput: {{dir: {recipe.output_dir}}}\n"
    )
    return path


def test_command_line_bounds_override_the_recipe(planned, monkeypatch, capsys) -> None:
    from cli_runner import run_cli

    code, out, err = run_cli(monkeypatch, capsys, "search", str(planned), "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["plan"]["entries"][0] == {
        "instruction": "lowercase",
        "settings": 10,
        "prompts": 3,
        "answers": 30,
    }
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        *("search", str(planned), "--dry-run", "--json", "--limit", "2", "--layers", "1,3"),
        *("--weights", "20,40", "--modes", "add,ablate", "--max-new-tokens", "5"),
    )
    assert code == 0, err
    plan = json.loads(out)["plan"]
    # 2 layers x (2 add weights + 1 ablate) + no steering = 7 settings on 2 prompts, 5 tokens each
    assert plan["entries"][0] == {"instruction": "lowercase", "settings": 7, "prompts": 2, "answers": 14}
    assert plan["max_new_tokens"] == 5
    code, out, err = run_cli(
        monkeypatch, capsys, "search", str(planned), "--dry-run", "--json", "--weights", "relative:1,4"
    )
    assert code == 0, err
    assert json.loads(out)["plan"]["entries"][0]["settings"] == 3 * 2 + 1
    code, out, err = run_cli(monkeypatch, capsys, "search", str(planned), "--dry-run", "--json", "--halving")
    assert code == 0, err
    plan = json.loads(out)["plan"]
    # 3 layers x 3 default ks on 3 prompts, halving from 4 pairs: one round, nothing saved
    assert plan["answers"] == plan["answers_without_halving"] == 9 * 3 + 3
    code, out, err = run_cli(
        monkeypatch, capsys, "search", str(planned), "--dry-run", "--halving", "--limit", "8", "--layers", "1,2,3"
    )
    assert code == 0, err
    # 9 settings on 8 pairs from 4: 9x4 + 5x4 = 56 steered + 8 unsteered = 64 of 9x8 + 8 = 80
    assert "80 answers; successive halving generates 64 of them" in err.replace("\n", " ")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--layers", "1,x", "--layers 1,x"),
        ("--layers", "1,99", "layer 99 is out of range"),
        ("--layers", "", "--layers : layers must be a non-empty list"),
        ("--weights", "relative:", "--weights relative:"),
        ("--weights", "1,nan", "Input should be a finite number (got nan)"),
        ("--modes", "set,sideways", "--modes set,sideways"),
        ("--limit", "0", "--limit 0"),
        ("--max-new-tokens", "-3", "--max-new-tokens -3"),
    ],
)
def test_bad_command_line_bounds_exit_2_naming_the_flag(planned, monkeypatch, capsys, flag, value, message) -> None:
    from cli_runner import run_cli

    import nsteer.pipeline

    monkeypatch.setattr(nsteer.pipeline, "open_model", lambda *a, **k: pytest.fail("a model was opened"))
    code, out, err = run_cli(monkeypatch, capsys, "search", str(planned), flag, value)
    assert code == 2 and message in err, err


def test_steer_entries_take_blocks_gates_clamps_skips_and_centered_directions(setup, handle) -> None:
    recipe = setup(
        instructions={"lowercase": {}, "uppercase": {}, "no_comma": {}},
        steer=[
            {"instruction": "lowercase", "layer": 1, "mode": "add", "weight": {"relative": 2.0}, "block": 2,
             "gate": 0.5, "skip_first": True},
            {"instruction": "uppercase", "layer": 2, "mode": "add", "weight": 3.0, "clamp": 0.0},
            {"instruction": "no_comma", "layer": 3, "mode": "add", "weight": 1.0, "direction": "centered",
             "positions": "prompt"},
        ],
    )  # fmt: skip
    vectors = load_recipe_vectors(recipe, handle)
    low, low2, upper, centered = recipe_edits(recipe, vectors)
    lower = vectors["lowercase"]
    assert [(e.layer, e.weight) for e in (low, low2)] == [
        (1, pytest.approx(float(lower.norms[1]))),  # k = 2 split over the block: 1 x ||u_l|| at each layer
        (2, pytest.approx(float(lower.norms[2]))),
    ]
    assert low.gate == pytest.approx(float(lower.mean_projections[1] - 0.5 * lower.norms[1])) and low.skip_first
    assert low2.gate == pytest.approx(float(lower.mean_projections[2] - 0.5 * lower.norms[2]))
    assert upper.bound == pytest.approx(float(vectors["uppercase"].mean_projections[2])) and upper.gate is None
    raw = torch.stack([vectors[n].directions[3] * vectors[n].norms[3] for n in ("lowercase", "uppercase", "no_comma")])
    specific = raw[2] - raw.mean(0)
    assert torch.allclose(centered.direction, specific / specific.norm(), atol=1e-6)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"block": 0}, r"steer\[0\].block: Input should be greater than or equal to 1"),
        ({"gate": 1.5}, r"steer\[0\].gate: Input should be less than or equal to 1"),
        ({"gate": -0.5}, r"steer\[0\].gate: Input should be greater than or equal to 0"),
        ({"gate": math.nan}, r"steer\[0\].gate: "),
        ({"clamp": math.inf}, r"steer\[0\].clamp: .*finite number"),
        ({"direction": "centered", "mode": "set"}, "a centered direction has no mean projection of its own"),
        ({"direction": "centered", "clamp": 0.0}, "a centered direction has no mean projection of its own"),
        ({"direction": "sideways"}, r"steer\[0\].direction"),
    ],
)
def test_bad_edit_options_in_a_steer_entry_are_refused(tmp_path, entry, message) -> None:
    with pytest.raises(RecipeError, match=message):
        make_recipe(tmp_path, steer=[{"instruction": "lowercase", "layer": 1, "mode": "add", **entry}])


def test_a_block_past_the_last_layer_and_a_centered_direction_without_three_vectors_are_refused(setup, handle) -> None:
    recipe = setup(steer=[{"instruction": "lowercase", "layer": 3, "mode": "add", "block": 2}])
    with pytest.raises(RecipeError, match=r"steer\[0\].block: a block of 2 layers from layer 3 ends past"):
        recipe.check_layers(handle.n_layers)
    centered = setup(steer=[{"instruction": "lowercase", "layer": 1, "mode": "add", "direction": "centered"}])
    with pytest.raises(RecipeError, match=r"steer\[0\].direction: A centered direction needs the vectors of 3 or more"):
        recipe_edits(centered, load_recipe_vectors(centered, handle))


def test_the_search_applies_the_entrys_options_and_records_them(setup, handle) -> None:
    recipe = setup(
        steer=[{"instruction": "lowercase", "layer": "auto", "mode": "add", "block": 2, "gate": 0.5}],
        search={"layers": [1, 2, 3], "weights": {"relative": [1.0]}, "max_prompts": 2},
    )
    seen = []

    def generator(h, prompts, *, row_edits, config, progress=None):
        edits = row_edits[0]
        seen.append([(e.layer, e.gate is not None) for e in edits])
        good = bool(edits) and edits[0].layer == 2
        return [PASS_LOWER if good else TITLE] * len(prompts)

    (sweep,) = search_recipe(recipe, handle, generator=generator, reference=None).sweeps
    assert [c.setting.layer for c in sweep.cells] == [1, 2]  # a block from layer 3 would not fit in 4 layers
    assert [(1, True), (2, True)] in seen and [(2, True), (3, True)] in seen
    assert (
        sweep.winner.setting.label == "layer 2 add w=1×‖u‖=" + f"{sweep.winner.setting.weight:.3g} (block 2, gate 0.5)"
    )
    chosen = load_vector(vector_path(recipe, "lowercase")).metadata.chosen
    assert (chosen.layer, chosen.block, chosen.gate, chosen.weight_relative) == (2, 2, 0.5, 1.0)
    assert chosen.options_label == "block 2, gate 0.5"
    first, second = recipe_edits(recipe, load_recipe_vectors(recipe, handle))
    vector = load_recipe_vectors(recipe, handle)["lowercase"]
    assert (first.layer, second.layer) == (2, 3)
    assert first.weight == pytest.approx(0.5 * float(vector.norms[2])) and first.gate is not None


def test_a_settings_answers_are_the_same_alone_or_batched_with_others(setup, handle, tmp_path) -> None:
    """Real greedy fp32 generation on the tiny model: layer 2's answers do not depend on what shares its batches."""
    from nsteer.generate import GenerationConfig, generate

    recipe = setup(search={"layers": [1, 2, 3], "max_prompts": 3})  # batches of 4 mix settings and prompts
    alone_recipe = setup(search={"layers": [2], "max_prompts": 3})
    batched = search_recipe(recipe, handle, reference=None, out_dir=tmp_path / "batched", write=False)
    alone = search_recipe(alone_recipe, handle, reference=None, out_dir=tmp_path / "alone", write=False)
    (layer2,) = [cell for cell in batched.sweeps[0].cells if cell.setting.layer == 2]
    assert layer2.answers == alone.sweeps[0].cells[0].answers
    assert batched.sweeps[0].baseline.answers == alone.sweeps[0].baseline.answers
    # ... and they are what plain generation with that one edit gives (the prompts as one batch of their own).
    vector = load_recipe_vectors(recipe, handle)["lowercase"]
    edit = nsteer_edit(vector, 2)
    config = GenerationConfig(max_new_tokens=8, batch_size=4)
    assert list(layer2.answers) == generate(handle, list(layer2.prompts), [edit], config=config)
    others = [cell.answers for cell in batched.sweeps[0].cells if cell.setting.layer != 2]
    assert all(answers != layer2.answers for answers in others)  # the settings do steer differently


def nsteer_edit(vector, layer):
    from nsteer.edits import edit_from_vector

    return edit_from_vector(vector, layer=layer, mode="set", weight=1.0)


def test_one_edit_per_setting_and_one_baseline_for_instructions_sharing_prompts(setup, handle) -> None:
    from nsteer.edits import compile_plan

    recipe = setup(
        instructions={"lowercase": {}, "uppercase": {}},
        steer=[{"instruction": "lowercase", "layer": "auto"}, {"instruction": "uppercase", "layer": "auto"}],
        search={"layers": [1, 2], "max_prompts": 3, "condition": "absent"},
    )
    recorded = ByLayer({})
    batches: list[list] = []

    def generator(h, prompts, *, row_edits, config, progress=None):
        batches.append(list(row_edits))
        return recorded(h, prompts, row_edits=row_edits, config=config)

    result = search_recipe(recipe, handle, generator=generator, reference=None, write=False)
    unsteered = [prompt for prompt, edits in zip(recorded.prompts, recorded.edits) if not edits]
    assert sorted(unsteered) == sorted(set(unsteered)) and len(unsteered) == 3  # the same 3 base prompts: once
    assert all(sweep.baseline.n == 3 for sweep in result.sweeps)
    assert result.sweeps[0].baseline.answers == result.sweeps[1].baseline.answers
    steered = [edits[0] for edits in recorded.edits if edits]
    assert len(steered) == 2 * 2 * 3 and len({id(edit) for edit in steered}) == 4  # 4 settings, one Edit each
    for row_edits in batches:  # full batches of 4 rows; one update per edited layer, each setting's direction once
        distinct = {id(edits[0]) for edits in row_edits if edits}
        plan = compile_plan(row_edits)
        assert [layer.slots for layer in plan] == [1] * len({edits[0].layer for edits in row_edits if edits})
        assert sum(int(layer.directions.shape[0]) for layer in plan) == len(distinct)
    assert [len(row_edits) for row_edits in batches] == [4, 4, 4, 3]  # 3 + 12 rows


def test_the_sweep_batches_rows_of_similar_prompt_length_together(setup, handle) -> None:
    """Rows are ordered by prompt length before they are cut into batches, so a batch pads little."""
    from nsteer.extract import fitted_token_ids

    recipe = setup(search={"layers": [1, 2, 3], "max_prompts": 4, "condition": "both"})
    calls: list[list[str]] = []
    recorded = ByLayer({})

    def generator(h, prompts, *, row_edits, config, progress=None):
        calls.append(list(prompts))
        return recorded(h, prompts, row_edits=row_edits, config=config)

    search_recipe(recipe, handle, generator=generator, reference=None, write=False)
    lengths = [len(fitted_token_ids(handle, prompt)) for call in calls for prompt in call]
    assert len(lengths) == 8 + 3 * 8  # the baseline and three layers on 4 pairs, with and without the instruction
    assert len(set(lengths)) > 1 and lengths == sorted(lengths)


def test_successive_halving_keeps_the_better_half_and_judges_the_winner_on_every_prompt(setup, handle) -> None:
    from nsteer.search import plan_search

    recipe = setup(
        steer=[{"instruction": "lowercase", "layer": "auto", "mode": "add"}],
        search={
            "layers": [1, 2, 3],
            "weights": [1.0, 2.0],
            "max_prompts": 5,
            "condition": "absent",
            "halving": True,
            "halving_start": 2,
        },
    )
    pairs = instruction_splits(recipe, "lowercase").validation[:5]
    late = {pair.without_instruction for pair in pairs[2:]}

    def answer(prompt, edit):
        if edit is None:
            return TITLE
        if (edit.layer, edit.weight) == (3, 2.0):  # weak on the first 2 prompts, perfect after: dropped early
            return PASS_LOWER if prompt in late else TITLE
        if edit.layer == 2:  # good on the first prompts only
            return TITLE if prompt in late and edit.weight == 2.0 else PASS_LOWER
        return TITLE

    recorded = ByLayer({})
    generate_rows = per_row(answer)

    def generator(h, prompts, *, row_edits, config, progress=None):
        recorded(h, prompts, row_edits=row_edits, config=config)
        return generate_rows(h, prompts, row_edits=row_edits, config=config)

    plan = plan_search(recipe, read_recipe_vectors(recipe))
    (sweep,) = search_recipe(recipe, handle, generator=generator, reference=None).sweeps
    # Rounds on 2, 4, then 5 pairs: 6 settings -> 3 -> 2. Steered rows: 6x2 + 3x2 + 2x1 = 20; no steering: 5.
    assert len(recorded.prompts) == 25 == plan.answers
    assert plan.full_answers == 6 * 5 + 5
    survivors = {(c.setting.layer, c.setting.weight) for c in sweep.cells if c.dropped is None}
    assert survivors == {(2, 1.0), (2, 2.0)}
    assert all(c.n == 5 for c in sweep.cells if c.dropped is None)
    dropped = {(c.setting.layer, c.setting.weight): c for c in sweep.cells if c.dropped}
    assert dropped[(3, 2.0)].n == 2 and "after 2 of 5" in dropped[(3, 2.0)].dropped
    # Ties keep sweep order: of the settings failing both first prompts, layer 1 w=1 comes first and stays a round.
    assert dropped[(1, 2.0)].n == 2 and dropped[(3, 1.0)].n == 2 and dropped[(1, 1.0)].n == 4
    assert (sweep.winner.setting.layer, sweep.winner.setting.weight) == (2, 1.0) and sweep.winner.loose == 1.0
    assert "successive halving" in sweep.rule


def test_halving_does_not_drop_the_best_setting_for_one_looping_answer_on_the_first_slice(setup, handle) -> None:
    """On a first slice of 4 answers one loop is 25% degenerate, over the guard's 0.1 margin; the guard judges only
    on every prompt, so the setting with the most substantive passes survives the round and wins."""
    recipe = setup(
        steer=[{"instruction": "lowercase", "layer": "auto", "mode": "add"}],
        search={"layers": [1, 2, 3], "weights": [1.0], "max_prompts": 8, "condition": "absent",
                "halving": True, "halving_start": 4, "min_perplexity_ratio": 0.0, "margin": 0.2},
    )  # fmt: skip
    pairs = instruction_splits(recipe, "lowercase").validation[:8]
    first = pairs[0].without_instruction

    def answer(prompt, edit):
        if edit is None or edit.layer == 1:
            return TITLE
        if edit.layer == 3:  # passes everywhere, but loops once, on the very first prompt
            return LOOP_LOWER if prompt == first else PASS_LOWER
        return PASS_LOWER if prompt == first else TITLE  # layer 2: one pass, no loop

    (sweep,) = search_recipe(recipe, handle, generator=per_row(answer), reference=None).sweeps
    best = next(c for c in sweep.cells if c.setting.layer == 3)
    assert best.dropped is None and best.n == 8 and best.degenerate_share == 1 / 8 and best.rejected is None
    assert sweep.winner is best


def test_layer_auto_takes_the_searched_positions_and_direction_and_refuses_others(setup, handle, tmp_path) -> None:
    """A vector searched as a centered prompt-only add is used that way by a plain `layer: auto` entry; an entry that
    names another shape, or centers on other vectors, is refused instead of steering with an unsearched edit."""
    three = {"lowercase": {}, "uppercase": {}, "no_comma": {}}
    shaped = {"mode": "add", "positions": "prompt", "direction": "centered"}
    recipe = setup(
        instructions=three,
        steer=[{"instruction": name, "layer": "auto", **shaped} for name in three],
        search={"layers": [2], "weights": {"relative": [1.0]}, "max_prompts": 2},
    )
    search_recipe(recipe, handle, generator=ByLayer({None: TITLE, 2: PASS_LOWER}), reference=None)
    chosen = load_vector(vector_path(recipe, "lowercase")).metadata.chosen
    assert (chosen.layer, chosen.positions, chosen.centered) == (2, "prompt", True)
    assert chosen.centered_on == ("lowercase", "no_comma", "uppercase")
    searched = recipe_edits(recipe, load_recipe_vectors(recipe, handle))

    def variant(entry_changes, names=tuple(three)):
        data = recipe.model_dump(exclude_unset=True)
        data["steer"] = [{"instruction": name, "layer": "auto", **entry_changes} for name in names]
        data["instructions"] = {name: {} for name in names}
        return recipe_from_dict(data)

    plain = variant({})  # no mode, positions or direction: all three come from the files
    adopted = recipe_edits(plain, load_recipe_vectors(plain, handle))
    assert len(adopted) == len(searched) == 1  # only lowercase passes at layer 2; the others keep no steering
    for mine, theirs in zip(adopted, searched):
        assert (mine.layer, mine.mode, mine.weight, mine.positions) == (theirs.layer, "add", theirs.weight, "prompt")
        assert torch.equal(mine.direction, theirs.direction)
    with pytest.raises(RecipeError, match=r"steer\[0\].positions: the setting searched for 'lowercase' \(layer 2\) "):
        recipe_edits(variant({"positions": "all"}), load_recipe_vectors(plain, handle))
    with pytest.raises(RecipeError, match=r"steer\[0\].direction: .*used direction centered, not own"):
        recipe_edits(variant({"direction": "own"}), load_recipe_vectors(plain, handle))
    pair = variant({}, names=("lowercase", "uppercase"))
    with pytest.raises(RecipeError, match=r"centered on the mean of 3 vectors .* this recipe steers with 2"):
        recipe_edits(pair, load_recipe_vectors(pair, handle))
    # One vector reached under two names counts twice in the mean: another center, refused too.
    data = plain.model_dump(exclude_unset=True)
    data["steer"] = [*data["steer"], {"instruction": "lowercase", "vector": str(vector_path(recipe, "lowercase")),
                                      "layer": 1, "mode": "add", "weight": 1.0}]  # fmt: skip
    twice = recipe_from_dict(data)
    with pytest.raises(RecipeError, match=r"steers with 4 \(lowercase, lowercase, no_comma, uppercase\)"):
        recipe_edits(twice, load_recipe_vectors(twice, handle))
    with pytest.raises(RecipeError, match=r"steer\[0\].gate: .*used gate none, not 0.5. Leave gate out"):
        recipe_edits(variant({"gate": 0.5}), load_recipe_vectors(plain, handle))


def test_a_centered_setting_without_its_vector_list_names_the_auto_entry(setup, handle) -> None:
    """An older file's centered setting (no centered_on) in a recipe with too few vectors: the error names the
    `layer: auto` entry whose searched setting is centered, not the first entry of the recipe."""
    three = {"lowercase": {}, "uppercase": {}, "no_comma": {}}
    recipe = setup(
        instructions=three,
        steer=[{"instruction": name, "layer": "auto", "mode": "add", "positions": "prompt", "direction": "centered"}
               for name in three],
        search={"layers": [2], "weights": {"relative": [1.0]}, "max_prompts": 2},
    )  # fmt: skip
    search_recipe(recipe, handle, generator=ByLayer({None: TITLE, 2: PASS_LOWER}), reference=None)
    vectors = load_recipe_vectors(recipe, handle)
    lower = vectors["lowercase"]
    older = lower.with_choice(dataclasses.replace(lower.choice(), centered_on=None))
    data = recipe.model_dump(exclude_unset=True)
    data["steer"] = [{"instruction": "uppercase", "layer": 1, "mode": "add", "weight": 1.0},
                     {"instruction": "lowercase", "layer": "auto"}]  # fmt: skip
    pair = recipe_from_dict(data)
    with pytest.raises(RecipeError, match=r"steer\[1\].direction: .*its searched setting steers along a centered"):
        recipe_edits(pair, {"lowercase": older, "uppercase": vectors["uppercase"]})
    # A file claiming an imported setting (whose shape the entry would choose) must say where it was imported from.
    claimed = lower.with_choice(dataclasses.replace(lower.choice(), imported=True, layers=(2,)))
    with pytest.raises(VectorFileError, match=r"steer\[1\] \('lowercase'\) says its setting was imported"):
        recipe_edits(pair, {"lowercase": claimed, "uppercase": vectors["uppercase"]})


def test_with_the_perplexity_rule_off_no_reference_model_is_opened(setup, handle, monkeypatch) -> None:
    import nsteer.search as search_module

    def refuse(*args, **kwargs):
        raise AssertionError("the reference model was opened although min_perplexity_ratio is 0")

    monkeypatch.setattr(search_module, "open_reference", refuse)
    recipe = setup(search={"min_perplexity_ratio": 0.0})
    (sweep,) = search_recipe(recipe, handle, generator=ByLayer({None: TITLE, 3: PASS_LOWER}), write=False).sweeps
    assert sweep.winner.setting.layer == 3
