"""The `nsteer` command line: inspect, error exits without tracebacks, compute → generate end to end on a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

from nsteer.searched import SearchedSetting
from nsteer.vectors import SteeringVector, VectorMetadata, save_vector

REPO = Path(__file__).resolve().parent.parent
NSTEER = Path(sys.executable).parent / "nsteer"


def flat(text: str) -> str:
    return " ".join(text.split())


def assert_user_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert "error:" in err
    message = err[err.index("error:") :].strip()  # progress lines (opening the model) may come before it
    assert "\n\n" not in message  # one paragraph
    for fragment in fragments:
        assert fragment in flat(message), message


@pytest.fixture()
def vector_file(tmp_path) -> Path:
    metadata = VectorMetadata(
        nsteer_version="0.1.0",
        model_id="tiny-llama-0",
        config_hash="c",
        weights_fingerprint="f",
        architecture="LlamaForCausalLM",
        hidden_size=8,
        n_layers=3,
        instruction_id="lowercase",
        category="format",
        n_pairs=12,
        chosen=SearchedSetting(layer=1, mode="set", weight=1.0, positions="all"),
    )
    directions = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    vector = SteeringVector(directions, torch.tensor([0.5, 1.5, 2.5]), torch.tensor([1.0, 3.0, 2.0]), metadata)
    return save_vector(vector, tmp_path / "lowercase.safetensors")


def test_inspect_prints_the_instruction(monkeypatch, capsys, vector_file):
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(vector_file))
    assert code == 0, err
    assert "lowercase" in out and "tiny-llama-0" in out and "LlamaForCausalLM" in out
    assert "1:3.00" in flat(out)  # per-layer norms


def test_inspect_json(monkeypatch, capsys, vector_file):
    import json

    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(vector_file), "--json")
    assert code == 0, err
    (summary,) = json.loads(out)["vectors"]
    assert summary["instruction"] == "lowercase" and summary["largest_norm_layer"] == 1 and summary["width"] == 8


def test_inspect_and_list_show_settings_searched_for_borrowers(monkeypatch, capsys, vector_file):
    import json

    from nsteer.vectors import load_vector

    borrowed = SearchedSetting(layer=2, mode="add", weight=-3.0, positions="all")
    save_vector(load_vector(vector_file).with_choice(borrowed, "exclude:lowercase"), vector_file)
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(vector_file))
    assert code == 0, err
    assert "searched for exclude:lowercase" in flat(out) and "weight -3" in out
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(vector_file), "--json")
    (summary,) = json.loads(out)["vectors"]
    assert summary["chosen_for"] == {"exclude:lowercase": borrowed.to_dict()}
    assert summary["chosen"]["layer"] == 1  # the vector's own setting, untouched
    code, out, err = run_cli(monkeypatch, capsys, "list", "--vectors", str(vector_file.parent), "--json")
    assert code == 0, err
    (row,) = json.loads(out)["vectors"]
    assert row["layer"] == 1 and row["searched_for"] == ["exclude:lowercase"]
    code, out, err = run_cli(monkeypatch, capsys, "list", "--vectors", str(vector_file.parent))
    assert code == 0, err
    assert "also searched for exclude:lowercase" in flat(out)


def test_inspect_missing_and_broken_files(monkeypatch, capsys, tmp_path):
    assert_user_error(*run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "none.safetensors")), "not found")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 5)
    assert_user_error(*run_cli(monkeypatch, capsys, "inspect", str(broken)), "not a readable safetensors")


def test_bad_recipe_exits_2_with_one_paragraph(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("instructions:\n  lowercase: {}\nsteer:\n  - instruction: lowercase\n    weight: big\n")
    for command in ("compute", "generate"):
        assert_user_error(*run_cli(monkeypatch, capsys, command, str(recipe)), str(recipe), "line 5", "steer[0].weight")


def test_missing_recipe_exits_2(monkeypatch, capsys, tmp_path):
    assert_user_error(*run_cli(monkeypatch, capsys, "compute", str(tmp_path / "nope.yaml")), "Recipe file not found")


def test_usage_error_exits_nonzero_without_traceback(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "inspect")
    assert code == 2 and "Traceback" not in out + err and "Missing argument" in err


def test_real_executable_exits_2_without_traceback(tmp_path):
    """Through the installed console script, in a fresh process (a `-v` in argv must not switch nnsight's debug on)."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: x\nmodel:\n  dtyp: float32\ninstructions:\n  lowercase: {}\n")
    executable = str(NSTEER) if NSTEER.exists() else None
    command = [executable] if executable else [sys.executable, "-m", "nsteer.cli"]
    env = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*command, "compute", str(recipe)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stdout + result.stderr
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n\n" not in message
    assert f"{recipe}, line 3, field model.dtyp: unknown key 'dtyp'" in flat(message)


# --- end to end on a tiny model saved to disk ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny import tiny_hf_model, tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama", seed=0).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def write_recipe(folder: Path, model_dir: Path) -> Path:
    (folder / "base.jsonl").write_text(
        "\n".join(
            f'{{"text": "{text}"}}'
            for text in [
                "Explain how rainbows form.",
                "Describe the water cycle.",
                "Why is the sea salty?",
                "Write a letter to a friend.",
                "What are the pros and cons of working from home?",
                "Tell me about the mountains.",
                "How do lakes freeze?",
                "Name the colors of a rainbow.",
            ]
        )
        + "\n"
    )
    recipe = folder / "tiny.yaml"
    recipe.write_text(
        f"""
name: tiny
model: {{id: "{model_dir}", dtype: float32, device: cpu}}
prompts: {{base: base.jsonl, seed: 0, max_pairs: 4, split: {{train: 0.5, validation: 0.25, test: 0.25}}}}
instructions:
  shout:
    phrasings: [Answer in capital letters., Use only uppercase letters., Write it ALL CAPS.]
    check: change_case:english_capital
steer:
  - {{instruction: shout, layer: 1, mode: add, weight: 8.0, positions: all}}
extraction: {{batch_size: 4}}
generation: {{max_new_tokens: 8, batch_size: 2}}
output: {{dir: "{folder / "out"}"}}
demo_prompts: [Describe the water cycle., Hi]
"""
    )
    return recipe


def test_compute_then_generate_end_to_end(monkeypatch, capsys, tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir)

    code, out, err = run_cli(monkeypatch, capsys, "generate", str(recipe))
    assert_user_error(code, out, err, "No vector for 'shout'", "nsteer compute")

    code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe))
    assert code == 0, err
    vector_path = tmp_path / "out" / "shout.safetensors"
    assert vector_path.is_file() and str(vector_path) in flat(out)

    from nsteer.vectors import load_vector

    vector = load_vector(vector_path)
    assert vector.instruction_id == "shout" and vector.metadata.n_pairs == 4
    assert vector.metadata.model_id == str(tiny_model_dir) and vector.directions.shape == (4, 64)

    code, plain_out, err = run_cli(monkeypatch, capsys, "generate", str(recipe), "--no-steer")
    assert code == 0, err
    code, steered_out, err = run_cli(monkeypatch, capsys, "generate", str(recipe))
    assert code == 0, err
    assert "Describe the water cycle." in plain_out and "Describe the water cycle." in steered_out
    assert plain_out != steered_out  # the add edit at layer 1 changes the answers

    code, out, err = run_cli(
        monkeypatch, capsys, "generate", str(recipe), "--compare", "--prompt", "Hi", "--max-new-tokens", "4"
    )
    assert code == 0, err
    assert "without steering" in out and "with steering" in out and "shout@1 add" in flat(out)

    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(vector_path))
    assert code == 0 and "shout" in out


