"""The fixed cost nsteer adds per decoding step, where compute hides nothing: a deep, narrow random model.

A width-64 Llama with the benchmark model's depth spends little time computing per step, so what nnsight's tracing,
the step loop and each edit add stands out. CPU time per step (one torch thread) is robust to other processes.

- composed edits: 0 / 1 / 2 / 4 ``set`` edits at distinct layers, batch 1, beside plain ``generate`` on the unwrapped
  model and one forward hook;
- rows: batches of 1 / 8 / 32 rows where every row carries its own setting at one layer (a search sweep's shape);
  the edit cost at B rows is the per-step CPU time of that steered batch minus nsteer's unsteered one at the same B.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.fixtures import (
    BenchModel,
    HookEdits,
    distinct_row_edits,
    edit_layers,
    generation_inputs,
    open_deep_narrow,
    quick_vector,
    set_edits,
)
from benchmarks.harness import rounds


@dataclass(frozen=True)
class OverheadSettings:
    """Sizes and repeats of the overhead section."""

    layers: int = 30
    new_tokens: int = 64
    edit_counts: tuple[int, ...] = (1, 2, 4)
    row_counts: tuple[int, ...] = (1, 8, 32)
    rounds: int = 10


def _median_difference_ms(a: list[float], b: list[float], steps: int) -> float:
    """Median over rounds of (a - b), in milliseconds per step."""
    return 1000 * statistics.median(x - y for x, y in zip(a, b)) / steps


def _resolution_ms(a: list[float], b: list[float], steps: int) -> float:
    """Median absolute deviation of the per-round (a - b), in ms per step; never below 1 microsecond."""
    differences = [x - y for x, y in zip(a, b)]
    centre = statistics.median(differences)
    return max(1000 * statistics.median(abs(d - centre) for d in differences) / steps, 0.001)


def bench_overhead(
    settings: OverheadSettings, device: str, generation: dict[str, Any] | None, targets: dict[str, float]
) -> dict[str, Any]:
    """Per-step CPU cost of nsteer's path and its edits, by number of composed edits and of distinct rows."""
    from nsteer.edits import compile_plan
    from nsteer.generate import GenerationConfig, steered_generate_batches

    model: BenchModel = open_deep_narrow(settings.layers, device)
    handle = model.handle
    vector = quick_vector(handle)
    steps = settings.new_tokens
    kwargs = {
        **GenerationConfig(max_new_tokens=steps).generate_kwargs(handle.tokenizer.pad_token_id),
        "min_new_tokens": steps,
    }
    counts = tuple(sorted({0, 1, *settings.edit_counts}))  # 0 and 1 are the references the costs are read from
    edit_sets = {count: set_edits(vector, edit_layers(handle.n_layers, count)) for count in counts}
    middle = edit_layers(handle.n_layers, 1)[0]
    inputs = {rows: generation_inputs(handle, rows, device) for rows in sorted({1, *settings.row_counts})}

    def plain(rows: int = 1, hooked: bool = False) -> None:
        ids, mask = inputs[rows]
        with torch.inference_mode(), HookEdits(model.plain, handle.layers_path, edit_sets[1] if hooked else []):
            model.plain.generate(input_ids=ids, attention_mask=mask, **kwargs)

    def traced(rows: int, plan: Any) -> None:
        ids, mask = inputs[rows]
        steered_generate_batches(handle, [(ids, mask, plan)], kwargs)

    variants: dict[str, Any] = {"hf_plain": plain, "hf_hook_1": lambda: plain(hooked=True)}
    for count in counts:
        variants[f"nsteer_edits_{count}"] = lambda plan=compile_plan([edit_sets[count]]): traced(1, plan)
    for rows in settings.row_counts:
        distinct = compile_plan(distinct_row_edits(vector, middle, rows))
        variants[f"rows_{rows}_unsteered"] = lambda rows=rows: traced(rows, ())
        variants[f"rows_{rows}_distinct"] = lambda rows=rows, plan=distinct: traced(rows, plan)
    for variant in variants.values():  # warm-up
        variant()
    times = rounds(variants, device, min_rounds=settings.rounds, max_rounds=settings.rounds, budget_s=0.0)
    per_step = times.per_step_ms(steps, cpu=True)
    base = per_step["hf_plain"]
    extra = {name: round(value - base, 3) for name, value in per_step.items() if not name.startswith("rows_")}
    slope = (
        statistics.median(
            (per_step[f"nsteer_edits_{count}"] - per_step["nsteer_edits_1"]) / (count - 1)
            for count in counts
            if count > 1
        )
        if counts[-1] > 1
        else float("nan")
    )
    edit_cost = {
        str(rows): round(
            _median_difference_ms(times.cpu[f"rows_{rows}_distinct"], times.cpu[f"rows_{rows}_unsteered"], steps), 3
        )
        for rows in settings.row_counts
    }
    smallest, largest = str(min(settings.row_counts)), str(max(settings.row_counts))
    # The 1-row cost is a difference of two noisy timings and can come out zero or negative; a ratio against it is
    # then meaningless. Divide by at least its resolution (the spread of its per-round differences), so the growth
    # stays finite and says "no larger than the noise allows".
    resolution = _resolution_ms(times.cpu[f"rows_{smallest}_distinct"], times.cpu[f"rows_{smallest}_unsteered"], steps)
    growth = edit_cost[largest] / max(edit_cost[smallest], resolution)
    result: dict[str, Any] = {
        "model": model.description,
        "new_tokens": steps,
        "rounds": settings.rounds,
        "cpu_ms_per_step": per_step,
        "extra_ms_per_step_over_hf": extra,
        "nsteer_minus_hook_ms_per_step": round(per_step["nsteer_edits_1"] - per_step["hf_hook_1"], 3),
        "ms_per_additional_edit": round(slope, 3),
        "composed_edits": {
            str(count): {
                "layers": edit_layers(handle.n_layers, count),
                **times.compare(f"nsteer_edits_{count}", "hf_plain"),
            }
            for count in counts
        },
        "distinct_rows": {
            "layer": middle,
            "setting": "one edit per row, each row's own mode, weight, positions; every third row its own direction",
            "slots_per_step": {
                str(rows): compile_plan(distinct_row_edits(vector, middle, rows))[0].slots
                for rows in settings.row_counts
            },
            "edit_cost_ms_per_step": edit_cost,
            f"cost_{largest}_over_{smallest}": round(growth, 3),
            f"resolution_{smallest}_ms_per_step": round(resolution, 3),
            "target": targets.get("edit_cost_rows_growth"),
            "met": growth <= targets.get("edit_cost_rows_growth", float("inf")),
        },
    }
    # What this fixed cost is worth on the benchmark model: its measured per-step CPU time, plus the extra ms.
    for key, entry in (generation or {}).items():
        step_ms = entry["per_step_cpu_ms"]["hf_plain"]
        result[f"expected_nsteer_over_plain_{key}"] = round((step_ms + extra["nsteer_edits_1"]) / step_ms, 4)
        result[f"expected_nsteer_over_hook_{key}"] = round(
            (step_ms + extra["nsteer_edits_1"]) / (step_ms + extra["hf_hook_1"]), 4
        )
    return result
