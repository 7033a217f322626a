"""Generate -> checkpoint -> score, written once: the loop behind the 2x2 table, composition and the layer search.

A caller hands in :class:`Unit` s — rows (a prompt, the edits that steer it, the checks that judge it) generated
together and checkpointed under one key — and gets back every row's answer with its scores. The caller decides what a
unit is (a table group, one instruction's composition rows, one search setting, one generation batch of many
settings) and how many units share one generator call (``per_call``: 1 checkpoints each unit as soon as it is done;
``None`` sends every unfinished unit in one call, which on NDIF is one request).

- **Checkpoint.** A unit's key hashes everything its answers depend on: the model's weights, every prompt and every
  row's edits (direction hashes included), and the decoding settings. Finished units are appended to a JSONL
  checkpoint (:mod:`nsteer.evaluate.checkpoint`) as their call returns, so a rerun generates only the rest.
- **Greedy reuse** (``reuse_greedy``): an unsteered row whose prompt an earlier unit already answered unsteered takes
  that answer instead of being generated again (greedy decoding gives the same answer; instructions share their base
  prompts, so the table's no-instruction cells often coincide). Off under sampling.
- **Scores.** Each row's checks (IFEval, strict and loose, judged against ``check_prompt``), degeneracy, sentence and
  word counts, the judge's score when one is given, and the perplexity under the reference model, computed once per
  distinct (prompt, answer) over the whole call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsteer.edits import Edit
from nsteer.errors import EvaluationError
from nsteer.evaluate.checkers import CheckResult, CheckSpec, check_all, count_sentences, count_words
from nsteer.evaluate.checkpoint import append_checkpoint, cell_key, read_checkpoint
from nsteer.evaluate.quality import assess, perplexity
from nsteer.generate import GenerationConfig, check_prompts_fit, generate
from nsteer.models import ModelHandle
from nsteer.progress import ProgressCallback, ProgressFactory

Generator = Callable[..., list[str]]  # generate(handle, prompts, *, row_edits, config, progress) -> answers
Judge = Callable[[str, str], float]  # (prompt, answer) -> score; a user's LLM judge, off by default


@dataclass(frozen=True, eq=False)
class Reference:
    """The model whose perplexity judges answers (a Hugging Face causal LM and its tokenizer)."""

    model: Any
    tokenizer: Any
    name: str


@dataclass(frozen=True, eq=False)
class Row:
    """One answer to generate and score: its prompt, the edits that steer it, the checks that judge it."""

    prompt: str
    edits: tuple[Edit, ...] = ()
    checks: tuple[CheckSpec, ...] = ()
    check_prompt: str | None = None  # the prompt IFEval's checkers see (default: ``prompt``)


@dataclass(frozen=True, eq=False)
class Unit:
    """Rows generated together and checkpointed under one key; ``label`` names its progress bar (units with the same
    label share one) and its checkpoint record."""

    label: str
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class ScoredAnswer:
    """One row's answer with everything needed to judge or re-score it."""

    prompt: str
    answer: str
    checks: tuple[CheckResult, ...]  # one per check of the row, in its order
    degeneracy: str | None
    perplexity: float  # NaN when the answer is empty or no reference model is set
    sentences: int
    words: int
    judge: float | None = None
    hollow: str | None = None  # the requested structure with almost no content (why), see nsteer.evaluate.quality
    echo: str | None = None  # the prompt restated with next to nothing of its own (why)

    @property
    def sound(self) -> bool:
        """The answer is neither degenerate nor hollow nor an echo of the prompt (whatever the checks say)."""
        return self.degeneracy is None and self.hollow is None and self.echo is None

    @property
    def substantive(self) -> bool:
        """A substantive pass: every check passes (loose) on a sound answer."""
        return self.loose and self.sound

    @property
    def strict(self) -> bool:
        """Every check passes under IFEval's strict scoring (IFEval's prompt level)."""
        return all(result.strict for result in self.checks)

    @property
    def loose(self) -> bool:
        """Every check passes under IFEval's loose scoring."""
        return all(result.loose for result in self.checks)


