"""Compute and search the vectors shipped in vectors/smollm2-135m-instruct/ (what `make vectors` runs).

For each of recipes/format.yaml, language.yaml, length.yaml and words.yaml, in that order, on the embedded model
(fp32, CPU):

1. compute a vector for every instruction with the recipe's own settings (``nsteer compute``'s code path), written
   into the output folder instead of ``runs/<name>``; a file already computed from the same pairs on the same model
   is kept (``--force`` recomputes);
2. search it (``nsteer search``'s code path: the recipe's layers, weights, validation prompts and quality guard) and
   record the winner in the file's ``chosen`` metadata; a file that already has one is kept (``--force`` searches
   again). Format, language and length are searched per vector.
   Words share ONE search: the words in ``SHARED_SEARCH_WORDS`` are swept together (their validation answers
   pooled, the guard applied to the pooled cells), and the winning layer and weight is written into every word
   vector, with ``chosen.shared_search`` naming the words it came from. Searching each word separately is
   ``nsteer search recipes/words.yaml``; that was out of a 2-core CPU's budget when these files were made.

Then ``SHA256SUMS`` is written beside the files. Everything is greedy decoding and float64 sums in a fixed order with
a fixed thread count (``--threads``, default 1), so a rerun with the float kernels of the CPU type that made the files,
at the same thread count, reproduces them bit for bit; on another CPU type or thread count the tensors agree to the
tolerance docs/vectors.md states (``scripts/compare_vectors.py`` checks it):

    make vectors VECTORS_DIR=/tmp/check VECTORS_RUNS=/tmp/check-runs
    python scripts/compare_vectors.py vectors/smollm2-135m-instruct /tmp/check
    cd /tmp/check && sha256sum -c /path/to/repo/vectors/smollm2-135m-instruct/SHA256SUMS   # same CPU type and threads

Search reports (every validation answer, ``search.md``, ``search.json``) and checkpoints go to
``runs/vectors/<recipe>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("format", "language", "length", "words")
DEFAULT_OUT = ROOT / "vectors" / "smollm2-135m-instruct"
DEFAULT_RUNS = ROOT / "runs" / "vectors"
# The words whose pooled validation answers pick the one layer / weight every word vector ships with.
SHARED_SEARCH_WORDS = ("ocean", "garden", "thunder")


def log(message: str) -> None:
    """One timestamped line on stderr."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def with_output(recipe, out_dir: Path):
    """The recipe with its output folder replaced (vectors are written there, searched there)."""
    from nsteer.recipe import OutputSection

    return recipe.model_copy(update={"output": OutputSection(dir=str(out_dir))})


def validation_answers(recipe, name: str) -> int:
    """How many validation answers a search of ``name`` scores per setting (both conditions count twice)."""
    from nsteer.pipeline import instruction_splits

    count = len(instruction_splits(recipe, name).validation)
    if recipe.search.max_prompts is not None:
        count = min(count, recipe.search.max_prompts)
    return count * (2 if recipe.search.condition == "both" else 1)


def searched(recipe, names, n_layers: int) -> bool:
    """Whether every vector of ``names`` carries a chosen setting from a search with the recipe's current settings.

    Changing the recipe's search layers, weights, condition or number of validation prompts makes the files stale, so
    they are searched again.
    """
    from nsteer.errors import NsteerError
    from nsteer.pipeline import vector_path
    from nsteer.search import candidate_layers, candidate_settings, searched_weights
    from nsteer.vectors import load_vector

    settings = recipe.search
    layers = candidate_layers(n_layers, settings.layers, settings.layer_step)
    indices = {entry.instruction: index for index, entry in enumerate(recipe.steer)}
    for name in names:
        try:
            vector = load_vector(vector_path(recipe, name))
        except NsteerError:
            return False
        chosen = vector.metadata.chosen
        if chosen is None or list(chosen.layers_searched or ()) != layers or chosen.condition != settings.condition:
            return False
        if chosen.shared_search:  # pooled over the shared words' validation answers
            expected = sum(validation_answers(recipe, f"include:{word}") for word in chosen.shared_search.words)
        else:
            expected = validation_answers(recipe, name)
        if chosen.n_prompts != expected:
            return False
        # A centered direction is taken against every vector the recipe steers with: a word added or removed
        # changes it, so the setting found for the old set is stale.
        if chosen.centered and tuple(chosen.centered_on or ()) != tuple(sorted(dict.fromkeys(names))):
            return False
        weights, relative = searched_weights(candidate_settings(recipe, indices[name], vector, layers))
        if (list(chosen.weights_searched or ()), chosen.weights_relative) != (weights, relative):
            return False
    return True


