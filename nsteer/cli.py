"""The `nsteer` command line: thin typer commands over the same functions the SDK exposes.

Results go to standard output (rich tables on a terminal, plain text in a pipe, ``--json`` / ``--jsonl`` on request;
shapes in docs/cli.md), everything else to standard error. Nothing read from a user, a file or a model is printed as
markup or with its control characters: :mod:`nsteer.terminal` does all the printing.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from nsteer.errors import NsteerError
from nsteer.progress import ProgressCallback, ProgressFactory
from nsteer.searched import SearchedSetting
from nsteer.terminal import Output
from nsteer.threads import ThreadGovernor, read_sample

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain click help: no `<bool>` after flags, nothing in help text parsed as markup
    help="Steer language models toward following instructions.",
)


MAX_THREADS = 1024  # far beyond any machine's cores; a bound keeps a mistyped number from reaching torch


def _print_version(value: bool) -> None:
    if value:
        from nsteer import __version__

        print(f"nsteer {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", "-V", is_eager=True, callback=_print_version, help="Print the version and exit."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        max=MAX_THREADS,
        metavar="N",
        envvar="NSTEER_THREADS",
        help="CPU threads torch may use (or $NSTEER_THREADS). Default: one per core that other processes leave free, "
        "measured between batches.",
    ),
) -> None:
    """Steer language models toward following instructions."""
    if threads is not None:
        import torch

        # The process's own command line, not the SDK: a library call never changes the caller's thread count.
        torch.set_num_threads(threads)
        ctx.obj = None  # a count the user chose: no governor changes it


# ------------------------------------------------------------------------------------------------ shared options

CHECKPOINT = "cells.jsonl"  # finished cells of eval and composition runs, in their output folder
RECIPE = typer.Argument(..., metavar="RECIPE", help="The recipe YAML file.")
JSON = typer.Option(False, "--json", help="Print the result as one JSON document (shapes: docs/cli.md).")
JSONL = typer.Option(False, "--jsonl", help="Print the result as JSON lines, one record per line (docs/cli.md).")
MODEL = typer.Option(
    None, "--model", metavar="ID", help="Override model.id: embedded:..., a folder, a .gguf file or a Hub id."
)
DEVICE = typer.Option(None, "--device", metavar="NAME", help="Override model.device: cpu, cuda, cuda:N or auto.")
DTYPE = typer.Option(None, "--dtype", metavar="NAME", help="Override model.dtype.")
LAYER = typer.Option(
    None,
    "--layer",
    metavar="[NAME=]N",
    help="Override steer[].layer (a number or auto) of every entry, or with NAME= of the entries steering NAME; "
    "repeatable.",
)
WEIGHT = typer.Option(None, "--weight", metavar="[NAME=]X", help="Override steer[].weight, like --layer; repeatable.")
MODE = typer.Option(
    None, "--mode", metavar="[NAME=]MODE", help="Override steer[].mode (set, add, ablate), like --layer; repeatable."
)
ALLOW_TRANSFER = typer.Option(
    False, "--allow-transfer", help="Accept vectors computed on another model of the same shape."
)


def _output(as_json: bool, as_jsonl: bool) -> Output:
    if as_json and as_jsonl:
        raise NsteerError("--json and --jsonl are two shapes of one result: give one of them.")
    return Output("json" if as_json else "jsonl" if as_jsonl else "text")


def _model_overrides(model: str | None, device: str | None, dtype: str | None) -> list:
    """Overrides of the recipe's model section; a --model that is a path is taken from the current directory."""
    from nsteer.recipe import Override, model_location

    found = []
    if model is not None:
        found.append(Override(("model", "id"), model_location(model, Path.cwd()), f"--model {model}"))
    if device is not None:
        found.append(Override(("model", "device"), device, f"--device {device}"))
    if dtype is not None:
        found.append(Override(("model", "dtype"), dtype, f"--dtype {dtype}"))
    return found


def _number(text: str, kind: type) -> Any:
    """``text`` as YAML would read a plain number (so the recipe's own rules judge it), else the text itself."""
    try:
        return int(text) if kind is int else float(text)
    except ValueError:
        return text


def _steer_overrides(option: str, field: str, values: Sequence[str] | None, kind: type | None) -> list:
    """``--layer 12`` (every steer entry) or ``--layer lowercase=12`` (the entries steering lowercase) as overrides."""
    from nsteer.recipe import Override

    found = []
    for text in values or ():
        name, equals, value = text.rpartition("=")
        parsed: Any = _number(value, kind) if kind else value
        found.append(Override(("steer", name if equals else None, field), parsed, f"{option} {text}"))
    return found


def _search_overrides(
    limit: int | None, layers: str | None, weights: str | None, modes: str | None, max_new_tokens: int | None
) -> list:
    """Search bounds from the command line as overrides of the recipe's ``search`` section (judged by its rules)."""
    from nsteer.recipe import Override

    found = []
    if limit is not None:
        found.append(Override(("search", "max_prompts"), limit, f"--limit {limit}"))
    if layers is not None:
        found.append(Override(("search", "layers"), _list(layers, int), f"--layers {layers}"))
    if weights is not None:
        kind, colon, numbers = weights.partition(":")
        value: Any = (
            {"relative": _list(numbers, float)} if colon and kind.strip() == "relative" else _list(weights, float)
        )
        found.append(Override(("search", "weights"), value, f"--weights {weights}"))
    if modes is not None:
        found.append(Override(("search", "modes"), _list(modes, None), f"--modes {modes}"))
    if max_new_tokens is not None:
        found.append(Override(("search", "max_new_tokens"), max_new_tokens, f"--max-new-tokens {max_new_tokens}"))
    return found


def _list(text: str, kind: type | None) -> list:
    """``12,16`` as a list, each item read as a plain number would be (the recipe's rules judge what is not one)."""
    items = [item.strip() for item in text.split(",")]
    return [_number(item, kind) if kind else item for item in items if item] if text.strip() else []


def _estimate(ctx: typer.Context, recipe: Any, remote: bool, answers: int, max_new_tokens: int) -> str:
    """How long ``answers`` take at the rate this machine recorded for the recipe's model, device, dtype, batch and
    the thread count the run will start with."""
    from nsteer.throughput import estimate, rate_key

    model, batch = recipe.model, recipe.generation.batch_size
    if remote or model.backend == "ndif":  # the keys runs record under (throughput.handle_rate_key)
        key = rate_key(model.id, "ndif", "remote", batch)
    else:
        key = rate_key(recipe.model_location, model.device, model.dtype, batch)
        if isinstance(ctx.obj, ThreadGovernor) and key.device == "cpu" and ctx.obj.adjust() is not None:
            key = rate_key(recipe.model_location, model.device, model.dtype, batch)  # at the count the run starts with
    return estimate(key, answers, max_new_tokens)


