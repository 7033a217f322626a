"""What the command line prints: data literally (markup and escape sequences in every field), plain text in a pipe,
the --json / --jsonl shapes of docs/cli.md, --version, help text, overrides shown and used, fail-fast checks."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from test_cli import write_recipe

from nsteer.searched import SearchedSetting
from nsteer.vectors import SteeringVector, VectorMetadata, save_vector

# Markup rich would interpret, terminal escape sequences (colour, OSC 8 link, window title), a carriage return, a
# right-to-left override, a bell and an emoji code.
HOSTILE = (
    "[/x] [bold red]R[/bold red] [link=http://e.vil]L[/link] \x1b[31mANSI\x1b[0m "
    "\x1b]8;;http://e.vil\x07OSC\x1b]8;;\x07 \x1b]0;title\x07 back\rover \u202eevil :ocean:"
)
RAW_SEQUENCES = ("\x1b[31m", "\x1b]8;;", "\x1b]0;", "\x07", "\r", "\u202e")
SHOWN = (
    "[/x]",
    "[bold red]R[/bold red]",
    "[link=http://e.vil]L[/link]",
    "\\x1b[31mANSI",
    "\\x1b]0;title\\x07",
    "back\\rover",
)


def assert_literal(text: str, *, times: int = 1, in_path: bool = False) -> None:
    """``text`` holds the hostile string as data: markup as typed, every escape sequence made visible.

    ``in_path``: it was part of a file name, where each / is a folder separator (and // collapses).
    """
    for raw in RAW_SEQUENCES:
        assert raw not in text, (raw, text)
    for shown in SHOWN:
        shown = shown.replace("//", "/") if in_path else shown
        assert text.count(shown) >= times, (shown, text)
    assert ":ocean:" in text and "🌊" not in text


@pytest.fixture(params=["pipe", "terminal"])
def mode(request, monkeypatch):
    """Run each printing test as if in a pipe and as if on a terminal (rich drawing, its own colours allowed)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1" if request.param == "terminal" else "0")
    monkeypatch.setenv("COLUMNS", "250")
    return request.param


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny import tiny_hf_model, tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama", seed=0).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture()
def recipe(tmp_path, tiny_model_dir) -> Path:
    return write_recipe(tmp_path, tiny_model_dir)


def hostile_vector(folder: Path, name: str = "hostile.safetensors") -> Path:
    metadata = VectorMetadata(
        nsteer_version=HOSTILE,
        model_id=HOSTILE,
        config_hash="c",
        weights_fingerprint="f",
        architecture=HOSTILE,
        hidden_size=8,
        n_layers=3,
        instruction_id=HOSTILE,
        category=HOSTILE,
        n_pairs=4,
        chosen=SearchedSetting(layer=1, mode="add", weight=2.0, positions="all"),
    )
    directions = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    vector = SteeringVector(directions, torch.tensor([0.5, 1.5, 2.5]), torch.tensor([1.0, 3.0, 2.0]), metadata)
    folder.mkdir(parents=True, exist_ok=True)
    return save_vector(vector, folder / name)


# --- literal printing -----------------------------------------------------------------------------------------------


def test_generate_prints_prompts_answers_and_names_literally(monkeypatch, capsys, tmp_path, recipe, mode):
    """A prompt with [/x] used to crash generate after generating (rich MarkupError); answers come from a model."""
    import sys

    recipe.write_text(recipe.read_text().replace("shout", '"shout[/x]"'))  # an instruction name with markup
    code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe))
    assert code == 0, err
    monkeypatch.setattr(
        sys.modules["nsteer.generate"], "generate", lambda handle, prompts, *a, **k: [HOSTILE for _ in prompts]
    )
    for flags in ([], ["--compare"]):
        code, out, err = run_cli(monkeypatch, capsys, "generate", str(recipe), "-p", HOSTILE, *flags)
        assert code == 0, err
        assert_literal(out, times=2 if flags else 1)  # the prompt and its answer(s)
        assert "shout[/x]@1 add" in out
        assert_no_raw(err, mode)


def assert_no_raw(text: str, mode: str) -> None:
    """No hostile sequence in ``text``; on a terminal, rich redraws its progress bars with carriage returns."""
    for raw in RAW_SEQUENCES:
        if not (raw == "\r" and mode == "terminal"):
            assert raw not in text, (raw, text)