def search_each(recipe, handle, runs_dir: Path, force: bool) -> None:
    """``nsteer search`` on the recipe: one sweep per `layer: auto` entry, winner written into each file."""
    from nsteer.report import write_search_report
    from nsteer.search import search_recipe

    names = [entry.instruction for entry in recipe.steer if entry.layer == "auto"]
    if not force and searched(recipe, names, handle.n_layers):
        log(f"{recipe.name}: every vector already has a chosen setting (use --force to search again)")
        return
    result = search_recipe(recipe, handle, out_dir=runs_dir / recipe.name / "search", progress=_progress)
    write_search_report(result, runs_dir / recipe.name / "search")
    for sweep in result.sweeps:
        log(f"{recipe.name}: {sweep.instruction} -> {sweep.winner.setting.label}")


def finite_median(values):
    """The median of the finite values (an empty answer's perplexity is NaN); NaN when there are none."""
    finite = [value for value in values if value == value]
    return statistics.median(finite) if finite else float("nan")


def pooled_cell(cells):
    """One SweepCell holding the answers of several words' cells of the same setting (equal prompt counts)."""
    from nsteer.search import SweepCell

    return SweepCell(
        setting=cells[0].setting,
        loose=statistics.fmean(cell.loose for cell in cells),
        strict=statistics.fmean(cell.strict for cell in cells),
        degenerate_share=statistics.fmean(cell.degenerate_share for cell in cells),
        substantive=statistics.fmean(cell.substantive for cell in cells),  # what the winner is ranked by first
        median_perplexity=finite_median([value for cell in cells for value in cell.perplexities]),
        prompts=tuple(p for cell in cells for p in cell.prompts),
        answers=tuple(a for cell in cells for a in cell.answers),
        perplexities=tuple(v for cell in cells for v in cell.perplexities),
    )


def search_words_shared(recipe, handle, runs_dir: Path, force: bool, words=SHARED_SEARCH_WORDS) -> None:
    """Sweep the shared words together, pool their cells, and write the pooled winner into every word vector."""
    from nsteer.pipeline import center_names, vector_path
    from nsteer.report import write_search_report
    from nsteer.search import InstructionSweep, candidate_layers, choose, guard, search_recipe, searched_setting
    from nsteer.searched import SharedSearch
    from nsteer.vectors import load_vector, save_vector

    names = [entry.instruction for entry in recipe.steer if entry.layer == "auto"]
    if not force and searched(recipe, names, handle.n_layers):
        log(f"{recipe.name}: every vector already has a chosen setting (use --force to search again)")
        return
    shared = {f"include:{word}" for word in words}
    missing = shared - set(names)
    if missing:
        raise SystemExit(f"{recipe.name}: the shared-search words {sorted(missing)} have no `layer: auto` entry.")
    # Only the shared words are swept, but a centered direction is each word minus the mean of EVERY word the recipe
    # steers with (what `layer: auto` later uses): the other words stay in as fixed entries, which a sweep leaves alone.
    layers = candidate_layers(handle.n_layers, recipe.search.layers, recipe.search.layer_step)
    fixed = {"layer": layers[0], "weight": 0.0}
    subset = recipe.model_copy(
        update={
            "steer": [
                entry if entry.instruction in shared else entry.model_copy(update=fixed) for entry in recipe.steer
            ]
        }
    )
    out_dir = runs_dir / recipe.name / "search"
    result = search_recipe(subset, handle, out_dir=out_dir, write=False, progress=_progress)
    write_search_report(result, out_dir)
    settings = recipe.search
    baseline = pooled_cell([sweep.baseline for sweep in result.sweeps])
    cells = [
        pooled_cell([sweep.cells[index] for sweep in result.sweeps]) for index in range(len(result.sweeps[0].cells))
    ]
    if settings.min_perplexity_ratio > 0:
        # The sweep scored perplexity only for each word's own contenders; the pooled rule needs it for the pooled ones
        # (and the pooled baseline) on every word's answers.
        from nsteer.evaluate.inputs import open_reference
        from nsteer.evaluate.quality import perplexity
        from nsteer.search import beats_baseline

        needed = {
            index
            for index, cell in enumerate(cells)
            if guard(cell, baseline, settings.margin, 0.0) is None and beats_baseline(cell, baseline)
        }
        if needed:
            reference = open_reference(subset, handle)
            pairs = list(
                dict.fromkeys(  # each distinct answer once, in one call
                    pair
                    for cell in (baseline, *(cells[index] for index in needed))
                    for pair in zip(cell.prompts, cell.answers)
                )
            )
            values = perplexity(reference.model, reference.tokenizer, [p for p, _ in pairs], [a for _, a in pairs])
            by_pair = dict(zip(pairs, values))

            def rescored(cell):
                per_answer = tuple(by_pair[pair] for pair in zip(cell.prompts, cell.answers))
                return dataclasses.replace(cell, perplexities=per_answer, median_perplexity=finite_median(per_answer))

            baseline = rescored(baseline)
            cells = [rescored(cell) if index in needed else cell for index, cell in enumerate(cells)]
    cells = [
        dataclasses.replace(cell, rejected=guard(cell, baseline, settings.margin, settings.min_perplexity_ratio))
        for cell in cells
    ]
    for cell in cells:
        verdict = f"rejected: {cell.rejected}" if cell.rejected else ""
        log(
            f"{recipe.name} pooled: {cell.setting.label} loose {cell.loose:.3f} strict {cell.strict:.3f} "
            f"degenerate {cell.degenerate_share:.0%} {verdict}"
        )
    sweep = InstructionSweep(
        instruction="+".join(sorted(shared)),
        steer_index=-1,
        vector_path="",
        condition=settings.condition,
        baseline=baseline,
        cells=tuple(cells),
        winner=choose(baseline, cells),
        rule=result.sweeps[0].rule,
    )
    vectors = {
        entry.vector or entry.instruction: load_vector(vector_path(recipe, entry.instruction)) for entry in subset.steer
    }
    chosen = dataclasses.replace(
        searched_setting(sweep, layers, center_names(subset, vectors)),  # recorded only for a centered winner
        shared_search=SharedSearch(
            words=tuple(words),
            note="layer and weight searched once on these words' pooled validation answers "
            "and shared by every word vector",
        ),
    )
    log(f"{recipe.name}: shared winner {sweep.winner.setting.label} (baseline loose {baseline.loose:.3f})")
    for name in names:
        path = vector_path(recipe, name)
        save_vector(load_vector(path).with_choice(chosen), path)


