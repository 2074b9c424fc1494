"""Tests of parallel.py: how many worker processes `workers: auto` gives."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from irv2_pipeline.parallel import worker_count

COUNT_ON_ONE_CORE = """
import os
from irv2_pipeline.parallel import worker_count
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
