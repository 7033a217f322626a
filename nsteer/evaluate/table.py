"""The 2×2 evaluation: instruction in the prompt (yes / no) × steering (yes / no), scored with IFEval's checkers.

Every answer is kept with its prompt, verdicts, degeneracy reason, perplexity under a reference model and length
counts, so a result can be re-scored later. Each cell's summary puts quality (mean perplexity, share of degenerate
answers, an optional judge's mean score) beside strict and loose accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsteer.edits import Edit
from nsteer.errors import EvaluationError
from nsteer.evaluate.checkers import CheckSpec, check_all, count_sentences, count_words, validate_spec
from nsteer.evaluate.checkpoint import append_checkpoint, cell_key, read_checkpoint
from nsteer.evaluate.quality import degeneracy, perplexity
from nsteer.fileio import MAX_DATA_BYTES, parse_json, read_text, text_lines
from nsteer.generate import GenerationConfig, generate
from nsteer.models import ModelHandle

Generator = Callable[..., list[str]]  # generate(handle, prompts, *, row_edits, config, progress) -> answers
Judge = Callable[[str, str], float]  # (prompt, answer) -> score; a user's LLM judge, off by default
ProgressFactory = Callable[[str], Callable[[int, int], None]]


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
class EvalItem:
    """One test prompt: with and (where known) without its instruction, the checks that judge it, who steers it."""

    key: str
    group: str  # the table row: a recipe instruction, or several joined by "+"
    category: str
    prompt_with: str
    prompt_without: str | None
    checks: tuple[CheckSpec, ...]
    instructions: tuple[str, ...]  # recipe instructions whose edits steer this item


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


@dataclass(frozen=True)
class PairedChange:
    """Steered against unsteered on the same prompts: how many failures steering fixed and how many passes it broke.

    ``p_value`` is the two-sided exact sign test on the discordant pairs (McNemar's exact test): the chance of a split
    at least this uneven if steering changed verdicts in either direction equally often. 1.0 when nothing changed.
    """

    pairs: int
    gained: int
    lost: int
    p_value: float


def paired_change(unsteered: Mapping[Any, bool], steered: Mapping[Any, bool]) -> PairedChange:
    """Compare loose verdicts prompt by prompt (keys present in both)."""
    keys = unsteered.keys() & steered.keys()
    gained = sum(steered[key] and not unsteered[key] for key in keys)
    lost = sum(unsteered[key] and not steered[key] for key in keys)
    return PairedChange(len(keys), gained, lost, sign_test(gained, lost))


def sign_test(successes: int, failures: int) -> float:
    """Two-sided exact binomial test of ``successes`` against ``failures`` at p = 1/2."""
    trials = successes + failures
    tail = sum(math.comb(trials, i) for i in range(min(successes, failures) + 1)) / 2**trials
    return min(1.0, 2 * tail)


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

    def paired(self, instruction_in_prompt: bool, group: str | None = None) -> PairedChange:
        """Steered vs unsteered loose verdicts on the same prompts, for one group or over every answer."""
        verdicts: dict[bool, dict[tuple[str, str], bool]] = {False: {}, True: {}}
        for answer in self.answers:
            if answer.instruction_in_prompt == instruction_in_prompt and (group is None or answer.group == group):
                verdicts[answer.steered][(answer.group, answer.key)] = answer.loose
        return paired_change(verdicts[False], verdicts[True])

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data: settings, per-group and overall summaries, and every answer."""
        table = {
            group: {_cell_name(cell): dataclasses.asdict(self.cell(cell, group)) for cell in CELLS}
            for group in self.groups
        }

        def paired_by_condition(group: str | None) -> dict[str, Any]:
            return {
                _condition_name(present): dataclasses.asdict(self.paired(present, group)) for present in (False, True)
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
                "answers": [dataclasses.asdict(answer) for answer in self.answers],
            }
        )


@dataclass(frozen=True, eq=False)
class Reference:
    """The model whose perplexity judges answers (a Hugging Face causal LM and its tokenizer)."""

    model: Any
    tokenizer: Any
    name: str


def _condition_name(instruction_in_prompt: bool) -> str:
    return f"{'with' if instruction_in_prompt else 'without'}_instruction"