def write_sums(out_dir: Path) -> Path:
    """``SHA256SUMS`` of every vector file in ``out_dir`` (the format ``sha256sum -c`` reads)."""
    lines = []
    for path in sorted(out_dir.glob("*.safetensors")):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    target = out_dir / "SHA256SUMS"
    target.write_text("".join(lines))
    return target


_BARS: dict[str, float] = {}


def _progress(label: str):
    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - _BARS.get(label, 0.0) > 60:
            _BARS[label] = now
            log(f"{label}: {done}/{total}")

    return update


def main(argv: list[str] | None = None) -> int:
    """Parse the options, then compute, search and checksum each recipe's vectors."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the vector files go")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="where search reports and checkpoints go")
    parser.add_argument("--only", default=",".join(RECIPES), help="comma-separated recipes (default: all four)")
    parser.add_argument("--force", action="store_true", help="recompute and search again even where files are current")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("NSTEER_VECTOR_THREADS", "1")),
        help="torch CPU threads (fixed: a rerun on the same CPU type with as many threads gives the same bytes)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from nsteer.pipeline import compute_recipe_vectors, open_recipe_model
    from nsteer.recipe import load_recipe

    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    handle = None
    started = time.monotonic()
    for name in RECIPES:
        if name not in names:
            continue
        recipe = with_output(load_recipe(ROOT / "recipes" / f"{name}.yaml"), args.out)
        if handle is None:
            log(f"opening {recipe.model.id} on cpu, {args.threads} thread(s)")
            handle = open_recipe_model(recipe)
        step = time.monotonic()
        compute_recipe_vectors(recipe, handle, force=args.force, progress=lambda label: _progress(f"compute {label}"))
        log(f"{name}: vectors ready ({time.monotonic() - step:.0f} s)")
        step = time.monotonic()
        if name == "words":
            search_words_shared(recipe, handle, args.runs, args.force)
        else:
            search_each(recipe, handle, args.runs, args.force)
        log(f"{name}: searched ({time.monotonic() - step:.0f} s)")
    log(f"wrote {write_sums(args.out)} ({time.monotonic() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
