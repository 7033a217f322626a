"""The timing harness every benchmark section shares: machine facts, one timed call, rotated rounds, paired ratios.

Variants of a comparison run in rounds; round ``r`` runs them in the order rotated by ``r`` (A B C D, then B C D A,
...), so over any multiple of the variant count each variant sits in every slot equally often and none always runs
first (cold caches) or right after the slowest. The headline ratio of two variants is the median of their per-round
ratios, which cancels most of a shared machine's drift; medians, minima and the spread go into the JSON beside it.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: str) -> str:
    """``cpu``, or ``cuda (NVIDIA H100 80GB HBM3)``."""
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return device


@dataclass
class LoadLog:
    """Load averages and start times sampled at the start of every section."""

    samples: list[tuple[str, list[float], float]] = field(default_factory=list)

    def mark(self, section: str) -> None:
        """Record the load average and the time now, labelled with the section about to run."""
        self.samples.append((section, load_average(), time.perf_counter()))

    def summary(self) -> dict[str, Any]:
        """Every sample (with the section's duration) plus min / max of the 1-minute figure."""
        ones = [load[0] for _, load, _ in self.samples if load]
        ends = [start for _, _, start in self.samples[1:]] + [self.samples[-1][2]]
        return {
            "samples": [
                {"section": name, "load": load, "seconds": round(end - start, 1)}
                for (name, load, start), end in zip(self.samples, ends)
            ],
            "one_minute_min": min(ones) if ones else None,
            "one_minute_max": max(ones) if ones else None,
        }


def synchronize(device: str) -> None:
    """Wait for queued GPU work so wall times are complete."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function: Callable[[], Any], device: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process, all threads) of one call."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    function()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """``names`` rotated left by ``round_index``: the run order of that round."""
    shift = round_index % len(names)
    return list(names[shift:]) + list(names[:shift])


@dataclass
class Timings:
    """Wall and CPU seconds per variant, one entry per round."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def compare(self, numerator: str, denominator: str, target: float | None = None) -> dict[str, Any]:
        """``compare`` of two variants, with the CPU-time ratio beside the wall-time one."""
        return compare(self.wall[numerator], self.wall[denominator], target, self.cpu[numerator], self.cpu[denominator])

    def per_step_ms(self, steps: int, cpu: bool = False) -> dict[str, float]:
        """Median milliseconds per step of every variant (wall, or CPU time with ``cpu``)."""
        source = self.cpu if cpu else self.wall
        return {name: round(1000 * statistics.median(values) / steps, 3) for name, values in source.items()}

    def rounded(self) -> dict[str, dict[str, list[float]]]:
        """Every sample, rounded, for the JSON."""
        return {
            "wall_s": {name: [round(t, 4) for t in values] for name, values in self.wall.items()},
            "cpu_s": {name: [round(t, 4) for t in values] for name, values in self.cpu.items()},
        }


def rounds(
    variants: dict[str, Callable[[], Any]], device: str, *, min_rounds: int, max_rounds: int, budget_s: float
) -> Timings:
    """Run every variant once per round in rotated order; rounds beyond ``min_rounds`` only while within the budget."""
    names = list(variants)
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    started = time.perf_counter()
    for index in range(max_rounds):
        elapsed = time.perf_counter() - started
        if index >= min_rounds and elapsed + elapsed / index > budget_s:
            break
        for name in rotated(names, index):
            wall, cpu = timed(variants[name], device)
            timings.wall[name].append(wall)
            timings.cpu[name].append(cpu)
    return timings


def compare(
    numerator: Sequence[float],
    denominator: Sequence[float],
    target: float | None = None,
    numerator_cpu: Sequence[float] | None = None,
    denominator_cpu: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Ratio statistics of paired samples: the median of per-pair ratios (headline), of medians and of minima.

    With CPU times, ``cpu_ratio`` is the median of per-pair CPU-time ratios: with one torch thread it counts only the
    time this process ran, so it is far less sensitive to other processes' load than wall time.
    """
    paired = [a / b for a, b in zip(numerator, denominator)]
    result: dict[str, Any] = {
        "ratio": round(statistics.median(paired), 4),
        "ratio_of_medians": round(statistics.median(numerator) / statistics.median(denominator), 4),
        "ratio_of_minima": round(min(numerator) / min(denominator), 4),
        "paired_min": round(min(paired), 4),
        "paired_max": round(max(paired), 4),
        "samples": len(paired),
        "a_median_s": round(statistics.median(numerator), 4),
        "b_median_s": round(statistics.median(denominator), 4),
    }
    if numerator_cpu and denominator_cpu:
        result["cpu_ratio"] = round(statistics.median(a / b for a, b in zip(numerator_cpu, denominator_cpu)), 4)
        result["cpu_a_median_s"] = round(statistics.median(numerator_cpu), 4)
        result["cpu_b_median_s"] = round(statistics.median(denominator_cpu), 4)
    if target is not None:
        result["target"] = target
        result["met"] = result["ratio"] <= target
    return result


def thread_counts(requested: str) -> list[int]:
    """``1``, ``all`` (this machine's cores) or a comma list like ``1,all``, as distinct thread counts in order."""
    counts: list[int] = []
    for part in requested.split(","):
        part = part.strip()
        value = (os.cpu_count() or 1) if part == "all" else int(part)
        if value < 1:
            raise ValueError(f"thread count must be at least 1, got {part!r}")
        if value not in counts:
            counts.append(value)
    return counts
