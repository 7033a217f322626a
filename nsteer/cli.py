"""The `nsteer` command line: thin typer commands over the same functions the SDK exposes."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nsteer.errors import NsteerError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Steer language models toward following instructions."
)
console = Console(emoji=False)  # "include:ocean:" must not become an emoji
errors = Console(stderr=True, emoji=False)


@contextmanager
def progress_bars() -> Iterator[Callable[[str], Callable[[int, int], None]]]:
    """Yield a factory of progress callbacks, one bar per task label (quiet when stderr is not a terminal)."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=False,
        disable=not errors.is_terminal,
    ) as progress:
        tasks: dict[str, int] = {}

        def factory(label: str) -> Callable[[int, int], None]:
            def update(done: int, total: int) -> None:
                if label not in tasks:
                    tasks[label] = progress.add_task(label, total=total)
                progress.update(tasks[label], completed=done, total=total)

            return update

        yield factory


def _say(message: str) -> None:
    errors.print(message, highlight=False)


@app.command()
def compute(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="The recipe YAML file."),
    force: bool = typer.Option(False, "--force", help="Recompute vectors that are already up to date."),
    remote: bool = typer.Option(False, "--remote", help="Run on NDIF (the recipe's model id must be a Hub id)."),
    no_wait: bool = typer.Option(
        False,
        "--no-wait",
        help="On NDIF: submit one job per instruction and return; `nsteer collect` writes the files.",
    ),
) -> None:
    """Compute a steering vector for every instruction in RECIPE and write them to its output folder."""
    from nsteer.recipe import load_recipe
    from nsteer.workflow import compute_recipe_vectors, open_recipe_model

    recipe = load_recipe(recipe_path)
    _check_no_wait(no_wait, remote, recipe)
    _say(f"Opening {recipe.model.id} ...")
    handle = open_recipe_model(recipe, remote=remote or None)
    if no_wait:
        return _submit_vectors(recipe, handle, force=force)
    with progress_bars() as bars:
        written = compute_recipe_vectors(recipe, handle, force=force, progress=lambda name: bars(f"compute {name}"))
    for name, path in written.items():
        console.print(f"{name}: {path}", highlight=False)


@app.command()
def generate(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="The recipe YAML file."),
    prompt: list[str] | None = typer.Option(
        None, "--prompt", "-p", help="A prompt (repeatable); default: the recipe's demo_prompts."
    ),
    no_steer: bool = typer.Option(False, "--no-steer", help="Generate without any edit."),
    compare: bool = typer.Option(False, "--compare", help="Show answers without and with steering side by side."),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", min=1, help="Override the recipe's max_new_tokens."
    ),
    allow_transfer: bool = typer.Option(
        False, "--allow-transfer", help="Accept vectors computed on another model of the same shape."
    ),
    remote: bool = typer.Option(False, "--remote", help="Run on NDIF."),
    no_wait: bool = typer.Option(
        False, "--no-wait", help="On NDIF: submit one job and return; `nsteer collect JOB` prints the answers."
    ),
) -> None:
    """Answer prompts with the recipe's steering edits (or without, or both side by side)."""
    from nsteer.generate import generate as run_generate
    from nsteer.recipe import load_recipe
    from nsteer.workflow import generation_config, load_recipe_vectors, open_recipe_model, recipe_edits

    recipe = load_recipe(recipe_path)
    prompts = list(prompt or recipe.demo_prompts)
    if not prompts:
        raise NsteerError("No prompt given: pass --prompt TEXT, or list demo_prompts in the recipe.")
    if not recipe.steer and not no_steer:
        raise NsteerError(f"{recipe_path} has no `steer` entries; add one, or pass --no-steer.")
    _check_no_wait(no_wait, remote, recipe)
    _say(f"Opening {recipe.model.id} ...")
    handle = open_recipe_model(recipe, remote=remote or None)
    config = generation_config(recipe, max_new_tokens=max_new_tokens)
    edits = (
        []
        if no_steer
        else recipe_edits(recipe, load_recipe_vectors(recipe, handle, allow_transfer=allow_transfer or None))
    )
    if no_wait:
        return _submit_generation(handle, prompts, edits, config, compare=compare)
    with progress_bars() as bars:
        steered = run_generate(handle, prompts, edits, config=config, progress=bars("generate"))
        plain = (
            run_generate(handle, prompts, [], config=config, progress=bars("unsteered")) if compare and edits else None
        )
    described = ", ".join(f"{e.name}@{e.layer} {e.mode} w={e.weight:g} ({e.positions})" for e in edits) or "no steering"
    if plain is None:
        for text, answer in zip(prompts, steered):
            console.rule(text, style="dim")
            console.print(answer, highlight=False, markup=False)
        return
    table = Table(show_lines=True, title=f"Steering: {described}")
    table.add_column("prompt", ratio=1)
    table.add_column("without steering", ratio=2)
    table.add_column("with steering", ratio=2)
    for text, before, after in zip(prompts, plain, steered):
        table.add_row(text, before, after)
    console.print(table)