def _cell_name(cell: Cell) -> str:
    return f"{_condition_name(cell.instruction_in_prompt)}/{'steered' if cell.steered else 'unsteered'}"


def json_safe(value: Any) -> Any:
    """NaN and infinities become null, tuples lists, so the JSON is valid everywhere."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


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
    )


def recipe_items(recipe: Any, split: str = "test", limit: int | None = None) -> list[EvalItem]:
    """One item per prompt pair of ``split`` for every instruction in the recipe (at most ``limit`` each)."""
    from nsteer.workflow import instruction_splits, resolve_instruction

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


@dataclass(frozen=True)
class IFEvalRecord:
    """One line of an IFEval-format JSONL file."""

    key: str
    prompt: str
    checks: tuple[CheckSpec, ...]
    prompt_without_instruction: str | None
    line: int


def read_ifeval_jsonl(path: str | Path) -> list[IFEvalRecord]:
    """Parse an IFEval JSONL file (key, prompt, instruction_id_list, kwargs, optional prompt_without_instruction)."""
    path = Path(path)
    hint = "Give a JSONL file with one prompt per line."
    text = read_text(path, "IFEval data file", EvaluationError, limit=MAX_DATA_BYTES, hint=hint)
    records: list[IFEvalRecord] = []
    seen: set[str] = set()
    for number, line in text_lines(text, path, "IFEval data file", EvaluationError):
        record = _ifeval_record(line, number, path)
        if record.key in seen:
            raise EvaluationError(f"{path}, line {number}: the key {record.key!r} appears twice; keys must be unique.")
        seen.add(record.key)
        records.append(record)
    if not records:
        raise EvaluationError(f"{path}: the file holds no records; it needs one JSON object per line.")
    return records


def _ifeval_record(line: str, number: int, path: Path) -> IFEvalRecord:
    where = f"{path}, line {number}"
    expected = "expected an object with key, prompt, instruction_id_list and kwargs"
    try:
        data = parse_json(line)
    except ValueError as error:
        raise EvaluationError(f"{where}: not valid JSON ({error.msg}); {expected}.") from None
    if not isinstance(data, dict):
        raise EvaluationError(f"{where}: {expected}, got {type(data).__name__}.")
    missing = [name for name in ("key", "prompt", "instruction_id_list", "kwargs") if name not in data]
    if missing:
        raise EvaluationError(f"{where}: missing {', '.join(missing)}; {expected}.")
    key, prompt, ids, kwargs = data["key"], data["prompt"], data["instruction_id_list"], data["kwargs"]
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise EvaluationError(f"{where}: key must be a string or an integer, got {key!r}.")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EvaluationError(f"{where}: prompt must be a non-empty string.")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise EvaluationError(f"{where}: instruction_id_list must be a non-empty list of IFEval ids.")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise EvaluationError(
            f"{where}: kwargs must be a list of {len(ids)} object(s), one per entry of instruction_id_list."
        )
    without = data.get("prompt_without_instruction")
    if without is not None and (not isinstance(without, str) or not without.strip()):
        raise EvaluationError(f"{where}: prompt_without_instruction must be a non-empty string when given.")
    checks = tuple(CheckSpec(i, k) for i, k in zip(ids, kwargs))
    for spec in checks:
        try:
            validate_spec(spec)
        except EvaluationError as error:
            raise EvaluationError(f"{where}: {error}") from None
    return IFEvalRecord(str(key), prompt, checks, without, number)


def ifeval_items(records: Sequence[IFEvalRecord], recipe: Any, limit: int | None = None) -> tuple[list[EvalItem], int]:
    """Map each record to the recipe instructions that share one of its check ids; returns items and the skip count.

    Where several recipe instructions share a check id (``include:ocean``, ``include:brave``), only those whose
    check kwargs equal the record's are matched. A record is scored against all its checks (IFEval's prompt level).
    """
    from nsteer.workflow import resolve_instruction

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


def instruction_edits(recipe: Any, vectors: Mapping[str, Any]) -> dict[str, tuple[Edit, ...]]:
    """Each recipe instruction's edits (its steer entries, in recipe order); empty where none steers it."""
    from nsteer.workflow import steer_entry_edit

    found: dict[str, list[Edit]] = {name: [] for name in recipe.instructions}
    for index, entry in enumerate(recipe.steer):
        edit = steer_entry_edit(recipe, vectors, index)
        if edit is not None:
            found[entry.instruction].append(edit)
    return {name: tuple(edits) for name, edits in found.items()}