def test_inspect_and_list_print_vector_metadata_literally(monkeypatch, capsys, tmp_path, mode):
    folder = tmp_path / "[b]vectors\x1b[31m"
    first = hostile_vector(folder, "one\x1b]0;t\x07.safetensors")
    second = hostile_vector(folder, "two.safetensors")
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(first))
    assert code == 0, err
    assert_literal(out)
    assert "[b]vectors\\x1b[31m" in out and "one\\x1b]0;t\\x07.safetensors" in out
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(first), str(second))
    assert code == 0, err
    assert_literal(out)
    code, out, err = run_cli(monkeypatch, capsys, "list", "--vectors", str(folder))
    assert code == 0, err
    assert_literal(out)


def test_error_messages_print_paths_and_details_literally(monkeypatch, capsys, tmp_path, mode):
    missing = tmp_path / f"{HOSTILE}.yaml"
    code, out, err = run_cli(monkeypatch, capsys, "compute", str(missing))
    assert code == 2 and "Recipe file not found" in err
    assert_literal(err, in_path=True)
    broken = tmp_path / "bad.yaml"
    broken.write_text(
        f"instructions:\n  lowercase: {{}}\nsteer:\n  - {{instruction: lowercase, mode: {json.dumps(HOSTILE)}}}\n"
    )
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(broken))
    assert code == 2 and "steer[0].mode" in err
    assert_literal(err)


def test_usage_errors_print_the_bad_argument_literally(monkeypatch, capsys, mode):
    code, out, err = run_cli(monkeypatch, capsys, "generate", "x.yaml", HOSTILE)
    assert code == 2 and "Usage:" in err and "unexpected extra argument" in err
    assert_literal(err.replace("\\x0d", "\\r"))  # the parser itself writes a carriage return as \x0d


def test_progress_labels_print_names_literally(monkeypatch, capsys, recipe, mode):
    recipe.write_text(recipe.read_text().replace("shout", json.dumps(HOSTILE)))
    code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe))
    assert code == 0, err
    assert_literal(out)  # the instruction name beside its file
    if mode == "pipe":
        assert_literal(err)  # "compute NAME: 4/4 (100%) ..." lines
    assert_no_raw(err, mode)


def test_collect_failures_print_job_ids_literally(monkeypatch, capsys, tmp_path, mode):
    monkeypatch.setenv("NSTEER_JOBS_DIR", str(tmp_path / "jobs"))
    code, out, err = run_cli(monkeypatch, capsys, "collect", HOSTILE)
    assert code == 2
    assert_literal(err, times=1)


def test_markdown_reports_hold_names_literally():
    from nsteer.evaluate.table import CELLS, Answer, EvaluationResult
    from nsteer.report import eval_markdown

    answers = tuple(
        Answer(
            "k", "a | b <script>", cell.instruction_in_prompt, cell.steered, "p", "a", True, True, (), None, 1.0, 1, 1
        )
        for cell in CELLS
    )
    result = EvaluationResult("m`x`|y", "test", "src", "ref", {"a | b <script>": "x@1 add"}, {}, answers)
    text = eval_markdown(result)
    assert "a \\| b &lt;script&gt;" in text and "<script>" not in text and "m\\`x\\`\\|y" in text
    for line in text.splitlines():
        if line.startswith("| a"):
            assert line.count(" | ") == line.replace("\\|", "").count(" | ")  # no extra column


# --- plain text, JSON and JSON lines --------------------------------------------------------------------------------


def test_plain_text_in_a_pipe_has_no_box_drawing(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(hostile_vector(tmp_path)))
    assert code == 0 and not re.search("[\u2500-\u257f]", out) and "\x1b" not in out
    assert re.search(r"^searched +layer 1, add, weight 2, all positions$", out, flags=re.MULTILINE), out


def test_compute_json_lines_and_up_to_date_kept(monkeypatch, capsys, tmp_path, recipe):
    code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe), "--jsonl")
    assert code == 0, err
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record == {"instruction": "shout", "path": str(tmp_path / "out" / "shout.safetensors"), "status": "computed"}
    code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe))
    assert code == 0 and "shout: " in out and "(up to date, kept)" in out
    code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe), "--json")
    document = json.loads(out)
    assert document["command"] == "compute" and document["vectors"][0]["status"] == "kept"
    assert {"recipe", "model", "backend", "device", "dtype", "seed"} <= set(document["run"])
    code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe), "--json", "--jsonl")
    assert code == 2 and "give one of them" in err