@app.command()
def inspect(
    vector_files: list[Path] = typer.Argument(
        ..., metavar="VECTOR_FILE...", help="One or more .safetensors vector files."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the summary as JSON (a list when several files are given)."
    ),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Write a PNG of cosine similarities: one file -> layer x layer (and norms by layer); "
        "several -> instruction x instruction at --layer, and each pair by layer.",
    ),
    layer: int | None = typer.Option(
        None, "--layer", min=0, help="The layer of the instruction x instruction comparison; default: the middle layer."
    ),
    centered: bool = typer.Option(
        False,
        "--centered",
        help="Compare what sets instructions apart: subtract their mean direction first (3+ files).",
    ),
) -> None:
    """Show vector files' metadata, searched setting and per-layer norms; compare several; plot their similarities."""
    from nsteer.vectors import load_vector, vector_summary

    vectors = [load_vector(path) for path in vector_files]
    summaries = [vector_summary(vector) for vector in vectors]
    similarity = None
    if len(vectors) > 1 or plot is not None:
        from nsteer.report import cosine_between, vector_labels, write_similarity_plot

        labels = vector_labels(vectors, vector_files)
        if plot is not None:
            _say(f"plot: {write_similarity_plot(vectors, vector_files, plot, layer=layer, centered=centered)}")
        if len(vectors) > 1:
            at = vectors[0].metadata.n_layers // 2 if layer is None else layer
            if not 0 <= at < vectors[0].metadata.n_layers:
                raise NsteerError(
                    f"--layer {at} is out of range: the vectors have layers 0..{vectors[0].metadata.n_layers - 1}."
                )
            similarity = (at, labels, cosine_between(vectors, centered=centered)[at])
    if as_json:
        data = summaries[0] if len(summaries) == 1 else summaries
        if similarity is not None:
            at, labels, matrix = similarity
            data = {
                "vectors": summaries,
                "cosine": {
                    "layer": at,
                    "labels": labels,
                    "matrix": [[round(float(x), 4) for x in row] for row in matrix],
                },
            }
        console.print_json(json.dumps(data))
        return
    if similarity is None:
        (vector_file,), (summary,) = vector_files, summaries
        table = Table(title=str(vector_file), show_header=False)
        for key in (
            "instruction",
            "category",
            "model",
            "architecture",
            "width",
            "layers",
            "pairs",
            "chosen",
            "nsteer_version",
        ):
            table.add_row(key, str(summary[key]))
        for name, setting in summary["chosen_for"].items():  # searched for instructions that borrow this vector
            table.add_row(f"chosen for {name}", str(setting))
        norms = summary["norms"]
        table.add_row("norm by layer", " ".join(f"{i}:{n:.2f}" for i, n in enumerate(norms)))
        console.print(table)
        return
    at, labels, matrix = similarity
    table = Table(title=f"{len(vectors)} vectors")
    for column in ("#", "file", "instruction", "model", "layers x width", "pairs", "searched"):
        table.add_column(column)
    for number, (vector_file, summary) in enumerate(zip(vector_files, summaries)):
        chosen = summary["chosen"] or {}
        searched = (
            "no steering"
            if chosen.get("no_steering")
            else (
                f"layer {chosen['layer']} {chosen.get('mode', '')} w={chosen.get('weight', '')}"
                if chosen.get("layer") is not None
                else "–"
            )
        )
        table.add_row(
            str(number),
            str(vector_file),
            summary["instruction"],
            summary["model"],
            f"{summary['layers']} x {summary['width']}",
            str(summary["pairs"]),
            searched,
        )
    console.print(table)
    table = Table(title=f"cosine similarity at layer {at}{', centered' if centered else ''} (columns: # above)")
    table.add_column("")
    for number in range(len(labels)):
        table.add_column(str(number), justify="right")
    for number, (label, row) in enumerate(zip(labels, matrix)):
        table.add_row(f"{number} {label}", *(f"{float(x):.2f}" for x in row))
    console.print(table)