def test_generate_with_a_layer_beyond_the_model(monkeypatch, capsys, tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    recipe.write_text(recipe.read_text().replace("layer: 1,", "layer: 9,"))
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(recipe), "--no-steer")
    assert_user_error(code, out, err, "steer[0].layer", "layer 9 is out of range", "4 layers")


def test_eval_composition_flag_refuses_external_data(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "eval",
        "recipes/compose-format-length.yaml",
        "--composition",
        "--data",
        str(tmp_path / "x.jsonl"),
    )
    assert code == 2
    assert "--composition" in err and "--data" in err
    assert "Traceback" not in err


def test_console_command_exits_without_the_final_collection_and_keeps_its_exit_code(tmp_path):
    """`nsteer` (cli.run) freezes the collector after main, so exit skips collecting torch's objects; codes are kept."""
    probe = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
        "sys.argv = ['nsteer', *sys.argv[1:]]\n"
        "from nsteer.cli import run\n"
        "run()\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(
        [sys.executable, "-c", probe, "--version"], capture_output=True, text=True, env=env, timeout=120
    )
    assert ok.returncode == 0 and ok.stdout.startswith("nsteer ") and ok.stdout.rstrip().endswith("frozen True"), ok
    missing = str(tmp_path / "nope.yaml")
    bad = subprocess.run([sys.executable, "-c", probe, "compute", missing], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Recipe file not found" in bad.stderr and "frozen True" in bad.stdout, bad


def test_loading_a_recipe_without_an_ifeval_check_does_not_import_ifeval():
    """IFEval's checkers bring datasets, pandas and NLTK (~0.7 s of every command): only a recipe naming one pays."""
    probe = (
        "import sys\n"
        "from nsteer.recipe import load_recipe\n"
        "load_recipe(sys.argv[1])\n"
        "print(sorted({'if_verifiable', 'datasets', 'pandas', 'nltk', 'langdetect'} & set(sys.modules)))\n"
    )
    root = Path(__file__).resolve().parents[1]
    quick = subprocess.run(
        [sys.executable, "-c", probe, str(root / "recipes" / "quickstart.yaml")], capture_output=True, text=True
    )
    assert quick.returncode == 0 and quick.stdout.strip() == "[]", quick