def _recipe(path: Path, overrides: Sequence[Any] = ()) -> Any:
    """Load a recipe and apply command-line overrides, validated by the recipe's own rules."""
    from nsteer.recipe import load_recipe, override_recipe

    return override_recipe(load_recipe(path), list(overrides))


def _open(ctx: typer.Context, output: Output, recipe: Any, remote: bool) -> Any:
    """Open the recipe's model (on NDIF with ``remote``), saying which, and give torch the cores other processes
    leave free (saying so when that is fewer than torch's own choice)."""
    from nsteer.pipeline import open_recipe_model

    use_remote = remote or recipe.model.backend == "ndif"
    output.note(f"Opening {recipe.model.id if use_remote else recipe.model_location} ...")
    handle = open_recipe_model(recipe, remote=remote or None)
    governor = _governor(ctx, handle)
    if governor is None:
        return handle
    governor.adjust()
    threads = governor.threads
    if threads < governor.initial:
        # Below the ceiling other processes took the cores; at it, the cap that set the ceiling (a quota, the CPUs).
        reason = (
            governor.limit if threads >= governor.ceiling and governor.limit else "other processes keep CPU cores busy"
        )
        output.note(
            f"{reason}: torch runs {threads} thread{'s' if threads > 1 else ''} instead of {governor.initial}, "
            "re-checked between batches (--threads N fixes the count)."
        )
    return handle


def _governor(ctx: typer.Context, handle: Any) -> ThreadGovernor | None:
    """The invocation's thread governor, when there is one and the model runs here on the CPU."""
    governor = ctx.obj if isinstance(ctx.obj, ThreadGovernor) else None
    if governor is None or handle.remote or str(handle.device) != "cpu":
        return None
    return governor


@contextmanager
def _progress(ctx: typer.Context, output: Output, handle: Any) -> Iterator[ProgressFactory]:
    """The output's progress bars; each update (a finished batch) also lets the governor re-check the free cores."""
    governor = _governor(ctx, handle)
    with output.progress() as bars:
        if governor is None:
            yield bars
            return

        def factory(label: str) -> ProgressCallback:
            update = bars(label)

            def governed(done: int, total: int) -> None:
                update(done, total)
                governor.adjust()

            return governed

        yield factory


def _run(recipe: Any, handle: Any, **extra: Any) -> dict[str, Any]:
    """What a run used, for its output: the recipe, the model as opened, and the settings given."""
    run = {
        "recipe": str(recipe.source) if recipe.source else None,
        "model": handle.model_id,
        "backend": "ndif" if handle.remote else "local",
        "device": "ndif" if handle.remote else str(handle.device),
        "dtype": recipe.model.dtype if handle.remote else str(handle.dtype).removeprefix("torch."),
        "seed": recipe.prompts.seed,
    }
    run.update(extra)
    return run


def _describe_run(run: dict[str, Any]) -> str:
    """``run: model X, device cpu, dtype float32, seed 0, ...`` on one line."""
    parts = [f"{key.replace('_', ' ')} {value}" for key, value in run.items() if key != "recipe" and value is not None]
    return "run: " + ", ".join(parts)


def _edit_record(edit: Any) -> dict[str, Any]:
    return {
        "instruction": edit.name,
        "layer": edit.layer,
        "mode": edit.mode,
        "weight": edit.weight,
        "positions": edit.positions,
    }


def _describe_edits(edits: Sequence[Any]) -> str:
    return ", ".join(f"{e.name}@{e.layer} {e.mode} w={e.weight:g} ({e.positions})" for e in edits) or "no steering"


def _check_split(split: str) -> None:
    if split not in ("train", "validation", "test"):
        raise NsteerError(f"--split {split!r} is not a split; use train, validation or test.")


# ----------------------------------------------------------------------------------------------------- commands


@app.command()
def compute(
    ctx: typer.Context,
    recipe_path: Path = RECIPE,
    force: bool = typer.Option(False, "--force", help="Recompute vectors that are already up to date."),
    model: str | None = MODEL,
    device: str | None = DEVICE,
    dtype: str | None = DTYPE,
    seed: int | None = typer.Option(
        None, "--seed", metavar="N", help="Override prompts.seed: which prompts pair up and land in which split."
    ),
    remote: bool = typer.Option(False, "--remote", help="Run on NDIF (the recipe's model id must be a Hub id)."),
    no_wait: bool = typer.Option(
        False,
        "--no-wait",
        help="On NDIF: submit one job per instruction and return; `nsteer collect` writes the files.",
    ),
    as_json: bool = JSON,
    as_jsonl: bool = JSONL,
) -> None:
    """Compute a steering vector for every instruction in RECIPE and write them to its output folder."""
    from nsteer.pipeline import compute_task, vector_tasks
    from nsteer.recipe import Override

    output = _output(as_json, as_jsonl)
    overrides = _model_overrides(model, device, dtype)
    if seed is not None:
        overrides.append(Override(("prompts", "seed"), seed, f"--seed {seed}"))
    recipe = _recipe(recipe_path, overrides)
    _check_no_wait(no_wait, remote, recipe)
    _writable(recipe.output_dir)
    handle = _open(ctx, output, recipe, remote)
    run = _run(recipe, handle)
    output.line(_describe_run(run))
    if no_wait:
        return _submit_vectors(output, recipe, handle, run, force=force)
    records = []
    with _progress(ctx, output, handle) as bars:
        for task in vector_tasks(recipe, handle, force=force):
            if task.keep:
                record = {"instruction": task.name, "path": str(task.path), "status": "kept"}
            else:
                path = compute_task(recipe, handle, task, force=force, progress=lambda name: bars(f"compute {name}"))
                record = {"instruction": task.name, "path": str(path), "status": "computed"}
            output.records([record])  # each line as its vector is written
            output.line(
                f"{task.name}: {record['path']} ({'up to date, kept' if task.keep else 'computed'})",
            )
            records.append(record)
    output.document({"command": "compute", "run": run, "vectors": records})


