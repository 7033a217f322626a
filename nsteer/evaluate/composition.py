"""Composition: each instruction's accuracy when its edits run alone next to its accuracy when every edit runs.

For every instruction of a recipe that has steer entries, on its test (or validation) prompts, with the instruction
absent from the prompt and present, three answers are generated: unsteered, steered by the instruction's own edits
(``alone``), and steered by all of the recipe's edits in recipe order (``composed``, the order the composition rule
applies them in: docs/method.md). All three go through one batched generation with per-row edits, so a prompt's three
rows differ only in their steering. Each answer is checked with the instruction's own IFEval checker (loose and
strict), with every steered instruction's checker at once (``joint``: does the answer follow all of them?), and for
degeneracy and, with a reference model, perplexity. Interference shows as ``composed`` falling below ``alone``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsteer.edits import Edit
from nsteer.errors import EvaluationError
from nsteer.evaluate.checkers import CheckSpec
from nsteer.evaluate.inputs import EvalItem, describe_edits, instruction_edits, open_reference, recipe_items
from nsteer.evaluate.runner import Generator, Reference, Row, Unit, run_units
from nsteer.fileio import json_safe, write_json, write_text
from nsteer.generate import GenerationConfig
from nsteer.models import ModelHandle
from nsteer.pipeline import generation_config, load_recipe_vectors, recipe_edits
from nsteer.progress import ProgressFactory
from nsteer.recipe import Recipe
from nsteer.text import markdown_text
from nsteer.vectors import SteeringVector

STEERING = ("unsteered", "alone", "composed")


@dataclass(frozen=True)
class CompositionAnswer:
    """One answer: which instruction's prompt, with or without the instruction, under which steering, and its scores."""

    instruction: str
    key: str
    instruction_in_prompt: bool
    steering: str  # unsteered | alone | composed
    prompt: str
    answer: str
    strict: bool
    loose: bool
    joint_loose: bool  # loose verdict of every steered instruction's checker at once
    degeneracy: str | None
    perplexity: float
    sentences: int
    words: int
    substantive: bool = False  # a loose pass of its own checker on an answer neither degenerate, hollow nor an echo


@dataclass(frozen=True)
class CompositionRow:
    """One line of the table: an instruction, a prompt condition and a steering state, summarized."""

    instruction: str
    instruction_in_prompt: bool
    steering: str
    n: int
    strict: float
    loose: float
    joint_loose: float
    degenerate_share: float
    substantive: float
    median_perplexity: float
    median_words: float
    median_sentences: float


