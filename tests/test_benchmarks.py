"""benchmarks/run.py --quick runs end to end on a tiny model, prints every ratio and writes valid JSON.

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
    "steered / unsteered generation, batch 1",
    "steered / unsteered generation, batch 8",
    "nsteer edit / forward hook, batch 1",
    "nsteer edit / forward hook, batch 8",
    "extraction / bare forward",
    "memory peak",
    "speed-up of extraction over one-prompt-at-a-time",
    "per-step overhead (",
    "composed edits / unsteered generation (deep narrow model, CPU time): 0 edit(s)",
    "eval throughput",
)
RATIOS = {
    "steered_over_unsteered_batch_1",
    "steered_over_unsteered_batch_8",
    "nsteer_over_hook_batch_1",
    "nsteer_over_hook_batch_8",
    "extraction_over_forward",
    "extraction_speedup_over_research",
    "memory_large_over_small",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """One ``--quick`` run on the tiny random model (CPU, one thread), in a subprocess."""
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
        "1",
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
    assert all(_positive(value) for value in report["ratios"].values()), report["ratios"]
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
    ):
        assert key in meta, key
    assert meta["torch_threads"] == 1
    assert meta["quick"] is True
    assert report["targets"]["steered_over_unsteered"] == 1.10


def test_json_sections_are_complete(quick_run: tuple[str, dict]) -> None:
    _, report = quick_run
    for key in ("batch_1", "batch_8"):
        entry = report["generation"][key]
        for name in ("hf_unsteered", "nsteer_steered", "hook_steered"):
            assert len(entry["times_s"][name]) >= 2 and all(_positive(t) for t in entry["times_s"][name])
        assert entry["nsteer_edit_matches_hook"] is True  # same edit both ways: identical greedy tokens
    overhead = report["overhead"]
    assert set(overhead["composed_edits"]) == {"0", "1", "2", "4"}
    assert set(overhead["cpu_ms_per_step"]) == {
        "hf_unsteered",
        "hook_edits_1",
        *(f"nsteer_edits_{n}" for n in (0, 1, 2, 4)),
    }
    assert all(_positive(value) for value in overhead["cpu_ms_per_step"].values())
    assert all(math.isfinite(value) for value in overhead["extra_ms_per_step_over_hf"].values())
    assert _positive(overhead["expected_nsteer_over_hook_batch_1"]) and _positive(
        overhead["expected_nsteer_over_hf_batch_8"]
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
    assert all(_positive(row["answers_per_s"]) for row in throughput.values())