@app.command("eval")
def evaluate(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="The recipe YAML file."),
    data: Path | None = typer.Option(
        None, "--data", help="Score on an IFEval-format JSONL file instead of the recipe's split."
    ),
    split: str = typer.Option("test", "--split", help="train, validation or test (ignored with --data)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many prompts per instruction."),
    out: Path | None = typer.Option(None, "--out", help="Report folder; default <output>/eval (or eval-<split>)."),
    allow_transfer: bool = typer.Option(
        False, "--allow-transfer", help="Accept vectors computed on another model of the same shape."
    ),
    remote: bool = typer.Option(False, "--remote", help="Run on NDIF."),
    composition: bool = typer.Option(
        False, "--composition", help="Report each instruction composed with the recipe's other edits next to alone."
    ),
) -> None:
    """The 2×2 table (instruction in prompt × steering) with quality, written as JSON, Markdown and PNG."""
    from nsteer.evaluate.table import CELLS, evaluate_recipe
    from nsteer.recipe import load_recipe
    from nsteer.report import CELL_HEADERS, write_eval_report
    from nsteer.workflow import load_recipe_vectors, open_recipe_model

    if composition:
        if data is not None or remote:
            raise NsteerError("--composition scores the recipe's own split locally; drop --data and --remote.")
        eval_composition(recipe_path, split=split, limit=limit, out=out, allow_transfer=allow_transfer)
        return
    recipe = load_recipe(recipe_path)
    if split not in ("train", "validation", "test"):
        raise NsteerError(f"--split {split!r} is not a split; use train, validation or test.")
    out_dir = out or recipe.output_dir / (
        "eval" if data is None and split == "test" else f"eval-{'data' if data else split}"
    )
    _say(f"Opening {recipe.model.id} ...")
    handle = open_recipe_model(recipe, remote=remote or None)
    vectors = load_recipe_vectors(recipe, handle, allow_transfer=allow_transfer or None) if recipe.steer else {}
    with progress_bars() as bars:
        result = evaluate_recipe(
            recipe,
            handle,
            vectors=vectors,
            split=split,
            limit=limit,
            data=data,
            checkpoint=out_dir / "cells.jsonl",
            progress=bars,
        )
    paths = write_eval_report(result, out_dir)
    table = Table(title=f"loose (strict) accuracy, {result.split}")
    table.add_column("instruction")
    for header in CELL_HEADERS:
        table.add_column(header, justify="right")
    for group in (*result.groups, None):
        cells = [result.cell(cell, group) for cell in CELLS]
        table.add_row(group or "overall", *(f"{c.loose:.2f} ({c.strict:.2f})" if c.n else "–" for c in cells))
    console.print(table)
    for kind, path in paths.items():
        console.print(f"{kind}: {path}", highlight=False)


@app.command()
def search(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="The recipe YAML file."),
    out: Path | None = typer.Option(None, "--out", help="Report and checkpoint folder; default <output>/search."),
    allow_transfer: bool = typer.Option(
        False, "--allow-transfer", help="Accept vectors computed on another model of the same shape."
    ),
    remote: bool = typer.Option(False, "--remote", help="Run on NDIF."),
) -> None:
    """Sweep layers (and add weights) of every `layer: auto` entry on validation prompts; record each winner."""
    from nsteer.recipe import load_recipe
    from nsteer.report import search_rows, write_search_report
    from nsteer.search import search_recipe
    from nsteer.workflow import load_recipe_vectors, open_recipe_model

    recipe = load_recipe(recipe_path)
    out_dir = out or recipe.output_dir / "search"
    _say(f"Opening {recipe.model.id} ...")
    handle = open_recipe_model(recipe, remote=remote or None)
    vectors = load_recipe_vectors(recipe, handle, allow_transfer=allow_transfer or None)
    with progress_bars() as bars:
        result = search_recipe(recipe, handle, vectors=vectors, out_dir=out_dir, progress=bars)
    paths = write_search_report(result, out_dir)
    table = Table(title=f"layer search (validation), {result.sweeps[0].rule if result.sweeps else ''}")
    for column in ("instruction", "setting", "loose", "strict", "degenerate", "median ppl", "verdict"):
        table.add_column(
            column, justify="right" if column in ("loose", "strict", "degenerate", "median ppl") else "left"
        )
    for row in search_rows(result):
        table.add_row(*row)
    console.print(table)
    for sweep in result.sweeps:
        console.print(f"{sweep.instruction}: {sweep.winner.setting.label} -> {sweep.vector_path}", highlight=False)
    for kind, path in paths.items():
        console.print(f"{kind}: {path}", highlight=False)