def describe_edits(edits: Sequence[Edit]) -> str:
    """``lowercase@14 set w=1`` for each edit, or ``none``."""
    return ", ".join(f"{e.name}@{e.layer} {e.mode} w={e.weight:g} ({e.positions})" for e in edits) or "none"


def open_reference(recipe: Any, handle: ModelHandle) -> Reference | None:
    """The recipe's reference model for perplexity: evaluation.reference_model, else the model itself when local."""
    from nsteer.models import open_model

    name = recipe.evaluation.reference_model
    if name is None or (name == handle.model_id and not handle.remote):
        return None if handle.remote else Reference(handle.hf_model, handle.tokenizer, handle.model_id)
    reference = open_model(name, dtype=recipe.model.dtype, device=recipe.model.device)
    return Reference(reference.hf_model, reference.tokenizer, name)


def edit_signature(edit: Edit) -> list[Any]:
    """What makes an edit's output differ: name, layer, mode, weight, positions, target and a hash of the direction."""
    digest = hashlib.sha256(edit.direction.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    return [edit.name, edit.layer, edit.mode, edit.weight, edit.positions, round(edit.target, 6), digest]


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
    unsteered ones (not generated twice). With ``checkpoint`` (a JSONL path) finished groups are reused on a rerun.
    """
    generator = generator or generate
    started = time.monotonic()
    finished = read_checkpoint(checkpoint) if checkpoint else {}
    by_group: dict[str, list[EvalItem]] = {}
    for item in items:
        by_group.setdefault(item.group, []).append(item)
    answers: list[Answer] = []
    steering: dict[str, str] = {}
    unsteered_answers: dict[str, str] = {}
    for group, group_items in by_group.items():
        group_edits = [edit for name in group_items[0].instructions for edit in edits.get(name, ())]
        steering[group] = describe_edits(group_edits)
        rows = [
            (item, cell)
            for item in group_items
            for cell in CELLS
            if (cell.instruction_in_prompt or item.prompt_without is not None) and (not cell.steered or group_edits)
        ]
        prompts = [_prompt(item, cell) for item, cell in rows]
        row_edits = [list(group_edits) if cell.steered else [] for _, cell in rows]
        key = cell_key(
            kind="eval",
            model=handle.weights_fingerprint or handle.model_id,
            group=group,
            prompts=prompts,
            edits=[edit_signature(e) for e in group_edits],
            steered=[cell.steered for _, cell in rows],
            config=dataclasses.asdict(config),
        )
        if key in finished:
            texts = list(finished[key]["answers"])
        else:
            # Greedy answers to an unsteered prompt already answered for another group are reused, not regenerated
            # (instructions share their base prompts, so the no-instruction, unsteered cells often coincide).
            reuse = {} if config.do_sample else unsteered_answers
            todo = [i for i, (prompt, edits_) in enumerate(zip(prompts, row_edits)) if edits_ or prompt not in reuse]
            fresh = (
                generator(
                    handle,
                    [prompts[i] for i in todo],
                    row_edits=[row_edits[i] for i in todo],
                    config=config,
                    progress=progress(f"eval {group}") if progress else None,
                )
                if todo
                else []
            )
            if len(fresh) != len(todo):
                raise EvaluationError(f"The generator returned {len(fresh)} answers for {len(todo)} prompts.")
            made = dict(zip(todo, fresh))
            texts = [made[i] if i in made else reuse[prompt] for i, prompt in enumerate(prompts)]
            if checkpoint:
                append_checkpoint(checkpoint, {"key": key, "group": group, "answers": list(texts)})
        unsteered_answers.update((prompt, text) for prompt, text, e in zip(prompts, texts, row_edits) if not e)
        generated = {(item.key, cell): text for (item, cell), text in zip(rows, texts)}
        scored_rows = []
        for item in group_items:
            for cell in CELLS:
                if not cell.instruction_in_prompt and item.prompt_without is None:
                    continue
                source_cell = cell if group_edits else Cell(cell.instruction_in_prompt, False)
                scored_rows.append((item, cell, generated[(item.key, source_cell)]))
        answers.extend(_score_rows(scored_rows, reference, judge))
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


def _prompt(item: EvalItem, cell: Cell) -> str:
    prompt = item.prompt_with if cell.instruction_in_prompt else item.prompt_without
    assert prompt is not None
    return prompt


def _score_rows(
    rows: Sequence[tuple[EvalItem, Cell, str]], reference: Reference | None, judge: Judge | None
) -> list[Answer]:
    """Check, measure and (optionally) judge each answer; perplexity is computed once per distinct pair."""
    perplexities: dict[tuple[str, str], float] = {}
    if reference is not None:
        distinct = list(dict.fromkeys((_prompt(item, cell), text) for item, cell, text in rows))
        values = perplexity(reference.model, reference.tokenizer, [p for p, _ in distinct], [a for _, a in distinct])
        perplexities = dict(zip(distinct, values))
    scored = []
    for item, cell, text in rows:
        prompt = _prompt(item, cell)
        results = check_all(item.checks, text, item.prompt_with)
        scored.append(
            Answer(
                key=item.key,
                group=item.group,
                instruction_in_prompt=cell.instruction_in_prompt,
                steered=cell.steered,
                prompt=prompt,
                answer=text,
                strict=all(r.strict for r in results),
                loose=all(r.loose for r in results),
                checks=tuple(
                    {"id": spec.instruction_id, "kwargs": dict(spec.kwargs), "strict": r.strict, "loose": r.loose}
                    for spec, r in zip(item.checks, results)
                ),
                degeneracy=degeneracy(text),
                perplexity=perplexities.get((prompt, text), math.nan),
                sentences=count_sentences(text),
                words=count_words(text),
                judge=float(judge(prompt, text)) if judge is not None else None,
            )
        )
    return scored


def evaluate_recipe(
    recipe: Any,
    handle: ModelHandle,
    *,
    vectors: Mapping[str, Any] | None = None,
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
    from nsteer.workflow import generation_config, load_recipe_vectors

    if vectors is None:
        vectors = load_recipe_vectors(recipe, handle) if recipe.steer else {}
    edits = instruction_edits(recipe, vectors)
    skipped = 0
    if data is not None:
        items, skipped = ifeval_items(read_ifeval_jsonl(data), recipe, limit)
        source = str(data)
    else:
        items, source = recipe_items(recipe, split, limit), f"recipe {recipe.name}"
    if reference is None:
        reference = open_reference(recipe, handle)
    result = evaluate(
        handle,
        items,
        edits,
        config=generation_config(recipe),
        reference=reference,
        judge=judge,
        generator=generator,
        checkpoint=checkpoint,
        progress=progress,
        split=split if data is None else "data",
        source=source,
    )
    notes = {name: _steering_note(recipe, vectors, name) for name in recipe.instructions}
    steering = {group: text if text != "none" else notes.get(group, "none") for group, text in result.steering.items()}
    return dataclasses.replace(result, skipped=skipped, steering=steering)


def _steering_note(recipe: Any, vectors: Mapping[str, Any], name: str) -> str:
    """Why an instruction is not steered: no steer entry, or the search chose no steering."""
    for entry in recipe.steer:
        if entry.instruction == name and entry.layer == "auto":
            chosen = vectors[entry.vector or entry.instruction].choice(entry.instruction) or {}
            if chosen.get("no_steering"):
                return "none (search chose no steering)"
    return "none (no steer entry)"


__all__ = [
    "CELLS",
    "Answer",
    "Cell",
    "CellSummary",
    "EvalItem",
    "EvaluationResult",
    "IFEvalRecord",
    "PairedChange",
    "Reference",
    "describe_edits",
    "evaluate",
    "evaluate_recipe",
    "ifeval_items",
    "instruction_edits",
    "open_reference",
    "paired_change",
    "read_ifeval_jsonl",
    "recipe_items",
    "sign_test",
    "summarize",
]
