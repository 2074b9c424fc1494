"""A short coverage-guided fuzz run of ``images.load_image`` (atheris / libFuzzer).

The run is seeded (``-seed``) and counted in inputs (``-runs``), so CI repeats the same
inputs; ``IRV2_FUZZ_SEED`` and ``IRV2_FUZZ_RUNS`` change them. The long, open-ended run is
the command in tests/fuzz/fuzz_images.py. When an input fails, its bytes (base64) are in
the failure message, to turn into a regression test.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

from tests.fuzz.fuzz_images import make_seed_corpus

HARNESS = Path(__file__).parent / "fuzz" / "fuzz_images.py"
SEED = int(os.environ.get("IRV2_FUZZ_SEED", "1"))
RUNS = int(os.environ.get("IRV2_FUZZ_RUNS", "20000"))
# Memory bound per fuzz process: decoding an image within the fuzz policy's 4 megapixels
# takes far less (71 MB at most in standalone runs).
RSS_LIMIT_MB = 512


def test_only_rejections_escape_and_no_input_hangs_or_bloats(tmp_path):
    corpus = tmp_path / "corpus"
    make_seed_corpus(corpus)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    # libFuzzer's -rss_limit_mb reads the peak RSS of its process (getrusage), and
    # Linux gives a program started straight from pytest pytest's own peak (over 2 GB
    # late in the suite, with TensorFlow loaded). A shell that forks the fuzzer gives
    # it a fresh count: the limit then bounds what the inputs take.
    result = subprocess.run(
        [
            "sh",
            "-c",
            '"$@"; exit $?',
            "sh",
            sys.executable,
            str(HARNESS),
            f"-seed={SEED}",
            f"-runs={RUNS}",
            "-timeout=10",
            f"-rss_limit_mb={RSS_LIMIT_MB}",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/",
            str(corpus),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    log = result.stdout + result.stderr
    failing = {
        path.name: base64.b64encode(path.read_bytes()[:4096]).decode()
        for path in artifacts.iterdir()
    }
    assert result.returncode == 0, f"{log[-3000:]}\nfailing inputs: {failing}"
    runs = [
        line for line in log.splitlines() if "stat::number_of_executed_units" in line
    ]
    assert runs and int(runs[0].split(":")[-1]) >= RUNS, log[-2000:]