def _check_no_wait(no_wait: bool, remote: bool, recipe) -> None:
    """--no-wait submits NDIF jobs: refuse it for a local run before any model is opened."""
    if no_wait and not remote and recipe.model.backend != "ndif":
        raise NsteerError("--no-wait submits NDIF jobs: add --remote, or set backend: ndif in the recipe.")


def _submit_vectors(recipe, handle, *, force: bool) -> None:
    """`compute --no-wait`: submit the NDIF jobs and print their ids."""
    from nsteer.remote import submit_recipe_vectors

    for name, job in submit_recipe_vectors(recipe, handle, force=force).items():
        console.print(
            f"{name}: {job} (up to date)" if isinstance(job, Path) else f"{name}: job {job.id}", highlight=False
        )
    _say("Fetch the vectors with: nsteer collect JOB ... (or nsteer collect --all)")


def _submit_generation(handle, prompts, edits, config, *, compare: bool) -> None:
    """`generate --no-wait`: submit one NDIF job and print its id."""
    from nsteer.remote import submit_generation

    if compare:
        raise NsteerError("--compare cannot be submitted as one job: submit twice, with and without --no-steer.")
    job = submit_generation(handle, prompts, edits, config=config)
    console.print(f"job {job.id}", highlight=False)
    _say(f"Fetch the answers with: nsteer collect {job.id}")


@app.command()
def collect(
    job_ids: list[str] | None = typer.Argument(None, metavar="JOB...", help="Job ids printed by --no-wait."),
    all_jobs: bool = typer.Option(
        False, "--all", help="Collect every job submitted from this machine and not collected yet."
    ),
    wait: float = typer.Option(0.0, "--wait", min=0, help="Seconds to keep polling a job that is still running."),
) -> None:
    """Fetch NDIF jobs submitted with --no-wait: write their vector files, or print their answers."""
    from nsteer.remote import collect as collect_job
    from nsteer.remote import pending_jobs

    ids = list(job_ids or [])
    if all_jobs:
        ids += [job.id for job in pending_jobs() if job.id not in ids]
    if not ids:
        raise NsteerError("No job to collect: give the JOB ids that --no-wait printed, or --all for every pending one.")
    failed = []
    for job_id in ids:
        try:
            result = collect_job(job_id, wait=wait)
        except NsteerError as error:
            errors.print(f"[bold red]{escape(job_id)}:[/] {escape(str(error))}", highlight=False)
            failed.append(job_id)
            continue
        if not result.done:
            console.print(
                f"{job_id}: not finished ({result.status}); collect it again later, or add --wait SECONDS.",
                highlight=False,
            )
            continue
        for name, path in result.paths.items():
            console.print(f"{name}: {path}", highlight=False)
        if result.answers is not None:
            for text, answer in zip(result.job.payload["prompts"], result.answers):
                console.rule(escape(text), style="dim")
                console.print(answer, highlight=False, markup=False)
    if failed:
        raise NsteerError(
            f"{len(failed)} of {len(ids)} job(s) could not be collected: {', '.join(failed)} (see above)."
        )