def test_generate_json_shapes_and_overrides_used(monkeypatch, capsys, tmp_path, recipe):
    code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe))
    assert code == 0, err
    code, out, err = run_cli(
        monkeypatch, capsys, "generate", str(recipe), "--json", "--compare", "--layer", "2", "--weight", "shout=3.5",
        "--seed", "5", "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 0, err
    document = json.loads(out)
    assert document["command"] == "generate"
    assert document["run"]["steering"] == [
        {"instruction": "shout", "layer": 2, "mode": "add", "weight": 3.5, "positions": "all"}
    ]
    assert document["run"]["max_new_tokens"] == 4 and document["run"]["generation_seed"] == 5
    assert [a["prompt"] for a in document["answers"]] == ["Describe the water cycle.", "Hi"]
    assert all(isinstance(a["steered"], str) and isinstance(a["unsteered"], str) for a in document["answers"])
    # the override is what ran: the same answers as a recipe that says layer 2, weight 3.5 itself
    edited = recipe.with_name("edited.yaml")
    edited.write_text(
        recipe.read_text().replace("layer: 1, mode: add, weight: 8.0", "layer: 2, mode: add, weight: 3.5")
    )
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(edited), "--jsonl", "--max-new-tokens", "4")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["steered"] for line in lines] == [a["steered"] for a in document["answers"]]
    assert all(line["unsteered"] is None for line in lines)
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(recipe), "--layer", "2", "--weight", "3.5")
    assert code == 0 and "run: model " in out and "steering shout@2 add w=3.5 (all)" in out


def test_overrides_are_refused_by_the_recipe_rules(monkeypatch, capsys, recipe):
    code, out, err = run_cli(
        monkeypatch, capsys, "generate", str(recipe), "--dtype", "float64", "--layer", "nobody=1", "--weight", "nan"
    )
    assert code == 2
    assert "--dtype float64: Input should be 'auto', 'float32'" in err
    assert "--layer nobody=1: no steer entry steers 'nobody'" in err
    assert "--weight nan: Input should be a finite number" in err


def test_inspect_eval_and_list_json_shapes(monkeypatch, capsys, tmp_path, recipe):
    code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe))
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(recipe), "--json", "--limit", "1")
    assert code == 0, err
    document = json.loads(out)
    assert document["command"] == "eval" and set(document["reports"]) == {"json", "markdown", "png"}
    rows = document["rows"]
    assert {(r["instruction"], r["instruction_in_prompt"], r["steered"]) for r in rows} == {
        (name, present, steered)
        for name in ("shout", "overall")
        for present in (False, True)
        for steered in (False, True)
    }
    assert all(r["n"] == 1 and 0.0 <= r["loose"] <= 1.0 for r in rows)
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "out" / "shout.safetensors"), "--jsonl")
    (summary,) = [json.loads(line) for line in out.splitlines()]
    assert summary["instruction"] == "shout" and summary["layers"] == 4 and len(summary["norms"]) == 4
    code, out, err = run_cli(monkeypatch, capsys, "list", "--vectors", str(tmp_path / "out"), "--jsonl")
    kinds = [json.loads(line)["kind"] for line in out.splitlines()]
    assert kinds.count("vector") == 1 and kinds.count("instruction") > 20


# --- version and help -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(monkeypatch, capsys, flag):
    import nsteer

    code, out, err = run_cli(monkeypatch, capsys, flag)
    assert code == 0 and out == f"nsteer {nsteer.__version__}\n"


def _recording_set_num_threads(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = torch.set_num_threads

    def recording(count: int) -> None:
        calls.append(count)
        real(count)

    monkeypatch.setattr(torch, "set_num_threads", recording)
    return calls


@pytest.mark.parametrize("how", ["option", "environment"])
def test_threads_sets_torch_threads_for_the_run_and_main_puts_them_back(monkeypatch, capsys, how):
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    calls = _recording_set_num_threads(monkeypatch)
    if how == "environment":
        monkeypatch.setenv("NSTEER_THREADS", str(wanted))
        code, out, err = run_cli(monkeypatch, capsys, "list", "--jsonl")
    else:
        code, out, err = run_cli(monkeypatch, capsys, "--threads", str(wanted), "list", "--jsonl")
    assert code == 0, err
    assert calls == [wanted, before]  # the run's count, then the process's own again
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("value", "fixed"),
    [
        ("4", True),
        ("4,2", True),
        (" 2 ", True),
        ("", False),
        ("abc", False),
        ("0", False),
        ("２", False),
        ("-1", False),
    ],
)
def test_only_a_count_openmp_takes_turns_the_thread_governor_off(value, fixed):
    from nsteer.cli import _omp_count_set

    assert _omp_count_set(value) is fixed


