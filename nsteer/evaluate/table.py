"""The 2×2 evaluation: instruction in the prompt (yes / no) × steering (yes / no), scored with IFEval's checkers.

Every answer is kept with its prompt, verdicts, degeneracy reason, perplexity under a reference model and length
counts, so a result can be re-scored later. Each cell's summary puts quality (mean perplexity, share of degenerate
answers, an optional judge's mean score) beside strict and loose accuracy.
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
from nsteer.evaluate.inputs import (
    EvalItem,
    describe_edits,
    evaluation_items,
    instruction_edits,
    open_reference,
    steering_note,
)
from nsteer.evaluate.runner import Generator, Judge, Reference, Row, ScoredAnswer, Unit, run_units
from nsteer.evaluate.stats import PairedChange, paired_change
from nsteer.fileio import json_safe
from nsteer.generate import GenerationConfig, generate
from nsteer.models import ModelHandle
from nsteer.pipeline import generation_config, load_recipe_vectors
from nsteer.progress import ProgressFactory
from nsteer.recipe import Recipe
from nsteer.throughput import Metered, handle_rate_key, record_run
from nsteer.vectors import SteeringVector


@dataclass(frozen=True)
class Cell:
    """One of the four conditions: the instruction in the prompt or not, steering on or off."""

    instruction_in_prompt: bool
    steered: bool

    @property
    def label(self) -> str:
        """A short human label, e.g. ``no instruction, steered``."""
        return (
            f"{'instruction' if self.instruction_in_prompt else 'no instruction'}, "
            f"{'steered' if self.steered else 'unsteered'}"
        )


CELLS = (Cell(False, False), Cell(False, True), Cell(True, False), Cell(True, True))


@dataclass(frozen=True)
class Answer:
    """One generated answer with everything needed to re-score it."""

    key: str
    group: str
    instruction_in_prompt: bool
    steered: bool
    prompt: str
    answer: str
    strict: bool
    loose: bool
    checks: tuple[Mapping[str, Any], ...]  # per check: id, kwargs, strict, loose
    degeneracy: str | None
    perplexity: float  # NaN when empty or when no reference model is set
    sentences: int
    words: int
    judge: float | None = None
    hollow: str | None = None  # why the answer is hollow (see nsteer.evaluate.quality), None if it is not
    echo: str | None = None  # why the answer is a prompt echo, None if it is not
    substantive: bool = False  # loose pass, and neither degenerate nor hollow nor an echo


@dataclass(frozen=True)
class CellSummary:
    """Accuracy and quality of one cell over a set of answers."""

    n: int
    strict: float
    loose: float
    degenerate_share: float
    mean_perplexity: float
    median_perplexity: float
    judge: float | None
    sentences: tuple[int, ...] = ()
    words: tuple[int, ...] = ()
    substantive: float = math.nan  # share of substantive passes


@dataclass(frozen=True)
class EvaluationResult:
    """The whole evaluation: every answer, what steered each row, and where the prompts came from."""

    model_id: str
    split: str
    source: str
    reference: str
    steering: Mapping[str, str]  # group -> description of its edits
    categories: Mapping[str, str]  # group -> category
    answers: tuple[Answer, ...]
    skipped: int = 0  # data records no recipe instruction could steer
    elapsed_s: float = 0.0
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> tuple[str, ...]:
        """The table's rows in first-seen order."""
        return tuple(dict.fromkeys(answer.group for answer in self.answers))

    def cell(self, cell: Cell, group: str | None = None) -> CellSummary:
        """The summary of ``cell`` for one group, or over every answer when ``group`` is None."""
        return summarize(
            [
                answer
                for answer in self.answers
                if answer.instruction_in_prompt == cell.instruction_in_prompt
                and answer.steered == cell.steered
                and (group is None or answer.group == group)
            ]
        )

    def paired(self, instruction_in_prompt: bool, group: str | None = None, measure: str = "loose") -> PairedChange:
        """Steered vs unsteered verdicts (``loose`` or ``substantive`` passes) on the same prompts, for one group or
        over every answer."""
        if measure not in ("loose", "substantive"):
            raise ValueError(f"measure must be loose or substantive, not {measure!r}")
        verdicts: dict[bool, dict[tuple[str, str], bool]] = {False: {}, True: {}}
        for answer in self.answers:
            if answer.instruction_in_prompt == instruction_in_prompt and (group is None or answer.group == group):
                verdicts[answer.steered][(answer.group, answer.key)] = getattr(answer, measure)
        return paired_change(verdicts[False], verdicts[True])

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data: settings, per-group and overall summaries, and every answer."""
        table = {
            group: {_cell_name(cell): dataclasses.asdict(self.cell(cell, group)) for cell in CELLS}
            for group in self.groups
        }

        def paired_by_condition(group: str | None, measure: str = "loose") -> dict[str, Any]:
            return {
                _condition_name(present): dataclasses.asdict(self.paired(present, group, measure))
                for present in (False, True)
            }

        return json_safe(
            {
                "model": self.model_id,
                "split": self.split,
                "source": self.source,
                "reference_model": self.reference,
                "settings": dict(self.settings),
                "elapsed_s": round(self.elapsed_s, 1),
                "skipped_records": self.skipped,
                "steering": dict(self.steering),
                "categories": dict(self.categories),
                "overall": {_cell_name(cell): dataclasses.asdict(self.cell(cell)) for cell in CELLS},
                "table": table,
                "paired": {group: paired_by_condition(group) for group in self.groups},
                "paired_overall": paired_by_condition(None),
                "paired_substantive": {group: paired_by_condition(group, "substantive") for group in self.groups},
                "paired_substantive_overall": paired_by_condition(None, "substantive"),
                "answers": [dataclasses.asdict(answer) for answer in self.answers],
            }
        )


def _condition_name(instruction_in_prompt: bool) -> str:
    return f"{'with' if instruction_in_prompt else 'without'}_instruction"


def _cell_name(cell: Cell) -> str:
    return f"{_condition_name(cell.instruction_in_prompt)}/{'steered' if cell.steered else 'unsteered'}"


def summarize(answers: Sequence[Answer]) -> CellSummary:
    """Strict / loose accuracy, degenerate share, perplexity (over non-empty answers) and length counts."""
    if not answers:
        return CellSummary(0, math.nan, math.nan, math.nan, math.nan, math.nan, None)
    count = len(answers)
    perplexities = [a.perplexity for a in answers if math.isfinite(a.perplexity)]
    judged = [a.judge for a in answers if a.judge is not None]
    return CellSummary(
        n=count,
        strict=sum(a.strict for a in answers) / count,
        loose=sum(a.loose for a in answers) / count,
        degenerate_share=sum(a.degeneracy is not None for a in answers) / count,
        mean_perplexity=statistics.fmean(perplexities) if perplexities else math.nan,
        median_perplexity=statistics.median(perplexities) if perplexities else math.nan,
        judge=statistics.fmean(judged) if judged else None,
        sentences=tuple(a.sentences for a in answers),
        words=tuple(a.words for a in answers),
        substantive=sum(a.substantive for a in answers) / count,
    )


def evaluate(
    handle: ModelHandle,
    items: Sequence[EvalItem],
    edits: Mapping[str, Sequence[Edit]],
    *,
    config: GenerationConfig = GenerationConfig(),
    reference: Reference | None = None,
    judge: Judge | None = None,
    generator: Generator | None = None,
    checkpoint: Path | None = None,
    progress: ProgressFactory | None = None,
    split: str = "test",
    source: str = "recipe",
) -> EvaluationResult:
    """Generate and score the four cells for every item, one batched generation per group.

    ``edits`` maps recipe instruction names to their edits; an item is steered by the edits of all its
    instructions. A group with no edits has identical steered and unsteered cells, so its steered answers are the
    unsteered ones (not generated twice). Greedy unsteered answers are reused across groups (the runner's
    ``reuse_greedy``). With ``checkpoint`` (a JSONL path) finished groups are reused on a rerun.
    """
    started = time.monotonic()
    by_group: dict[str, list[EvalItem]] = {}
    for item in items:
        by_group.setdefault(item.group, []).append(item)
    steering: dict[str, str] = {}
    units: list[Unit] = []
    generated: list[tuple[list[tuple[EvalItem, Cell]], bool]] = []  # per group: its generated rows, whether steered
    for group, group_items in by_group.items():
        group_edits = _group_edits(group_items, edits)
        steering[group] = describe_edits(group_edits)
        rows = _group_rows(group_items, group_edits)
        generated.append((rows, bool(group_edits)))
        units.append(
            Unit(
                f"eval {group}",
                tuple(
                    Row(_prompt(item, cell), group_edits if cell.steered else (), item.checks, item.prompt_with)
                    for item, cell in rows
                ),
            )
        )
    scored = run_units(
        handle,
        units,
        kind="eval",
        config=config,
        generator=generator,
        reference=reference,
        judge=judge,
        checkpoint=checkpoint,
        progress=progress,
        reuse_greedy=True,
    )
    answers: list[Answer] = []
    for group_items, (rows, steered_group), unit_answers in zip(by_group.values(), generated, scored):
        by_cell = {(item.key, cell): answer for (item, cell), answer in zip(rows, unit_answers)}
        for item in group_items:
            for cell in CELLS:
                if not cell.instruction_in_prompt and item.prompt_without is None:
                    continue
                source_cell = cell if steered_group else Cell(cell.instruction_in_prompt, False)
                answers.append(_answer(item, cell, by_cell[(item.key, source_cell)]))
    return EvaluationResult(
        model_id=handle.model_id,
        split=split,
        source=source,
        reference=reference.name if reference else "",
        steering=steering,
        categories={group: group_items[0].category for group, group_items in by_group.items()},
        answers=tuple(answers),
        elapsed_s=time.monotonic() - started,
        settings={
            "max_new_tokens": config.max_new_tokens,
            "do_sample": config.do_sample,
            "batch_size": config.batch_size,
        },
    )


def _group_edits(group_items: Sequence[EvalItem], edits: Mapping[str, Sequence[Edit]]) -> tuple[Edit, ...]:
    """The edits that steer a group: those of every instruction of its items."""
    return tuple(edit for name in group_items[0].instructions for edit in edits.get(name, ()))


def _group_rows(group_items: Sequence[EvalItem], group_edits: Sequence[Edit]) -> list[tuple[EvalItem, Cell]]:
    """The (item, cell) answers a group generates: no instruction-absent cells for items without such a prompt, and
    no steered cells for a group nothing steers (they equal the unsteered ones)."""
    return [
        (item, cell)
        for item in group_items
        for cell in CELLS
        if (cell.instruction_in_prompt or item.prompt_without is not None) and (not cell.steered or group_edits)
    ]


@dataclass(frozen=True)
class EvaluationPlan:
    """What an evaluation will generate, before it does: the table's answers and how many of them are generated."""

    prompts: int  # items (test prompts over every instruction)
    answers: int  # the answers the table holds (up to four per prompt)
    generated: int  # the answers generated: steered cells of unsteered groups and repeated greedy prompts are reused
    max_new_tokens: int
    batch_size: int

    def summary(self) -> str:
        """``N prompts × up to 4 cells = K answers, J to generate``."""
        text = f"{self.prompts} prompts × up to 4 cells = {self.answers:,} answers"
        if self.generated < self.answers:
            text += f", {self.generated:,} to generate (unsteered answers are shared where they coincide)"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data."""
        return dataclasses.asdict(self)


def plan_evaluation(
    items: Sequence[EvalItem], edits: Mapping[str, Sequence[Edit]], config: GenerationConfig
) -> EvaluationPlan:
    """Count what :func:`evaluate` generates for ``items`` (greedy unsteered answers reused across groups)."""
    by_group: dict[str, list[EvalItem]] = {}
    for item in items:
        by_group.setdefault(item.group, []).append(item)
    answered: set[str] = set()  # prompts an earlier group answered unsteered
    answers = generated = 0
    for group_items in by_group.values():
        rows = _group_rows(group_items, _group_edits(group_items, edits))
        answers += sum(4 if item.prompt_without is not None else 2 for item in group_items)
        unsteered = [_prompt(item, cell) for item, cell in rows if not cell.steered]
        generated += sum(cell.steered for _, cell in rows)
        generated += len(unsteered) if config.do_sample else sum(prompt not in answered for prompt in unsteered)
        answered.update(unsteered)
    return EvaluationPlan(len(items), answers, generated, config.max_new_tokens, config.batch_size)


def plan_recipe_evaluation(
    recipe: Recipe,
    vectors: Mapping[str, SteeringVector],
    *,
    split: str = "test",
    limit: int | None = None,
    data: str | Path | None = None,
) -> EvaluationPlan:
    """What :func:`evaluate_recipe` will generate, from the recipe and its vector files alone (no model)."""
    items, _, _ = evaluation_items(recipe, split, limit, data)
    return plan_evaluation(items, instruction_edits(recipe, vectors), generation_config(recipe))


def _prompt(item: EvalItem, cell: Cell) -> str:
    prompt = item.prompt_with if cell.instruction_in_prompt else item.prompt_without
    assert prompt is not None
    return prompt


def _answer(item: EvalItem, cell: Cell, scored: ScoredAnswer) -> Answer:
    """One cell's answer of one item, with its per-check verdicts."""
    return Answer(
        key=item.key,
        group=item.group,
        instruction_in_prompt=cell.instruction_in_prompt,
        steered=cell.steered,
        prompt=scored.prompt,
        answer=scored.answer,
        strict=scored.strict,
        loose=scored.loose,
        checks=tuple(
            {"id": spec.instruction_id, "kwargs": dict(spec.kwargs), "strict": result.strict, "loose": result.loose}
            for spec, result in zip(item.checks, scored.checks)
        ),
        degeneracy=scored.degeneracy,
        perplexity=scored.perplexity,
        sentences=scored.sentences,
        words=scored.words,
        judge=scored.judge,
        hollow=scored.hollow,
        echo=scored.echo,
        substantive=scored.substantive,
    )


