"""Peak memory of extraction over a small and a large number of pairs, each count in a fresh subprocess.

The measure is the peak of live torch-allocated bytes during ``compute_vector`` (the profiler's allocation events),
on a random model of the benchmark model's width with a few layers and its tokenizer; the large set is the small one
repeated, so only the count differs. Run as a script, this module is that subprocess.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script (the subprocess): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fixtures import INSTRUCTION, benchmark_pairs, deep_narrow_config, random_model, tiny_tokenizer  # noqa: E402
from benchmarks.harness import synchronize  # noqa: E402


@dataclass(frozen=True)
class MemorySettings:
    """Pair counts and the memory model's depth."""

    pairs: tuple[int, int] = (256, 2048)
    layers: int = 2
    batch_size: int = 16


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) of this process; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The kernel's resident high-water mark (VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler(threading.Thread):
    """Polls RSS every few milliseconds (a fallback and cross-check for VmHWM)."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)


def torch_allocation_peak(function: Callable[[], Any]) -> tuple[int, int]:
    """Run ``function`` under the profiler; return (peak, final) live torch-allocated CPU bytes relative to the start.

    The running sum of the profiler's allocation events (frees are negative) is the memory torch's CPU allocator
    handed out, independent of how glibc caches and returns pages; its maximum is the peak of the run.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    events = sorted(
        (event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
        key=lambda event: event.start_ns(),
    )
    live = peak = 0
    for event in events:
        if event.device_type() != torch.autograd.DeviceType.CPU:
            continue
        live += event.nbytes()
        peak = max(peak, live)
    return peak, live


def memory_child(args: argparse.Namespace) -> None:
    """(Subprocess) compute one vector over ``--pairs`` pairs and print peak-memory figures as JSON."""
    from nsteer.extract import compute_vector
    from nsteer.models import wrap_model
    from nsteer.prompts import builtin_instruction

    torch.set_num_threads(args.threads)
    device = args.device
    if args.memory_model == "tiny":
        tokenizer = tiny_tokenizer()
        config = deep_narrow_config(4)
    else:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.memory_dir)
        config = AutoConfig.from_pretrained(args.memory_dir)
        config.num_hidden_layers = args.memory_layers
    handle = wrap_model(random_model(config, device), tokenizer, model_id=f"bench-memory-{args.memory_model}")
    base = benchmark_pairs(args.memory_base)
    pairs = [base[index % len(base)] for index in range(args.pairs)]
    instruction = builtin_instruction(INSTRUCTION)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    rss_before = current_rss()
    reset_ok = reset_peak_rss()
    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    torch_peak, torch_final = torch_allocation_peak(
        lambda: compute_vector(handle, instruction, pairs, batch_size=args.batch_size)
    )
    synchronize(device)
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    peak = max(peak_rss() if reset_ok else 0, sampler.peak)
    report = {
        "pairs": len(pairs),
        "seconds_with_profiler": round(seconds, 3),
        "torch_peak_mb": round(torch_peak / 2**20, 2),
        "torch_retained_mb": round(torch_final / 2**20, 2),
        # Resident memory of the whole process, the profiler's own event buffers included (they grow with the number
        # of batches): recorded for completeness, not a measure of extraction.
        "rss_before_mb": round(rss_before / 2**20, 2),
        "process_peak_rss_mb_profiler_included": round(peak / 2**20, 2),
        "rss_peak_source": "VmHWM reset via /proc/self/clear_refs" if reset_ok else "RSS sampled every 2 ms",
        "n_layers": handle.n_layers,
        "hidden_size": handle.hidden_size,
    }
    if device.startswith("cuda"):
        report["cuda_peak_delta_mb"] = round((torch.cuda.max_memory_allocated() - cuda_before) / 2**20, 2)
    print("MEMORY_JSON " + json.dumps(report), flush=True)


def bench_memory(
    handle: Any, settings: MemorySettings, device: str, threads: int, model_kind: str, target: float
) -> dict[str, Any]:
    """Peak memory of extraction over the small and the large pair count, each in a fresh subprocess."""
    small, large = settings.pairs
    with tempfile.TemporaryDirectory(prefix="nsteer-bench-") as directory:
        memory_model = "tiny" if model_kind == "tiny" else "shallow"
        if memory_model == "shallow":  # the benchmark model's tokenizer and config, saved so children load them fast
            handle.tokenizer.save_pretrained(directory)
            handle.hf_model.config.save_pretrained(directory)
        runs = {}
        for pairs in (small, large):
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--pairs",
                str(pairs),
                "--memory-base",
                str(small),
                "--memory-model",
                memory_model,
                "--memory-dir",
                directory,
                "--memory-layers",
                str(settings.layers),
                "--device",
                device,
                "--threads",
                str(threads),
                "--batch-size",
                str(settings.batch_size),
            ]
            completed = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
            line = next((out for out in completed.stdout.splitlines() if out.startswith("MEMORY_JSON ")), None)
            if completed.returncode != 0 or line is None:
                raise RuntimeError(
                    f"memory subprocess for {pairs} pairs failed:\n{completed.stdout[-2000:]}\n"
                    f"{completed.stderr[-4000:]}"
                )
            runs[str(pairs)] = json.loads(line[len("MEMORY_JSON ") :])
    key = "cuda_peak_delta_mb" if device.startswith("cuda") else "torch_peak_mb"
    ratio = runs[str(large)][key] / max(runs[str(small)][key], 1e-9)
    described = (
        f"{handle.hidden_size}-wide random model with {settings.layers} layers and the benchmark model's tokenizer"
        if memory_model == "shallow"
        else "the tiny benchmark model"
    )
    return {
        "model": described,
        "pair_counts": [small, large],
        "large_set": (
            f"the {small} pairs repeated x{large // small}: same prompt-length distribution, only the count differs"
        ),
        "runs": runs,
        "measure": key,
        "ratio": round(ratio, 4),
        "measure_note": (
            "peak of live torch-allocated bytes during compute_vector, from the profiler's allocation events, in a "
            "fresh process per pair count; RSS is not the headline because glibc's caching made RSS deltas vary by "
            "+-40% between identical runs, and the profiler's own buffers inflate RSS with the event count"
        ),
        "target": target,
        "met": abs(ratio - 1.0) <= target - 1.0,
    }


def parse_child_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The subprocess's options."""
    parser = argparse.ArgumentParser(description="(subprocess of the memory section) one compute_vector, measured")
    parser.add_argument("--pairs", type=int, required=True)
    parser.add_argument("--memory-base", type=int, required=True)
    parser.add_argument("--memory-model", choices=("tiny", "shallow"), default="tiny")
    parser.add_argument("--memory-dir", default="")
    parser.add_argument("--memory-layers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    return parser.parse_args(argv)


if __name__ == "__main__":
    memory_child(parse_child_args())
