"""nsteer benchmarks: what steering, extraction and evaluation cost next to the plain work they do.

Each section is a module of this folder (generation, overhead, extraction, evaluation, memory) on one timing harness
(harness.py: rotated rounds, paired ratios) and one set of fixtures (fixtures.py: models with an unwrapped twin, the
tests' tokenizer, the forward-hook baseline). See docs/performance.md for the results and how to read them.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/run.py                    # full run (make bench), embedded model
    .venv/bin/python benchmarks/run.py --quick --model tiny --out x.json   # smoke run on a tiny random model
    python3 benchmarks/run.py --device cuda --model llama-8b-shape         # a GPU, an 8B-shaped random model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.evaluation import EvaluationSettings, bench_eval_throughput  # noqa: E402
from benchmarks.extraction import ExtractionSettings, bench_extraction  # noqa: E402
from benchmarks.fixtures import MODEL_KINDS, open_bench_model, quick_vector  # noqa: E402
from benchmarks.generation import GenerationSettings, bench_generation  # noqa: E402
from benchmarks.harness import LoadLog, cpu_model, device_name, load_average, thread_counts  # noqa: E402
from benchmarks.memory import MemorySettings, bench_memory  # noqa: E402
from benchmarks.overhead import OverheadSettings, bench_overhead  # noqa: E402
from benchmarks.report import format_table  # noqa: E402

SECTIONS = ("extraction", "generation", "overhead", "eval", "memory")
CPU_TARGETS = {
    "steered_over_plain": 1.05,
    "nsteer_over_hook": 1.03,
    "edit_cost_rows_growth": 1.20,
    "extraction_over_forward": 1.20,
    "memory_large_over_small": 1.10,
}
GPU_TARGETS = {**CPU_TARGETS, "steered_over_plain": 1.10}
del GPU_TARGETS["nsteer_over_hook"]  # no target set on a GPU: reported only


@dataclass(frozen=True)
class Settings:
    """Every section's sizes and repeats."""

    generation: GenerationSettings = GenerationSettings()
    overhead: OverheadSettings = OverheadSettings()
    extraction: ExtractionSettings = ExtractionSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    memory: MemorySettings = MemorySettings()


FULL = Settings()
QUICK = Settings(
    generation=GenerationSettings(new_tokens=8, min_rounds=2, max_rounds=2, budgets_s=(5.0, 5.0)),
    overhead=OverheadSettings(layers=4, new_tokens=8, rounds=2),
    extraction=ExtractionSettings(pairs=16, full_forward_every=2, research_prompts=4),
    evaluation=EvaluationSettings(prompts=16, new_tokens=4, batch_sizes=(1, 4, 8, 16), max_rounds=1, budget_s=5.0),
    memory=MemorySettings(pairs=(8, 64)),
)
# A GPU: batch 1 and 32 (the shapes), shorter runs; the check has minutes, not a quarter of an hour.
GPU = Settings(
    generation=GenerationSettings(
        new_tokens=64, batch_sizes=(1, 32), min_rounds=4, max_rounds=8, budgets_s=(40.0, 40.0)
    ),
    overhead=OverheadSettings(rounds=6),
    extraction=ExtractionSettings(pairs=128, full_forward_every=8),
    evaluation=EvaluationSettings(prompts=32, new_tokens=32, batch_sizes=(1, 8, 32), max_rounds=1, budget_s=30.0),
    memory=MemorySettings(pairs=(128, 1024)),
)


