"""The recipe pipeline: resolve a recipe's instructions and splits, open its model, compute or load its vectors, and
turn its steer entries into edits.

The CLI and the SDK both call these functions; each step delegates to the stage module that owns it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nsteer.edits import Edit, EditOptions, mean_vector, vector_edits
from nsteer.errors import NsteerError, RecipeError, VectorFileError
from nsteer.extract import compute_vector
from nsteer.fileio import builtin_name, input_path
from nsteer.generate import GenerationConfig
from nsteer.models import ModelHandle, open_model
from nsteer.progress import ProgressFactory
from nsteer.prompts import (
    Instruction,
    PromptPair,
    Split,
    builtin_instruction,
    load_base_prompts,
    load_phrasings,
    prompt_set_hash,
    split_pairs,
)
from nsteer.recipe import Recipe, RelativeWeight, SteerEntry, vector_file_name
from nsteer.searched import SearchedSetting
from nsteer.vectors import SteeringVector, check_compatible, load_vector, replace_vector, same_model


def resolve_instruction(recipe: Recipe, name: str) -> Instruction:
    """The recipe's instruction ``name`` with its phrasings and check resolved (built-in defaults filled in)."""
    section = recipe.instructions[name]
    builtin: Instruction | None
    try:
        builtin = builtin_instruction(name)
    except NsteerError:
        builtin = None
    phrasings_source = section.phrasings
    borrowed = builtin_name(phrasings_source) if isinstance(phrasings_source, str) else None
    if phrasings_source is None:
        if builtin is None:
            raise recipe.error(("instructions", name, "phrasings"), f"'{name}' is not built in: give its phrasings.")
        phrasings = builtin.phrasings
    else:
        phrasings = load_phrasings(phrasings_source, recipe.base_dir)  # a list, a file, or builtin:<instruction>
    check = section.check
    if check is None:
        reference = builtin or (builtin_instruction(borrowed) if borrowed is not None else None)
        check_id, check_kwargs = (reference.check_id, dict(reference.check_kwargs)) if reference else ("", {})
    elif isinstance(check, str):
        check_id, check_kwargs = check, {}
    elif check.id is None:  # a regex or a function, built when the recipe was loaded
        check_id, check_kwargs = recipe.custom_check(name).name, {}
    else:
        check_id, check_kwargs = check.id, dict(check.kwargs)
    return Instruction(
        id=name,
        category=section.category or (builtin.category if builtin else "custom"),
        description=builtin.description if builtin else name,
        check_id=check_id,
        check_kwargs=check_kwargs,
        phrasings=tuple(phrasings),
        custom_check=recipe.custom_check(name),
    )


def instruction_splits(recipe: Recipe, name: str) -> Split:
    """Seeded train / validation / test pairs for instruction ``name`` (no base prompt in two splits)."""
    instruction = resolve_instruction(recipe, name)
    prompts = load_base_prompts(recipe.prompts.base, recipe.base_dir)
    split = recipe.prompts.split
    fractions = {"train": split.train, "validation": split.validation, "test": split.test}
    pairs = split_pairs(prompts, instruction.phrasings, fractions, recipe.prompts.seed)
    if recipe.prompts.max_pairs is not None:
        return Split(pairs.train[: recipe.prompts.max_pairs], pairs.validation, pairs.test)
    return pairs


def open_recipe_model(recipe: Recipe, *, remote: bool | None = None) -> ModelHandle:
    """Open the recipe's model (on NDIF when the backend says so or ``remote`` is True) and check its layers."""
    section = recipe.model
    use_remote = section.backend == "ndif" if remote is None else remote
    handle = open_model(
        section.id if use_remote else recipe.model_location,
        dtype=section.dtype,
        device=section.device,
        layers_path=section.layers_path,
        revision=section.revision,
        remote=use_remote,
        **({"timeout": section.timeout} if use_remote else {}),
    )
    recipe.check_layers(handle.n_layers)
    return handle


def vector_path(recipe: Recipe, name: str) -> Path:
    """Where ``compute`` writes the vector of instruction ``name``."""
    return recipe.output_dir / vector_file_name(name)