@app.command()
def generate(
    ctx: typer.Context,
    recipe_path: Path = RECIPE,
    prompt: list[str] | None = typer.Option(
        None, "--prompt", "-p", metavar="TEXT", help="A prompt (repeatable); default: the recipe's demo_prompts."
    ),
    no_steer: bool = typer.Option(False, "--no-steer", help="Generate without any edit."),
    compare: bool = typer.Option(False, "--compare", help="Show answers without and with steering side by side."),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", metavar="N", help="Override generation.max_new_tokens."
    ),
    model: str | None = MODEL,
    device: str | None = DEVICE,
    dtype: str | None = DTYPE,
    layer: list[str] | None = LAYER,
    weight: list[str] | None = WEIGHT,
    mode: list[str] | None = MODE,
    seed: int | None = typer.Option(
        None, "--seed", metavar="N", help="Override generation.seed: the sampling seed (with do_sample)."
    ),
    allow_transfer: bool = ALLOW_TRANSFER,
    remote: bool = typer.Option(False, "--remote", help="Run on NDIF."),
    no_wait: bool = typer.Option(
        False, "--no-wait", help="On NDIF: submit one job and return; `nsteer collect JOB` prints the answers."
    ),
    as_json: bool = JSON,
    as_jsonl: bool = JSONL,
) -> None:
    """Answer prompts with the recipe's steering edits (or without, or both side by side)."""
    from nsteer.generate import generate as run_generate
    from nsteer.pipeline import check_recipe_vectors, generation_config, read_recipe_vectors, recipe_edits
    from nsteer.recipe import Override

    output = _output(as_json, as_jsonl)
    overrides = [
        *_model_overrides(model, device, dtype),
        *_steer_overrides("--layer", "layer", layer, int),
        *_steer_overrides("--weight", "weight", weight, float),
        *_steer_overrides("--mode", "mode", mode, None),
    ]
    if seed is not None:
        overrides.append(Override(("generation", "seed"), seed, f"--seed {seed}"))
    if max_new_tokens is not None:
        overrides.append(
            Override(("generation", "max_new_tokens"), max_new_tokens, f"--max-new-tokens {max_new_tokens}")
        )
    recipe = _recipe(recipe_path, overrides)
    prompts = list(prompt or recipe.demo_prompts)
    if not prompts:
        raise NsteerError("No prompt given: pass --prompt TEXT, or list demo_prompts in the recipe.")
    if any(not text.strip() for text in prompts):
        raise NsteerError("A prompt is empty: every --prompt (and demo_prompts entry) needs some text to answer.")
    if not recipe.steer and not no_steer:
        raise NsteerError(f"{recipe_path} has no `steer` entries; add one, or pass --no-steer.")
    _check_no_wait(no_wait, remote, recipe)
    vectors = {} if no_steer else read_recipe_vectors(recipe)  # a missing file is refused before the model loads
    handle = _open(ctx, output, recipe, remote)
    check_recipe_vectors(recipe, vectors, handle, allow_transfer=allow_transfer or None)
    config = generation_config(recipe)
    edits = [] if no_steer else recipe_edits(recipe, vectors)
    run = _run(
        recipe,
        handle,
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        generation_seed=config.seed,
        steering=_describe_edits(edits),
    )
    if no_wait:
        output.line(_describe_run(run))
        return _submit_generation(output, handle, prompts, edits, config, compare=compare)
    with _progress(ctx, output, handle) as bars:
        steered = run_generate(handle, prompts, edits, config=config, progress=bars("generate"))
        plain = (
            run_generate(handle, prompts, [], config=config, progress=bars("unsteered")) if compare and edits else None
        )
    if edits:
        records = [
            {"prompt": text, "steered": answer, "unsteered": plain[index] if plain is not None else None}
            for index, (text, answer) in enumerate(zip(prompts, steered))
        ]
    else:
        records = [{"prompt": text, "steered": None, "unsteered": answer} for text, answer in zip(prompts, steered)]
    output.line(_describe_run(run))
    output.answers(records, _describe_edits(edits))
    output.records(records)
    output.document(
        {"command": "generate", "run": {**run, "steering": [_edit_record(e) for e in edits]}, "answers": records}
    )


@app.command()
def inspect(
    vector_files: list[Path] = typer.Argument(
        ..., metavar="VECTOR_FILE...", help="One or more .safetensors vector files."
    ),
    as_json: bool = JSON,
    as_jsonl: bool = typer.Option(False, "--jsonl", help="Print one summary per line (docs/cli.md)."),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        metavar="FILE.png",
        help="Write a PNG of cosine similarities: one file -> layer x layer (and norms by layer); "
        "several -> instruction x instruction at --layer, and each pair by layer.",
    ),
    layer: int | None = typer.Option(
        None,
        "--layer",
        metavar="N",
        min=0,
        help="The layer of the instruction x instruction comparison; default: the middle layer.",
    ),
    centered: bool = typer.Option(
        False,
        "--centered",
        help="Compare what sets instructions apart: subtract their mean direction first (3+ files).",
    ),
) -> None:
    """Show vector files' metadata, searched setting and per-layer norms; compare several; plot their similarities."""
    from nsteer.vectors import load_vector, vector_summary

    output = _output(as_json, as_jsonl)
    vectors = [load_vector(path) for path in vector_files]
    summaries = [{"file": str(path), **vector_summary(vector)} for path, vector in zip(vector_files, vectors)]
    cosine = None
    if len(vectors) > 1 or plot is not None:
        from nsteer.report import cosine_between, vector_labels, write_similarity_plot

        labels = vector_labels(vectors, vector_files)
        if plot is not None:
            _new_output(plot, force=True, what="plot")
            written = write_similarity_plot(vectors, vector_files, plot, layer=layer, centered=centered)
            output.note(f"plot: {written}")
        if len(vectors) > 1:
            at = vectors[0].metadata.n_layers // 2 if layer is None else layer
            if not 0 <= at < vectors[0].metadata.n_layers:
                raise NsteerError(
                    f"--layer {at} is out of range: the vectors have layers 0..{vectors[0].metadata.n_layers - 1}."
                )
            matrix = cosine_between(vectors, centered=centered)[at]
            cosine = {
                "layer": at,
                "centered": centered,
                "labels": labels,
                "matrix": [[round(float(x), 4) for x in row] for row in matrix],
            }
    output.document({"command": "inspect", "vectors": summaries, "cosine": cosine})
    output.records(summaries)
    if not output.text:
        return
    if cosine is None:
        (summary,) = summaries
        rows = [
            (key, str(summary[key]))
            for key in ("instruction", "category", "model", "architecture", "width", "layers", "pairs")
        ]
        (vector,) = vectors
        rows.append(("searched", _describe_setting(vector.metadata.chosen, vector.norms)))
        rows += [
            (f"searched for {name}", _describe_setting(setting, vector.norms))
            for name, setting in sorted(vector.metadata.chosen_for.items())
        ]
        if summary.get("imported_from"):
            rows.append(("imported from", str(summary["imported_from"])))
        rows.append(("nsteer version", str(summary["nsteer_version"])))
        rows.append(("norm by layer", " ".join(f"{i}:{n:.2f}" for i, n in enumerate(summary["norms"]))))
        output.table(summary["file"], ("field", "value"), rows, header=False)
        return
    output.table(
        f"{len(vectors)} vectors",
        ("#", "file", "instruction", "model", "layers x width", "pairs", "searched"),
        [
            (
                str(number),
                summary["file"],
                summary["instruction"],
                summary["model"],
                f"{summary['layers']} x {summary['width']}",
                str(summary["pairs"]),
                _describe_setting(vector.metadata.chosen, vector.norms),
            )
            for number, (summary, vector) in enumerate(zip(summaries, vectors))
        ],
    )
    output.table(
        f"cosine similarity at layer {cosine['layer']}{', centered' if centered else ''} (columns: # above)",
        ("", *(str(number) for number in range(len(cosine["labels"])))),
        [
            (f"{number} {label}", *(f"{x:.2f}" for x in row))
            for number, (label, row) in enumerate(zip(cosine["labels"], cosine["matrix"]))
        ],
        right=tuple(str(number) for number in range(len(cosine["labels"]))),
    )


