"""benchmarks/run.py --quick runs every section end to end on a tiny model, prints every ratio and writes valid JSON.

No timing is asserted anywhere: the numbers depend on the machine and its load. Only that each measurement ran and
produced a finite, positive figure, plus one correctness check (the nsteer edit and the forward-hook edit generate
the same tokens).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"

PRINTED = (
    "steered / plain generate (unwrapped), batch 1, 1 thread(s)",
    "steered / plain generate (unwrapped), batch 8, 2 thread(s)",
    "nsteer steered / forward hook, batch 1, 1 thread(s)",
    "nsteer steered / forward hook, batch 8, 2 thread(s)",
    "(nsteer unsteered / plain, batch 1",
    "(hook / plain, batch 8",
    "extraction / bare forward",
    "memory peak",
    "speed-up of extraction over one-prompt-at-a-time",
    "per-step overhead (",
    "edit cost per step with every row's own setting",
    "eval throughput, generation + perplexity",
)
RATIOS = {
    *(
        f"{name}_batch_{size}_threads_{threads}"
        for name in ("steered_over_plain", "nsteer_over_hook")
        for size in (1, 8)
        for threads in (1, 2)
    ),
    "edit_cost_rows_growth",
    "extraction_over_forward",
    "extraction_speedup_over_research",
    "memory_large_over_small",
}
VARIANTS = ("hf_plain", "hf_hook", "nsteer_steered", "nsteer_unsteered")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """One ``--quick`` run on the tiny random model (CPU, generation at 1 and 2 threads), in a subprocess."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--threads",
        "1,2",
        "--out",
        str(out),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert completed.returncode == 0, f"stdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-5000:]}"
    return completed.stdout, json.loads(out.read_text())


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_prints_every_ratio(quick_run: tuple[str, dict]) -> None:
    stdout, _ = quick_run
    missing = [label for label in PRINTED if label not in stdout]
    assert not missing, f"not printed: {missing}\n{stdout}"


def test_json_has_every_ratio_and_the_machine(quick_run: tuple[str, dict]) -> None:
    _, report = quick_run
    assert set(report["ratios"]) == RATIOS
    assert all(isinstance(value, float) and math.isfinite(value) for value in report["ratios"].values()), report[
        "ratios"
    ]
    assert all(_positive(value) for key, value in report["ratios"].items() if key != "edit_cost_rows_growth")
    meta = report["meta"]
    for key in (
        "nproc",
        "cpu_model",
        "torch",
        "nnsight",
        "transformers",
        "torch_threads",
        "load_start",
        "load_end",
        "command",
        "dtype",
    ):
        assert key in meta, key
    assert meta["torch_threads"] == [1, 2]
    assert meta["quick"] is True and meta["dtype"] == "float32"
    assert report["targets"]["steered_over_plain"] == 1.05 and report["targets"]["nsteer_over_hook"] == 1.03


def test_json_sections_are_complete(quick_run: tuple[str, dict]) -> None:
    _, report = quick_run
    assert set(report["generation"]) == {"threads_1", "threads_2"}
    for by_batch in report["generation"].values():
        assert set(by_batch) == {"batch_1", "batch_8"}
        for entry in by_batch.values():
            for name in VARIANTS:
                samples = entry["wall_s"][name]
                assert len(samples) >= 2 and all(_positive(t) for t in samples)
            # Same edit both ways, and no edit both ways: identical greedy tokens.
            assert entry["steered_matches_hook"] is True and entry["unsteered_matches_plain"] is True
    overhead = report["overhead"]
    assert set(overhead["composed_edits"]) == {"0", "1", "2", "4"}
    assert {"hf_plain", "hf_hook_1", *(f"nsteer_edits_{n}" for n in (0, 1, 2, 4))} <= set(overhead["cpu_ms_per_step"])
    assert all(_positive(value) for value in overhead["cpu_ms_per_step"].values())
    rows = overhead["distinct_rows"]
    assert rows["slots_per_step"] == {"1": 1, "8": 1, "32": 1}  # one fused update, however many settings
    assert set(rows["edit_cost_ms_per_step"]) == {"1", "8", "32"}
    assert _positive(overhead["expected_nsteer_over_hook_batch_1"]) and _positive(
        overhead["expected_nsteer_over_plain_batch_8"]
    )
    extraction = report["extraction"]
    assert extraction["per_batch"]["samples"] == extraction["batches"] >= 1
    assert _positive(extraction["research_scaled_s"])
    memory = report["memory"]
    small, large = memory["pair_counts"]
    assert set(memory["runs"]) == {str(small), str(large)}
    assert all(_positive(run["torch_peak_mb"]) for run in memory["runs"].values())
    throughput = report["eval_throughput"]["by_batch_size"]
    assert set(throughput) == {"1", "4", "8", "16"}
    assert all(_positive(row["answers_per_s"]) and 0 < row["scoring_share"] < 1 for row in throughput.values())


def test_rounds_rotate_so_every_variant_takes_every_slot() -> None:
    """Over as many rounds as variants, each variant runs once in each position (none is always first)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import rotated

    names = ["a", "b", "c", "d"]
    orders = [rotated(names, index) for index in range(len(names))]
    for slot in range(len(names)):
        assert sorted(order[slot] for order in orders) == names


def test_search_benchmark_compares_winners_and_answers_cell_by_cell() -> None:
    """The search benchmark's comparison: wall ratio, each differing winner named, identical and differing cells."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.search import pairwise

    old = {
        "wall_s": 30.0,
        "cpu_s": 20.0,
        "winners": {"lowercase": "L14 set", "title": "no steering"},
        "answers": {"lowercase / L14 set": ["a", "b"], "title / L6 set": ["c", "d"], "title / L10 set": ["e", "f"]},
    }
    new = {
        "wall_s": 10.0,
        "cpu_s": 8.0,
        "winners": {"lowercase": "L14 set", "title": "L6 set"},
        # one cell identical, one differing, one scored on fewer prompts (dropped by halving): not compared
        "answers": {"lowercase / L14 set": ["a", "b"], "title / L6 set": ["c", "x"], "title / L10 set": ["e"]},
    }
    (pair,) = pairwise({"old": old, "new": new}, ["old", "new"]).items()
    assert pair[0] == "old vs new"
    assert pair[1]["wall_ratio"] == 3.0 and pair[1]["cpu_ratio"] == 2.5
    assert pair[1]["winners_differ"] == {"title": ["no steering", "L6 set"]}
    assert pair[1]["answers"] == {"cells_compared": 2, "cells_identical": 1, "differing": ["title / L6 set"]}


def test_row_growth_divides_by_the_resolution_when_the_one_row_cost_is_noise() -> None:
    from benchmarks.overhead import _resolution_ms

    # Per-round CPU seconds over 10 steps: the 1-row edit costs -0.1 / +0.1 / 0.0 ms per step, i.e. nothing measurable.
    distinct = [1.000, 1.002, 1.001]
    unsteered = [1.001, 1.001, 1.001]
    resolution = _resolution_ms(distinct, unsteered, steps=10)
    assert math.isclose(resolution, 0.1, rel_tol=1e-6)
    assert _resolution_ms([1.0, 1.0], [1.0, 1.0], steps=10) == 0.001  # identical timings: the floor, not zero
