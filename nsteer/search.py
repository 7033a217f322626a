"""Layer and (for ``add``) weight search on the validation split, with a quality guard and "no steering" as a candidate.

For every steer entry with ``layer: auto`` the sweep generates answers to the instruction's validation prompts under
no steering (the baseline) and under each candidate setting, scores them with the loose IFEval checker, and applies
the guard. The rule, exactly: a steered setting is rejected when

- its share of degenerate answers exceeds the baseline's share by more than ``search.margin``, or
- ``search.min_perplexity_ratio > 0`` and the median perplexity of its answers under the reference model is below
  ``min_perplexity_ratio`` times the baseline's median (repetitive text is improbably predictable).

A steered setting can win only if the guard accepts it and it has more substantive passes (loose passes that are
neither degenerate, nor hollow, nor an echo of the prompt: ``evaluate/quality.py``) than the baseline; among those,
the winner has the most substantive passes, then the highest loose, then strict accuracy, and the first in sweep
order wins a tie. Without such a setting, no steering wins. The winner is written into the vector file's metadata. Only
the validation split is ever read.

**One batched sweep.** Every entry's candidates are generated together: each candidate is one Edit shared by all of
its rows, the rows of every entry and candidate (the unsteered ones included) are ordered by prompt length and cut
into batches of ``generation.batch_size``, and each batch steers each of its rows by that row's own edit. The
unsteered answer depends only on the prompt, so entries whose validation prompts coincide (the same base prompts,
instruction absent) share it. Each finished batch goes to a JSONL checkpoint, so an interrupted sweep resumes at the
first unfinished batch. On NDIF the same batches travel in as few requests as the backend allows.

**Perplexity where it can decide.** The perplexity rule only ever rejects, so it can change the winner only by
rejecting it. The reference model scores the answers of the setting that would win if it passed (best-ranked first)
together with its entry's baseline answers, each distinct answer once; only when the rule rejects that setting is the
next one scored, and so on. The winner is the one scoring every answer would give (perplexities batched differently
may differ in their last bits); the settings never scored report no median perplexity (n/a).

**Successive halving** (``search.halving``), exactly: round 1 scores every candidate and the baseline on the first
``halving_start`` validation pairs (under the search's condition: with ``both``, each pair gives two prompts); each
next round doubles the pairs seen, the last round ends at all of them (``max_prompts``). After every round but the last,
each entry ranks its remaining candidates on all the pairs seen so far by substantive passes, then loose, then strict,
ties in sweep order, and keeps the better half, rounded up; the baseline always stays. The guard is not applied to a
partial slice (one looping answer in eight is already over a 0.1 margin): a looping answer is never a substantive
pass, so such settings rank low anyway, and the guard judges the survivors on every prompt. Dropped candidates keep
their partial scores in the report and cannot win: the winner is chosen by the rule above among the candidates scored
on every validation prompt.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsteer.edits import Edit, EditOptions, relative_weight, vector_edits
from nsteer.errors import EvaluationError
from nsteer.evaluate.checkers import CheckSpec
from nsteer.evaluate.inputs import open_reference
from nsteer.evaluate.runner import (
    Generator,
    Reference,
    Row,
    ScoredAnswer,
    Unit,
    generate_units,
    score_units,
    with_perplexity,
)
from nsteer.extract import fitted_token_ids
from nsteer.generate import GenerationConfig, generate
from nsteer.models import ModelHandle
from nsteer.pipeline import (
    center_names,
    entry_options,
    generation_config,
    instruction_splits,
    load_recipe_vectors,
    recipe_center,
    resolve_instruction,
    steer_vector_path,
)
from nsteer.progress import ProgressFactory
from nsteer.prompts import PromptPair
from nsteer.recipe import Recipe, RelativeWeight, SearchWeights
from nsteer.searched import SearchedSetting
from nsteer.throughput import Metered, handle_rate_key, record_run
from nsteer.vectors import SteeringVector, record_choice

CHECKPOINT_NAME = "cells.jsonl"


@dataclass(frozen=True)
class Setting:
    """One candidate: a layer, mode, weight and positions; ``layer=None`` is "no steering".

    ``weight`` is what the edit applies; ``relative`` is the k it came from when it was given on the vector's scale
    (``weight = k × ‖u_l‖``), None for an absolute weight. ``target_scale`` k makes a ``set`` target k × z_l.
    """

    layer: int | None
    mode: str = "set"
    weight: float = 1.0
    positions: str = "all"
    relative: float | None = None
    target_scale: float = 1.0
    options: EditOptions = EditOptions()  # the entry's block, gate, clamp, skip-first and direction

    @property
    def no_steering(self) -> bool:
        """Whether this is the unsteered baseline."""
        return self.layer is None

    @property
    def weight_label(self) -> str:
        """``w=1``, or ``w=0.5×‖u‖=22.6`` for a weight on the vector's scale (plus ``z×1.2`` for a scaled target)."""
        text = f"w={self.weight:g}" if self.relative is None else f"w={self.relative:g}×‖u‖={self.weight:.3g}"
        return text + (f" z×{self.target_scale:g}" if self.target_scale != 1.0 else "")

    @property
    def label(self) -> str:
        """``no steering`` or ``layer 14 set w=1``."""
        if self.layer is None:
            return "no steering"
        options = f" ({self.options.label})" if self.options.label else ""
        return f"layer {self.layer} {self.mode} {self.weight_label}{options}"