def _describe_setting(chosen: SearchedSetting | None, norms: Any = None) -> str:
    """A searched setting in words: ``layer 14, set, weight 1, all positions (validation 0.42 vs 0.30 unsteered)``.

    A relative weight is shown as this vector's own k × ‖u_l‖ (``norms``): a setting shared by several vectors stores
    the absolute weight of the one it was searched on."""
    from nsteer.vectors import applied_weight

    if chosen is None:
        return "not searched"
    if chosen.no_steering:
        text = "no steering (nothing beat the unsteered model)"
    else:
        weight = chosen.weight if norms is None else applied_weight(chosen, norms)
        text = f"layer {chosen.layer}, {chosen.mode}, weight {weight:g}"
        if chosen.weight_relative is not None:
            text += f" ({chosen.weight_relative:g} x the layer's norm)"
        text += f", {chosen.positions} positions"
        if chosen.options_label:
            text += f", {chosen.options_label}"
        if chosen.layers is not None:
            text += f" (file steers layers {list(chosen.layers)})"
    if chosen.score is not None and chosen.baseline_score is not None:
        text += f"; validation loose {chosen.score:.2f} vs {chosen.baseline_score:.2f} unsteered"
        if chosen.substantive_score is not None and chosen.baseline_substantive_score is not None:
            text += f", substantive {chosen.substantive_score:.2f} vs {chosen.baseline_substantive_score:.2f}"
        if chosen.n_prompts is not None:
            text += f" on {chosen.n_prompts} prompts"
        if chosen.condition is not None:
            text += f" (instruction {'in the prompt or not' if chosen.condition == 'both' else chosen.condition})"
    return text


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    recipe_path: Path = RECIPE,
    data: Path | None = typer.Option(
        None, "--data", metavar="FILE.jsonl", help="Score on an IFEval-format JSONL file instead of the recipe's split."
    ),
    split: str = typer.Option(
        "test", "--split", metavar="NAME", help="train, validation or test (ignored with --data)."
    ),
    limit: int | None = typer.Option(
        None, "--limit", metavar="N", min=1, help="At most this many prompts per instruction."
    ),
    out: Path | None = typer.Option(
        None, "--out", metavar="DIR", help="Report folder; default <output>/eval (or eval-<split>)."
    ),
    model: str | None = MODEL,
    device: str | None = DEVICE,
    dtype: str | None = DTYPE,
    layer: list[str] | None = LAYER,
    weight: list[str] | None = WEIGHT,
    mode: list[str] | None = MODE,
    seed: int | None = typer.Option(
        None,
        "--seed",
        metavar="N",
        help="Override prompts.seed (which prompts are test prompts): keep the seed the vectors were computed with.",
    ),
    allow_transfer: bool = ALLOW_TRANSFER,
    remote: bool = typer.Option(False, "--remote", help="Run on NDIF."),
    composition: bool = typer.Option(
        False, "--composition", help="Report each instruction composed with the recipe's other edits next to alone."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (prompts, answers, time) and stop; no model is opened."
    ),
    as_json: bool = JSON,
    as_jsonl: bool = JSONL,
) -> None:
    """The 2×2 table (instruction in prompt × steering) with quality, written as JSON, Markdown and PNG.

    Before any work it prints the plan: prompts × cells = answers, and how long that takes at this machine's rate.
    """
    from nsteer.evaluate.table import CELLS, evaluate_recipe, plan_recipe_evaluation
    from nsteer.pipeline import check_recipe_vectors, read_recipe_vectors, vectors_from_other_pairs
    from nsteer.recipe import Override
    from nsteer.report import CELL_HEADERS, EVAL_REPORT_FILES, write_eval_report

    overrides = [
        *_model_overrides(model, device, dtype),
        *_steer_overrides("--layer", "layer", layer, int),
        *_steer_overrides("--weight", "weight", weight, float),
        *_steer_overrides("--mode", "mode", mode, None),
    ]
    if seed is not None:
        overrides.append(Override(("prompts", "seed"), seed, f"--seed {seed}"))
    if composition:
        if data is not None or remote:
            raise NsteerError("--composition scores the recipe's own split locally; drop --data and --remote.")
        return _eval_composition(
            ctx,
            recipe_path,
            overrides,
            split=split,
            limit=limit,
            out=out,
            allow_transfer=allow_transfer,
            output=_output(as_json, as_jsonl),
        )
    output = _output(as_json, as_jsonl)
    recipe = _recipe(recipe_path, overrides)
    _check_split(split)
    out_dir = out or recipe.output_dir / (
        "eval" if data is None and split == "test" else f"eval-{'data' if data else split}"
    )
    if not dry_run:  # a plan touches nothing: no report folder is made
        _writable(out_dir, files=(CHECKPOINT, *EVAL_REPORT_FILES))
    vectors = read_recipe_vectors(recipe) if recipe.steer else {}
    if data is None:
        for name in vectors_from_other_pairs(recipe, vectors):
            output.note(
                f"note: the vector of '{name}' was computed from other training pairs than this recipe's split gives "
                f"(prompts.seed {recipe.prompts.seed}, the prompts or the phrasings changed since): the test prompts "
                "may include its training prompts. Recompute it with `nsteer compute` (and the same --seed)."
            )
    plan = plan_recipe_evaluation(recipe, vectors, split=split, limit=limit, data=data)
    output.note(f"plan: {plan.summary()} ({_estimate(ctx, recipe, remote, plan.generated, plan.max_new_tokens)}).")
    if dry_run:
        output.document({"command": "eval", "dry_run": True, "plan": plan.to_dict()})
        output.records([plan.to_dict()])
        return
    handle = _open(ctx, output, recipe, remote)
    check_recipe_vectors(recipe, vectors, handle, allow_transfer=allow_transfer or None)
    with _progress(ctx, output, handle) as bars:
        result = evaluate_recipe(
            recipe,
            handle,
            vectors=vectors,
            split=split,
            limit=limit,
            data=data,
            checkpoint=out_dir / CHECKPOINT,
            progress=bars,
        )
    paths = write_eval_report(result, out_dir)
    run = _run(recipe, handle, split=result.split, steering=dict(result.steering))
    rows = [
        {
            "instruction": group or "overall",
            "instruction_in_prompt": cell.instruction_in_prompt,
            "steered": cell.steered,
            "n": summary.n,
            "loose": summary.loose if summary.n else None,
            "strict": summary.strict if summary.n else None,
            "substantive": summary.substantive if summary.n else None,
            "degenerate_share": summary.degenerate_share if summary.n else None,
            "median_perplexity": summary.median_perplexity if summary.n else None,
        }
        for group in (*result.groups, None)
        for cell in CELLS
        for summary in (result.cell(cell, group),)
    ]
    output.records(rows)
    output.document({"command": "eval", "run": run, "rows": rows, "reports": {k: str(v) for k, v in paths.items()}})
    if not output.text:
        return
    output.line(_describe_run({**run, "steering": None}))
    output.table(
        f"loose (strict) accuracy, {result.split}",
        ("instruction", *CELL_HEADERS),
        [
            (
                group or "overall",
                *(f"{c.loose:.2f} ({c.strict:.2f})" if c.n else "–" for c in (result.cell(x, group) for x in CELLS)),
            )
            for group in (*result.groups, None)
        ],
        right=CELL_HEADERS,
    )
    for group in result.groups:
        output.line(f"steering {group}: {result.steering.get(group, 'none')}")
    for kind, path in paths.items():
        output.line(f"{kind}: {path}")