@app.command("export")
def export_vector(
    vector_file: Path = typer.Argument(..., metavar="VECTOR", help="A .safetensors vector file."),
    fmt: str = typer.Option(
        "llama-cpp", "--format", help="llama-cpp: llama.cpp's control-vector GGUF (also read by repeng)."
    ),
    layers: str | None = typer.Option(
        None, "--layers", help="Layers to export, e.g. 8,10 (1 or more); default: the searched layer."
    ),
    weight: float | None = typer.Option(
        None,
        "--weight",
        help="Scale: each direction.N is weight x unit direction, as an add edit; default: the searched add weight.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="The .gguf file to write; default: VECTOR with a .gguf suffix."
    ),
) -> None:
    """Write a vector as a llama.cpp control vector (use with llama.cpp's --control-vector FILE.gguf)."""
    from nsteer.interop import export_llama_cpp, parse_layers
    from nsteer.vectors import load_vector

    if fmt != "llama-cpp":
        raise NsteerError(f"--format {fmt!r} is not supported; the only export format is llama-cpp.")
    vector = load_vector(vector_file)
    path = export_llama_cpp(
        vector, out or vector_file.with_suffix(".gguf"), layers=parse_layers(layers) if layers else None, weight=weight
    )
    chosen = vector.metadata.chosen or {}
    if weight is not None and chosen.get("mode", "add") != "add":
        _say(
            f"note: '{vector.instruction_id}' was searched in {chosen['mode']} mode; "
            "llama.cpp can only add, so the file adds weight x direction."
        )
    console.print(f"{vector.instruction_id}: {path}", highlight=False)


@app.command("import")
def import_vector(
    gguf_file: Path = typer.Argument(..., metavar="FILE.gguf", help="A llama.cpp control-vector GGUF."),
    out: Path = typer.Option(..., "--out", help="The .safetensors vector file to write."),
    model_id: str | None = typer.Option(
        None,
        "--model-id",
        help="The model it is for: opened to check width and depth (needed for files nsteer did not write).",
    ),
    instruction: str | None = typer.Option(
        None, "--instruction", help="Name of the instruction; default: from the file, else its file name."
    ),
) -> None:
    """Read a llama.cpp control vector into an nsteer vector file (add / ablate only: it has no mean projections)."""
    from nsteer.interop import import_llama_cpp, read_control_vector
    from nsteer.models import open_model
    from nsteer.vectors import save_vector

    read_control_vector(gguf_file)  # refuse a bad file before opening any model
    handle = None
    if model_id:
        _say(f"Opening {model_id} ...")
        handle = open_model(model_id)
    vector = import_llama_cpp(gguf_file, handle=handle, model_id=model_id, instruction_id=instruction)
    path = save_vector(vector, out)
    chosen = vector.metadata.chosen or {}
    console.print(
        f"{vector.instruction_id}: {path} (layers {chosen.get('layers')}, model {vector.metadata.model_id}; "
        "use mode add with weight = the layer's norm to reproduce llama.cpp at strength 1)",
        highlight=False,
    )


