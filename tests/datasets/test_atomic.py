"""Tests of atomic saves: a failed or killed save leaves the previous output whole."""

from __future__ import annotations

import os
import subprocess
import sys

import matplotlib
import pandas as pd
import pytest

from irv2_pipeline.atomic import replaced_atomically
from irv2_pipeline.datasets import (
    AtomicCSVDataset,
    AtomicJSONDataset,
    AtomicMatplotlibDataset,
    MarkdownReportDataset,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

# Saves a 1 MB table under a 64 KB file-size limit: the write fails part of the way,
# as on a full disk (the OS says "File too large" instead of "No space left").
SAVE_UNDER_A_SIZE_LIMIT = """
import resource, signal, sys
import pandas as pd
from kedro_datasets.pandas import CSVDataset
from irv2_pipeline.datasets import AtomicCSVDataset
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
kind = {"atomic": AtomicCSVDataset, "plain": CSVDataset}[sys.argv[2]]
table = pd.DataFrame({"path": [f"{i:08d}.jpg" for i in range(60000)]})
kind(filepath=sys.argv[1]).save(table)
"""


@pytest.mark.parametrize("kind", ["atomic", "plain"])
def test_a_write_that_fails_half_way_leaves_the_previous_file(tmp_path, kind):
    path = tmp_path / "manifest.csv"
    good = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["x", "y"]})
    AtomicCSVDataset(filepath=str(path)).save(good)
    before = path.read_bytes()

    failed = subprocess.run(
        [sys.executable, "-c", SAVE_UNDER_A_SIZE_LIMIT, str(path), kind],
        capture_output=True,
        text=True,
        check=False,
    )

    assert failed.returncode != 0
    assert "File too large" in failed.stderr
    if kind == "atomic":
        assert f"Could not write {path}" in failed.stderr
    if kind == "atomic":
        assert path.read_bytes() == before
        assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]
    else:  # what kedro-datasets alone does: the fault is real
        assert path.read_bytes() != before


def test_json_figure_and_report_saves_replace_whole_files(tmp_path):
    AtomicJSONDataset(filepath=str(tmp_path / "m.json")).save({"accuracy": 0.5})
    figure = plt.figure()
    AtomicMatplotlibDataset(filepath=str(tmp_path / "plot.png")).save(figure)
    plt.close(figure)
    MarkdownReportDataset(filepath=str(tmp_path / "r.md")).save("# Report\n")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "plot.png", "r.md"]
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert AtomicJSONDataset(filepath=str(tmp_path / "m.json")).load() == {
        "accuracy": 0.5
    }


def test_a_save_removes_temporaries_of_dead_runs_and_keeps_a_live_ones(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    target = tmp_path / "summary.json"
    left_by_dead = tmp_path / f".summary.json.{dead.stdout.strip()}.tmp.json"
    left_by_dead.write_text('{"half": ')
    live = tmp_path / f".summary.json.{os.getppid()}.tmp.json"
    live.write_text("{")

    with replaced_atomically(target) as temporary:
        temporary.write_text("{}")

    assert target.read_text() == "{}"
    assert not left_by_dead.exists()
    assert live.exists(), "another running process may still be writing it"


def test_a_kill_during_a_save_leaves_the_previous_file(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("previous, whole")
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from irv2_pipeline.atomic import replaced_atomically\n"
        "with replaced_atomically(Path(sys.argv[1])) as temporary:\n"
        "    temporary.write_text('half of the new')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(target)], check=False)

    assert killed.returncode == -9
    assert target.read_text() == "previous, whole"
    assert MarkdownReportDataset(filepath=str(target)).load() == "previous, whole"