def _is_current(path: Path, handle: ModelHandle, instruction: Instruction, expected_hash: str) -> bool:
    """Whether a vector on disk was computed from exactly these pairs on this model (so a rerun can skip it)."""
    try:
        vector = load_vector(path)
    except NsteerError:
        return False
    meta = vector.metadata
    return meta.prompt_set_hash == expected_hash and meta.instruction_id == instruction.id and same_model(meta, handle)


@dataclass(frozen=True)
class VectorTask:
    """One instruction that needs a vector of its own: its training pairs, its file, and whether that file is kept."""

    name: str
    instruction: Instruction
    pairs: tuple[PromptPair, ...]
    path: Path
    keep: bool  # the file is current (or a vector put there to transfer): nothing to compute


def vector_tasks(recipe: Recipe, handle: ModelHandle, *, force: bool = False) -> list[VectorTask]:
    """What `compute` does per instruction, locally or on NDIF: compute its vector, or keep the file already there.

    An instruction whose steer entries all take another vector (``vector:``, e.g. word exclusion steering with the
    inclusion vector) and that no entry borrows gets none: it is there to be prompted and scored, not extracted.
    """
    tasks = []
    for name in recipe.instructions:
        if borrows_vector(recipe, name):
            continue
        instruction = resolve_instruction(recipe, name)
        pairs = instruction_splits(recipe, name).train
        path = vector_path(recipe, name)
        keep = (
            not force
            and path.exists()
            and (
                _is_current(path, handle, instruction, prompt_set_hash(pairs))
                # `transfer: true`: a vector copied from another model is kept (docs/transfer.md)
                or (recipe.transfer and _is_transferred(path, handle, instruction.id))
            )
        )
        tasks.append(VectorTask(name, instruction, pairs, path, keep))
    return tasks


def compute_recipe_vectors(
    recipe: Recipe,
    handle: ModelHandle,
    *,
    force: bool = False,
    progress: ProgressFactory | None = None,
) -> dict[str, Path]:
    """Compute and save a vector for every instruction that needs one (:func:`vector_tasks`); finished files are kept
    and skipped on a rerun. ``progress(instruction_name)`` gives each computation's ``(done, total)`` callback."""
    written: dict[str, Path] = {}
    for task in vector_tasks(recipe, handle, force=force):
        written[task.name] = (
            task.path if task.keep else compute_task(recipe, handle, task, force=force, progress=progress)
        )
    return written


def compute_task(
    recipe: Recipe,
    handle: ModelHandle,
    task: VectorTask,
    *,
    force: bool = False,
    progress: ProgressFactory | None = None,
) -> Path:
    """Compute one task's vector and save it (keeping the searched settings of the file it replaces, unless forced)."""
    vector = compute_vector(
        handle,
        task.instruction,
        task.pairs,
        batch_size=recipe.extraction.batch_size,
        seed=recipe.prompts.seed,
        progress=progress(task.name) if progress else None,
    )
    return replace_vector(task.path, vector, keep_choices=not force)


def _is_transferred(path: Path, handle: ModelHandle, instruction: str) -> bool:
    """Whether ``path`` holds a readable vector of ``instruction`` from another model of ``handle``'s shape (one put
    there to transfer)."""
    try:
        meta = load_vector(path).metadata
    except NsteerError:
        return False
    same_shape = meta.hidden_size == handle.hidden_size and meta.n_layers == handle.n_layers
    return same_shape and not same_model(meta, handle) and meta.instruction_id == instruction


def borrows_vector(recipe: Recipe, name: str) -> bool:
    """Whether instruction ``name`` is steered only with other vectors and lends its own to no entry."""
    own = [entry for entry in recipe.steer if entry.instruction == name]
    lent = any(entry.vector == name for entry in recipe.steer)
    return bool(own) and all(entry.vector and entry.vector != name for entry in own) and not lent