@app.command()
def search(
    ctx: typer.Context,
    recipe_path: Path = RECIPE,
    out: Path | None = typer.Option(
        None, "--out", metavar="DIR", help="Report and checkpoint folder; default <output>/search."
    ),
    allow_transfer: bool = ALLOW_TRANSFER,
    remote: bool = typer.Option(False, "--remote", help="Run on NDIF."),
    limit: int | None = typer.Option(
        None, "--limit", metavar="N", help="At most N validation prompts per instruction (search.max_prompts)."
    ),
    layers: str | None = typer.Option(
        None, "--layers", metavar="L,L,...", help="Candidate layers, e.g. 12,16,20 (search.layers)."
    ),
    weights: str | None = typer.Option(
        None,
        "--weights",
        metavar="W,W,...",
        help="Candidate add weights: numbers (20,40), or relative:0.5,1,2 for k x the layer's norm (search.weights).",
    ),
    modes: str | None = typer.Option(
        None, "--modes", metavar="MODE,...", help="Modes to sweep, e.g. set,add (search.modes)."
    ),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", metavar="N", help="Tokens per answer in the sweep (search.max_new_tokens)."
    ),
    halving: bool | None = typer.Option(
        None,
        "--halving/--no-halving",
        help="Successive halving: all settings on the first prompts, the better half on twice as many, ... "
        "(search.halving).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (settings, prompts, answers, time) and stop; no model is opened."
    ),
    as_json: bool = JSON,
    as_jsonl: bool = JSONL,
) -> None:
    """Sweep layers (and add weights) of every `layer: auto` entry on validation prompts; record each winner.

    Before any work it prints the plan: settings x prompts = answers, and how long that takes at the rate recorded
    on this machine by earlier runs (or that none is recorded yet).
    """
    from nsteer.pipeline import check_recipe_vectors, read_recipe_vectors, steer_vector_path
    from nsteer.recipe import Override
    from nsteer.report import SEARCH_REPORT_FILES, search_rows, write_search_report
    from nsteer.search import CHECKPOINT_NAME, plan_search, search_recipe

    output = _output(as_json, as_jsonl)
    overrides = _search_overrides(limit, layers, weights, modes, max_new_tokens)
    if halving is not None:
        overrides.append(Override(("search", "halving"), halving, "--halving" if halving else "--no-halving"))
    recipe = _recipe(recipe_path, overrides)
    out_dir = out or recipe.output_dir / "search"
    vectors = read_recipe_vectors(recipe)
    plan = plan_search(recipe, vectors)  # the vector files know the layer count: no model needed
    output.note(f"plan: {plan.summary()} ({_estimate(ctx, recipe, remote, plan.answers, plan.max_new_tokens)}).")
    if dry_run:
        output.records([entry.to_dict() for entry in plan.entries])
        output.document({"command": "search", "dry_run": True, "plan": plan.to_dict()})
        for line in plan.lines():
            output.line(line)
        return
    searched = [index for index, entry in enumerate(recipe.steer) if entry.layer == "auto"]
    _writable(  # the winners go into the vector files
        out_dir,
        *(steer_vector_path(recipe, index).parent for index in searched),
        files=(CHECKPOINT_NAME, *SEARCH_REPORT_FILES),
    )
    handle = _open(ctx, output, recipe, remote)
    check_recipe_vectors(recipe, vectors, handle, allow_transfer=allow_transfer or None)
    with _progress(ctx, output, handle) as bars:
        result = search_recipe(recipe, handle, vectors=vectors, out_dir=out_dir, progress=bars)
    paths = write_search_report(result, out_dir)
    columns = ("instruction", "setting", "loose", "strict", "degenerate", "substantive", "median ppl", "verdict")
    rows = search_rows(result)
    records = [dict(zip(columns, row)) for row in rows]
    winners = [
        {"instruction": sweep.instruction, "winner": sweep.winner.setting.label, "vector": str(sweep.vector_path)}
        for sweep in result.sweeps
    ]
    run = _run(recipe, handle)
    output.records(records)
    output.document(
        {
            "command": "search",
            "run": run,
            "rule": result.sweeps[0].rule if result.sweeps else None,
            "rows": records,
            "winners": winners,
            "reports": {k: str(v) for k, v in paths.items()},
        }
    )
    if not output.text:
        return
    output.line(_describe_run(run))
    output.table(
        f"layer search (validation), {result.sweeps[0].rule if result.sweeps else ''}",
        columns,
        rows,
        right=("loose", "strict", "degenerate", "substantive", "median ppl"),
    )
    for winner in winners:
        output.line(f"{winner['instruction']}: {winner['winner']} -> {winner['vector']}")
    for kind, path in paths.items():
        output.line(f"{kind}: {path}")


