"""The command line's thread count: /proc/stat read right, free cores counted right, a real busy process seen."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nsteer.threads import CpuSample, ThreadGovernor, busy_seconds, free_threads, quota_cores, read_sample

PROC_STAT = """cpu  700 20 100 5000 30 0 5 7 0 0
cpu0 300 10 50 2500 10 0 2 3 0 0
cpu1 400 10 50 2500 20 0 3 4 0 0
intr 123 0 0
ctxt 456
"""


def test_busy_time_counts_user_nice_system_irq_softirq_and_steal_of_the_allowed_cores() -> None:
    assert busy_seconds(PROC_STAT, {0}, 100) == pytest.approx((300 + 10 + 50 + 2 + 3) / 100)
    assert busy_seconds(PROC_STAT, {0, 1}, 100) == pytest.approx((365 + 400 + 10 + 50 + 3 + 4) / 100)
    # An older kernel's shorter lines (no steal column) count what they have.
    assert busy_seconds("cpu0 300 10 50 2500 10 0 2\n", {0}, 100) == pytest.approx(3.62)


@pytest.mark.parametrize(
    "text",
    [
        PROC_STAT.replace("cpu1 ", "cpuX "),  # an allowed core missing
        PROC_STAT.replace("cpu0 300", "cpu0 -300"),  # not a count
        PROC_STAT.replace("cpu0 300", "cpu0 ³00"),  # a digit to str.isdigit, not to int()
        "cpu0 1 2\n",  # too few fields
        "",
    ],
)
def test_unreadable_counters_give_none_never_a_guess(text) -> None:
    assert busy_seconds(text, {0, 1}, 100) is None


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [(None, None), ("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000", 1), ("800000 100000", 8)]
    + [("junk", None), ("100 0", None), ("", None), ("² 100000", None), ("100000 ²", None)],
)
def test_a_cgroup_quota_is_read_as_whole_cores(cpu_max, cores) -> None:
    assert quota_cores(cpu_max) == cores


def sample(busy: float, own: float, at: float) -> CpuSample:
    return CpuSample(busy_s=busy, own_s=own, at_s=at)


@pytest.mark.parametrize(
    ("others", "threads"),
    [(0.0, 2), (0.1, 2), (0.4, 2), (0.5, 2), (0.55, 1), (1.0, 1), (2.0, 1), (5.0, 1)],
)
def test_free_threads_give_up_a_core_only_to_real_work_of_others(others, threads) -> None:
    before = sample(100.0, 10.0, 50.0)
    after = sample(100.0 + 1.5 * 4 + others * 4, 10.0 + 1.5 * 4, 54.0)  # we used 1.5 cores for 4 s
    assert free_threads(before, after, cpus=2, most=2) == threads


def test_free_threads_never_exceed_torch_s_own_count_and_wait_for_a_long_enough_window() -> None:
    before = sample(0.0, 0.0, 0.0)
    assert free_threads(before, sample(0.0, 0.0, 10.0), cpus=16, most=4) == 4
    assert free_threads(before, sample(3.0, 0.0, 1.0), cpus=16, most=16) == 13  # 3 cores busy elsewhere
    assert free_threads(before, sample(10.0, 0.0, 1.0), cpus=16, most=4) == 4  # a quota of 4, 6 CPUs still free
    assert free_threads(before, sample(14.0, 0.0, 1.0), cpus=16, most=4) == 2
    assert free_threads(before, sample(5.0, 0.0, 0.5), cpus=2, most=2) is None  # half a second says too little


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_counters_no_kernel_writes_leave_the_count_alone(bad) -> None:
    before = sample(0.0, 0.0, 0.0)
    assert free_threads(before, sample(bad, 0.0, 2.0), cpus=2, most=2) is None
    assert free_threads(before, sample(1.0, bad, 2.0), cpus=2, most=2) is None
    assert free_threads(before, sample(1.0, 0.0, bad), cpus=2, most=2) is None


def test_a_clock_tick_rate_of_zero_reads_as_no_counters(monkeypatch) -> None:
    monkeypatch.setattr(os, "sysconf", lambda name: 0)
    assert read_sample() is None


class Threads:
    def __init__(self, count: int) -> None:
        self.count, self.sets = count, []

    def get(self) -> int:
        return self.count

    def set(self, count: int) -> None:
        self.count = count
        self.sets.append(count)


def test_the_governor_follows_the_load_between_batches() -> None:
    samples = iter(
        [
            sample(0.0, 0.0, 0.0),  # the start
            sample(4.0, 1.0, 2.0),  # 1.5 cores of others over 2 s: one thread
            sample(4.5, 1.0, 2.5),  # half a second later: too short, nothing changes
            sample(6.0, 2.5, 4.0),  # the window since 2 s: others idle: two threads again
        ]
    )
    threads = Threads(2)
    governor = ThreadGovernor(threads.get, threads.set, sample=lambda: next(samples), cpus=2)
    assert governor.adjust() == 1 and threads.count == 1
    assert governor.adjust() is None and threads.count == 1
    assert governor.adjust() == 2 and threads.sets == [1, 2]


def test_a_quota_caps_the_threads_even_on_a_quiet_machine() -> None:
    samples = iter([sample(0.0, 0.0, 0.0), sample(1.0, 1.0, 2.0)])
    threads = Threads(16)
    governor = ThreadGovernor(threads.get, threads.set, sample=lambda: next(samples), cpus=16, quota=4)
    assert governor.ceiling == 4 and governor.limit == "the CPU quota allows 4 cores"
    assert governor.adjust() == 4


def test_the_caps_hold_from_the_first_look_however_short_the_window() -> None:
    samples = iter([sample(0.0, 0.0, 0.0), sample(0.1, 0.1, 0.2)])  # 0.2 s: too short to judge other work
    threads = Threads(4)
    governor = ThreadGovernor(threads.get, threads.set, sample=lambda: next(samples), cpus=2)
    assert governor.ceiling == 2 and governor.limit == "this process may run on 2 cores"
    assert governor.adjust() == 2 and threads.sets == [2]


def test_without_counters_the_governor_leaves_torch_alone() -> None:
    threads = Threads(2)
    governor = ThreadGovernor(threads.get, threads.set, sample=lambda: None, cpus=2)
    assert governor.adjust() is None and threads.sets == []


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads Linux's /proc/stat")
def test_a_real_busy_process_is_seen_as_taking_a_core() -> None:
    """Against the kernel itself: while this process sleeps, a child spins for 1.5 s; the counters must show about a
    core of other work, enough to give a thread up on a 2-core machine."""
    before = read_sample()
    assert before is not None
    spin = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end:\n    pass\n"
    child = subprocess.Popen([sys.executable, "-c", spin])
    child.wait(timeout=60)
    time.sleep(0.05)
    after = read_sample()
    assert after is not None and after.at_s - before.at_s >= 1.5
    others = ((after.busy_s - before.busy_s) - (after.own_s - before.own_s)) / (after.at_s - before.at_s)
    assert 0.5 <= others <= len(os.sched_getaffinity(0)) + 0.1
    assert free_threads(before, after, cpus=2, most=2) == 1
