"""The 2×2 evaluation: counts against hand-computed expectations, IFEval JSONL input, word exclusion, reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nsteer.errors import EvaluationError
from nsteer.evaluate.check_spec import CheckSpec
from nsteer.evaluate.ifeval_data import read_ifeval_jsonl
from nsteer.evaluate.inputs import ifeval_items, instruction_edits, recipe_items
from nsteer.evaluate.runner import Reference, Row, score_answer
from nsteer.evaluate.stats import PairedChange, paired_change, sign_test
from nsteer.evaluate.table import CELLS, Cell, evaluate_recipe
from nsteer.pipeline import compute_recipe_vectors, load_recipe_vectors
from nsteer.recipe import recipe_from_dict
from nsteer.report import eval_markdown, write_eval_report

PASS_LOWER = "this is a short lowercase answer about the weather today."
LOOP_LOWER = "the cat sat on the mat " * 6  # passes the lowercase checker, and is a repetition loop
TITLE = "The Answer Is Here In Title Case For Everyone."
CAPS = "THIS IS AN ANSWER WRITTEN IN CAPITAL LETTERS ONLY."
ABSENT_UNSTEERED, ABSENT_STEERED, PRESENT_UNSTEERED, PRESENT_STEERED = CELLS


def make_recipe(tmp_path: Path, **extra):
    """A recipe on the built-in prompts whose vectors live in ``tmp_path`` (model id is not opened by the tests)."""
    data = {
        "name": "t",
        "prompts": {"max_pairs": 4},
        "instructions": {"lowercase": {}, "uppercase": {}},
        "steer": [{"instruction": "lowercase", "layer": 1, "mode": "set"}],
        "generation": {"max_new_tokens": 8, "batch_size": 4},
        "output": {"dir": str(tmp_path / "out")},
    }
    data.update(extra)
    return recipe_from_dict(data)


class FixedAnswers:
    """A stand-in generator: the answer depends on the item, the cell and the group, as the tables below say."""

    def __init__(self, recipe, plan: dict[str, dict[Cell, list[str]]], limit: int) -> None:
        # Instructions share base prompts, so a bare prompt names its position; a full prompt names its group too.
        self.group_of: dict[str, str] = {}
        self.position: dict[tuple[str, str, bool], int] = {}
        counts: dict[str, int] = {}
        for item in recipe_items(recipe, "test", limit):
            position = counts[item.group] = counts.get(item.group, -1) + 1
            self.group_of[item.prompt_with] = item.group
            self.position[(item.group, item.prompt_with, True)] = position
            self.position[(item.group, item.prompt_without, False)] = position
        self.plan = plan
        self.calls: list[tuple[list[str], list[list]]] = []

    def __call__(self, handle, prompts, *, row_edits, config, progress=None):
        self.calls.append((list(prompts), [list(edits) for edits in row_edits]))
        (group,) = {self.group_of[p] for p in prompts if p in self.group_of}
        answers = []
        for prompt, edits in zip(prompts, row_edits):
            present = prompt in self.group_of
            position = self.position[(group, prompt, present)]
            answers.append(self.plan[group][Cell(present, bool(edits))][position])
        return answers


PLAN = {
    "lowercase": {
        ABSENT_UNSTEERED: [TITLE, TITLE, TITLE],
        ABSENT_STEERED: [PASS_LOWER, PASS_LOWER, LOOP_LOWER],
        PRESENT_UNSTEERED: [PASS_LOWER, TITLE, TITLE],
        PRESENT_STEERED: [PASS_LOWER, PASS_LOWER, PASS_LOWER],
    },
    "uppercase": {  # no steer entry: the steered cells reuse the unsteered answers, never generate
        # The bare prompts are the same as lowercase's (shared base prompts): answered once, so never asked here.
        PRESENT_UNSTEERED: [CAPS, TITLE, CAPS],
    },
}


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("evaluated")
    recipe = make_recipe(tmp_path)
    handle = tiny("llama")
    compute_recipe_vectors(recipe, handle)
    generator = FixedAnswers(recipe, PLAN, limit=3)
    result = evaluate_recipe(
        recipe,
        handle,
        limit=3,
        generator=generator,
        judge=lambda prompt, answer: float(answer.islower()),
        checkpoint=tmp_path / "eval" / "cells.jsonl",
    )
    return recipe, handle, generator, result, tmp_path


def test_two_by_two_counts_match_hand_computed_expectations(evaluated) -> None:
    recipe, _, generator, result, _ = evaluated
    assert result.groups == ("lowercase", "uppercase")
    assert len(result.answers) == 2 * 3 * 4
    expected_loose = {  # hand-counted from PLAN; uppercase's steered cells equal its unsteered ones
        "lowercase": {ABSENT_UNSTEERED: 0 / 3, ABSENT_STEERED: 3 / 3, PRESENT_UNSTEERED: 1 / 3, PRESENT_STEERED: 3 / 3},
        "uppercase": {ABSENT_UNSTEERED: 0 / 3, ABSENT_STEERED: 0 / 3, PRESENT_UNSTEERED: 2 / 3, PRESENT_STEERED: 2 / 3},
    }
    for group, cells in expected_loose.items():
        for cell, value in cells.items():
            summary = result.cell(cell, group)
            assert summary.n == 3
            assert summary.loose == pytest.approx(value), (group, cell)
            assert summary.strict == pytest.approx(value), (group, cell)  # one-line answers: strict = loose here
    overall = {ABSENT_UNSTEERED: 0 / 6, ABSENT_STEERED: 3 / 6, PRESENT_UNSTEERED: 3 / 6, PRESENT_STEERED: 5 / 6}
    for cell, value in overall.items():
        assert result.cell(cell).loose == pytest.approx(value)
        assert result.cell(cell).n == 6
    # Quality beside each cell: the loop is the one degenerate answer; perplexity comes from the model itself.
    assert result.cell(ABSENT_STEERED, "lowercase").degenerate_share == pytest.approx(1 / 3)
    assert result.cell(PRESENT_STEERED, "lowercase").degenerate_share == 0
    assert all(math.isfinite(a.perplexity) and a.perplexity > 1 for a in result.answers)
    assert result.reference == "tiny-llama-0"
    assert result.cell(ABSENT_UNSTEERED, "lowercase").judge == 0.0
    assert result.cell(ABSENT_STEERED, "lowercase").judge == 1.0
    # Generation: one batched call per group; lowercase steered rows carry the edit; uppercase is never steered and
    # its bare prompts, already answered unsteered for lowercase, are not generated again.
    assert len(generator.calls) == 2
    lower_prompts, lower_edits = generator.calls[0]
    assert len(lower_prompts) == 12 and sum(bool(e) for e in lower_edits) == 6
    assert {(e[0].layer, e[0].mode) for e in lower_edits if e} == {(1, "set")}
    upper_prompts, upper_edits = generator.calls[1]
    assert len(upper_prompts) == 3 and not any(upper_edits)
    assert [a.answer for a in result.answers if a.group == "uppercase" and not a.instruction_in_prompt] == [TITLE] * 6
    assert result.steering["lowercase"] == "lowercase@1 set w=1 (all)"
    assert result.steering["uppercase"] == "none (no steer entry)"


def test_substantive_passes_leave_out_degenerate_hollow_and_echoing_answers(evaluated) -> None:
    _, _, _, result, _ = evaluated
    # The loop passes the lowercase checker (loose 3/3) but is degenerate: 2 of 3 steered passes are substantive.
    assert result.cell(ABSENT_STEERED, "lowercase").loose == 1.0
    assert result.cell(ABSENT_STEERED, "lowercase").substantive == pytest.approx(2 / 3)
    assert result.cell(PRESENT_UNSTEERED, "lowercase").substantive == pytest.approx(1 / 3)
    assert result.cell(PRESENT_STEERED, "lowercase").substantive == 1.0
    absent = result.paired(False, "lowercase", "substantive")
    assert (absent.gained, absent.lost) == (2, 0)
    data = result.to_dict()
    assert data["paired_substantive"]["lowercase"]["without_instruction"]["gained"] == 2
    assert data["overall"]["without_instruction/steered"]["substantive"] == pytest.approx(2 / 6)
    loop = next(a for a in data["answers"] if a["answer"] == LOOP_LOWER)
    assert loop["loose"] and loop["degeneracy"] == "repetition" and not loop["substantive"]
    assert "| lowercase | 0.00 | 0.67 | 0.33 | 1.00 | 2 / 0 (0.5) | 2 / 0 (0.5) |" in eval_markdown(result)


@pytest.mark.parametrize(
    ("text", "flag"),
    [
        ("Section 1\nSection 2\nSection 3", "hollow"),
        ("Write a short poem about rain. Write a short poem about rain. SECTION 1", "echo"),
    ],
)
def test_scored_answers_carry_hollowness_and_echo(text, flag) -> None:
    spec = CheckSpec("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 3})
    prompt = "Write a short poem about rain. Your response must have 3 sections, each starting with Section X."
    scored = score_answer(Row(prompt, (), (spec,)), text, math.nan)
    assert getattr(scored, flag) is not None and not scored.substantive


def test_paired_change_counts_fixed_and_broken_prompts(evaluated, tmp_path) -> None:
    _, _, _, result, _ = evaluated
    # Hand-counted from PLAN: lowercase steering fixes all 3 bare prompts and the 2 failing instructed ones,
    # breaks none.
    assert result.paired(False, "lowercase") == PairedChange(3, 3, 0, 0.25)
    assert result.paired(True, "lowercase") == PairedChange(3, 2, 0, 0.5)
    assert result.paired(True, "uppercase") == PairedChange(3, 0, 0, 1.0)  # never steered: nothing changes
    assert result.paired(False) == PairedChange(6, 3, 0, 0.25)
    data = json.loads(write_eval_report(result, tmp_path / "report")["json"].read_text())
    assert data["paired"]["lowercase"]["without_instruction"] == {"pairs": 3, "gained": 3, "lost": 0, "p_value": 0.25}
    assert data["paired_overall"]["with_instruction"]["gained"] == 2
    assert "| lowercase | 3 / 0 (0.25) | 2 / 0 (0.5) |" in eval_markdown(result)


def test_paired_change_ignores_prompts_answered_only_one_way() -> None:
    change = paired_change({"a": False, "b": True, "c": False}, {"a": True, "b": False, "d": True})
    assert change == PairedChange(pairs=2, gained=1, lost=1, p_value=1.0)


@pytest.mark.parametrize(
    "gained, lost, p_value",
    [(0, 0, 1.0), (1, 1, 1.0), (5, 0, 2 / 32), (8, 1, 2 * (1 + 9) / 512), (1, 8, 2 * (1 + 9) / 512), (30, 9, 0.001065)],
)
def test_sign_test_matches_the_binomial_tail(gained, lost, p_value) -> None:
    assert sign_test(gained, lost) == pytest.approx(p_value, abs=1e-6)


def test_answers_are_kept_for_rescoring(evaluated) -> None:
    _, _, _, result, _ = evaluated
    data = result.to_dict()
    json.dumps(data, allow_nan=False)  # valid JSON: no NaN
    answers = data["answers"]
    assert len(answers) == 24
    first = answers[0]
    assert set(first) >= {
        "prompt",
        "answer",
        "strict",
        "loose",
        "degeneracy",
        "perplexity",
        "checks",
        "sentences",
        "words",
    }
    assert first["checks"][0]["id"] == "change_case:english_lowercase"
    loops = [a for a in answers if a["answer"] == LOOP_LOWER]
    assert loops and all(a["degeneracy"] == "repetition" and a["loose"] for a in loops)
    assert data["overall"]["without_instruction/steered"]["loose"] == pytest.approx(3 / 6)


def test_a_finished_group_is_not_generated_again(evaluated) -> None:
    recipe, handle, _, first, tmp_path = evaluated
    again = FixedAnswers(recipe, PLAN, limit=3)
    second = evaluate_recipe(recipe, handle, limit=3, generator=again, checkpoint=tmp_path / "eval" / "cells.jsonl")
    assert again.calls == []
    assert [a.answer for a in second.answers] == [a.answer for a in first.answers]


def test_reports_are_written(evaluated, tmp_path) -> None:
    _, _, _, result, _ = evaluated
    paths = write_eval_report(result, tmp_path / "report")
    data = json.loads(paths["json"].read_text())
    assert len(data["answers"]) == 24
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = paths["markdown"].read_text()
    assert "| **overall** | 6 |" in markdown
    assert "| lowercase | 3 | 0.00 (0.00) | 1.00 (1.00) | 0.33 (0.33) | 1.00 (1.00) |" in markdown
    assert not list((tmp_path / "report").glob("*.tmp"))


def test_length_instructions_get_sentence_and_word_distributions(tiny, tmp_path) -> None:
    recipe = make_recipe(tmp_path, instructions={"length_0": {}}, steer=[])
    handle = tiny("llama")
    answers = ["One thing. Two things. Three things here.", "Just this one short sentence."]
    result = evaluate_recipe(
        recipe,
        handle,
        limit=2,
        reference=Reference(handle.hf_model, handle.tokenizer, "tiny"),
        generator=lambda h, prompts, **_: [answers[(i // 2) % 2] for i in range(len(prompts))],
    )
    summary = result.cell(ABSENT_UNSTEERED, "length_0")
    assert sorted(summary.sentences) == [1, 3] and sorted(summary.words) == [5, 7]
    assert summary.loose == pytest.approx(0.5)  # "less than 3 sentences"
    markdown = eval_markdown(result)
    assert "Length: sentences and words" in markdown


def test_word_exclusion_uses_the_inclusion_vector_and_the_forbidden_words_check(tiny, tmp_path) -> None:
    recipe = make_recipe(
        tmp_path,
        instructions={
            "include:ocean": {},
            "exclude_ocean": {
                "phrasings": ["Do not use the word ocean.", "Never mention the word ocean.", "Avoid the word ocean."],
                "check": {"id": "keywords:forbidden_words", "kwargs": {"forbidden_words": ["ocean"]}},
                "category": "words",
            },
        },
        steer=[{"instruction": "exclude_ocean", "vector": "include:ocean", "mode": "add", "weight": -4.0, "layer": 2}],
    )
    handle = tiny("llama")
    compute_recipe_vectors(recipe, handle)
    vectors = load_recipe_vectors(recipe, handle)
    edits = instruction_edits(recipe, vectors)
    (edit,) = edits["exclude_ocean"]
    assert edit.mode == "add" and edit.weight == -4.0 and edit.layer == 2
    assert torch.equal(edit.direction, vectors["include:ocean"].directions[2])
    assert edits["include:ocean"] == ()
    result = evaluate_recipe(
        recipe,
        handle,
        limit=2,
        vectors=vectors,
        generator=lambda h, prompts, row_edits, **_: [
            "The sea is deep and blue." if edits else "The ocean is deep and blue." for edits in row_edits
        ],
    )
    assert result.cell(ABSENT_UNSTEERED, "exclude_ocean").loose == 0.0
    assert result.cell(ABSENT_STEERED, "exclude_ocean").loose == 1.0
    assert result.answers[0].checks[0]["id"] in ("keywords:existence", "keywords:forbidden_words")
    assert {a.checks[0]["id"] for a in result.answers if a.group == "exclude_ocean"} == {"keywords:forbidden_words"}


def _write_lines(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


LOWER_ID = "change_case:english_lowercase"


def test_ifeval_jsonl_is_parsed_and_mapped_by_check_id(tiny, tmp_path) -> None:
    recipe = make_recipe(tmp_path)
    data = _write_lines(
        tmp_path / "ifeval.jsonl",
        [
            {
                "key": 1,
                "prompt": "Describe a cat. Answer in lowercase only.",
                "instruction_id_list": [LOWER_ID],
                "kwargs": [{}],
                "prompt_without_instruction": "Describe a cat.",
            },
            {"key": 2, "prompt": "Describe a dog in all lowercase.", "instruction_id_list": [LOWER_ID], "kwargs": [{}]},
            {
                "key": 3,
                "prompt": "Write 3 bullets.",
                "instruction_id_list": ["detectable_format:number_bullet_lists"],
                "kwargs": [{"num_bullets": 3}],
            },
            "",
        ],
    )
    records = read_ifeval_jsonl(data)
    assert [r.key for r in records] == ["1", "2", "3"]
    items, skipped = ifeval_items(records, recipe)
    assert skipped == 1 and [i.group for i in items] == ["lowercase", "lowercase"]
    assert items[1].prompt_without is None
    handle = tiny("llama")
    compute_recipe_vectors(recipe, handle)
    result = evaluate_recipe(
        recipe,
        handle,
        data=data,
        generator=lambda h, prompts, **_: [PASS_LOWER] * len(prompts),
    )
    # Key 1 has all four cells, key 2 (no prompt_without_instruction) only the two with the instruction.
    assert len(result.answers) == 6 and result.skipped == 1
    assert result.cell(ABSENT_UNSTEERED).n == 1 and result.cell(PRESENT_STEERED).n == 2
    assert result.cell(PRESENT_STEERED).loose == 1.0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"line 2: not valid JSON"),
        ('["a list"]', r"line 2: expected an object"),
        ({"key": 9, "prompt": "Hi."}, r"line 2: missing instruction_id_list, kwargs"),
        (
            {"key": 9, "prompt": "Hi.", "instruction_id_list": [LOWER_ID], "kwargs": []},
            r"line 2: kwargs must be a list of 1",
        ),
        (
            {"key": 9, "prompt": "Hi.", "instruction_id_list": ["change_case:lowercase"], "kwargs": [{}]},
            r"line 2: Unknown IFEval instruction id 'change_case:lowercase'",
        ),
        ({"key": 9, "prompt": "", "instruction_id_list": [LOWER_ID], "kwargs": [{}]}, r"line 2: prompt must be"),
        (
            {"key": 1, "prompt": "Hi.", "instruction_id_list": [LOWER_ID], "kwargs": [{}]},
            r"line 2: the key '1' appears twice",
        ),
    ],
)
def test_bad_ifeval_lines_name_the_line(tmp_path, line, message) -> None:
    good = {"key": 1, "prompt": "Say hi in lowercase.", "instruction_id_list": [LOWER_ID], "kwargs": [{}]}
    path = _write_lines(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(EvaluationError, match=message):
        read_ifeval_jsonl(path)


def test_ifeval_file_with_no_matching_instruction_says_what_to_do(tmp_path) -> None:
    recipe = make_recipe(tmp_path)
    path = _write_lines(
        tmp_path / "other.jsonl",
        [
            {
                "key": 1,
                "prompt": "Write 3 bullets.",
                "instruction_id_list": ["detectable_format:number_bullet_lists"],
                "kwargs": [{"num_bullets": 3}],
            },
        ],
    )
    with pytest.raises(EvaluationError, match="None of the 1 records uses a check"):
        ifeval_items(read_ifeval_jsonl(path), recipe)
    with pytest.raises(EvaluationError, match="not found"):
        read_ifeval_jsonl(tmp_path / "missing.jsonl")


def test_the_plan_counts_what_the_evaluation_generates(evaluated) -> None:
    from nsteer.evaluate.table import plan_recipe_evaluation
    from nsteer.pipeline import read_recipe_vectors

    recipe, _, generator, result, _ = evaluated
    plan = plan_recipe_evaluation(recipe, read_recipe_vectors(recipe), limit=3)
    generated = sum(len(prompts) for prompts, _ in generator.calls)
    # lowercase: 3 prompts x 4 cells; uppercase (not steered): its 3 bare prompts were answered for lowercase
    assert (plan.prompts, plan.answers, plan.generated) == (6, 24, 12 + 3) and generated == plan.generated
    assert len(result.answers) == plan.answers
    assert plan.summary() == "6 prompts × up to 4 cells = 24 answers, 15 to generate (unsteered answers are shared " + (
        "where they coincide)"
    )


def test_eval_dry_run_prints_the_plan_without_opening_the_model(evaluated, monkeypatch, capsys) -> None:
    from cli_runner import run_cli

    import nsteer.pipeline

    recipe, _, _, _, tmp_path = evaluated
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "name: t\nprompts: {max_pairs: 4}\ninstructions: {lowercase: {}, uppercase: {}}\n"
        "steer: [{instruction: lowercase, layer: 1, mode: set}]\ngeneration: {max_new_tokens: 8, batch_size: 4}\n"
        f"output: {{dir: {recipe.output_dir}}}\n"
    )
    monkeypatch.setattr(nsteer.pipeline, "open_model", lambda *a, **k: pytest.fail("a model was opened"))
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(path), "--limit", "3", "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out) == {
        "command": "eval",
        "dry_run": True,
        "plan": {"prompts": 6, "answers": 24, "generated": 15, "max_new_tokens": 8, "batch_size": 4},
    }
    assert "plan: 6 prompts × up to 4 cells = 24 answers, 15 to generate" in err
    assert not (recipe.output_dir / "eval").exists()  # a plan writes nothing, not even the report folder