def run_device(args: argparse.Namespace, device: str, settings: Settings) -> dict[str, Any]:
    """Every requested section on one device and model; returns the report."""
    import nnsight
    import transformers

    counts = thread_counts(args.threads)
    torch.set_num_threads(counts[0])
    targets = GPU_TARGETS if device.startswith("cuda") else CPU_TARGETS
    loads = LoadLog()
    started = time.perf_counter()
    load_start = load_average()
    loads.mark("load model")
    model = open_bench_model(args.model, device, args.dtype)
    handle = model.handle
    load_s = time.perf_counter() - started
    print(f"[bench] {device}: {model.description} loaded in {load_s:.1f} s; load average {load_average()}", flush=True)

    sections = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = sections - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(sorted(unknown))}; use {','.join(SECTIONS)}")
    report: dict[str, Any] = {
        name: None for name in ("generation", "overhead", "extraction", "memory", "eval_throughput")
    }
    if "extraction" in sections:
        loads.mark("extraction")
        report["extraction"], vector = bench_extraction(
            model, settings.extraction, device, targets["extraction_over_forward"]
        )
        print(f"[bench] extraction done ({report['extraction']['ratio']:.3f}); load {load_average()}", flush=True)
    else:
        vector = quick_vector(handle)
    if "generation" in sections:
        report["generation"] = {}
        for count in counts:  # each thread count: every variant runs under the same setting
            torch.set_num_threads(count)
            loads.mark(f"generation, {count} thread(s)")
            report["generation"][f"threads_{count}"] = bench_generation(
                model, settings.generation, device, vector, targets
            )
            print(f"[bench] generation at {count} thread(s) done; load {load_average()}", flush=True)
        torch.set_num_threads(counts[0])
    if "overhead" in sections:
        loads.mark("overhead")
        first = (report["generation"] or {}).get(f"threads_{counts[0]}")
        report["overhead"] = bench_overhead(settings.overhead, device, first, targets)
        print(f"[bench] per-step overhead done; load {load_average()}", flush=True)
    if "eval" in sections:
        loads.mark("eval throughput")
        report["eval_throughput"] = bench_eval_throughput(model, settings.evaluation, device, vector)
        print(f"[bench] eval throughput done; load {load_average()}", flush=True)
    if "memory" in sections:
        loads.mark("memory")
        kind = "tiny" if args.model == "tiny" else "shallow"
        report["memory"] = bench_memory(
            handle, settings.memory, device, counts[0], kind, targets["memory_large_over_small"]
        )
    loads.mark("end")
    meta = {
        "device": device_name(device),
        "model": model.description,
        "model_kind": args.model,
        "n_layers": handle.n_layers,
        "hidden_size": handle.hidden_size,
        "dtype": str(handle.dtype).replace("torch.", ""),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nnsight": getattr(nnsight, "__version__", "?"),
        "python": platform.python_version(),
        "torch_threads": counts,
        "load_start": load_start,
        "load_end": load_average(),
        "load_during": loads.summary(),
        "model_load_s": round(load_s, 2),
        "wall_s": round(time.perf_counter() - started, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "settings": dataclasses.asdict(settings),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    return {"meta": meta, "ratios": headline_ratios(report), "targets": targets, **report}


def headline_ratios(report: dict[str, Any]) -> dict[str, float]:
    """The ratios the targets speak of, flat, for a quick look at the JSON."""
    ratios: dict[str, float] = {}
    for threads_key, by_batch in (report.get("generation") or {}).items():
        for entry in by_batch.values():
            suffix = f"batch_{entry['batch_size']}_{threads_key}"
            ratios[f"steered_over_plain_{suffix}"] = entry["steered_over_plain"]["ratio"]
            ratios[f"nsteer_over_hook_{suffix}"] = entry["nsteer_over_hook"]["ratio"]
    if report.get("overhead"):
        rows = report["overhead"]["distinct_rows"]
        ratios["edit_cost_rows_growth"] = next(value for key, value in rows.items() if key.startswith("cost_"))
    if report.get("extraction"):
        ratios["extraction_over_forward"] = report["extraction"]["ratio"]
        ratios["extraction_speedup_over_research"] = report["extraction"]["speedup_over_research"]
    if report.get("memory"):
        ratios["memory_large_over_small"] = report["memory"]["ratio"]
    return ratios


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats: a smoke run, not a measurement")
    parser.add_argument("--model", choices=MODEL_KINDS, default="embedded", help="what to measure (default embedded)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on a GPU that has it, else float32), float32 ..."
    )
    parser.add_argument(
        "--threads",
        default=os.environ.get("NSTEER_BENCH_THREADS", "1,all"),
        help="torch intra-op thread counts for the generation section, e.g. 1,all (default); "
        "the other sections use the first",
    )
    parser.add_argument("--only", default="", help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<device>.json)")
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace, device: str) -> Settings:
    """QUICK with --quick, GPU sizes on CUDA, else the full CPU sizes."""
    if args.quick:
        return QUICK
    return GPU if device.startswith("cuda") else FULL


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON."""
    from nsteer.models import resolve_device

    args = parse_args(argv)
    torch.set_num_interop_threads(1)
    device = resolve_device(args.device)
    report = run_device(args, device, settings_for(args, device))
    name = device.split(":")[0]
    out = args.out or ROOT / "benchmarks" / "results" / f"{name}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report), flush=True)
    print(f"[bench] wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
