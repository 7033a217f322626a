"""Reports: JSON (everything, every answer included), Markdown tables and PNG plots, each written atomically."""

from __future__ import annotations

import dataclasses
import io
import math
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsteer.errors import NsteerError, VectorFileError
from nsteer.evaluate.stats import PairedChange
from nsteer.evaluate.table import CELLS, CellSummary, EvaluationResult
from nsteer.fileio import atomic_write_bytes, json_safe, write_json, write_text
from nsteer.search import InstructionSweep, SearchResult, SweepCell
from nsteer.text import markdown_text, visible

CELL_HEADERS = ("no instr., unsteered", "no instr., steered", "instr., unsteered", "instr., steered")


def _percent(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.2f}"


def _accuracy(summary: CellSummary) -> str:
    return "–" if summary.n == 0 else f"{_percent(summary.loose)} ({_percent(summary.strict)})"


def _quality(summary: CellSummary) -> str:
    if summary.n == 0:
        return "–"
    text = f"{_number(summary.mean_perplexity)} / {summary.degenerate_share:.0%}"
    return text + (f" / {summary.judge:.2f}" if summary.judge is not None else "")


def _paired(change: PairedChange) -> str:
    if not change.pairs:
        return "–"
    return f"{change.gained} / {change.lost} ({change.p_value:.2g})"


def _plot_text(text: object) -> str:
    """Data shown in a figure, literally: control characters visible, ``$`` escaped (matplotlib reads $...$ as math,
    and an unbalanced one makes the whole figure fail after the work is done)."""
    return visible(text).replace("$", r"\$")


def _number(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.1f}"


def _spread(values: Sequence[int]) -> str:
    if not values:
        return "–"
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return f"{statistics.median(ordered):g} [{quartiles[0]:g}–{quartiles[2]:g}], max {ordered[-1]}"