@dataclass(frozen=True)
class CompositionResult:
    """Every answer of a composition evaluation and the edits behind each steering state."""

    model_id: str
    split: str
    composed: str  # description of all edits, in the order they apply
    alone: Mapping[str, str]  # instruction -> description of its own edits
    answers: tuple[CompositionAnswer, ...]
    elapsed_s: float = 0.0
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def instructions(self) -> tuple[str, ...]:
        """The steered instructions, in recipe order."""
        return tuple(self.alone)

    def rows(self) -> list[CompositionRow]:
        """Summaries per instruction x condition x steering, in a stable order."""
        rows = []
        for name in self.instructions:
            for present in (False, True):
                for steering in STEERING:
                    picked = [
                        a
                        for a in self.answers
                        if a.instruction == name and a.instruction_in_prompt == present and a.steering == steering
                    ]
                    if picked:
                        rows.append(_summarize(name, present, steering, picked))
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data (NaN becomes null)."""
        return json_safe(
            {
                "model": self.model_id,
                "split": self.split,
                "composed": self.composed,
                "alone": dict(self.alone),
                "settings": dict(self.settings),
                "elapsed_s": round(self.elapsed_s, 1),
                "rows": [dataclasses.asdict(row) for row in self.rows()],
                "answers": [dataclasses.asdict(answer) for answer in self.answers],
            }
        )


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _summarize(name: str, present: bool, steering: str, answers: Sequence[CompositionAnswer]) -> CompositionRow:
    count = len(answers)
    return CompositionRow(
        instruction=name,
        instruction_in_prompt=present,
        steering=steering,
        n=count,
        strict=sum(a.strict for a in answers) / count,
        loose=sum(a.loose for a in answers) / count,
        joint_loose=sum(a.joint_loose for a in answers) / count,
        degenerate_share=sum(a.degeneracy is not None for a in answers) / count,
        substantive=sum(a.substantive for a in answers) / count,
        median_perplexity=_median([a.perplexity for a in answers]),
        median_words=_median([float(a.words) for a in answers]),
        median_sentences=_median([float(a.sentences) for a in answers]),
    )


def evaluate_composition(
    handle: ModelHandle,
    items: Sequence[EvalItem],
    alone: Mapping[str, Sequence[Edit]],
    composed: Sequence[Edit],
    *,
    config: GenerationConfig = GenerationConfig(),
    reference: Reference | None = None,
    generator: Generator | None = None,
    checkpoint: Path | None = None,
    progress: ProgressFactory | None = None,
    split: str = "test",
) -> CompositionResult:
    """Score each item unsteered, with its instruction's edits ``alone``, and with the ``composed`` edits.

    ``alone`` maps each steered instruction to its edits; items of other instructions are skipped. ``composed`` is the
    full edit list in application order. One batched generation per instruction, each row with its own edits.
    """
    steered = [name for name, edits in alone.items() if edits]
    if len(steered) < 2:
        raise EvaluationError(
            "Composition needs edits for at least two instructions; "
            f"got {len(steered)} ({', '.join(steered) or 'none'})."
        )
    started = time.monotonic()
    joint_specs: dict[str, tuple[CheckSpec, ...]] = {}
    for item in items:
        if item.group in steered:
            joint_specs.setdefault(item.group, item.checks)
    every_check = tuple(spec for other in steered for spec in joint_specs.get(other, ()))
    units: list[Unit] = []
    generated: list[list[tuple[EvalItem, bool, str]]] = []
    for name in steered:
        group = [item for item in items if item.group == name]
        if not group:
            raise EvaluationError(f"No prompts to evaluate '{name}' on: its split is empty.")
        edits_by_state: dict[str, tuple[Edit, ...]] = {
            "unsteered": (),
            "alone": tuple(alone[name]),
            "composed": tuple(composed),
        }
        rows = [
            (item, present, steering)
            for item in group
            for present in (False, True)
            if present or item.prompt_without is not None
            for steering in STEERING
        ]
        generated.append(rows)
        # Each row is checked against its own instruction, then against every steered instruction (joint).
        units.append(
            Unit(
                f"composition {name}",
                tuple(
                    Row(
                        item.prompt_with if present else item.prompt_without,  # type: ignore[arg-type]
                        edits_by_state[steering],
                        (*item.checks, *every_check),
                        item.prompt_with,
                    )
                    for item, present, steering in rows
                ),
            )
        )
    scored = run_units(
        handle,
        units,
        kind="composition",
        config=config,
        generator=generator,
        reference=reference,
        checkpoint=checkpoint,
        progress=progress,
    )
    answers: list[CompositionAnswer] = []
    for name, rows, unit_answers in zip(steered, generated, scored):
        for (item, present, steering), answer in zip(rows, unit_answers):
            own, joint = answer.checks[: len(item.checks)], answer.checks[len(item.checks) :]
            answers.append(
                CompositionAnswer(
                    instruction=name,
                    key=item.key,
                    instruction_in_prompt=present,
                    steering=steering,
                    prompt=answer.prompt,
                    answer=answer.answer,
                    strict=all(r.strict for r in own),
                    loose=all(r.loose for r in own),
                    joint_loose=all(r.loose for r in joint),
                    degeneracy=answer.degeneracy,
                    perplexity=answer.perplexity,
                    sentences=answer.sentences,
                    words=answer.words,
                    substantive=all(r.loose for r in own) and answer.sound,
                )
            )
    return CompositionResult(
        model_id=handle.model_id,
        split=split,
        composed=describe_edits(composed),
        alone={name: describe_edits(alone[name]) for name in steered},
        answers=tuple(answers),
        elapsed_s=time.monotonic() - started,
        settings={
            "max_new_tokens": config.max_new_tokens,
            "do_sample": config.do_sample,
            "batch_size": config.batch_size,
            "prompts_per_instruction": {name: sum(i.group == name for i in items) for name in steered},
        },
    )


def evaluate_recipe_composition(
    recipe: Recipe,
    handle: ModelHandle,
    *,
    vectors: Mapping[str, SteeringVector] | None = None,
    split: str = "test",
    limit: int | None = None,
    reference: Reference | None = None,
    generator: Generator | None = None,
    checkpoint: Path | None = None,
    progress: ProgressFactory | None = None,
) -> CompositionResult:
    """Composed vs alone for a recipe: each steered instruction on its ``split`` prompts (at most ``limit`` each)."""
    if vectors is None:
        vectors = load_recipe_vectors(recipe, handle)
    alone = instruction_edits(recipe, vectors)
    composed = recipe_edits(recipe, vectors)  # recipe order: the order edits sharing a layer apply in
    items = [item for item in recipe_items(recipe, split, limit) if alone.get(item.group)]
    if reference is None:
        reference = open_reference(recipe, handle)
    return evaluate_composition(
        handle,
        items,
        alone,
        composed,
        config=generation_config(recipe),
        reference=reference,
        generator=generator,
        checkpoint=checkpoint,
        progress=progress,
        split=split,
    )


def composition_markdown(result: CompositionResult) -> str:
    """The composed-vs-alone table: loose (strict) accuracy, substantive passes, joint accuracy, quality and lengths
    per row."""
    lines = [
        f"Model {markdown_text(result.model_id)}, {result.split} split; composed edits (in order): "
        f"{markdown_text(result.composed)}.",
        "",
        "| instruction | instruction in prompt | steering | n | loose (strict) | substantive "
        "| all steered instructions (loose) | degenerate | median ppl | median words | median sentences |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows():
        ppl = "n/a" if not math.isfinite(row.median_perplexity) else f"{row.median_perplexity:.1f}"
        lines.append(
            f"| {markdown_text(row.instruction)} | {'yes' if row.instruction_in_prompt else 'no'} | {row.steering} "
            f"| {row.n} "
            f"| {row.loose:.2f} ({row.strict:.2f}) | {row.substantive:.2f} | {row.joint_loose:.2f} "
            f"| {row.degenerate_share:.0%} | {ppl} "
            f"| {row.median_words:g} | {row.median_sentences:g} |"
        )
    lines.append("")
    for name, text in result.alone.items():
        lines.append(f"- {markdown_text(name)} alone: {markdown_text(text)}")
    return "\n".join(lines) + "\n"


#: The files the composition report writes into its folder (the CLI checks them before a model runs).
COMPOSITION_REPORT_FILES = ("composition.json", "composition.md")


def write_composition_report(result: CompositionResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``composition.json`` (every answer) and ``composition.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    return {
        "json": write_json(out_dir / COMPOSITION_REPORT_FILES[0], result.to_dict()),
        "markdown": write_text(out_dir / COMPOSITION_REPORT_FILES[1], composition_markdown(result)),
    }


__all__ = [
    "STEERING",
    "CompositionAnswer",
    "CompositionResult",
    "CompositionRow",
    "composition_markdown",
    "evaluate_composition",
    "evaluate_recipe_composition",
    "write_composition_report",
]