def evaluate_recipe(
    recipe: Recipe,
    handle: ModelHandle,
    *,
    vectors: Mapping[str, SteeringVector] | None = None,
    split: str = "test",
    limit: int | None = None,
    data: str | Path | None = None,
    reference: Reference | None = None,
    judge: Judge | None = None,
    generator: Generator | None = None,
    checkpoint: Path | None = None,
    progress: ProgressFactory | None = None,
) -> EvaluationResult:
    """The 2×2 table for a recipe: on its ``split`` (default test), or on an IFEval JSONL file given as ``data``."""
    if vectors is None:
        vectors = load_recipe_vectors(recipe, handle) if recipe.steer else {}
    edits = instruction_edits(recipe, vectors)
    items, skipped, source = evaluation_items(recipe, split, limit, data)
    if reference is None:
        reference = open_reference(recipe, handle)
    config = generation_config(recipe)
    meter = Metered(generator or generate)  # a real evaluation teaches the next plan this machine's rate
    started = time.monotonic()
    result = evaluate(
        handle,
        items,
        edits,
        config=config,
        reference=reference,
        judge=judge,
        generator=meter,
        checkpoint=checkpoint,
        progress=progress,
        split=split if data is None else "data",
        source=source,
    )
    if generator is None:
        record_run(handle_rate_key(handle, config.batch_size), meter, started, config.max_new_tokens)
    notes = {name: steering_note(recipe, vectors, name) for name in recipe.instructions}
    steering = {group: text if text != "none" else notes.get(group, "none") for group, text in result.steering.items()}
    return dataclasses.replace(result, skipped=skipped, steering=steering)


__all__ = [
    "CELLS",
    "Answer",
    "Cell",
    "CellSummary",
    "EvaluationResult",
    "evaluate",
    "evaluate_recipe",
    "summarize",
]
