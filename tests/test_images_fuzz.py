"""A short coverage-guided fuzz run of ``images.load_image`` (atheris / libFuzzer).

The long run is a documented command (see tests/fuzz/fuzz_images.py and the README).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.fuzz.fuzz_images import make_seed_corpus

HARNESS = Path(__file__).parent / "fuzz" / "fuzz_images.py"
SECONDS = int(os.environ.get("IRV2_FUZZ_SECONDS", "30"))


def test_only_rejections_escape_and_no_input_hangs_or_bloats(tmp_path):
    corpus = tmp_path / "corpus"
    make_seed_corpus(corpus)
    result = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            f"-max_total_time={SECONDS}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            str(corpus),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        cwd=tmp_path,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    runs = [
        line for line in log.splitlines() if "stat::number_of_executed_units" in line
    ]
    assert runs and int(runs[0].split(":")[-1]) > 100, log[-2000:]
