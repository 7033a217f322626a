"""What an evaluation of a recipe runs on: its test items, each instruction's edits, and the reference model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nsteer.edits import Edit
from nsteer.errors import EvaluationError
from nsteer.evaluate.checkers import CheckSpec
from nsteer.evaluate.ifeval_data import IFEvalRecord, read_ifeval_jsonl
from nsteer.evaluate.runner import Reference
from nsteer.models import ModelHandle, open_model
from nsteer.pipeline import instruction_splits, resolve_instruction, steer_entry_edits
from nsteer.recipe import Recipe
from nsteer.vectors import SteeringVector


@dataclass(frozen=True)
class EvalItem:
    """One test prompt: with and (where known) without its instruction, the checks that judge it, who steers it."""

    key: str
    group: str  # the table row: a recipe instruction, or several joined by "+"
    category: str
    prompt_with: str
    prompt_without: str | None
    checks: tuple[CheckSpec, ...]
    instructions: tuple[str, ...]  # recipe instructions whose edits steer this item


def recipe_items(recipe: Recipe, split: str = "test", limit: int | None = None) -> list[EvalItem]:
    """One item per prompt pair of ``split`` for every instruction in the recipe (at most ``limit`` each)."""
    limit = limit if limit is not None else recipe.evaluation.max_prompts
    items: list[EvalItem] = []
    for name in recipe.instructions:
        instruction = resolve_instruction(recipe, name)
        if not instruction.check_id:
            raise recipe.error(
                ("instructions", name, "check"),
                f"'{name}' has no check, so it cannot be scored: give `check: {{id, kwargs}}`.",
            )
        pairs = instruction_splits(recipe, name).part(split)
        if not pairs:
            raise EvaluationError(
                f"The {split} split of '{name}' is empty: "
                f"give prompts.split.{split} a positive fraction, or more base prompts."
            )
        spec = instruction.check
        for pair in pairs[:limit]:
            items.append(
                EvalItem(
                    key=f"{name}/{pair.base_id}",
                    group=name,
                    category=instruction.category,
                    prompt_with=pair.with_instruction,
                    prompt_without=pair.without_instruction,
                    checks=(spec,),
                    instructions=(name,),
                )
            )
    return items


def ifeval_items(
    records: Sequence[IFEvalRecord], recipe: Recipe, limit: int | None = None
) -> tuple[list[EvalItem], int]:
    """Map each record to the recipe instructions that share one of its check ids; returns items and the skip count.

    Where several recipe instructions share a check id (``include:ocean``, ``include:brave``), only those whose
    check kwargs equal the record's are matched. A record is scored against all its checks (IFEval's prompt level).
    """
    instructions = {name: resolve_instruction(recipe, name) for name in recipe.instructions}
    items: list[EvalItem] = []
    per_group: dict[str, int] = {}
    skipped = 0
    for record in records:
        matched: list[str] = []
        for spec in record.checks:
            candidates = [name for name, ins in instructions.items() if ins.check_id == spec.instruction_id]
            if len(candidates) > 1:
                given = {k: v for k, v in spec.kwargs.items() if v is not None}
                candidates = [name for name in candidates if dict(instructions[name].check_kwargs) == given]
            matched.extend(name for name in candidates if name not in matched)
        if not matched:
            skipped += 1
            continue
        group = "+".join(matched)
        if limit is not None and per_group.get(group, 0) >= limit:
            continue
        per_group[group] = per_group.get(group, 0) + 1
        items.append(
            EvalItem(
                key=record.key,
                group=group,
                category=instructions[matched[0]].category,
                prompt_with=record.prompt,
                prompt_without=record.prompt_without_instruction,
                checks=record.checks,
                instructions=tuple(matched),
            )
        )
    if not items:
        known = ", ".join(sorted({ins.check_id for ins in instructions.values()}))
        raise EvaluationError(
            f"None of the {len(records)} records uses a check of the recipe's instructions ({known}). "
            "Add instructions with those checks to the recipe, or pass a file with matching instruction ids."
        )
    return items, skipped


def instruction_edits(recipe: Recipe, vectors: Mapping[str, SteeringVector]) -> dict[str, tuple[Edit, ...]]:
    """Each recipe instruction's edits (its steer entries, in recipe order); empty where none steers it."""
    found: dict[str, list[Edit]] = {name: [] for name in recipe.instructions}
    for index, entry in enumerate(recipe.steer):
        found[entry.instruction].extend(steer_entry_edits(recipe, vectors, index))
    return {name: tuple(edits) for name, edits in found.items()}


def describe_edits(edits: Sequence[Edit]) -> str:
    """``lowercase@14 set w=1 (all)`` for each edit (plus its gate, clamp and skip-first), or ``none``."""
    return ", ".join(f"{e.name}@{e.layer} {e.mode} w={e.weight:g} ({e.positions}{_extras(e)})" for e in edits) or "none"


def _extras(edit: Edit) -> str:
    """``, gate < -3.2, clamp 41, skip first`` for the modifiers an edit has."""
    parts = [f"gate < {edit.gate:.4g}"] if edit.gate is not None else []
    parts += [f"clamp {edit.bound:.4g}"] if edit.bound is not None else []
    parts += ["skip first"] if edit.skip_first else []
    return "".join(f", {part}" for part in parts)


def steering_note(recipe: Recipe, vectors: Mapping[str, SteeringVector], name: str) -> str:
    """Why an instruction is not steered: no steer entry, or the search chose no steering."""
    for entry in recipe.steer:
        if entry.instruction == name and entry.layer == "auto":
            chosen = vectors[entry.vector or entry.instruction].choice(entry.instruction)
            if chosen is not None and chosen.no_steering:
                return "none (search chose no steering)"
    return "none (no steer entry)"


def open_reference(recipe: Recipe, handle: ModelHandle) -> Reference | None:
    """The recipe's reference model for perplexity: evaluation.reference_model, else the model itself when local."""
    name = recipe.evaluation.reference_model
    if name is None or (name == handle.model_id and not handle.remote):
        return None if handle.remote else Reference(handle.hf_model, handle.tokenizer, handle.model_id)
    reference = open_model(name, dtype=recipe.model.dtype, device=recipe.model.device)
    return Reference(reference.hf_model, reference.tokenizer, name)


def evaluation_items(
    recipe: Recipe, split: str, limit: int | None, data: str | Path | None
) -> tuple[list[EvalItem], int, str]:
    """The items of an evaluation: from an IFEval JSONL file ``data`` when given, else the recipe's ``split``;
    returns the items, the records skipped and where the prompts came from."""
    if data is not None:
        items, skipped = ifeval_items(read_ifeval_jsonl(data), recipe, limit)
        return items, skipped, str(data)
    return recipe_items(recipe, split, limit), 0, f"recipe {recipe.name}"