def _busy_neighbours(monkeypatch) -> None:
    """CPU counters in which other processes keep every core busy: 2 s apart, a million cores' worth busy, none of it
    ours."""
    from nsteer.threads import CpuSample

    ticks = iter(range(1000))

    def sample() -> CpuSample:
        tick = next(ticks)
        return CpuSample(busy_s=2e6 * tick, own_s=0.0, at_s=2.0 * tick)

    monkeypatch.setattr(sys.modules["nsteer.cli"], "read_sample", sample)
    monkeypatch.delenv("NSTEER_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_on_a_busy_machine_the_run_gets_one_thread_says_so_and_main_puts_them_back(monkeypatch, capsys, recipe):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe))
        assert code == 0, err
        _busy_neighbours(monkeypatch)
        calls = _recording_set_num_threads(monkeypatch)
        code, out, err = run_cli(monkeypatch, capsys, "generate", str(recipe), "--max-new-tokens", "2")
        assert code == 0, err
        assert calls == [1, 2]  # one thread for the run (the cores were busy at every look), then torch's two again
        assert "torch runs 1 thread instead of 2" in err and "--threads N" in err
        # The plan's time estimate is made at the count the run will start with.
        calls.clear()
        code, out, err = run_cli(monkeypatch, capsys, "eval", str(recipe), "--dry-run", "--limit", "1")
        assert code == 0, err
        assert "plan:" in err and calls == [1, 2]
        # A count the user chose is theirs: no governor, no note.
        calls.clear()
        code, out, err = run_cli(
            monkeypatch, capsys, "--threads", "2", "generate", str(recipe), "--max-new-tokens", "2"
        )
        assert code == 0, err
        assert calls == [2, 2] and "instead of" not in err
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["0", "-1", "two", "100000"])
def test_threads_out_of_range_is_a_usage_error(monkeypatch, capsys, value):
    before = torch.get_num_threads()
    code, out, err = run_cli(monkeypatch, capsys, "--threads", value, "list")
    assert code == 2 and "--threads" in err and out == ""
    assert torch.get_num_threads() == before


def test_help_has_no_type_noise(monkeypatch, capsys):
    import typer

    from nsteer.cli import app

    group = typer.main.get_command(app)
    for name in [None, *group.commands]:
        code, out, err = run_cli(monkeypatch, capsys, *([name] if name else []), "--help")
        assert code == 0 and out.startswith("Usage: "), (name, err)
        options = out[out.index("Options:") :]
        assert "<bool>" not in options and "<list" not in options and "<int" not in options, (name, out)
        assert "<float" not in options and "<text>" not in options, (name, out)


# --- fail fast: before any model loads --------------------------------------------------------------------------------


@pytest.fixture()
def no_model_load(monkeypatch):
    """Any attempt to load model weights fails the test."""
    import nsteer.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the problem was reported")

    monkeypatch.setattr(nsteer.models, "_load_local", refuse)


@pytest.mark.parametrize(
    ("command", "extra", "fragment"),
    [
        ("generate", [], "No vector for 'shout'"),  # the vector file was never computed
        ("eval", [], "No vector for 'shout'"),
        ("generate", ["--dtype", "int4"], "--dtype int4: Input should be"),
        ("compute", ["--device", "mps"], "--device mps: String should match pattern"),
        ("compute", ["--device", "tpu"], "--device tpu: String should match pattern"),
        ("compute", ["--model", "./no/such/model"], "names no file or folder"),
        ("compute", ["--model", "gone.gguf"], "gone.gguf' names no file or folder"),
    ],
)
def test_fail_fast_before_the_model_loads(
    monkeypatch, capsys, tmp_path, recipe, no_model_load, command, extra, fragment
):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, command, str(recipe), *extra)
    assert code == 2, err
    assert fragment in " ".join(err.split())
    assert "Opening" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_fails_before_the_model_loads(monkeypatch, capsys, recipe, no_model_load):
    code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe), "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err


def test_relative_model_id_resolves_from_the_recipe_folder(monkeypatch, capsys, tmp_path, tiny_model_dir):
    import shutil

    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copytree(tiny_model_dir, folder / "model")
    recipe = write_recipe(folder, folder / "model")
    recipe.write_text(recipe.read_text().replace(f'"{folder / "model"}"', '"model"'))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe), "--json")
    assert code == 0, err
    assert json.loads(out)["run"]["model"] == str(folder / "model")


def test_eval_with_another_seed_than_the_vectors_warns_of_overlap(monkeypatch, capsys, recipe):
    code, out, err = run_cli(monkeypatch, capsys, "compute", str(recipe))
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(recipe), "--limit", "1", "--json")
    assert code == 0 and "other training pairs" not in err
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(recipe), "--limit", "1", "--seed", "3", "--json")
    assert code == 0, err
    assert "the vector of 'shout' was computed from other training pairs" in " ".join(err.split())
    assert json.loads(out)["run"]["seed"] == 3
