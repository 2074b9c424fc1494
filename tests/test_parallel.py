"""Tests of parallel.py: how many worker processes `workers: auto` gives."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from irv2_pipeline.parallel import IN_FLIGHT_PER_WORKER, process_map, worker_count

COUNT_ON_ONE_CORE = """
import os
from irv2_pipeline.parallel import IN_FLIGHT_PER_WORKER, process_map, worker_count
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
print(worker_count("auto"))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_auto_counts_the_cores_this_process_may_use():
    pinned = subprocess.run(
        [sys.executable, "-c", COUNT_ON_ONE_CORE],
        capture_output=True,
        text=True,
        check=True,
    )
    assert pinned.stdout.strip() == "1"


def test_explicit_counts_and_bad_values():
    assert worker_count(3) == 3
    with pytest.raises(ValueError, match="augmentation.workers = 0"):
        worker_count(0, "augmentation.workers")


def square(number: int) -> int:
    """A job for worker processes (module-level, so that it pickles)."""
    if number < 0:
        raise ValueError(f"negative job {number}")
    return number * number


def test_results_come_in_order_with_few_jobs_taken_ahead():
    taken = []

    def jobs():
        for number in range(200):
            taken.append(number)
            yield number

    results = process_map(square, jobs(), 2, chunksize=4)
    assert next(results) == 0
    # Only the chunks in flight were taken, not all 200 jobs (as Executor.map does).
    assert len(taken) <= (IN_FLIGHT_PER_WORKER * 2 + 1) * 4
    assert [0, *results] == [number * number for number in range(200)]


def test_a_failing_job_raises_its_error():
    with pytest.raises(ValueError, match="negative job -1"):
        list(process_map(square, [3, 2, -1, 5], 2, chunksize=1))
