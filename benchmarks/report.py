"""The printed table of a benchmark report: one line per ratio, then the per-step costs and throughput."""

from __future__ import annotations

from typing import Any

HEADER = f"{'ratio (A / B)':<58}{'A med s':>9}{'B med s':>9}{'ratio':>8}{'spread':>16}{'cpu':>7}{'target':>8}  met"


def _row(name: str, stats: dict[str, Any]) -> str:
    spread = f"{stats.get('paired_min', stats['ratio']):.3f}-{stats.get('paired_max', stats['ratio']):.3f}"
    target = stats.get("target")
    cpu = f"{stats['cpu_ratio']:.3f}" if "cpu_ratio" in stats else "-"
    met = "-" if target is None else ("yes" if stats.get("met") else "NO")
    return (
        f"{name:<58}{stats.get('a_median_s', float('nan')):>9.3f}{stats.get('b_median_s', float('nan')):>9.3f}"
        f"{stats['ratio']:>8.3f}{spread:>16}{cpu:>7}{(f'{target:.2f}' if target else '-'):>8}  {met}"
    )


def format_table(report: dict[str, Any]) -> str:
    """The whole report as text."""
    meta = report["meta"]
    lines = [
        f"nsteer benchmarks: {meta['device']} | {meta['model']} ({meta['dtype']}) | {meta['cpu_model']} "
        f"x{meta['nproc']} | torch {meta['torch']} | load {meta['load_start']} -> {meta['load_end']} "
        f"| {meta['wall_s']:.0f} s",
        HEADER,
    ]
    for threads_key, by_batch in (report.get("generation") or {}).items():
        threads = threads_key.removeprefix("threads_")
        for entry in by_batch.values():
            size = entry["batch_size"]
            where = f"batch {size}, {threads} thread(s)"
            lines.append(_row(f"steered / plain generate (unwrapped), {where}", entry["steered_over_plain"]))
            lines.append(_row(f"nsteer steered / forward hook, {where}", entry["nsteer_over_hook"]))
            lines.append(_row(f"  (nsteer unsteered / plain, {where})", entry["unsteered_over_plain"]))
            lines.append(_row(f"  (hook / plain, {where})", entry["hook_over_plain"]))
    extraction = report.get("extraction")
    if extraction:
        per_batch = dict(extraction["per_batch"], target=extraction["target"], met=extraction["met"])
        lines.append(_row(f"extraction / bare forward, {extraction['pairs']} pairs (per batch)", per_batch))
        lines.append(
            f"{'  (totals, tokenization included)':<58}{extraction['nsteer_total_s']:>9.2f}"
            f"{extraction['decoder_forward_total_s']:>9.2f}{extraction['ratio_totals']:>8.3f}"
        )
        if extraction.get("full_forward_subset"):
            lines.append(_row("  (extraction / full forward with LM head, subset)", extraction["full_forward_subset"]))
    memory = report.get("memory")
    if memory:
        small, large = memory["pair_counts"]
        measure = memory["measure"]
        lines.append(
            f"{f'memory peak, {large} / {small} pairs':<58}{memory['runs'][str(large)][measure]:>8.1f}M"
            f"{memory['runs'][str(small)][measure]:>8.1f}M{memory['ratio']:>8.3f}{'':>16}{'':>7}"
            f"{memory['target']:>8.2f}  {'yes' if memory['met'] else 'NO'}"
        )
        lines.append(f"  memory: {measure}; {memory['model']}; {memory['large_set']}")
    if extraction:
        lines.append(
            "speed-up of extraction over one-prompt-at-a-time output_hidden_states: "
            f"x{extraction['speedup_over_research']} ({extraction['note'].split(';')[0]})"
        )
    overhead = report.get("overhead")
    if overhead:
        extra = overhead["extra_ms_per_step_over_hf"]
        lines.append(
            f"per-step overhead ({overhead['model']}, batch 1, CPU ms/step over plain generate's "
            f"{overhead['cpu_ms_per_step']['hf_plain']:.2f}): hook {extra['hf_hook_1']:+.3f}, "
            + ", ".join(
                f"nsteer {count} edit(s) {extra[f'nsteer_edits_{count}']:+.3f}" for count in overhead["composed_edits"]
            )
            + f"; nsteer - hook {overhead['nsteer_minus_hook_ms_per_step']:+.3f} ms, "
            f"each added edit {overhead['ms_per_additional_edit']:+.3f} ms"
        )
        rows = overhead["distinct_rows"]
        costs = ", ".join(f"{count} rows {cost:+.3f}" for count, cost in rows["edit_cost_ms_per_step"].items())
        growth_key = next(key for key in rows if key.startswith("cost_"))
        lines.append(
            f"edit cost per step with every row's own setting (CPU ms over unsteered): {costs}; "
            f"{growth_key.replace('_', ' ')} {rows[growth_key]:.3f} (target {rows['target']}: "
            f"{'yes' if rows['met'] else 'NO'}); slots per step {rows['slots_per_step']}"
        )
        for key in overhead:
            if key.startswith("expected_nsteer_over_hook_"):
                batch = key.removeprefix("expected_nsteer_over_hook_")
                lines.append(
                    f"  that overhead on the benchmark model, {batch.replace('_', ' ')}: nsteer / plain "
                    f"{overhead[f'expected_nsteer_over_plain_{batch}']:.4f}, nsteer / hook {overhead[key]:.4f}"
                )
    throughput = report.get("eval_throughput")
    if throughput:
        parts = ", ".join(
            f"bs {size}: {row['answers_per_s']:.2f}/s (scoring {row['scoring_share']:.0%})"
            for size, row in throughput["by_batch_size"].items()
        )
        lines.append(
            f"eval throughput, generation + perplexity ({throughput['prompts']} prompts, <= "
            f"{throughput['max_new_tokens']} new tokens): {parts}"
        )
    return "\n".join(lines)
