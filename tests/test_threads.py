"""The CPU thread policy (``--threads``): the CPUs that are idle now, shared among the
run's processes; the user's OMP_NUM_THREADS kept; an explicit count wins."""

from __future__ import annotations

import pytest
import torch

from cores_cli import threads as policy

BEFORE = "cpu  30 0 30 100 0 0 0 0 0 0\ncpu0 10 0 10 50 0 0 0 0 0 0\ncpu1 20 0 20 50 0 0 0 0 0 0\nintr 1 2 3\n"


def after(busy_cpu1: bool) -> str:
    """0.1 s later: cpu0 idle the whole time; cpu1 busy (user time) or idle too."""
    cpu1 = "30 0 20 50 0 0 0 0 0 0" if busy_cpu1 else "20 0 20 60 0 0 0 0 0 0"
    return f"cpu  40 0 30 110 0 0 0 0 0 0\ncpu0 10 0 10 60 0 0 0 0 0 0\ncpu1 {cpu1}\n"


def test_the_stat_lines_become_idle_and_total_ticks_per_cpu():
    assert policy.cpu_times(BEFORE) == {0: (50, 70), 1: (50, 90)}  # the aggregate "cpu" line is not a CPU


def test_a_busy_cpu_is_not_counted_as_free():
    assert policy.idle_cpus({0, 1}, BEFORE, after(busy_cpu1=True)) == 1
    assert policy.idle_cpus({0, 1}, BEFORE, after(busy_cpu1=False)) == 2
    assert policy.idle_cpus({1}, BEFORE, after(busy_cpu1=True)) == 0  # only the CPUs of the affinity count


@pytest.mark.parametrize("free,processes,expected", [(2, 1, 2), (1, 1, 1), (2, 2, 1), (0, 1, 1), (8, 3, 2)])
def test_the_default_is_this_process_share_of_the_free_cpus(monkeypatch, free, processes, expected):
    monkeypatch.setattr(policy, "idle_cpus", lambda cpus, before, after: free)
    monkeypatch.setattr(policy.time, "sleep", lambda s: None)
    assert policy.default_threads(processes) == expected


def test_without_proc_stat_every_cpu_of_the_affinity_counts(monkeypatch, tmp_path):
    import os

    monkeypatch.setattr(policy, "STAT", tmp_path / "absent")
    assert policy.default_threads() == len(os.sched_getaffinity(0))


def test_an_explicit_count_wins_and_omp_num_threads_is_kept(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        monkeypatch.setattr(policy, "default_threads", lambda processes=1: pytest.fail("the user's OMP_NUM_THREADS was overridden"))
        torch.set_num_threads(1)
        assert policy.apply_threads(None) == 1  # left as the user's setting made it
        assert policy.apply_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(policy, "default_threads", lambda processes=1: 1)
        assert policy.apply_threads(None) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_predict_takes_threads(tmp_path):
    from conftest import invoke_cli

    from cores_cli.bundled import EXAMPLE_QUERY, example_image

    before = torch.get_num_threads()
    try:
        result = invoke_cli("predict", example_image(), EXAMPLE_QUERY, "-o", tmp_path, "--threads", "1")
        assert result.exit_code == 0, result.stderr
        assert torch.get_num_threads() == 1
        result = invoke_cli("predict", example_image(), EXAMPLE_QUERY, "-o", tmp_path / "b", "--threads", "0")
        assert result.exit_code == 2 and "--threads" in result.stderr
    finally:
        torch.set_num_threads(before)
