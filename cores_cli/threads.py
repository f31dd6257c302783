"""How many CPU threads torch computes with (``--threads``).

torch's default is every core of the machine. On a shared machine that is the wrong number:
with one of two cores busy elsewhere, two threads run 2.9× slower than one (issue 16's
measurement), because each step waits for the thread that shares its core. The default here is
the CPUs this process may use (its affinity) that are idle now, sampled from ``/proc/stat`` over
a tenth of a second, shared among the worker processes of the run. ``OMP_NUM_THREADS``, when set,
is the user's choice and is left alone; ``--threads N`` overrides both.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

IDLE_SAMPLE_S = 0.1
IDLE_SHARE = 0.5
"""A CPU counts as free when it was idle at least this share of the sample."""
STAT = Path("/proc/stat")


def cpu_times(stat_text: str) -> dict[int, tuple[int, int]]:
    """CPU index → (idle ticks, total ticks) from the text of ``/proc/stat``."""
    times: dict[int, tuple[int, int]] = {}
    for line in stat_text.splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        ticks = [int(f) for f in fields[:8]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        times[int(name[3:])] = (idle, sum(ticks))
    return times


def idle_cpus(cpus: set[int], before: str, after: str) -> int:
    """How many of ``cpus`` were idle at least :data:`IDLE_SHARE` of the time between two
    readings of ``/proc/stat``."""
    first, second = cpu_times(before), cpu_times(after)
    free = 0
    for cpu in cpus:
        if cpu not in first or cpu not in second:
            free += 1  # not reported: nothing says it is busy
            continue
        idle = second[cpu][0] - first[cpu][0]
        total = second[cpu][1] - first[cpu][1]
        if total <= 0 or idle / total >= IDLE_SHARE:
            free += 1
    return free


def available_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity, where the platform tells)."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def default_threads(processes: int = 1, sample_s: float = IDLE_SAMPLE_S) -> int:
    """This process's share of the CPUs that are free now (at least 1)."""
    cpus = available_cpus()
    try:
        before = STAT.read_text()
        time.sleep(sample_s)
        after = STAT.read_text()
        free = idle_cpus(cpus, before, after)
    except OSError:  # no /proc (not Linux): every CPU of the affinity
        free = len(cpus)
    return max(1, free // max(1, processes))


def apply_threads(threads: int | None, processes: int = 1) -> int:
    """Set torch's thread count for this process: ``threads`` when given, else the user's
    ``OMP_NUM_THREADS`` when set, else :func:`default_threads`. Returns the count in effect."""
    import torch

    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    count = threads if threads is not None else default_threads(processes)
    torch.set_num_threads(count)
    return count