def _new_output(path: Path, *, force: bool, what: str) -> Path:
    """Refuse to replace an existing file without --force (a computed vector is not silently overwritten), and an
    output path that is a folder or in a folder that cannot be written, before any work is done."""
    from nsteer.fileio import check_output_path

    check_output_path(path, what)
    if path.exists() and not force:
        raise NsteerError(f"{path} already exists; pass --force to replace it, or give another --out.")
    _writable(path.parent)
    return path


def _writable(*folders: Path, files: Sequence[str] = ()) -> None:
    """Prove each output folder takes a file before a model is opened (not after it has run for an hour), and that
    ``files`` (names in the first folder) are files or absent: a folder or a pipe there would fail the last write."""
    from nsteer.fileio import check_output_path, writable_folder

    for folder in dict.fromkeys(folders):
        writable_folder(folder)
    for name in files:
        check_output_path(folders[0] / name)


def _check_no_wait(no_wait: bool, remote: bool, recipe: Any) -> None:
    """--no-wait submits NDIF jobs: refuse it for a local run before any model is opened."""
    if no_wait and not remote and recipe.model.backend != "ndif":
        raise NsteerError("--no-wait submits NDIF jobs: add --remote, or set backend: ndif in the recipe.")


def _submit_vectors(output: Output, recipe: Any, handle: Any, run: dict[str, Any], *, force: bool) -> None:
    """`compute --no-wait`: submit the NDIF jobs and print their ids."""
    from nsteer.jobs import submit_recipe_vectors

    records = []
    for name, job in submit_recipe_vectors(recipe, handle, force=force).items():
        if isinstance(job, Path):
            record = {"instruction": name, "path": str(job), "status": "kept"}
            output.line(f"{name}: {job} (up to date, kept)")
        else:
            record = {"instruction": name, "job": job.id, "status": "submitted"}
            output.line(f"{name}: job {job.id}")
        records.append(record)
    output.records(records)
    output.document({"command": "compute", "run": run, "vectors": records})
    output.note("Fetch the vectors with: nsteer collect JOB ... (or nsteer collect --all)")


def _submit_generation(
    output: Output, handle: Any, prompts: list[str], edits: list, config: Any, *, compare: bool
) -> None:
    """`generate --no-wait`: submit one NDIF job and print its id."""
    from nsteer.jobs import submit_generation

    if compare:
        raise NsteerError("--compare cannot be submitted as one job: submit twice, with and without --no-steer.")
    job = submit_generation(handle, prompts, edits, config=config)
    output.line(f"job {job.id}")
    output.records([{"job": job.id, "status": "submitted"}])
    output.document({"command": "generate", "job": job.id, "status": "submitted"})
    output.note(f"Fetch the answers with: nsteer collect {job.id}")


@app.command()
def collect(
    job_ids: list[str] | None = typer.Argument(None, metavar="JOB...", help="Job ids printed by --no-wait."),
    all_jobs: bool = typer.Option(
        False, "--all", help="Collect every job submitted from this machine and not collected yet."
    ),
    wait: float = typer.Option(
        0.0, "--wait", metavar="SECONDS", min=0, help="Seconds to keep polling a job that is still running."
    ),
    as_json: bool = JSON,
    as_jsonl: bool = JSONL,
) -> None:
    """Fetch NDIF jobs submitted with --no-wait: write their vector files, or print their answers."""
    from nsteer.jobs import collect as collect_job
    from nsteer.jobs import pending_job_ids

    output = _output(as_json, as_jsonl)
    ids = list(job_ids or [])
    if all_jobs:
        ids += [job_id for job_id in pending_job_ids() if job_id not in ids]  # a bad record is reported, not fatal
    if not ids:
        raise NsteerError("No job to collect: give the JOB ids that --no-wait printed, or --all for every pending one.")
    failed = []
    records = []
    for job_id in ids:
        try:
            result = collect_job(job_id, wait=wait)
        except NsteerError as error:
            output.error([f"{job_id}: {error}"])
            failed.append(job_id)
            records.append({"job": job_id, "status": "failed", "error": str(error)})
            continue
        if not result.done:
            output.line(f"{job_id}: not finished ({result.status}); collect it again later, or add --wait SECONDS.")
            records.append({"job": job_id, "status": "running", "detail": result.status})
            continue
        record: dict[str, Any] = {"job": job_id, "status": "done"}
        for name, path in result.paths.items():
            output.line(f"{name}: {path}")
        if result.paths:
            record["vectors"] = {name: str(path) for name, path in result.paths.items()}
        if result.answers is not None:
            answers = [
                {"prompt": text, "steered": answer, "unsteered": None}
                for text, answer in zip(result.job.payload["prompts"], result.answers)
            ]
            output.answers(answers, "as submitted")
            record["answers"] = answers
        records.append(record)
    output.records(records)
    output.document({"command": "collect", "jobs": records})
    if failed:
        raise NsteerError(
            f"{len(failed)} of {len(ids)} job(s) could not be collected: {', '.join(failed)} (see above)."
        )