def eval_markdown(result: EvaluationResult) -> str:
    """The 2×2 table (loose and strict accuracy), quality beside it, and length distributions where relevant."""
    header = "| instruction | n | " + " | ".join(CELL_HEADERS) + " |"
    rule = "|---|---:|" + "---:|" * len(CELLS)
    rows = [
        f"| {markdown_text(group)} | {result.cell(CELLS[2], group).n} | "
        + " | ".join(_accuracy(result.cell(c, group)) for c in CELLS)
        + " |"
        for group in result.groups
    ]
    overall = result.cell(CELLS[2])
    rows.append(
        f"| **overall** | {overall.n} | " + " | ".join(f"**{_accuracy(result.cell(c))}**" for c in CELLS) + " |"
    )
    quality = [
        f"| {markdown_text(group)} | " + " | ".join(_quality(result.cell(c, group)) for c in CELLS) + " |"
        for group in result.groups
    ]
    quality.append("| **overall** | " + " | ".join(_quality(result.cell(c)) for c in CELLS) + " |")
    judged = any(answer.judge is not None for answer in result.answers)
    lines = [
        f"# Evaluation: {markdown_text(result.source)}",
        "",
        f"Model {markdown_text(result.model_id)}, split {markdown_text(result.split)}, {len(result.answers)} answers, "
        f"{result.elapsed_s:.0f} s. Cells: loose accuracy (strict in brackets), IFEval prompt level.",
        "",
        header,
        rule,
        *rows,
        "",
        f"Quality: mean answer perplexity under {markdown_text(result.reference or 'no reference model')} / share of "
        "degenerate "
        f"answers{' / judge mean' if judged else ''}.",
        "",
        "| instruction | " + " | ".join(CELL_HEADERS) + " |",
        "|---|" + "---:|" * len(CELLS),
        *quality,
        "",
        "Substantive passes: the checker passes (loose) and the answer is neither degenerate nor hollow (the "
        "requested structure with almost no content) nor an echo of the prompt; beside each, steered vs unsteered "
        "on the same prompts: failures steering fixed / passes it broke (two-sided exact sign test p).",
        "",
        "| instruction | " + " | ".join(CELL_HEADERS) + " | no instruction: fixed / broke (p) | instruction: fixed / "
        "broke (p) |",
        "|---|" + "---:|" * (len(CELLS) + 2),
        *[
            f"| {label} | "
            + " | ".join(f"{result.cell(c, group).substantive:.2f}" for c in CELLS)
            + f" | {_paired(result.paired(False, group, 'substantive'))}"
            + f" | {_paired(result.paired(True, group, 'substantive'))} |"
            for label, group in [*((markdown_text(g), g) for g in result.groups), ("**overall**", None)]
        ],
        "",
        "Steered vs unsteered on the same prompts (loose): failures steering fixed / passes it broke, and the "
        "two-sided exact sign test p on those discordant pairs.",
        "",
        "| instruction | no instruction: fixed / broke (p) | instruction: fixed / broke (p) |",
        "|---|---:|---:|",
        *[
            f"| {label} | {_paired(result.paired(False, group))} | {_paired(result.paired(True, group))} |"
            for label, group in [*((markdown_text(g), g) for g in result.groups), ("**overall**", None)]
        ],
        "",
        "Steering per instruction:",
        "",
        *[f"- {markdown_text(group)}: {markdown_text(result.steering.get(group, 'none'))}" for group in result.groups],
    ]
    if result.skipped:
        lines += ["", f"{result.skipped} data record(s) matched no recipe instruction and were skipped."]
    length_groups = [g for g in result.groups if result.categories.get(g) == "length"]
    if length_groups:
        lines += [
            "",
            "Length: sentences and words, median [quartiles], max.",
            "",
            "| instruction | cell | sentences | words |",
            "|---|---|---|---|",
        ]
        for group in length_groups:
            for cell in CELLS:
                summary = result.cell(cell, group)
                if summary.n:
                    lines.append(
                        f"| {markdown_text(group)} | {cell.label} | {_spread(summary.sentences)} | "
                        f"{_spread(summary.words)} |"
                    )
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, so no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def eval_bars_png(result: EvaluationResult) -> bytes:
    """Per-instruction bars of the four cells' loose accuracy (and overall), as PNG bytes."""
    groups = [*result.groups, "overall"]
    figure = _figure(max(6.0, 0.9 * len(groups) + 2), 4.2)
    axes = figure.add_subplot()
    width = 0.2
    colors = ("#c6dbef", "#2171b5", "#fdd0a2", "#d94801")
    for offset, (cell, header, color) in enumerate(zip(CELLS, CELL_HEADERS, colors)):
        values = [result.cell(cell, None if g == "overall" else g).loose for g in groups]
        positions = [i + (offset - 1.5) * width for i in range(len(groups))]
        axes.bar(positions, [0 if not math.isfinite(v) else v for v in values], width, label=header, color=color)
    axes.set_xticks(range(len(groups)), [_plot_text(g) for g in groups], rotation=35, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("loose accuracy")
    axes.set_title(f"{_plot_text(result.model_id)}: instruction in prompt × steering")
    axes.legend(fontsize=8, ncols=2)
    return _png(figure)


@dataclass(frozen=True)
class SweepPoints:
    """Where a sweep's settings sit in its plot: one line per weight (per k for weights on the vector's scale, per
    target scale for set), its points dodged sideways so that settings of one layer with equal scores stay apart; the
    rejected points, the points successive halving dropped early, and the winner's point (None: no steering won)."""

    lines: tuple[tuple[str, tuple[tuple[float, float], ...]], ...]
    rejected: tuple[tuple[float, float], ...]
    dropped: tuple[tuple[float, float], ...]
    winner: tuple[float, float] | None


def plotted_score(cell: SweepCell) -> float:
    """What a sweep plot shows for a setting: its share of substantive passes (what the search ranks by first), or
    its loose accuracy where no substantive share was measured."""
    return cell.substantive if math.isfinite(cell.substantive) else cell.loose


def sweep_points(sweep: InstructionSweep) -> SweepPoints:
    """The plotted position of every setting of ``sweep`` (see :class:`SweepPoints`)."""

    def series(cell: SweepCell) -> tuple[float, float]:  # a relative k is one line across layers, not one weight
        setting = cell.setting
        return (setting.weight if setting.relative is None else setting.relative, setting.target_scale)

    def series_label(key: tuple[float, float], relative: bool) -> str:
        weight, scale = key
        return (f"w={weight:g}×‖u‖" if relative else f"w={weight:g}") + (f" z×{scale:g}" if scale != 1.0 else "")

    weights = sorted({series(cell) for cell in sweep.cells})
    relative = any(cell.setting.relative is not None for cell in sweep.cells)
    layers = sorted({cell.setting.layer for cell in sweep.cells})
    spacing = min((b - a for a, b in zip(layers, layers[1:])), default=1)
    dodge = 0.6 * spacing / max(len(weights), 1)  # the weights of one layer share 60% of the gap to the next layer
    position: dict[int, tuple[float, float]] = {}
    lines = []
    for number, weight in enumerate(weights):
        offset = (number - (len(weights) - 1) / 2) * dodge
        cells = sorted((c for c in sweep.cells if series(c) == weight), key=lambda c: c.setting.layer)
        for cell in cells:
            position[id(cell)] = (cell.setting.layer + offset, plotted_score(cell))
        lines.append((series_label(weight, relative), tuple(position[id(cell)] for cell in cells)))
    return SweepPoints(
        lines=tuple(lines),
        rejected=tuple(position[id(cell)] for cell in sweep.cells if cell.rejected),
        dropped=tuple(position[id(cell)] for cell in sweep.cells if cell.dropped),
        winner=None if sweep.winner.setting.no_steering else position[id(sweep.winner)],
    )


def panel_title(instruction: str, setting: str, width: int = 46) -> str:
    """A sweep panel's title: the instruction, then its chosen setting, each wrapped to ``width`` characters, so a long
    name or setting stays above its own panel instead of running into the next one."""
    options = {"width": width, "break_on_hyphens": False, "max_lines": 2, "placeholder": " …"}
    lines = textwrap.wrap(_plot_text(instruction), **options) or [""]
    lines += textwrap.wrap(f"→ {_plot_text(setting)}", **options)
    return "\n".join(lines)


def sweep_png(result: SearchResult) -> bytes:
    """Substantive passes (:func:`plotted_score`) against layer per instruction: one line per weight, the baseline
    dashed, rejected settings crossed in red, the winner ringed (or the baseline drawn bold when no steering won)."""
    count = max(len(result.sweeps), 1)
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure = _figure(3.2 * columns, 2.8 * rows)
    figure.set_layout_engine("constrained")  # keeps each panel's title clear of the x label above it
    for index, sweep in enumerate(result.sweeps):
        axes = figure.add_subplot(rows, columns, index + 1)
        points = sweep_points(sweep)
        for label, line in points.lines:
            axes.plot([x for x, _ in line], [y for _, y in line], marker="o", markersize=4, label=label, zorder=2)
        if points.rejected:
            axes.scatter(*zip(*points.rejected), marker="x", color="red", zorder=3, s=40, label="rejected")
        if points.dropped:  # scored on the first prompts only: successive halving left them out
            axes.scatter(
                *zip(*points.dropped),
                marker="s",
                s=50,
                facecolors="none",
                edgecolors="gray",
                zorder=3,
                label="dropped early (halving)",
            )
        if points.winner is not None:
            axes.scatter(
                *points.winner, marker="o", s=160, facecolors="none", edgecolors="black", linewidths=1.5, zorder=4
            )
            axes.plot([], [], "o", markersize=9, markerfacecolor="none", markeredgecolor="black", label="winner")
        baseline_won = points.winner is None
        axes.axhline(
            plotted_score(sweep.baseline),
            linestyle="--",
            color="black" if baseline_won else "gray",
            linewidth=2.0 if baseline_won else 1.0,
            label="no steering (winner)" if baseline_won else "no steering",
            zorder=1,
        )
        axes.set_title(panel_title(sweep.instruction, sweep.winner.setting.label), fontsize=8)
        axes.set_ylim(-0.02, 1.02)
        axes.set_xticks(sorted({c.setting.layer for c in sweep.cells}))
        axes.set_xlabel("layer", fontsize=8)
        axes.tick_params(labelsize=7)
        if index == 0:
            axes.set_ylabel("substantive passes (validation)", fontsize=8)
        axes.legend(fontsize=6)
    figure.suptitle(
        f"{_plot_text(result.model_id)}: layer sweep (winner ringed; red x: rejected by the quality guard)", fontsize=9
    )
    return _png(figure)


#: The files each report writes into its folder (the CLI checks them before a model runs).
EVAL_REPORT_FILES = ("eval.json", "eval.md", "eval-cells.png")
SEARCH_REPORT_FILES = ("search.json", "search.md", "search-layers.png")


def write_eval_report(result: EvaluationResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.md`` and ``eval-cells.png`` to ``out_dir``; returns their paths by kind."""
    out_dir = Path(out_dir)
    return {
        "json": write_json(out_dir / EVAL_REPORT_FILES[0], result.to_dict()),
        "markdown": write_text(out_dir / EVAL_REPORT_FILES[1], eval_markdown(result)),
        "png": _write_bytes(out_dir / EVAL_REPORT_FILES[2], eval_bars_png(result)),
    }


def _write_bytes(path: Path, payload: bytes) -> Path:
    atomic_write_bytes(path, payload)
    return path


def _cell_dict(cell: SweepCell, winner: SweepCell) -> dict[str, Any]:
    data = dataclasses.asdict(cell)
    data["n"] = cell.n
    data["label"] = cell.setting.label
    data["winner"] = cell is winner
    return data


def search_dict(result: SearchResult) -> dict[str, Any]:
    """The search as JSON-ready data, every validation answer included."""
    return json_safe(
        {
            "model": result.model_id,
            "reference_model": result.reference,
            "elapsed_s": round(result.elapsed_s, 1),
            "sweeps": [
                {
                    "instruction": sweep.instruction,
                    "steer_index": sweep.steer_index,
                    "vector": sweep.vector_path,
                    "condition": sweep.condition,
                    "rule": sweep.rule,
                    "winner": sweep.winner.setting.label,
                    "cells": [_cell_dict(c, sweep.winner) for c in (sweep.baseline, *sweep.cells)],
                }
                for sweep in result.sweeps
            ],
        }
    )


def search_rows(result: SearchResult) -> list[tuple[str, str, str, str, str, str, str, str]]:
    """One row per instruction and setting: instruction, setting, loose, strict, degenerate, substantive, perplexity,
    verdict."""
    rows = []
    for sweep in result.sweeps:
        for cell in (sweep.baseline, *sweep.cells):
            verdict = "WINNER" if cell is sweep.winner else (f"rejected: {cell.rejected}" if cell.rejected else "")
            if cell.dropped and cell is not sweep.winner:
                verdict = "; ".join(part for part in (cell.dropped, verdict) if part)
            rows.append(
                (
                    sweep.instruction,
                    cell.setting.label,
                    f"{cell.loose:.2f}",
                    f"{cell.strict:.2f}",
                    f"{cell.degenerate_share:.0%}",
                    f"{cell.substantive:.2f}",
                    _number(cell.median_perplexity),
                    verdict,
                )
            )
    return rows


def search_markdown(result: SearchResult) -> str:
    """The sweep as a Markdown table, with the guard's rule."""
    rule = result.sweeps[0].rule if result.sweeps else ""
    lines = [
        f"# Layer search: {markdown_text(result.model_id)}",
        "",
        f"Validation split only; {result.elapsed_s:.0f} s. Rule: {markdown_text(rule)}.",
        "",
        "| instruction | setting | loose | strict | degenerate | substantive | median ppl | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *["| " + " | ".join(markdown_text(cell) for cell in row) + " |" for row in search_rows(result)],
    ]
    return "\n".join(lines) + "\n"


def write_search_report(result: SearchResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``search.json``, ``search.md`` and ``search-layers.png`` to ``out_dir``; returns their paths by kind."""
    out_dir = Path(out_dir)
    return {
        "json": write_json(out_dir / SEARCH_REPORT_FILES[0], search_dict(result)),
        "markdown": write_text(out_dir / SEARCH_REPORT_FILES[1], search_markdown(result)),
        "png": _write_bytes(out_dir / SEARCH_REPORT_FILES[2], sweep_png(result)),
    }


# ------------------------------------------------------------------ vector similarity plots (`nsteer inspect --plot`)


def cosine_across_layers(vector: Any) -> Any:
    """``[L, L]`` cosine similarity between one vector's unit directions at every pair of layers."""
    import torch

    directions = torch.nn.functional.normalize(vector.directions.detach().double().cpu(), dim=-1)
    return (directions @ directions.T).float()


def cosine_between(vectors: Sequence[Any], *, centered: bool = False) -> Any:
    """``[L, N, N]`` cosine similarity between the unit directions of ``N`` vectors, layer by layer.

    ``centered`` first subtracts, at each layer, the mean of the ``N`` unit directions: what the instructions share
    (mostly "an instruction was appended") drops out and what tells them apart remains (needs ``N >= 3``).
    """
    import torch

    shapes = {tuple(v.directions.shape) for v in vectors}
    if len(shapes) > 1:
        described = ", ".join(
            f"{v.instruction_id}: {v.metadata.n_layers} layers x width {v.metadata.hidden_size}" for v in vectors
        )
        raise VectorFileError(
            f"Only vectors of the same shape can be compared ({described}); give vectors of one model family."
        )
    stacked = torch.stack(
        [torch.nn.functional.normalize(v.directions.detach().double().cpu(), dim=-1) for v in vectors], dim=1
    )
    if centered:
        if len(vectors) < 3:
            raise VectorFileError("Centering needs three or more vectors (two centered vectors are always opposite).")
        stacked = torch.nn.functional.normalize(stacked - stacked.mean(dim=1, keepdim=True), dim=-1)
    return torch.einsum("lah,lbh->lab", stacked, stacked).float()


def vector_labels(vectors: Sequence[Any], paths: Sequence[str | Path]) -> list[str]:
    """The instruction ids, or file names where two vectors share an instruction id."""
    ids = [v.instruction_id for v in vectors]
    return ids if len(set(ids)) == len(ids) else [Path(p).stem for p in paths]


def similarity_png(
    vectors: Sequence[Any], labels: Sequence[str], *, layer: int | None = None, centered: bool = False
) -> bytes:
    """PNG of cosine similarities: one vector -> layer x layer heatmap and norms by layer;
    several -> instruction x instruction heatmap at ``layer`` (default: the middle layer)
    and pairwise curves by layer."""
    first = vectors[0]
    n_layers = first.metadata.n_layers
    model = _plot_text(first.metadata.model_id)
    labels = [_plot_text(label) for label in labels]
    if layer is not None and not 0 <= layer < n_layers:
        raise NsteerError(f"--layer {layer} is out of range: the vectors have layers 0..{n_layers - 1}.")
    if len(vectors) == 1:
        return _single_vector_png(first, labels[0], model)
    similarity = cosine_between(vectors, centered=centered)  # [L, N, N]
    layer = n_layers // 2 if layer is None else layer
    count = len(vectors)
    figure = _figure(6.0 + 0.35 * count + 6.0, 4.6 + 0.2 * count)
    figure.set_layout_engine("constrained")  # keeps the colorbar clear of the second panel's labels
    heat = figure.add_subplot(1, 2, 1)
    image = heat.imshow(similarity[layer].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    heat.set_xticks(range(count), labels, rotation=45, ha="right", fontsize=8)
    heat.set_yticks(range(count), labels, fontsize=8)
    if count <= 14:
        for row in range(count):
            for column in range(count):
                value = float(similarity[layer, row, column])
                heat.text(
                    column,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=9 if count <= 6 else 7,
                    color="white" if abs(value) > 0.6 else "black",
                )
    heat.set_title(f"cosine similarity at layer {layer}{' (centered)' if centered else ''}", fontsize=10)
    figure.colorbar(image, ax=heat, fraction=0.046, pad=0.04)
    curves = figure.add_subplot(1, 2, 2)
    pairs = [(a, b) for a in range(count) for b in range(a + 1, count)]
    layers = list(range(n_layers))
    if len(pairs) <= 10:
        for a, b in pairs:
            curves.plot(layers, similarity[:, a, b].numpy(), marker=".", label=f"{labels[a]} · {labels[b]}")
        curves.legend(fontsize=7, loc="best")
    else:  # too many pairs for one line each: the mean with the min-max band
        values = similarity[:, [a for a, _ in pairs], [b for _, b in pairs]]
        curves.fill_between(
            layers,
            values.min(dim=1).values.numpy(),
            values.max(dim=1).values.numpy(),
            alpha=0.25,
            label=f"min-max over {len(pairs)} pairs",
        )
        curves.plot(layers, values.mean(dim=1).numpy(), marker=".", label="mean over pairs")
        curves.legend(fontsize=7, loc="best")
    curves.axvline(layer, color="gray", linestyle=":", linewidth=1)
    curves.axhline(0, color="black", linewidth=0.5)
    lowest = float(similarity.min())
    curves.set_ylim(min(-0.05, lowest - 0.05), 1.02)
    curves.set_xlabel("layer")
    curves.set_ylabel("cosine similarity")
    curves.set_title("between instructions, by layer", fontsize=10)
    note = ", each minus the instructions' mean direction" if centered else ""
    figure.suptitle(f"Instruction vectors of {model}{note}", fontsize=11)
    return _png(figure)


def _single_vector_png(vector: Any, label: str, model: str) -> bytes:
    """Layer x layer cosine heatmap of one vector, and its raw norm by layer (the searched layer marked)."""
    similarity = cosine_across_layers(vector)
    n_layers = vector.metadata.n_layers
    figure = _figure(11.5, 4.8)
    figure.set_layout_engine("constrained")
    heat = figure.add_subplot(1, 2, 1)
    image = heat.imshow(similarity.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
    heat.set_xlabel("layer")
    heat.set_ylabel("layer")
    heat.set_title("cosine similarity of the direction across layers", fontsize=10)
    figure.colorbar(image, ax=heat, fraction=0.046, pad=0.04)
    norms = figure.add_subplot(1, 2, 2)
    norms.plot(range(n_layers), vector.norms.detach().float().cpu().numpy(), marker=".", label="‖u_l‖ (raw norm)")
    chosen = vector.metadata.chosen
    if chosen is not None and not chosen.no_steering:
        norms.axvline(
            chosen.layer,
            color="#d94801",
            linestyle="--",
            label=_plot_text(f"searched: layer {chosen.layer} {chosen.mode} w={chosen.weight}"),
        )
    elif chosen is not None:
        norms.plot([], [], " ", label="searched: no steering")
    norms.set_xlabel("layer")
    norms.set_ylabel("norm of the mean difference")
    norms.set_title("strength of the direction by layer", fontsize=10)
    norms.legend(fontsize=8, loc="best")
    figure.suptitle(f"{label} ({model}, {vector.metadata.n_pairs} pairs)", fontsize=11)
    return _png(figure)


def write_similarity_plot(
    vectors: Sequence[Any],
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    layer: int | None = None,
    centered: bool = False,
) -> Path:
    """Draw ``similarity_png`` for the vectors read from ``paths`` and write it to ``out`` (a .png) atomically."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise NsteerError(f"--plot {out}: the plot is a PNG image; give a file name ending in .png.")
    return _write_bytes(out, similarity_png(vectors, vector_labels(vectors, paths), layer=layer, centered=centered))
