"""Checks a recipe's author writes (a regular expression or a Python function): validated when the recipe loads,
scored like IFEval's by eval and search, and never imported from anything but a recipe's own check section."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
from test_search import ByLayer, make_recipe

from nsteer.errors import EvaluationError, RecipeError
from nsteer.evaluate.checkers import CheckSpec, check_all
from nsteer.evaluate.custom_checks import function_check, regex_check
from nsteer.recipe import load_recipe, recipe_from_dict

CHECKS_PY = """
def ends_with_question(answer):
    return answer.rstrip().endswith("?")

def ends_with_question_loose(answer):
    return "?" in answer[-20:]

def not_a_verdict(answer):
    return len(answer)

def crashes(answer):
    raise ValueError("cannot judge")

def two_arguments(answer, other):
    return True

NOT_CALLABLE = 3
"""


@pytest.fixture()
def folder(tmp_path) -> Path:
    (tmp_path / "my_checks.py").write_text(CHECKS_PY)
    return tmp_path


def write_recipe(folder: Path, check: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(
        "instructions:\n  ask_back:\n    phrasings: [End with a question., Finish by asking me something.]\n"
        f"    check: {check}\n"
    )
    return path


def verdicts(spec: CheckSpec, answer: str) -> tuple[bool, bool]:
    (result,) = check_all((spec,), answer)
    return result.strict, result.loose


# --- scoring ------------------------------------------------------------------------------------------------------


def test_regex_check_scores_strict_and_loose_like_ifeval():
    spec = CheckSpec("regex:x", custom=regex_check(r"\?\s*$"))
    assert verdicts(spec, "Is it?") == (True, True)
    assert verdicts(spec, "No.") == (False, False)
    assert verdicts(spec, "   ") == (False, False)  # an empty answer fails, as in IFEval
    # IFEval's loose variants drop the first or last line and asterisks: a trailing sign-off fails strict only
    assert verdicts(spec, "Is it?\nBest wishes") == (False, True)
    assert verdicts(CheckSpec("regex:x", custom=regex_check(r"\?\s*$", loose=r"\?")), "Is it? Yes.") == (False, True)


def test_function_check_from_a_file_next_to_the_recipe(folder, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path.parent)  # the file is found from the recipe's folder, not the current directory
    recipe = load_recipe(write_recipe(folder, "{function: 'my_checks:ends_with_question'}"))
    check = recipe.custom_check("ask_back")
    assert check.name == "function:my_checks:ends_with_question"
    spec = CheckSpec(check.name, custom=check)
    assert verdicts(spec, "Shall we?") == (True, True) and verdicts(spec, "Done.") == (False, False)
    loose = load_recipe(
        write_recipe(folder, "{function: 'my_checks:ends_with_question', loose: 'my_checks:ends_with_question_loose'}")
    ).custom_check("ask_back")
    assert verdicts(CheckSpec("f", custom=loose), "Shall we? Bye.") == (False, True)


def test_function_check_from_an_importable_module(tmp_path, monkeypatch):
    package = tmp_path / "site" / "team_checks"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "format.py").write_text("def shouts(answer):\n    return answer.isupper()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    recipe = load_recipe(write_recipe(tmp_path, "{function: 'team_checks.format:shouts'}"))
    assert verdicts(CheckSpec("f", custom=recipe.custom_check("ask_back")), "YES") == (True, True)


def test_a_check_that_misbehaves_while_scoring_says_which_and_why(folder):
    for name, fragment in (
        ("not_a_verdict", "returned 5 (int); it must return True or False"),
        ("crashes", "raised ValueError: cannot judge"),
    ):
        check = function_check(f"my_checks:{name}", folder)
        with pytest.raises(EvaluationError, match=re.escape(fragment)) as error:
            check_all((CheckSpec(check.name, custom=check),), "Hello")
        assert f"function:my_checks:{name}" in str(error.value)


# --- validated when the recipe loads ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "fragment"),
    [
        ("{regex: '(unclosed'}", "'(unclosed' is not a regular expression"),
        ("{regex: ''}", "give a regular expression of 1 to"),
        ("{function: 'my_checks'}", "is not module:function"),
        ("{function: 'os.system()'}", "is not module:function"),
        ("{function: 'no_such_module:f'}", "cannot import 'no_such_module': no file"),
        ("{function: 'my_checks:missing'}", "'my_checks' has no 'missing'"),
        ("{function: 'my_checks:NOT_CALLABLE'}", "is a int, not a function"),
        ("{function: 'my_checks:two_arguments'}", "must take one argument, the answer"),
        ("{function: 'broken:f'}", "importing"),
        ("{regex: 'a', function: 'my_checks:crashes'}", "give exactly one of id (an IFEval check), regex or function"),
        ("{regex: 'a', kwargs: {n: 1}}", "kwargs are the arguments of an IFEval check"),
        ("{id: 'change_case:english_lowercase', loose: 'x'}", "loose goes with regex or function"),
    ],
)
def test_a_bad_custom_check_is_refused_when_the_recipe_loads(folder, check, fragment):
    (folder / "broken.py").write_text("raise RuntimeError('half-written module')\n")
    path = write_recipe(folder, check)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert message.startswith(f"{path}, line 4, field instructions.ask_back.check"), message
    assert fragment in message, message


# --- eval and search use them -----------------------------------------------------------------------------------------


def test_eval_scores_with_a_function_check(folder, tiny):
    from nsteer.evaluate.table import CELLS, evaluate_recipe

    recipe = recipe_from_dict(
        {
            "prompts": {"max_pairs": 4},
            "instructions": {
                "ask_back": {
                    "phrasings": ["End with a question."],
                    "check": {"function": "my_checks:ends_with_question"},
                }
            },
            "steer": [{"instruction": "ask_back", "layer": 1, "mode": "add", "weight": 1.0}],
            "generation": {"max_new_tokens": 4},
            "output": {"dir": str(folder / "out")},
        },
        source=folder / "recipe.yaml",
    )
    from nsteer.pipeline import compute_recipe_vectors

    handle = tiny("llama")
    compute_recipe_vectors(recipe, handle)

    def generator(handle, prompts, *, row_edits, config, progress=None):
        return ["Shall we?" if edits else "We shall." for edits in row_edits]

    result = evaluate_recipe(recipe, handle, generator=generator, limit=3)
    for cell in CELLS:
        summary = result.cell(cell, "ask_back")
        assert summary.n == 3 and summary.strict == summary.loose == (1.0 if cell.steered else 0.0)
    assert {tuple(c["id"] for c in answer.checks) for answer in result.answers} == {
        ("function:my_checks:ends_with_question",)
    }


def test_search_scores_with_a_regex_check(tmp_path, tiny):
    from nsteer.pipeline import compute_recipe_vectors
    from nsteer.search import search_recipe

    handle = tiny("llama")
    recipe = make_recipe(
        tmp_path,
        instructions={"ask_back": {"phrasings": ["End with a question."], "check": {"regex": r"\?$"}}},
        steer=[{"instruction": "ask_back", "layer": "auto", "mode": "set"}],
        search={"min_perplexity_ratio": 0.0, "margin": 1.0},
    )
    compute_recipe_vectors(recipe, handle)
    question = "Would you like to hear more about the weather and the sky today?"
    statement = "The weather today is calm and the sky is clear over the hills."
    generator = ByLayer({None: statement, 1: statement, 2: question, 3: statement})
    (sweep,) = search_recipe(recipe, handle, generator=generator).sweeps
    assert sweep.winner.setting.layer == 2 and sweep.winner.loose == 1.0 and sweep.baseline.loose == 0.0


# --- nothing but a recipe's check section names code ------------------------------------------------------------------


def test_data_files_and_vector_files_never_import_what_they_name(tmp_path, monkeypatch, capsys):
    from cli_runner import run_cli

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"key": 1, "prompt": "Hi", "instruction_id_list": ["function:os:system"], "kwargs": [{}]}) + "\n"
    )
    from nsteer.evaluate.ifeval_data import read_ifeval_jsonl

    with pytest.raises(EvaluationError, match="Unknown IFEval instruction id 'function:os:system'"):
        read_ifeval_jsonl(data)
    with pytest.raises(EvaluationError, match="Unknown IFEval instruction id"):
        check_all((CheckSpec("regex:.*"),), "answer")  # an id alone is never turned into a check
    assert "os" not in imported and not any("nsteer_recipe_check" in name for name in imported)
    # a vector file whose metadata names a function check: listed as text, never imported
    import torch

    from nsteer.vectors import SteeringVector, VectorMetadata, save_vector

    metadata = VectorMetadata(
        nsteer_version="0", model_id="m", config_hash="c", weights_fingerprint="f", architecture="A", hidden_size=4,
        n_layers=2, instruction_id="x", category="custom", n_pairs=2, check_id="function:evil_module:run",
    )  # fmt: skip
    vector = SteeringVector(torch.eye(4)[:2], torch.zeros(2), torch.ones(2), metadata)
    save_vector(vector, tmp_path / "vectors" / "x.safetensors")
    code, out, err = run_cli(monkeypatch, capsys, "list", "--vectors", str(tmp_path / "vectors"), "--json")
    assert code == 0, err
    assert "evil_module" not in imported


def test_the_trust_boundary_is_documented():
    text = (Path(__file__).resolve().parent.parent / "docs" / "quickstart.md").read_text()
    assert "function:" in text and "regex:" in text and "a recipe from someone else is code" in text.lower()