@app.command("export")
def export_vector(
    vector_file: Path = typer.Argument(..., metavar="VECTOR", help="A .safetensors vector file."),
    fmt: str = typer.Option(
        "llama-cpp",
        "--format",
        metavar="NAME",
        help="llama-cpp: llama.cpp's control-vector GGUF (also read by repeng).",
    ),
    layers: str | None = typer.Option(
        None, "--layers", metavar="N,N", help="Layers to export, e.g. 8,10 (1 or more); default: the searched layer."
    ),
    weight: float | None = typer.Option(
        None,
        "--weight",
        metavar="X",
        help="Scale: each direction.N is weight x unit direction, as an add edit; default: the searched add weight.",
    ),
    out: Path | None = typer.Option(
        None, "--out", metavar="FILE.gguf", help="The .gguf file to write; default: VECTOR with a .gguf suffix."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the output file if it exists."),
    as_json: bool = JSON,
) -> None:
    """Write a vector as a llama.cpp control vector (use with llama.cpp's --control-vector FILE.gguf)."""
    from nsteer.interop import export_llama_cpp, export_weight_and_layers, parse_layers
    from nsteer.vectors import load_vector

    output = _output(as_json, False)
    if fmt != "llama-cpp":
        raise NsteerError(f"--format {fmt!r} is not supported; the only export format is llama-cpp.")
    vector = load_vector(vector_file)
    chosen_layers, chosen_weight = export_weight_and_layers(vector, parse_layers(layers) if layers else None, weight)
    target = _new_output(out or vector_file.with_suffix(".gguf"), force=force, what="control vector")
    path = export_llama_cpp(vector, target, layers=chosen_layers, weight=chosen_weight)
    chosen = vector.metadata.chosen
    if weight is not None and chosen is not None and chosen.mode != "add":
        output.note(
            f"note: '{vector.instruction_id}' was searched in {chosen.mode} mode; "
            "llama.cpp can only add, so the file adds weight x direction."
        )
    output.line(f"{vector.instruction_id}: {path}")
    output.document({"command": "export", "instruction": vector.instruction_id, "path": str(path)})


@app.command("import")
def import_vector(
    gguf_file: Path = typer.Argument(..., metavar="FILE.gguf", help="A llama.cpp control-vector GGUF."),
    out: Path = typer.Option(..., "--out", metavar="FILE", help="The .safetensors vector file to write."),
    model_id: str | None = typer.Option(
        None,
        "--model-id",
        metavar="ID",
        help="The model it is for: opened to check width and depth (needed for files nsteer did not write).",
    ),
    instruction: str | None = typer.Option(
        None,
        "--instruction",
        metavar="NAME",
        help="Name of the instruction; default: from the file, else its file name.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it exists."),
    as_json: bool = JSON,
) -> None:
    """Read a llama.cpp control vector into an nsteer vector file (add / ablate only: it has no mean projections)."""
    from nsteer.interop import import_llama_cpp, read_control_vector
    from nsteer.models import open_model
    from nsteer.vectors import save_vector

    output = _output(as_json, False)
    read_control_vector(gguf_file)  # refuse a bad file, or an output already there, before opening any model
    _new_output(out, force=force, what="vector file")
    handle = None
    if model_id:
        output.note(f"Opening {model_id} ...")
        handle = open_model(model_id)
    vector = import_llama_cpp(gguf_file, handle=handle, model_id=model_id, instruction_id=instruction)
    path = save_vector(vector, out)
    chosen = vector.metadata.chosen
    layers = list(chosen.layers) if chosen is not None and chosen.layers is not None else None
    output.line(
        f"{vector.instruction_id}: {path} (layers {layers}, model {vector.metadata.model_id}; "
        "use mode add with weight = the layer's norm to reproduce llama.cpp at strength 1)"
    )
    output.document(
        {
            "command": "import",
            "instruction": vector.instruction_id,
            "path": str(path),
            "layers": layers,
            "model": vector.metadata.model_id,
        }
    )


@app.command("eval-composition")
def eval_composition(
    ctx: typer.Context,
    recipe_path: Path = typer.Argument(
        ..., metavar="RECIPE", help="A recipe whose steer entries cover two or more instructions."
    ),
    split: str = typer.Option("test", "--split", metavar="NAME", help="train, validation or test."),
    limit: int | None = typer.Option(
        None, "--limit", metavar="N", min=1, help="At most this many prompts per instruction."
    ),
    out: Path | None = typer.Option(
        None, "--out", metavar="DIR", help="Report folder; default <output>/composition (or composition-<split>)."
    ),
    model: str | None = MODEL,
    device: str | None = DEVICE,
    dtype: str | None = DTYPE,
    allow_transfer: bool = ALLOW_TRANSFER,
    as_json: bool = JSON,
    as_jsonl: bool = JSONL,
) -> None:
    """Each instruction's accuracy with its own edits alone beside its accuracy with all the recipe's edits composed."""
    _eval_composition(
        ctx,
        recipe_path,
        _model_overrides(model, device, dtype),
        split=split,
        limit=limit,
        out=out,
        allow_transfer=allow_transfer,
        output=_output(as_json, as_jsonl),
    )


def _eval_composition(
    ctx: typer.Context,
    recipe_path: Path,
    overrides: Sequence[Any],
    *,
    split: str,
    limit: int | None,
    out: Path | None,
    allow_transfer: bool,
    output: Output,
) -> None:
    from nsteer.evaluate.composition import (
        COMPOSITION_REPORT_FILES,
        evaluate_recipe_composition,
        write_composition_report,
    )
    from nsteer.pipeline import check_recipe_vectors, read_recipe_vectors

    recipe = _recipe(recipe_path, overrides)
    _check_split(split)
    out_dir = out or recipe.output_dir / ("composition" if split == "test" else f"composition-{split}")
    _writable(out_dir, files=(CHECKPOINT, *COMPOSITION_REPORT_FILES))
    vectors = read_recipe_vectors(recipe)
    handle = _open(ctx, output, recipe, False)
    check_recipe_vectors(recipe, vectors, handle, allow_transfer=allow_transfer or None)
    with _progress(ctx, output, handle) as bars:
        result = evaluate_recipe_composition(
            recipe,
            handle,
            vectors=vectors,
            split=split,
            limit=limit,
            checkpoint=out_dir / CHECKPOINT,
            progress=bars,
        )
    paths = write_composition_report(result, out_dir)
    run = _run(recipe, handle, split=result.split, steering=result.composed)
    records = [
        {
            "instruction": r.instruction,
            "instruction_in_prompt": r.instruction_in_prompt,
            "steering": r.steering,
            "n": r.n,
            "loose": r.loose,
            "strict": r.strict,
            "joint_loose": r.joint_loose,
            "degenerate_share": r.degenerate_share,
            "substantive": r.substantive,
            "median_perplexity": r.median_perplexity,
        }
        for r in result.rows()
    ]
    output.records(records)
    output.document(
        {"command": "eval-composition", "run": run, "rows": records, "reports": {k: str(v) for k, v in paths.items()}}
    )
    if not output.text:
        return
    output.line(_describe_run(run))
    rows = {(r.instruction, r.instruction_in_prompt, r.steering): r for r in result.rows()}
    table = []
    for name in result.instructions:
        for present in (False, True):
            cells = [rows.get((name, present, steering)) for steering in ("unsteered", "alone", "composed")]
            if not any(cells):
                continue
            table.append(
                (
                    name,
                    "yes" if present else "no",
                    *(f"{c.loose:.2f} ({c.strict:.2f}) {c.substantive:.2f}" if c else "–" for c in cells),
                    f"{cells[2].joint_loose:.2f}" if cells[2] else "–",
                )
            )
    columns = ("instruction", "in prompt", "unsteered", "alone", "composed", "composed: all followed")
    title = f"composed vs alone, loose (strict) accuracy and substantive passes, {result.split}"
    output.table(title, columns, table, right=columns[2:])
    for kind, path in paths.items():
        output.line(f"{kind}: {path}")


@app.command("list")
def list_instructions(
    vectors_dir: Path | None = typer.Option(
        None, "--vectors", metavar="DIR", help="A vectors folder; default: the shipped vectors/ (or $NSTEER_VECTORS)."
    ),
    as_json: bool = JSON,
    as_jsonl: bool = JSONL,
) -> None:
    """The built-in instructions and the shipped vectors with their searched (chosen) settings."""
    import json

    from nsteer.prompts import builtin_catalog
    from nsteer.vectors import default_vectors_dir, listing_row, scan_vectors

    output = _output(as_json, as_jsonl)
    root = vectors_dir or default_vectors_dir()
    instructions = builtin_catalog()
    found, unreadable = scan_vectors(root) if vectors_dir or root.is_dir() else ([], [])
    rows = [listing_row(vector, root) for vector in found]
    for _, problem in unreadable:  # reported, and the readable files still listed
        output.note(f"skipped: {problem}")
    skipped = [{"file": str(path), "error": problem} for path, problem in unreadable]
    output.document(
        {
            "command": "list",
            "instructions": instructions,
            "vectors_dir": str(root),
            "vectors": rows,
            "unreadable": skipped,
        }
    )
    output.records(
        [{"kind": "instruction", **row} for row in instructions] + [{"kind": "vector", **row} for row in rows]
    )
    if not output.text:
        return
    output.table(
        "built-in instructions",
        ("id", "category", "check", "phrasings"),
        [
            (
                row["id"],
                row["category"],
                row["check"] + (f" {json.dumps(row['kwargs'])}" if row["kwargs"] else ""),
                str(row["phrasings"]),
            )
            for row in instructions
        ],
        right=("phrasings",),
    )
    words = next((row["words"] for row in instructions if row["words"]), [])
    output.line(f"built-in words ({len(words)}): {', '.join(words)}")
    if not rows:
        output.line(f"no vector files under {root}")
        return
    table = []
    for row in rows:
        if not row["searched"]:
            setting = ["unsearched", "", "", ""]
        elif row["no_steering"]:
            setting = ["no steering", "", "", ""]
        else:
            setting = [str(row["layer"]), row["mode"], f"{row['weight']:g}", row["positions"]]
        score = "" if row["score"] is None else f"{row['score']:.2f} (base {row['baseline_score']:.2f})"
        if row["shared_search"]:
            score += " shared"
        if row["searched_for"]:
            score += f" (also searched for {', '.join(row['searched_for'])})"
        table.append((row["instruction"], row["category"], str(row["pairs"]), *setting, score, row["file"]))
    output.table(
        f"vectors in {root}",
        ("instruction", "category", "pairs", "layer", "mode", "weight", "positions", "val. score", "file"),
        table,
        right=("pairs", "layer", "weight", "val. score"),
    )
    shared = sorted({word for row in rows for word in row["shared_search"]})
    if shared:
        output.line(f"shared: setting searched once on {', '.join(shared)} and used by every word vector")


# --------------------------------------------------------------------------------------------------- entry point


def _quiet_libraries() -> None:
    """Keep third-party progress bars and debug switches out of the command line's output."""
    # Loading a GGUF (the embedded model) draws a raw tqdm bar of its own; tqdm reads TQDM_DISABLE when first imported.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # nnsight turns its debug mode on when it sees -v/--verbose anywhere in argv: import it with a clean argv.
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        import nnsight  # noqa: F401
        from transformers.utils import logging as transformers_logging
    finally:
        sys.argv = saved
    transformers_logging.disable_progress_bar()  # weight-loading bars would bury nsteer's own messages


def _usage_error(error: Any) -> None:
    """A click usage error (unknown option, missing argument, bad number): usage, hint, and the message, visibly."""
    context = getattr(error, "ctx", None)
    output = Output()
    if context is not None:
        output.note(context.get_usage())
        if context.command.get_help_option(context) is not None:
            output.note(f"Try '{context.command_path} {context.help_option_names[0]}' for help.")
    output.error([error.format_message()])


def _omp_count_set(value: str) -> bool:
    """Whether ``OMP_NUM_THREADS`` holds a count OpenMP takes (``4``, or per nesting level ``4,2``); OpenMP ignores
    anything else, and so does nsteer."""
    parts = [part.strip() for part in value.split(",")]
    return all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts)