def steer_vector_path(recipe: Recipe, index: int) -> Path:
    """The vector file steer entry ``index`` uses: another instruction's vector, a file (the rule of
    :func:`nsteer.fileio.input_path`, which recipe loading checks too), else the entry's own."""
    entry = recipe.steer[index]
    if entry.vector in recipe.instructions:
        return vector_path(recipe, entry.vector)
    if entry.vector:
        return input_path(entry.vector, recipe.base_dir)
    return vector_path(recipe, entry.instruction)


def load_recipe_vectors(
    recipe: Recipe, handle: ModelHandle, *, allow_transfer: bool | None = None
) -> dict[str, SteeringVector]:
    """Load the vectors the recipe's steer entries use, checked against ``handle``'s model."""
    vectors = read_recipe_vectors(recipe)
    check_recipe_vectors(recipe, vectors, handle, allow_transfer=allow_transfer)
    return vectors


def read_recipe_vectors(recipe: Recipe) -> dict[str, SteeringVector]:
    """Read the vector files the recipe's steer entries use, without any model: a missing or broken file is refused
    before a model is opened. Keys are the entries' ``vector`` (or instruction) names."""
    vectors: dict[str, SteeringVector] = {}
    missing = []
    for index, entry in enumerate(recipe.steer):
        key = entry.vector or entry.instruction
        if key in vectors:
            continue
        path = steer_vector_path(recipe, index)
        if not path.exists():
            missing.append(f"No vector for '{entry.instruction}' at {path}.")
            continue
        vector = load_vector(path)
        expected = None if entry.vector and entry.vector not in recipe.instructions else key
        if expected is not None and vector.instruction_id != expected:
            # A file renamed or copied onto another instruction's name would steer that instruction with the wrong
            # direction; a `vector:` path is how a recipe borrows another instruction's vector on purpose.
            raise RecipeError(
                recipe.problem(
                    ("steer", index, "vector" if entry.vector else "instruction"),
                    f"{path} holds the vector of '{vector.instruction_id}', not of '{expected}' (renamed or copied "
                    f"over another file?). Recompute it with `nsteer compute`, or to steer '{entry.instruction}' with "
                    f"it on purpose, name the file in this entry: vector: {path}.",
                )
            )
        vectors[key] = vector
    if missing:
        missing.append(f"Run `nsteer compute {recipe._source or 'RECIPE'}` first.")
        raise RecipeError(*missing)
    return vectors


def vectors_from_other_pairs(recipe: Recipe, vectors: Mapping[str, SteeringVector]) -> list[str]:
    """Instructions whose own vector was computed from other training pairs than the recipe's split gives now.

    A changed ``prompts.seed`` (or prompt set, or phrasings) since ``compute`` moves prompts between splits: the test
    split may then hold the vector's training prompts. Borrowed, imported and transferred vectors are not judged.
    """
    found = []
    for name, vector in vectors.items():
        meta = vector.metadata
        if name not in recipe.instructions or meta.instruction_id != name or not meta.prompt_set_hash:
            continue
        if meta.imported_from or borrows_vector(recipe, name):
            continue
        if meta.prompt_set_hash != prompt_set_hash(instruction_splits(recipe, name).train):
            found.append(name)
    return found


def check_recipe_vectors(
    recipe: Recipe, vectors: Mapping[str, SteeringVector], handle: ModelHandle, *, allow_transfer: bool | None = None
) -> None:
    """Refuse vectors made for another model than ``handle``'s (unless transfer is allowed: recipe or argument)."""
    transfer = recipe.transfer if allow_transfer is None else allow_transfer
    for vector in vectors.values():
        check_compatible(vector, handle, allow_transfer=transfer)


def recipe_edits(recipe: Recipe, vectors: Mapping[str, SteeringVector]) -> list[Edit]:
    """The recipe's steer entries as edits, in recipe order (the order edits sharing a layer are applied in)."""
    return [edit for index in range(len(recipe.steer)) for edit in steer_entry_edits(recipe, vectors, index)]


