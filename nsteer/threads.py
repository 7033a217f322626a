"""How many CPU threads the command line gives torch: one per core that other processes leave free.

torch's worker threads wait for each other by spinning, so a thread whose core another process holds stalls every
parallel step. With one busy process beside it on a 2-core machine, the embedded model generated 2.4-7x slower with
torch's default two threads than with one (docs/performance.md, "CPU threads"). So, unless the user fixes the count
(``--threads``, ``NSTEER_THREADS``, ``OMP_NUM_THREADS``), the command line measures between batches how much CPU time
other processes took on the CPUs this process may run on, and gives torch the cores they leave free, at most as many as
torch chose itself and a cgroup v2 CPU quota allows. It reads Linux's ``/proc/stat``; where that is missing it leaves
torch's choice alone.

The SDK never calls this: a library does not change its caller's thread count.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# Cores other processes must keep busy on average before a thread gives its core up: beside a process busy 40% of the
# time two threads were still faster than one on a 2-core machine, at 60% one was (benchmarks/threads.py).
BUSY = 0.5
MIN_WINDOW_S = 1.0  # shorter windows say little: /proc/stat counts in ticks of 10 ms


@dataclass(frozen=True)
class CpuSample:
    """CPU time counters at one moment: the allowed cores' busy time (every process), this process's own CPU time
    (all its threads), both in seconds, and a monotonic clock."""

    busy_s: float
    own_s: float
    at_s: float


def busy_seconds(proc_stat: str, cpus: Iterable[int], ticks_per_s: float) -> float | None:
    """Seconds the cores ``cpus`` spent busy since boot, from the text of ``/proc/stat``; None if a core is missing.

    Busy is user, nice, system, irq, softirq and steal (time a hypervisor gave to another machine is not ours either);
    idle and iowait are free.
    """
    wanted = {f"cpu{number}" for number in cpus}
    total, found = 0, set()
    for line in proc_stat.splitlines():
        name, _, rest = line.partition(" ")
        if name not in wanted:
            continue
        fields = rest.split()
        if len(fields) < 4 or not all(_digits(field) for field in fields):
            return None
        values = [int(field) for field in fields[:8]] + [0] * (8 - min(len(fields), 8))
        user, nice, system, _idle, _iowait, irq, softirq, steal = values
        total += user + nice + system + irq + softirq + steal
        found.add(name)
    return total / ticks_per_s if found == wanted and wanted else None


def _digits(text: str) -> bool:
    """Whether ``text`` is a count written in ASCII digits (``str.isdigit`` also takes ``²`` and other scripts)."""
    return text.isascii() and text.isdigit()


def quota_cores(cpu_max: str | None) -> int | None:
    """The cores a cgroup v2 CPU quota allows (``cpu.max``: ``quota period``, rounded up), or None without one."""
    if cpu_max:
        quota, _, period = cpu_max.strip().partition(" ")
        if _digits(quota) and _digits(period) and int(period) > 0:
            return max(1, math.ceil(int(quota) / int(period)))
    return None


def read_sample() -> CpuSample | None:
    """The counters now, or None where the system does not expose them (not Linux, a restricted ``/proc``)."""
    try:
        cpus = os.sched_getaffinity(0)
        ticks = os.sysconf("SC_CLK_TCK")
        busy = busy_seconds(Path("/proc/stat").read_text(), cpus, ticks) if ticks > 0 else None
        own = os.times()
    except (OSError, AttributeError, ValueError, OverflowError):  # ValueError: unknown sysconf name, undecodable text
        return None
    if busy is None:
        return None
    return CpuSample(busy, own.user + own.system, time.monotonic())


def free_threads(before: CpuSample, after: CpuSample, cpus: int, most: int) -> int | None:
    """Threads for the ``cpus`` this process may run on less those other processes kept busy between two samples (at
    least 1, at most ``most``); None when the window is too short to tell."""
    window = after.at_s - before.at_s
    if not math.isfinite(window) or window < MIN_WINDOW_S:
        return None
    others = ((after.busy_s - before.busy_s) - (after.own_s - before.own_s)) / window
    if not math.isfinite(others):
        return None  # counters no kernel writes: keep the count
    others = max(0.0, others)
    taken = max(0, math.ceil(others - BUSY - 1e-9))  # cores others hold; a little background work takes none
    return max(1, min(most, cpus - taken))


def _cpu_max() -> str | None:
    try:
        return Path("/sys/fs/cgroup/cpu.max").read_text()
    except (OSError, ValueError):
        return None


def _allowed_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (OSError, AttributeError):  # no affinity outside Linux: read_sample gives None there anyway
        return os.cpu_count() or 1


class ThreadGovernor:
    """Gives torch the free cores, re-measured each time :meth:`adjust` is called (between batches). One per
    command-line invocation; it holds only its last sample.

    ``initial`` is torch's own count; ``ceiling`` the most the governor gives: ``initial``, capped by the CPUs this
    process may run on and by a cgroup v2 CPU quota (on a 16-CPU host, a container allowed 4 cores gets at most 4
    threads, fewer only while the host's other work leaves fewer than 4 of its CPUs free). ``limit`` says which cap
    binds, when one does.
    """

    def __init__(
        self,
        get_threads: Callable[[], int],
        set_threads: Callable[[int], None],
        *,
        sample: Callable[[], CpuSample | None] = read_sample,
        start: CpuSample | None = None,
        cpus: int | None = None,
        quota: int | None = None,
    ) -> None:
        self._get, self._set, self._sample = get_threads, set_threads, sample
        self.initial = get_threads()
        self.cpus = cpus if cpus is not None else _allowed_cpus()
        if quota is None and cpus is None:  # this machine's (tests give both)
            quota = quota_cores(_cpu_max())
        self.ceiling, self.limit = self.initial, None
        if quota is not None and quota < self.ceiling and quota <= self.cpus:
            self.ceiling, self.limit = quota, f"the CPU quota allows {_cores(quota)}"
        elif self.cpus < self.ceiling:
            self.ceiling, self.limit = self.cpus, f"this process may run on {_cores(self.cpus)}"
        self._last = start if start is not None else sample()

    @property
    def threads(self) -> int:
        """torch's thread count now."""
        return self._get()

    def adjust(self) -> int | None:
        """Measure the window since the last sample and set torch's threads to the free cores; the count set, or None
        when nothing changed."""
        now = self._sample() if self._last is not None else None
        threads = None
        if self._last is not None and now is not None:
            threads = free_threads(self._last, now, self.cpus, self.ceiling)
        if threads is not None:
            self._last = now
        elif self._get() > self.ceiling:
            threads = self.ceiling  # the caps hold from the first look, whatever the window
        else:
            return None  # keep the window open until it says something
        if threads == self._get():
            return None
        self._set(threads)
        return threads


def _cores(count: int) -> str:
    return f"{count} core{'s' if count != 1 else ''}"