@app.command("eval-composition")
def eval_composition(
    recipe_path: Path = typer.Argument(
        ..., metavar="RECIPE", help="A recipe whose steer entries cover two or more instructions."
    ),
    split: str = typer.Option("test", "--split", help="train, validation or test."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many prompts per instruction."),
    out: Path | None = typer.Option(
        None, "--out", help="Report folder; default <output>/composition (or composition-<split>)."
    ),
    allow_transfer: bool = typer.Option(
        False, "--allow-transfer", help="Accept vectors computed on another model of the same shape."
    ),
) -> None:
    """Each instruction's accuracy with its own edits alone beside its accuracy with all the recipe's edits composed."""
    from nsteer.evaluate.composition import evaluate_recipe_composition, write_composition_report
    from nsteer.recipe import load_recipe
    from nsteer.workflow import load_recipe_vectors, open_recipe_model

    recipe = load_recipe(recipe_path)
    if split not in ("train", "validation", "test"):
        raise NsteerError(f"--split {split!r} is not a split; use train, validation or test.")
    out_dir = out or recipe.output_dir / ("composition" if split == "test" else f"composition-{split}")
    _say(f"Opening {recipe.model.id} ...")
    handle = open_recipe_model(recipe)
    vectors = load_recipe_vectors(recipe, handle, allow_transfer=allow_transfer or None)
    with progress_bars() as bars:
        result = evaluate_recipe_composition(
            recipe,
            handle,
            vectors=vectors,
            split=split,
            limit=limit,
            checkpoint=out_dir / "cells.jsonl",
            progress=bars,
        )
    paths = write_composition_report(result, out_dir)
    table = Table(title=f"composed vs alone, loose (strict) accuracy, {result.split}")
    for column in ("instruction", "in prompt", "unsteered", "alone", "composed", "composed: all followed"):
        table.add_column(column, justify="left" if column in ("instruction", "in prompt") else "right")
    rows = {(r.instruction, r.instruction_in_prompt, r.steering): r for r in result.rows()}
    for name in result.instructions:
        for present in (False, True):
            cells = [rows.get((name, present, steering)) for steering in ("unsteered", "alone", "composed")]
            if not any(cells):
                continue
            table.add_row(
                name,
                "yes" if present else "no",
                *(f"{c.loose:.2f} ({c.strict:.2f})" if c else "–" for c in cells),
                f"{cells[2].joint_loose:.2f}" if cells[2] else "–",
            )
    console.print(table)
    for kind, path in paths.items():
        console.print(f"{kind}: {path}", highlight=False)


@app.command("list")
def list_instructions(
    vectors_dir: Path | None = typer.Option(
        None, "--vectors", help="A vectors folder; default: the shipped vectors/ (or $NSTEER_VECTORS)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print instructions and vectors as JSON."),
) -> None:
    """The built-in instructions and the shipped vectors with their searched (chosen) settings."""
    from nsteer.prompts import builtin_catalog
    from nsteer.vectors import default_vectors_dir, listing_row, shipped_vectors

    root = vectors_dir or default_vectors_dir()
    instructions = builtin_catalog()
    rows = [listing_row(vector, root) for vector in shipped_vectors(root)] if vectors_dir or root.is_dir() else []
    if as_json:
        console.print_json(json.dumps({"instructions": instructions, "vectors_dir": str(root), "vectors": rows}))
        return
    table = Table(title="built-in instructions")
    for column in ("id", "category", "check", "phrasings"):
        table.add_column(column, justify="right" if column == "phrasings" else "left")
    for row in instructions:
        check = row["check"] + (f" {json.dumps(row['kwargs'])}" if row["kwargs"] else "")
        table.add_row(escape(row["id"]), row["category"], escape(check), str(row["phrasings"]))
    console.print(table, emoji=False)
    words = next((row["words"] for row in instructions if row["words"]), [])
    console.print(f"built-in words ({len(words)}): {', '.join(words)}", highlight=False, markup=False, emoji=False)
    if not rows:
        console.print(f"no vector files under {root}", highlight=False, markup=False)
        return
    table = Table(title=f"vectors in {root}")
    for column in ("instruction", "category", "pairs", "layer", "mode", "weight", "positions", "val. score", "file"):
        table.add_column(column, justify="right" if column in ("pairs", "layer", "weight", "val. score") else "left")
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
        table.add_row(
            escape(row["instruction"]), row["category"], str(row["pairs"]), *setting, score, escape(row["file"])
        )
    console.print(table, emoji=False)
    shared = sorted({word for row in rows for word in row["shared_search"]})
    if shared:
        console.print(
            f"shared: setting searched once on {', '.join(shared)} and used by every word vector",
            highlight=False,
            markup=False,
            emoji=False,
        )


def main() -> None:
    """Entry point: run the app; user errors print one paragraph and exit non-zero, never a traceback."""
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
    try:
        # Without standalone mode typer turns Ctrl-C (and typer.Exit) into a returned exit code instead of raising.
        code = app(standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            raise SystemExit(code)
    except NsteerError as error:
        errors.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise SystemExit(error.exit_code) from None
    except KeyboardInterrupt:
        errors.print("interrupted: files already finished are kept; rerun the same command to continue.")
        raise SystemExit(130) from None
    except OSError as error:  # the file system refused: no space, no permission, a folder where a file should be ...
        where = f" {error.filename}" if error.filename else ""
        reason = error.strerror or str(error)
        if isinstance(error, (FileExistsError, NotADirectoryError)):
            reason += " (a file stands where a folder is needed)"
        errors.print(
            f"[bold red]error:[/] cannot read or write{escape(where)}: {escape(reason)}. "
            "Check the path, its permissions and the free disk space, then rerun the same command.",
            highlight=False,
            soft_wrap=True,
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
            error.show()
            raise SystemExit(error.exit_code) from None
        raise


if __name__ == "__main__":
    main()