def entry_options(entry: SteerEntry) -> EditOptions:
    """A steer entry's block, gate, clamp, skip-first and direction as edit options."""
    return EditOptions(
        block=entry.block,
        gate=entry.gate,
        clamp=entry.clamp,
        skip_first=entry.skip_first,
        centered=entry.direction == "centered",
    )


def recipe_center(
    recipe: Recipe, vectors: Mapping[str, SteeringVector], index: int | None = None
) -> torch.Tensor | None:
    """The mean vector ``[L, H]`` of the vectors the recipe's steer entries use (each once), for entries with
    ``direction: centered``; None when no entry is centered. ``index`` asks for it on behalf of that steer entry
    (a `layer: auto` entry whose searched setting is centered), which a failure then names."""
    if index is None and not any(entry.direction == "centered" for entry in recipe.steer):
        return None
    used = _center_keys(recipe)
    try:
        return mean_vector([vectors[key] for key in used])
    except NsteerError as error:
        if index is None:
            index = next(i for i, entry in enumerate(recipe.steer) if entry.direction == "centered")
            why = ""
        else:
            why = " (its searched setting steers along a centered direction)"
        raise recipe.error(("steer", index, "direction"), f"{error} The recipe steers with {len(used)}{why}.") from None


def _center_keys(recipe: Recipe) -> list[str]:
    """The keys of the vectors a centered direction is taken against: each vector the steer entries use, once."""
    return list(dict.fromkeys(entry.vector or entry.instruction for entry in recipe.steer))


def center_names(recipe: Recipe, vectors: Mapping[str, SteeringVector]) -> tuple[str, ...]:
    """The instruction ids of the vectors :func:`recipe_center` averages, one per vector averaged (a vector reached
    under two names counts twice there, and here), sorted."""
    return tuple(sorted(vectors[key].instruction_id for key in _center_keys(recipe)))


