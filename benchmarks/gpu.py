"""The benchmark half of the GPU check (scripts/gpu_check.sh): real shapes, random weights, built on the GPU.

On CUDA: generation and extraction on a Llama-3.1-8B-shaped model in bfloat16 at batch 1 and 32, where the target is
steered / plain generate <= 1.10, then every section on a random model of the embedded model's shape (SmolLM2-135M:
30 layers, width 576) in bfloat16 (dtype auto). One JSON, ``benchmarks/results/cuda-<gpu>.json``.

Without a GPU (the fallback that lets the script be tried anywhere) the same code runs on the CPU with quick sizes
and small stand-ins, into ``benchmarks/results/cpu-fallback.json``; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.evaluation import EvaluationSettings  # noqa: E402
from benchmarks.extraction import ExtractionSettings  # noqa: E402
from benchmarks.generation import GenerationSettings  # noqa: E402
from benchmarks.memory import MemorySettings  # noqa: E402
from benchmarks.overhead import OverheadSettings  # noqa: E402
from benchmarks.report import format_table  # noqa: E402
from benchmarks.run import QUICK, Settings, run_device  # noqa: E402

# Sized for minutes: a rerun must fit the same device budget.
SMALL_SHAPE = Settings(
    generation=GenerationSettings(
        new_tokens=32, batch_sizes=(1, 32), min_rounds=4, max_rounds=6, budgets_s=(30.0, 30.0)
    ),
    overhead=OverheadSettings(new_tokens=32, rounds=4),
    extraction=ExtractionSettings(pairs=128, full_forward_every=4),
    evaluation=EvaluationSettings(prompts=16, new_tokens=32, batch_sizes=(1, 16), max_rounds=1, budget_s=30.0),
    memory=MemorySettings(pairs=(128, 1024)),
)
LARGE_SHAPE = Settings(
    generation=GenerationSettings(
        new_tokens=32, batch_sizes=(1, 32), min_rounds=4, max_rounds=6, budgets_s=(40.0, 40.0)
    ),
    extraction=ExtractionSettings(pairs=64, full_forward_every=4, research_prompts=8),
)
# (model kind, sections, settings) per run; the 8B shape first, as it holds the check's target.
CUDA_RUNS = (
    ("llama-8b-shape", "extraction,generation", LARGE_SHAPE),
    ("smollm2-shape", "extraction,generation,overhead,eval,memory", SMALL_SHAPE),
)
CPU_FALLBACK_RUNS = (
    ("smollm2-shape", "extraction,generation,eval", QUICK),
    ("tiny", "extraction,generation,overhead,memory", QUICK),
)


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (a file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def write(out: Path, runs: dict[str, Any], cuda: bool, wall_s: float, *, complete: bool, copy_to: Path | None) -> None:
    """The check's JSON: a summary (device, every headline ratio by model) and each model's full report."""
    summary = {
        "device": runs[next(iter(runs))]["meta"]["device"],
        "fallback": not cuda,
        "complete": complete,
        "wall_s": round(wall_s, 1),
        "ratios": {f"{kind}: {key}": value for kind, report in runs.items() for key, value in report["ratios"].items()},
    }
    out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, copy_to / out.name)


def main(argv: list[str] | None = None) -> int:
    """Run every model of the check, print the tables, write one JSON (and copy it with --copy-to)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copy-to", type=Path, default=None, help="also copy the JSON into this folder")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = f"cuda-{gpu_slug(torch.cuda.get_device_name(0))}" if cuda else "cpu-fallback"
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: dict[str, Any] = {}
    plan = CUDA_RUNS if cuda else CPU_FALLBACK_RUNS
    for kind, sections, settings in plan:
        options = argparse.Namespace(
            model=kind, dtype="auto", threads="all" if cuda else "1", only=sections, quick=not cuda
        )
        report = run_device(options, device, settings)
        print(format_table(report), flush=True)
        runs[kind] = report
        # Written after every model: a check stopped at its time limit still leaves what it measured.
        write(out, runs, cuda, time.perf_counter() - started, complete=len(runs) == len(plan), copy_to=args.copy_to)
        if cuda:
            torch.cuda.empty_cache()
    print(f"[gpu-check] wrote {out} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