def edit_signature(edit: Edit) -> list[Any]:
    """What makes an edit's output differ: name, layer, mode, weight, positions, target, a hash of the direction, and
    the gate, clamp and skip-first when the edit has them."""
    digest = hashlib.sha256(edit.direction.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    signature = [edit.name, edit.layer, edit.mode, edit.weight, edit.positions, round(edit.target, 6), digest]
    # Gate, clamp and skip-first only when used, so the keys of edits without them stay what they were.
    if edit.gate is not None:
        gate_direction = edit.gate_direction if edit.gate_direction is not None else edit.direction
        gate_digest = hashlib.sha256(gate_direction.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
        signature += ["gate", edit.gate, gate_digest]
    if edit.bound is not None:
        signature += ["bound", edit.bound]
    if edit.skip_first:
        signature += ["skip_first"]
    return signature


def unit_key(handle: ModelHandle, unit: Unit, config: GenerationConfig, kind: str) -> str:
    """The checkpoint key of ``unit``: the model, every prompt, every row's edits and the decoding settings."""
    signatures: dict[int, list[Any]] = {}  # an edit shared by many rows is hashed once
    return cell_key(
        kind=kind,
        model=handle.run_identity,
        prompts=[row.prompt for row in unit.rows],
        edits=[[signatures.setdefault(id(edit), edit_signature(edit)) for edit in row.edits] for row in unit.rows],
        config=dataclasses.asdict(config),
    )


@dataclass
class _Bars:
    """One progress bar per unit label, counting rows over every unit with that label."""

    factory: ProgressFactory | None
    totals: dict[str, int] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)
    bars: dict[str, ProgressCallback] = field(default_factory=dict)

    def advance(self, label: str, rows: int) -> None:
        self.done[label] = self.done.get(label, 0) + rows
        self.show(label, self.done[label])

    def show(self, label: str, done: int) -> None:
        if self.factory is None:
            return
        if label not in self.bars:
            self.bars[label] = self.factory(label)
        self.bars[label](done, self.totals[label])

    def during(self, label: str) -> ProgressCallback | None:
        """A generator's progress callback for a call whose rows count under ``label``."""
        if self.factory is None:
            return None
        offset = self.done.get(label, 0)
        return lambda count, _total: self.show(label, offset + count)


def run_units(
    handle: ModelHandle,
    units: Sequence[Unit],
    *,
    kind: str,
    config: GenerationConfig = GenerationConfig(),
    generator: Generator | None = None,
    reference: Reference | None = None,
    judge: Judge | None = None,
    checkpoint: Path | None = None,
    progress: ProgressFactory | None = None,
    per_call: int | None = 1,
    reuse_greedy: bool = False,
) -> list[tuple[ScoredAnswer, ...]]:
    """Generate (or take from the checkpoint) every unit's answers, then score them; one tuple per unit, in order.

    ``kind`` names the caller in checkpoint keys (``eval``, ``composition``, ``search``), so callers sharing one
    checkpoint file never take each other's answers.
    """
    answers = generate_units(
        handle,
        units,
        kind=kind,
        config=config,
        generator=generator,
        checkpoint=checkpoint,
        progress=progress,
        per_call=per_call,
        reuse_greedy=reuse_greedy,
    )
    return score_units(units, answers, reference=reference, judge=judge)


def generate_units(
    handle: ModelHandle,
    units: Sequence[Unit],
    *,
    kind: str,
    config: GenerationConfig = GenerationConfig(),
    generator: Generator | None = None,
    checkpoint: Path | None = None,
    progress: ProgressFactory | None = None,
    per_call: int | None = 1,
    reuse_greedy: bool = False,
) -> list[list[str]]:
    """Every unit's answers, in order: from the checkpoint where finished, else generated and checkpointed."""
    if per_call is not None and per_call < 1:
        raise EvaluationError(f"per_call must be at least 1 (or None for one call), got {per_call}.")
    generator = generator or generate
    finished = read_checkpoint(checkpoint) if checkpoint else {}
    keys = [unit_key(handle, unit, config, kind) for unit in units]
    answers: list[list[str] | None] = [None] * len(units)
    reuse: dict[str, str] = {}  # prompt -> greedy unsteered answer of an earlier unit
    greedy = reuse_greedy and not config.do_sample
    bars = _Bars(progress)
    for unit in units:
        bars.totals[unit.label] = bars.totals.get(unit.label, 0) + len(unit.rows)

    def finish(index: int, texts: list[str]) -> None:
        answers[index] = texts
        if greedy:
            reuse.update((row.prompt, text) for row, text in zip(units[index].rows, texts) if not row.edits)

    pending: list[int] = []
    for index, (unit, key) in enumerate(zip(units, keys)):
        record = finished.get(key)
        if record is not None and _holds_answers(record, len(unit.rows), config.max_new_tokens * MAX_TOKEN_CHARS):
            finish(index, list(record["answers"]))
            bars.advance(unit.label, len(unit.rows))
        else:
            pending.append(index)
    # Every prompt still to answer is checked against the model's context before the first call: an over-long one
    # stops the run before it starts, not after hours of answers.
    check_prompts_fit(handle, [row.prompt for index in pending for row in units[index].rows], config)
    size = len(pending) if per_call is None else per_call
    for start in range(0, len(pending), max(size, 1)):
        call = pending[start : start + size]
        # Rows of this call that must be generated; the others take an earlier unit's greedy answer.
        todo = [
            (index, number)
            for index in call
            for number, row in enumerate(units[index].rows)
            if row.edits or row.prompt not in reuse
        ]
        label = units[call[0]].label
        fresh = (
            generator(
                handle,
                [units[index].rows[number].prompt for index, number in todo],
                row_edits=[list(units[index].rows[number].edits) for index, number in todo],
                config=config,
                progress=bars.during(label),
            )
            if todo
            else []
        )
        if len(fresh) != len(todo):
            raise EvaluationError(f"The generator returned {len(fresh)} answers for {len(todo)} prompts.")
        made = dict(zip(todo, fresh))
        for index in call:
            unit = units[index]
            texts = [
                made[(index, number)] if (index, number) in made else reuse[row.prompt]
                for number, row in enumerate(unit.rows)
            ]
            if checkpoint is not None:
                append_checkpoint(checkpoint, {"key": keys[index], "label": unit.label, "answers": texts})
            finish(index, texts)
            bars.advance(unit.label, len(unit.rows))
    return [list(texts or ()) for texts in answers]


# No vocabulary's token decodes to more characters than this: a longer cached answer is not one the model gave.
MAX_TOKEN_CHARS = 256


def _holds_answers(record: Mapping[str, Any], count: int, max_chars: int) -> bool:
    """Whether a checkpoint record holds ``count`` answers as strings of at most ``max_chars`` characters (a damaged
    record is generated again; an answer of up to 256 MiB from someone else's checkpoint line took minutes to score)."""
    texts = record.get("answers")
    return (
        isinstance(texts, list)
        and len(texts) == count
        and all(isinstance(text, str) and len(text) <= max_chars for text in texts)
    )


def score_units(
    units: Sequence[Unit],
    answers: Sequence[Sequence[str]],
    *,
    reference: Reference | None = None,
    judge: Judge | None = None,
) -> list[tuple[ScoredAnswer, ...]]:
    """Score each unit's answers (see the module doc); perplexity once per distinct (prompt, answer)."""
    scored = [
        tuple(score_answer(row, text, math.nan, judge) for row, text in zip(unit.rows, texts))
        for unit, texts in zip(units, answers)
    ]
    return scored if reference is None else with_perplexity(scored, reference)


def with_perplexity(groups: Sequence[Sequence[ScoredAnswer]], reference: Reference) -> list[tuple[ScoredAnswer, ...]]:
    """The same answers with their perplexity under ``reference``, computed once per distinct (prompt, answer)."""
    distinct = list(dict.fromkeys((answer.prompt, answer.answer) for group in groups for answer in group))
    values = perplexity(reference.model, reference.tokenizer, [p for p, _ in distinct], [a for _, a in distinct])
    perplexities = dict(zip(distinct, values))
    return [
        tuple(dataclasses.replace(answer, perplexity=perplexities[(answer.prompt, answer.answer)]) for answer in group)
        for group in groups
    ]


def score_answer(row: Row, text: str, perplexity_value: float, judge: Judge | None = None) -> ScoredAnswer:
    """Check, count, assess the quality of and (optionally) judge one answer."""
    check_prompt = row.prompt if row.check_prompt is None else row.check_prompt
    quality = assess(text, check_prompt)  # echo against the prompt with the instruction, in both cells
    return ScoredAnswer(
        prompt=row.prompt,
        answer=text,
        checks=check_all(row.checks, text, check_prompt),
        degeneracy=quality.degenerate,
        hollow=quality.hollow,
        echo=quality.echo,
        perplexity=perplexity_value,
        sentences=count_sentences(text),
        words=count_words(text),
        judge=float(judge(row.prompt, text)) if judge is not None else None,
    )