@dataclass(frozen=True)
class SweepCell:
    """One setting's validation answers and scores; ``rejected`` says why the guard refused it (None: accepted)."""

    setting: Setting
    loose: float
    strict: float
    degenerate_share: float
    median_perplexity: float
    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    perplexities: tuple[float, ...]
    rejected: str | None = None
    substantive: float = math.nan  # share of substantive passes: loose, neither degenerate nor hollow nor an echo
    dropped: str | None = None  # successive halving left it out before the full validation set (why, in words)

    @property
    def n(self) -> int:
        """Number of validation answers."""
        return len(self.answers)


@dataclass(frozen=True)
class InstructionSweep:
    """The sweep of one steer entry: baseline, every candidate, the winner and the rule that chose it."""

    instruction: str
    steer_index: int
    vector_path: str
    condition: str
    baseline: SweepCell
    cells: tuple[SweepCell, ...]
    winner: SweepCell
    rule: str


@dataclass(frozen=True)
class SearchResult:
    """Every sweep of a recipe's search."""

    model_id: str
    reference: str
    sweeps: tuple[InstructionSweep, ...]
    elapsed_s: float = 0.0


def candidate_layers(n_layers: int, layers: Sequence[int] | None = None, step: int = 2) -> list[int]:
    """The given layers, or the default range ``n_layers // 5`` to the last layer, every ``step``."""
    if layers:
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise EvaluationError(f"search layers {bad} are out of range: the model has layers 0..{n_layers - 1}.")
        return sorted(set(layers))
    return list(range(n_layers // 5, n_layers, step))


def candidate_settings(recipe: Recipe, index: int, vector: SteeringVector, layers: Sequence[int]) -> list[Setting]:
    """The settings swept for steer entry ``index``: for every mode searched (``search.modes``, default the entry's
    own), every candidate layer with every weight, and for ``set`` every target scale.

    ``add`` sweeps ``search.weights`` (relative ks become ``k × ‖u_l‖`` at each layer) unless the entry gives its own
    add weight; ``set`` sweeps ``search.target_scales`` unless the entry gives its own; ``set`` and ``ablate`` keep
    the entry's weight when they are its mode, else weight 1.
    """
    entry, search = recipe.steer[index], recipe.search
    own, options = entry.mode, entry_options(entry)
    n_layers = vector.directions.shape[0]
    fitting = [layer for layer in layers if layer + options.block <= n_layers]  # the whole block fits in the model
    if layers and not fitting:  # else the search would record "no steering" having tried nothing
        raise recipe.error(
            ("steer", index, "block"),
            f"a block of {options.block} layers fits after none of the searched layers {list(layers)}: the model has "
            f"layers 0..{n_layers - 1}, "
            + (
                f"so the block starts at layer {n_layers - options.block} or earlier. Search earlier layers or "
                "shorten the block."
                if options.block <= n_layers
                else f"fewer than the block. Make the block {n_layers} layers or shorter."
            ),
        )
    candidates = []
    # A value listed twice (weights: [1, 1.0], modes: [add, add]) is swept once: each copy was a full extra cell.
    for mode in dict.fromkeys(search.modes or [own]):
        weights: list[tuple[float, bool]]
        if mode == own and ("weight" in entry.model_fields_set or mode != "add"):
            given = entry.weight
            weights = [(given.relative, True) if isinstance(given, RelativeWeight) else (given, False)]
        elif mode != "add":
            weights = [(1.0, False)]
        elif isinstance(search.weights, SearchWeights):
            weights = [(k, True) for k in search.weights.relative]
        else:
            weights = [(weight, False) for weight in search.weights]
        if mode != "set":
            scales = [1.0]
        elif mode == own and "target_scale" in entry.model_fields_set:
            scales = [entry.target_scale]
        else:
            scales = list(search.target_scales)
        weights, scales = list(dict.fromkeys(weights)), list(dict.fromkeys(scales))
        candidates += [
            Setting(
                layer,
                mode,
                relative_weight(vector, layer, weight) if relative else float(weight),
                entry.positions,
                relative=float(weight) if relative else None,
                target_scale=float(scale),
                options=options,
            )
            for layer in fitting
            for weight, relative in weights
            for scale in scales
        ]
    return candidates


def guard_rule(margin: float, min_perplexity_ratio: float) -> str:
    """The guard's rule in words, as recorded with the result."""
    rule = f"reject if degenerate share > baseline share + {margin:g}"
    if min_perplexity_ratio > 0:
        rule += (
            f", or median perplexity < {min_perplexity_ratio:g} x baseline median (measured best-ranked setting first,"
            " until one passes)"
        )
    needs = "; a steered setting needs more substantive passes than no steering"
    return rule + needs + "; most substantive, then loose, then strict wins"


def guard(cell: SweepCell, baseline: SweepCell, margin: float, min_perplexity_ratio: float) -> str | None:
    """Why the quality guard rejects ``cell`` against ``baseline``, or None when it passes (see the module doc)."""
    if cell.setting.no_steering:
        return None
    if cell.degenerate_share > baseline.degenerate_share + margin + 1e-12:
        return f"degenerate {cell.degenerate_share:.0%} > baseline {baseline.degenerate_share:.0%} + {margin:g}"
    if (
        min_perplexity_ratio > 0
        and math.isfinite(cell.median_perplexity)
        and math.isfinite(baseline.median_perplexity)
        and cell.median_perplexity < min_perplexity_ratio * baseline.median_perplexity
    ):
        return (
            f"median perplexity {cell.median_perplexity:.2f} < {min_perplexity_ratio:g} x baseline "
            f"{baseline.median_perplexity:.2f}"
        )
    return None


def choose(baseline: SweepCell, cells: Sequence[SweepCell]) -> SweepCell:
    """The winner: the baseline unless an accepted setting judged on every validation prompt (not dropped by
    successive halving) has more substantive passes than the baseline (passes on looping, hollow or echoing answers
    do not justify steering) and, among such settings, the highest (substantive, loose, strict) scores."""
    best = baseline
    for cell in cells:
        if cell.rejected is not None or cell.dropped is not None or not beats_baseline(cell, baseline):
            continue
        if best is baseline or rank_key(cell) > rank_key(best):
            best = cell
    return best


def beats_baseline(cell: SweepCell, baseline: SweepCell) -> bool:
    """More substantive passes than no steering; where either share was not measured (NaN), more loose passes."""
    if math.isfinite(cell.substantive) and math.isfinite(baseline.substantive):
        return cell.substantive > baseline.substantive
    return cell.loose > baseline.loose


def rank_key(cell: SweepCell) -> tuple[float, float, float]:
    """What a setting is ranked by: substantive passes, then loose, then strict accuracy (NaN ranks lowest)."""
    substantive = cell.substantive if math.isfinite(cell.substantive) else -1.0
    return (substantive, cell.loose, cell.strict)


def searched_weights(settings: Sequence[Setting]) -> tuple[list[float], bool]:
    """The weights a sweep tried, in order, and whether they are ks on the vector's scale (else absolute)."""
    relative = any(setting.relative is not None for setting in settings)
    weights = dict.fromkeys(setting.relative if relative else setting.weight for setting in settings)
    return [float(weight) for weight in weights if weight is not None], relative


def searched_setting(
    sweep: InstructionSweep, layers: Sequence[int], centered_on: Sequence[str] | None = None
) -> SearchedSetting:
    """The record of this sweep's winner that goes into the vector file (its ``chosen`` or ``chosen_for`` entry).

    ``weight`` is always the absolute weight the winner applied; ``weight_relative`` is its k when the weights were
    searched on the vector's scale (``weights_searched`` then lists the ks, with ``weights_relative``).
    ``centered_on`` names the vectors a centered direction was taken against (recorded only for a centered winner).
    """
    winner, setting = sweep.winner, sweep.winner.setting
    weights, relative = searched_weights([cell.setting for cell in sweep.cells])
    return SearchedSetting(
        layer=setting.layer,
        mode=setting.mode,
        weight=setting.weight,
        weight_relative=setting.relative,
        target_scale=setting.target_scale,
        positions=setting.positions,
        block=setting.options.block,
        gate=setting.options.gate,
        clamp=setting.options.clamp,
        skip_first=setting.options.skip_first,
        centered=setting.options.centered,
        centered_on=tuple(sorted(centered_on)) if centered_on is not None and setting.options.centered else None,
        score=winner.loose,
        strict_score=winner.strict,
        degenerate_share=winner.degenerate_share,
        baseline_score=sweep.baseline.loose,
        baseline_degenerate_share=sweep.baseline.degenerate_share,
        substantive_score=_share_or_none(winner.substantive),
        baseline_substantive_score=_share_or_none(sweep.baseline.substantive),
        split="validation",
        condition=sweep.condition,
        n_prompts=winner.n,
        layers_searched=tuple(layers),
        weights_searched=tuple(weights),
        weights_relative=relative,
        target_scales_searched=tuple(dict.fromkeys(cell.setting.target_scale for cell in sweep.cells)),
        modes_searched=tuple(dict.fromkeys(cell.setting.mode for cell in sweep.cells)),
        rule=sweep.rule,
    )


def _share_or_none(value: float) -> float | None:
    """A share for the record, None where none was measured (NaN)."""
    return value if math.isfinite(value) else None


def validation_pairs(recipe: Recipe, name: str) -> tuple[PromptPair, ...]:
    """The validation pairs of instruction ``name`` the search scores on (the test split is never read)."""
    pairs = instruction_splits(recipe, name).validation[: recipe.search.max_prompts]
    if not pairs:
        raise EvaluationError(
            f"The validation split of '{name}' is empty, so nothing can be searched: "
            "give prompts.split.validation a positive fraction."
        )
    return tuple(pairs)


def condition_prompts(pairs: Sequence[PromptPair], condition: str) -> list[str]:
    """The prompts of ``pairs`` under the search's condition: without the instruction, with it, or both."""
    without = [pair.without_instruction for pair in pairs] if condition in ("absent", "both") else []
    with_ = [pair.with_instruction for pair in pairs] if condition in ("present", "both") else []
    return without + with_


def validation_prompts(recipe: Recipe, name: str) -> list[str]:
    """The validation prompts of instruction ``name`` under the search's condition."""
    return condition_prompts(validation_pairs(recipe, name), recipe.search.condition)


def halving_rounds(pairs: int, start: int | None) -> list[int]:
    """How many validation pairs each round has seen by its end: ``start``, twice that, ... up to ``pairs``
    (``start`` None: one round on all of them)."""
    if start is None or start >= pairs:
        return [pairs]
    rounds = [start]
    while rounds[-1] * 2 < pairs:
        rounds.append(rounds[-1] * 2)
    return [*rounds, pairs]


def survivors_after(count: int) -> int:
    """Steered settings kept by a halving round that ranked ``count`` of them: the better half, rounded up."""
    return math.ceil(count / 2)


@dataclass(frozen=True, eq=False)
class _Entry:
    """One searched entry while it is swept: its check, validation pairs, candidates and one Edit per candidate."""

    index: int
    instruction: str
    spec: CheckSpec
    pairs: tuple[PromptPair, ...]
    baseline: Setting
    settings: tuple[Setting, ...]
    # edits[i] steers settings[i] (one Edit per layer of its block), shared by all of its rows: a batch holds each once
    edits: tuple[tuple[Edit, ...], ...]


def _generate_rows(
    handle: ModelHandle,
    rows: Sequence[tuple[str, tuple[Edit, ...]]],
    *,
    config: GenerationConfig,
    generator: Generator | None,
    checkpoint: Path | None,
    progress: ProgressFactory | None,
    label: str,
) -> dict[tuple[str, int], str]:
    """Answers to ``(prompt, edits)`` rows (``()``: unsteered), keyed by ``(prompt, id(edits))``; each distinct row
    once.

    Rows, ordered by prompt length, go into units of ``generation.batch_size`` (the last may be short): one
    generation batch each, checkpointed as it finishes, so an interrupted sweep resumes at the first unfinished
    batch. On NDIF all units travel in one call (grouped into as few requests as the backend allows).
    """
    distinct = list(dict.fromkeys((prompt, edits) for prompt, edits in rows))
    # Rows of similar prompt length share a batch: every row is padded to its batch's longest prompt, and the pooled
    # rows may go in any order because an answer does not depend on the rows beside it. On the format recipe this cuts
    # the padded prompt tokens at batch 64 from 1.55x the real ones to 1.03x. Stable: sweep order within a length.
    length = {
        prompt: len(
            fitted_token_ids(handle, prompt, new_tokens=config.max_new_tokens, truncate=config.truncate_prompts)
        )
        for prompt in dict.fromkeys(prompt for prompt, _ in distinct)
    }
    distinct.sort(key=lambda row: length[row[0]])
    size = config.batch_size
    units = [
        Unit(
            label,
            tuple(Row(prompt, edits) for prompt, edits in distinct[start : start + size]),
        )
        for start in range(0, len(distinct), size)
    ]
    answers = generate_units(
        handle,
        units,
        kind="search",
        config=config,
        generator=generator,
        checkpoint=checkpoint,
        progress=progress,
        per_call=None if handle.remote else 1,
    )
    texts = [text for unit_answers in answers for text in unit_answers]
    return {(prompt, id(edits)): text for (prompt, edits), text in zip(distinct, texts)}


def _sweep(
    handle: ModelHandle,
    entries: Sequence[_Entry],
    *,
    condition: str,
    halving_start: int | None,
    margin: float,
    min_perplexity_ratio: float,
    config: GenerationConfig,
    reference: Reference | None,
    generator: Generator | None,
    checkpoint: Path | None,
    progress: ProgressFactory | None,
) -> dict[int, tuple[SweepCell, list[SweepCell]]]:
    """Baseline and candidate cells of every entry, generated together (see :func:`search_recipe`)."""
    scored: dict[tuple[int, int], list[ScoredAnswer]] = {}  # (entry, setting number or -1 baseline) -> answers
    alive = {entry.index: list(range(len(entry.settings))) for entry in entries}
    dropped: dict[tuple[int, int], str] = {}
    schedule = {entry.index: halving_rounds(len(entry.pairs), halving_start) for entry in entries}
    rounds = max(len(counts) for counts in schedule.values())
    for number in range(rounds):
        # The prompts each entry adds this round (an entry with fewer rounds has finished).
        fresh: dict[int, list[str]] = {}
        for entry in entries:
            counts = schedule[entry.index]
            if number < len(counts):
                seen = counts[number - 1] if number else 0
                fresh[entry.index] = condition_prompts(entry.pairs[seen : counts[number]], condition)
        rows: list[tuple[str, tuple[Edit, ...]]] = []
        for entry in entries:  # the unsteered rows first: instructions with the same prompts share them
            rows += [(prompt, ()) for prompt in fresh.get(entry.index, ())]
        for entry in entries:
            for setting in alive[entry.index]:
                rows += [(prompt, entry.edits[setting]) for prompt in fresh.get(entry.index, ())]
        label = "search" if rounds == 1 else f"search round {number + 1}/{rounds}"
        texts = _generate_rows(
            handle,
            rows,
            config=config,
            generator=generator,
            checkpoint=checkpoint,
            progress=progress,
            label=label,
        )
        # Score per entry and setting (each entry with its own check); perplexity once per distinct answer.
        keys, units, answers = [], [], []
        for entry in entries:
            prompts = fresh.get(entry.index, [])
            if not prompts:
                continue
            for setting in [-1, *alive[entry.index]]:
                edits = () if setting < 0 else entry.edits[setting]
                keys.append((entry.index, setting))
                units.append(Unit(label, tuple(Row(p, edits, (entry.spec,)) for p in prompts)))
                answers.append([texts[(p, id(edits))] for p in prompts])
        # Perplexity comes later, and only where the guard's perplexity rule can change the winner.
        for key, unit_scores in zip(keys, score_units(units, answers, reference=None)):
            scored.setdefault(key, []).extend(unit_scores)
        for entry in entries:
            counts = schedule[entry.index]
            if number >= len(counts) - 1:
                continue  # its last round is done: every survivor has seen every validation prompt
            ranked = []
            for setting in alive[entry.index]:
                answers_so_far = scored[(entry.index, setting)]
                cell = _sweep_cell(entry.settings[setting], [a.prompt for a in answers_so_far], answers_so_far)
                # No guard on a partial slice (see the module doc): it dropped the full sweep's winner for one loop.
                ranked.append(((*rank_key(cell), -setting), setting))
            ranked.sort(reverse=True)
            keep = survivors_after(len(ranked))
            for _, setting in ranked[keep:]:
                dropped[(entry.index, setting)] = (
                    f"dropped by successive halving after {counts[number]} of {len(entry.pairs)} prompt pairs"
                )
            alive[entry.index] = sorted(setting for _, setting in ranked[:keep])
    if reference is not None and min_perplexity_ratio > 0:
        # The perplexity rule only ever rejects, so it can change the winner only by rejecting it. Each pass scores,
        # for every entry still open, the setting that would win if every unscored setting passed the rule (plus the
        # entry's baseline, once); an entry closes when that setting passes, or when no steered setting is left able
        # to win. The winner is the one scoring every answer would give, at the cost of one or two settings' answers.
        unscored = {entry.index: {-1, *range(len(entry.settings))} for entry in entries}
        open_entries = list(entries)
        while open_entries:
            needed, still_open = [], []
            for entry in open_entries:
                baseline, cells = _cells(entry, scored, dropped, margin, min_perplexity_ratio)
                winner = choose(baseline, cells)
                if winner is baseline:
                    continue
                number = next(number for number, cell in enumerate(cells) if cell is winner)
                if number not in unscored[entry.index]:
                    continue  # scored, and it passed
                for key in [-1, number] if -1 in unscored[entry.index] else [number]:
                    unscored[entry.index].discard(key)
                    needed.append((entry.index, key))
                still_open.append(entry)
            if needed:
                for key, answers in zip(needed, with_perplexity([scored[key] for key in needed], reference)):
                    scored[key] = list(answers)
            open_entries = still_open
    return {entry.index: _cells(entry, scored, dropped, margin, min_perplexity_ratio) for entry in entries}


def _cells(
    entry: _Entry,
    scored: Mapping[tuple[int, int], Sequence[ScoredAnswer]],
    dropped: Mapping[tuple[int, int], str],
    margin: float,
    min_perplexity_ratio: float,
) -> tuple[SweepCell, list[SweepCell]]:
    """An entry's baseline cell and its candidates' cells, each judged by the guard."""
    base_answers = scored[(entry.index, -1)]
    baseline = _sweep_cell(entry.baseline, [answer.prompt for answer in base_answers], base_answers)
    cells = []
    for number, setting in enumerate(entry.settings):
        answers_so_far = scored.get((entry.index, number), [])
        cell = _sweep_cell(setting, [a.prompt for a in answers_so_far], answers_so_far)
        cells.append(
            dataclasses.replace(
                cell,
                rejected=guard(cell, baseline, margin, min_perplexity_ratio),
                dropped=dropped.get((entry.index, number)),
            )
        )
    return baseline, cells


def _sweep_cell(setting: Setting, prompts: Sequence[str], answers: Sequence[ScoredAnswer]) -> SweepCell:
    """One setting's scores: loose and strict accuracy, degenerate share, substantive passes, median perplexity."""
    finite = [answer.perplexity for answer in answers if math.isfinite(answer.perplexity)]
    count = max(len(answers), 1)
    return SweepCell(
        setting=setting,
        loose=sum(answer.loose for answer in answers) / count,
        strict=sum(answer.strict for answer in answers) / count,
        degenerate_share=sum(answer.degeneracy is not None for answer in answers) / count,
        median_perplexity=statistics.median(finite) if finite else math.nan,
        prompts=tuple(prompts),
        answers=tuple(answer.answer for answer in answers),
        perplexities=tuple(answer.perplexity for answer in answers),
        substantive=sum(answer.substantive for answer in answers) / count,
    )


@dataclass(frozen=True)
class EntryPlan:
    """What one ``layer: auto`` entry's sweep generates: its candidate settings on its validation prompts."""

    instruction: str
    settings: int  # steered candidates (the no-steering baseline is counted once per prompt, in SearchPlan)
    prompts: tuple[str, ...]
    rounds: tuple[int, ...] = ()  # successive halving: prompts seen by the end of each round (empty: no halving)

    @property
    def halving_answers(self) -> int:
        """Steered answers under successive halving: each round's survivors on that round's new prompts."""
        if not self.rounds:
            return self.settings * len(self.prompts)
        total, alive, seen = 0, self.settings, 0
        for number, count in enumerate(self.rounds):
            total += alive * (count - seen)
            seen = count
            if number < len(self.rounds) - 1:
                alive = survivors_after(alive)
        return total

    def to_dict(self) -> dict[str, Any]:
        """The entry's plan as JSON-ready data (settings count no steering)."""
        settings = self.settings + 1
        data = {
            "instruction": self.instruction,
            "settings": settings,
            "prompts": len(self.prompts),
            "answers": settings * len(self.prompts),
        }
        if self.rounds:
            data["halving_rounds"] = list(self.rounds)
            data["halving_answers"] = self.halving_answers + len(self.prompts)
        return data


@dataclass(frozen=True)
class SearchPlan:
    """The answers a search will generate, before any is: per entry its settings x prompts, plus the baseline.

    The unsteered baseline depends only on the prompt, so entries with the same validation prompts share it: it
    counts once per distinct prompt.
    """

    entries: tuple[EntryPlan, ...]
    max_new_tokens: int
    batch_size: int

    @property
    def steered_answers(self) -> int:
        """Answers under a candidate setting."""
        return sum(entry.settings * len(entry.prompts) for entry in self.entries)

    @property
    def baseline_answers(self) -> int:
        """Unsteered answers: one per distinct validation prompt."""
        return len({prompt for entry in self.entries for prompt in entry.prompts})

    @property
    def answers(self) -> int:
        """Every answer the search generates (on a fresh checkpoint), successive halving counted."""
        if self.halving:
            return sum(entry.halving_answers for entry in self.entries) + self.baseline_answers
        return self.steered_answers + self.baseline_answers

    @property
    def full_answers(self) -> int:
        """Every answer the search would generate without successive halving."""
        return self.steered_answers + self.baseline_answers

    @property
    def halving(self) -> bool:
        """Whether the search runs successive halving rounds."""
        return any(len(entry.rounds) > 1 for entry in self.entries)

    def summary(self) -> str:
        """``N settings × M prompts = K answers`` (no steering counted as a setting of every entry)."""
        settings = sum(entry.settings + 1 for entry in self.entries)
        counts = sorted({len(entry.prompts) for entry in self.entries})
        prompts = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        nominal = sum((entry.settings + 1) * len(entry.prompts) for entry in self.entries)
        text = f"{settings} settings × {prompts} prompts = {nominal:,} answers"
        if self.full_answers < nominal:
            text += (
                f", {self.full_answers:,} to generate (instructions with the same prompts share the no-steering "
                "answers)"
            )
        if self.halving:
            text += f"; successive halving generates {self.answers:,} of them"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data."""
        return {
            "entries": [entry.to_dict() for entry in self.entries],
            "answers": self.answers,
            "answers_without_halving": self.full_answers,
            "steered_answers": self.steered_answers,
            "baseline_answers": self.baseline_answers,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
        }

    def lines(self) -> list[str]:
        """One line per entry: its settings (no steering included) × prompts."""
        return [
            f"{entry.instruction}: {entry.settings + 1} settings × {len(entry.prompts)} prompts = "
            f"{(entry.settings + 1) * len(entry.prompts)} answers"
            for entry in self.entries
        ]


def search_entries(recipe: Recipe) -> list[int]:
    """The indices of the steer entries a search sweeps (``layer: auto``); a recipe error when there are none."""
    entries = [index for index, entry in enumerate(recipe.steer) if entry.layer == "auto"]
    if not entries:
        raise recipe.error(
            ("steer",),
            "no steer entry has `layer: auto`, so there is nothing to search. "
            "Set layer: auto on the entries to search.",
        )
    return entries


def plan_search(recipe: Recipe, vectors: Mapping[str, SteeringVector]) -> SearchPlan:
    """What :func:`search_recipe` will generate for ``recipe`` with ``vectors`` (no model needed: the vectors know
    the layer count). Candidate layers out of range are refused here, before any model is opened."""
    entries = []
    for index in search_entries(recipe):
        entry = recipe.steer[index]
        vector = vectors[entry.vector or entry.instruction]
        recipe.check_layers(vector.metadata.n_layers)  # names the recipe line, or the option that set the layers
        layers = candidate_layers(vector.metadata.n_layers, recipe.search.layers, recipe.search.layer_step)
        settings = candidate_settings(recipe, index, vector, layers)
        pairs = validation_pairs(recipe, entry.instruction)
        prompts = tuple(condition_prompts(pairs, recipe.search.condition))
        per_pair = len(prompts) // len(pairs)
        search = recipe.search
        counts = halving_rounds(len(pairs), search.halving_start) if search.halving else []
        rounds = tuple(count * per_pair for count in counts) if len(counts) > 1 else ()
        entries.append(EntryPlan(entry.instruction, len(settings), prompts, rounds))
    config_tokens = recipe.search.max_new_tokens or recipe.generation.max_new_tokens
    return SearchPlan(tuple(entries), config_tokens, recipe.generation.batch_size)


def search_recipe(
    recipe: Recipe,
    handle: ModelHandle,
    *,
    vectors: Mapping[str, SteeringVector] | None = None,
    out_dir: Path | None = None,
    reference: Reference | None = None,
    generator: Generator | None = None,
    write: bool = True,
    progress: ProgressFactory | None = None,
) -> SearchResult:
    """Sweep every ``layer: auto`` steer entry of ``recipe`` on validation prompts and record each winner.

    ``out_dir`` (default ``<output>/search``) holds the checkpoint; with ``write`` the winners go into the vector files.
    """
    started = time.monotonic()
    settings = recipe.search
    entries = search_entries(recipe)
    paths = {index: steer_vector_path(recipe, index) for index in entries}
    # Resolved, so one file named two ways (an instruction's vector and a `vector:` path) counts as one file.
    files = {index: path.resolve() for index, path in paths.items()}
    # A vector file holds one searched setting per instruction that uses it (its own, and one per borrower).
    uses = [(files[index], recipe.steer[index].instruction) for index in entries]
    shared = [use for use in dict.fromkeys(uses) if uses.count(use) > 1]
    if shared:
        raise recipe.error(
            ("steer",),
            f"several `layer: auto` entries for '{shared[0][1]}' use the vector {shared[0][0]}, "
            "but a vector file holds "
            "one searched setting per instruction. Give all but one of them a fixed layer.",
        )
    vectors = vectors if vectors is not None else load_recipe_vectors(recipe, handle)
    if reference is None and settings.min_perplexity_ratio > 0:  # ratio 0: the rule is off, nothing is scored
        reference = open_reference(recipe, handle)
    config = generation_config(recipe, max_new_tokens=settings.max_new_tokens)
    meter = Metered(generator or generate)  # a real search teaches the next plan this machine's rate
    swept_from = time.monotonic()
    layers = candidate_layers(handle.n_layers, settings.layers, settings.layer_step)
    out_dir = Path(out_dir) if out_dir is not None else recipe.output_dir / "search"
    checkpoint = out_dir / CHECKPOINT_NAME
    rule = guard_rule(settings.margin, settings.min_perplexity_ratio)
    center = recipe_center(recipe, vectors)
    centered_on = center_names(recipe, vectors) if center is not None else None  # recorded with a centered winner
    if settings.halving:
        rule += f"; successive halving from {settings.halving_start} prompt pairs (see nsteer.search)"
    work = []
    for index in entries:
        entry = recipe.steer[index]
        vector = vectors[entry.vector or entry.instruction]
        instruction = resolve_instruction(recipe, entry.instruction)
        if not instruction.check_id:
            raise recipe.error(
                ("instructions", entry.instruction, "check"), "this instruction has no check to score the search with."
            )
        candidates = tuple(candidate_settings(recipe, index, vector, layers))
        edits = tuple(
            tuple(
                vector_edits(
                    vector,
                    layer=setting.layer,
                    mode=setting.mode,
                    weight=setting.weight,
                    weight_relative=setting.relative,
                    positions=setting.positions,
                    target_scale=setting.target_scale,
                    options=setting.options,
                    center=center,
                )
            )
            for setting in candidates
        )
        work.append(
            _Entry(
                index=index,
                instruction=entry.instruction,
                spec=instruction.check,
                pairs=validation_pairs(recipe, entry.instruction),
                baseline=Setting(None, entry.mode, 0.0, entry.positions),
                settings=candidates,
                edits=edits,
            )
        )
    swept = _sweep(
        handle,
        work,
        condition=settings.condition,
        halving_start=settings.halving_start if settings.halving else None,
        margin=settings.margin,
        min_perplexity_ratio=settings.min_perplexity_ratio,
        config=config,
        reference=reference,
        generator=meter,
        checkpoint=checkpoint,
        progress=progress,
    )
    if generator is None:
        record_run(handle_rate_key(handle, config.batch_size), meter, swept_from, config.max_new_tokens)
    sweeps = []
    for item in work:
        baseline, cells = swept[item.index]
        index = item.index
        sweep = InstructionSweep(
            instruction=item.instruction,
            steer_index=index,
            vector_path=str(paths[index]),
            condition=settings.condition,
            baseline=baseline,
            cells=tuple(cells),
            winner=choose(baseline, cells),
            rule=rule,
        )
        if write:
            # Only into the vector searched: re-read under a lock, refused if recomputed or replaced meanwhile, and
            # what other entries (or other searches) recorded in the same file is kept.
            vector = vectors[recipe.steer[index].vector or item.instruction]
            record_choice(paths[index], vector, searched_setting(sweep, layers, centered_on), item.instruction)
        sweeps.append(sweep)
    return SearchResult(
        model_id=handle.model_id,
        reference=reference.name if reference else "",
        sweeps=tuple(sweeps),
        elapsed_s=time.monotonic() - started,
    )