def main() -> None:
    """Entry point: run the app; user errors print one paragraph and exit non-zero, never a traceback. torch's thread
    count is left as it was found."""
    started = read_sample()  # before the imports, so the first look at the free cores spans the whole start
    _quiet_libraries()
    import torch

    governor = None
    if not _omp_count_set(os.environ.get("OMP_NUM_THREADS", "")):  # a count set for OpenMP is the user's choice too
        governor = ThreadGovernor(torch.get_num_threads, torch.set_num_threads, sample=read_sample, start=started)
    threads = torch.get_num_threads()
    output = Output()
    try:
        # Without standalone mode typer turns Ctrl-C (and typer.Exit) into a returned exit code instead of raising.
        code = app(standalone_mode=False, obj=governor)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            raise SystemExit(code)
    except NsteerError as error:
        output.error(getattr(error, "problems", None) or [str(error)])
        raise SystemExit(error.exit_code) from None
    except KeyboardInterrupt:
        output.note("interrupted: files already finished are kept; rerun the same command to continue.")
        raise SystemExit(130) from None
    except OSError as error:  # the file system refused: no space, no permission, a folder where a file should be ...
        where = f" {error.filename}" if error.filename else ""
        reason = error.strerror or str(error)
        if isinstance(error, (FileExistsError, NotADirectoryError)):
            reason += " (a file stands where a folder is needed)"
        output.error(
            [
                f"cannot read or write{where}: {reason}. "
                "Check the path, its permissions and the free disk space, then rerun the same command."
            ]
        )
        raise SystemExit(2) from None
    except typer.Abort:
        raise SystemExit(1) from None
    except Exception as error:  # click's usage errors arrive here in non-standalone mode
        import click

        usage_errors: tuple[type[Exception], ...] = (click.ClickException,)
        try:  # recent typer releases raise their own vendored copy of click's exceptions
            from typer._click.exceptions import ClickException as TyperClickException

            usage_errors += (TyperClickException,)
        except ImportError:
            pass
        if isinstance(error, usage_errors):
            _usage_error(error)
            raise SystemExit(error.exit_code) from None
        raise
    finally:
        torch.set_num_threads(threads)


def run() -> None:
    """The console command: :func:`main`, then an exit without the interpreter's final garbage collection.

    torch and transformers leave about a million objects behind; collecting them at exit took ~0.7 s of every command
    and frees nothing the operating system would not. Every file nsteer writes is closed (with-blocks, atomic
    renames) before main returns, and atexit handlers still run. Tests call main() and keep their collector.
    """
    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    run()