def _in_words(value: Any) -> str:
    """A setting's value as a recipe would write it (none, true, 0.5, prompt)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def searched_shape(
    recipe: Recipe, index: int, chosen: SearchedSetting, vector: SteeringVector
) -> tuple[str, EditOptions]:
    """The positions and edit options of `layer: auto` entry ``index``: those its setting was searched with.

    An entry that leaves one out takes the searched one (a format vector searched on the prompt only, centered, is
    used that way by `{instruction: title, layer: auto}`); an entry that names another is an error, since a layer and
    weight found for one shape of edit say nothing about another. An imported control vector was never searched:
    the entry's own shape is used.
    """
    entry = recipe.steer[index]
    if chosen.imported:
        if not vector.metadata.imported_from:
            raise VectorFileError(
                f"The vector file of steer[{index}] ('{vector.instruction_id}') says its setting was imported, but it "
                "names no source it was imported from, so its searched shape cannot be set aside. Import the control "
                "vector again (`nsteer import`), or use a vector file nsteer wrote."
            )
        return entry.positions, entry_options(entry)
    searched: dict[str, Any] = {
        "positions": chosen.positions,
        "block": chosen.block,
        "gate": chosen.gate,
        "clamp": chosen.clamp,
        "skip_first": chosen.skip_first,
        "direction": "centered" if chosen.centered else "own",
    }
    for name, value in searched.items():
        given = getattr(entry, name)
        if name in entry.model_fields_set and given != value:
            raise recipe.error(
                ("steer", index, name),
                f"the setting searched for '{entry.instruction}' (layer {chosen.layer}) used {name} "
                f"{_in_words(value)}, not {_in_words(given)}. Leave {name} out to use the searched one, or run "
                f"`nsteer search` again with {name} {_in_words(given)}.",
            )
    options = EditOptions(
        block=chosen.block,
        gate=chosen.gate,
        clamp=chosen.clamp,
        skip_first=chosen.skip_first,
        centered=chosen.centered,
    )
    return chosen.positions, options


def steer_entry_edits(recipe: Recipe, vectors: Mapping[str, SteeringVector], index: int) -> tuple[Edit, ...]:
    """Steer entry ``index`` as edits (one per layer of its block); none when it is ``layer: auto`` and the search
    chose no steering.

    With ``layer: auto`` the entry takes the setting searched for ITS instruction: for a borrowed vector (word
    exclusion on the include:<word> vector) that is the setting recorded under ``chosen_for``, never the vector's own.
    The searched mode is used when the entry names none (an entry naming another mode is an error), and an entry
    that gives no weight or target scale of its own takes the searched ones too. Positions, block, gate, clamp,
    skip-first and direction are the searched ones (:func:`searched_shape`), and a centered setting must be centered
    on the vectors it was searched with.
    """
    entry = recipe.steer[index]
    vector = vectors[entry.vector or entry.instruction]
    layer, mode, weight, target_scale = entry.layer, entry.mode, entry.weight, entry.target_scale
    positions, options = entry.positions, entry_options(entry)
    if layer == "auto":
        chosen = vector.choice(entry.instruction)
        if chosen is not None and chosen.no_steering:
            return ()
        if chosen is None:
            own = vector.choice()
            borrowed = ""
            if entry.instruction != vector.instruction_id:
                borrowed = (
                    f" on the borrowed '{vector.instruction_id}' vector "
                    "(a setting searched for one instruction is not used for another"
                )
                if own is not None and not own.no_steering:
                    borrowed += f"; its own search chose layer {own.layer} {own.mode} w={own.weight}"
                borrowed += ")"
            raise recipe.error(
                ("steer", index, "layer"),
                f"layer is auto but there is no searched layer for '{entry.instruction}'{borrowed}. "
                "Run `nsteer search` on this recipe, or give a layer number.",
            )
        layer = chosen.layer
        searched_mode = chosen.mode
        if searched_mode != mode:
            if "mode" in entry.model_fields_set:  # a layer searched for one mode says nothing about another
                raise recipe.error(
                    ("steer", index, "mode"),
                    f"the searched setting for '{entry.instruction}' is mode {searched_mode} (layer {layer}), not "
                    f"{mode}. Leave mode out to use the searched one, or run `nsteer search` again for mode {mode}.",
                )
            mode = searched_mode  # a search over several modes (search.modes) chose this one
        if "weight" not in entry.model_fields_set and chosen.mode == mode:
            # the weight the search tried: its k on the vector's scale when it had one (a block splits it per layer)
            weight = (
                RelativeWeight(relative=chosen.weight_relative) if chosen.weight_relative is not None else chosen.weight
            )
        if "target_scale" not in entry.model_fields_set and chosen.mode == mode:
            target_scale = chosen.target_scale
        positions, options = searched_shape(recipe, index, chosen, vector)
        if options.centered and chosen.centered_on is not None:
            steered = center_names(recipe, vectors)
            if steered != tuple(sorted(chosen.centered_on)):
                raise recipe.error(
                    ("steer", index, "direction"),
                    f"the setting searched for '{entry.instruction}' is centered on the mean of "
                    f"{len(chosen.centered_on)} vectors ({', '.join(chosen.centered_on)}); this recipe steers with "
                    f"{len(steered)} ({', '.join(steered)}), which gives another direction. Steer with the same "
                    "instructions (as the recipe that searched it does), or search this recipe.",
                )
    if not 0 <= layer < vector.metadata.n_layers:
        raise recipe.error(
            ("steer", index, "layer"), f"layer {layer} is out of range (0..{vector.metadata.n_layers - 1})."
        )
    relative = weight.relative if isinstance(weight, RelativeWeight) else None
    try:
        edits = vector_edits(
            vector,
            layer=layer,
            mode=mode,
            weight=0.0 if relative is not None else float(weight),
            weight_relative=relative,
            positions=positions,
            target_scale=target_scale,
            options=options,
            center=recipe_center(recipe, vectors, index) if options.centered else None,
        )
    except RecipeError:
        raise
    except NsteerError as error:
        raise recipe.error(("steer", index), str(error)) from None
    return tuple(edits)


def generation_config(recipe: Recipe, **overrides) -> GenerationConfig:
    """The recipe's decoding settings, with CLI overrides (None values are ignored)."""
    settings = recipe.generation.model_dump()
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return GenerationConfig(**settings)
