"""Planted cause: mislabelled training images, through `kedro run --env smoke`.

A fifth of one demo class's training images are moved into the other two class
folders (alternately), in a copy of the project, and the whole DAG runs on it: the
model trains on the wrong labels, as a user's would. The diagnosis must name
``label_noise`` and ``label_issues`` must list at least half of the moved images
among its first as many rows as images were moved. The clean demo run (the shared
``smoke_run``) must raise no ``label_noise``.

Ingestion splits by a hash of each image's duplicate group, whose id is a hash of
the file's bytes, not of its path or label: a moved file keeps its split. The test
checks that it did.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from .conftest import run_cut_to_the_finding

pytestmark = pytest.mark.slow

SOURCE = "trouser"
MOVED_SHARE = 0.2
SEED = 42


def read_outputs(project: Path) -> tuple[pd.DataFrame, list[dict], dict, pd.DataFrame]:
    """The manifest, diagnosis, noise estimate and label issues of a finished run."""
    data = project / "data"
    return (
        pd.read_csv(data / "02_intermediate/image_manifest.csv"),
        json.loads((data / "08_reporting/diagnosis.json").read_text()),
        json.loads((data / "08_reporting/label_noise_estimate.json").read_text()),
        pd.read_csv(data / "07_model_output/label_issues.csv"),
    )


@pytest.fixture(scope="module")
def planted_run(project_copy_factory, run_kedro) -> tuple[Path, dict[str, str]]:
    """The smoke DAG on the demo images with a fifth of SOURCE's training moved,
    training cut to the head stage (``run_cut_to_the_finding``).

    Returns:
        The finished project and, for each moved image, its new path -> old path.
    """
    project = project_copy_factory("planted_label_noise")
    ingested = run_kedro(["run", "--env", "smoke", "--pipeline", "ingestion"], project)
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    manifest = pd.read_csv(project / "data/02_intermediate/image_manifest.csv")
    train = manifest[(manifest["split"] == "train") & (manifest["label"] == SOURCE)]
    chosen = np.random.default_rng(SEED).choice(
        sorted(train["path"]), round(MOVED_SHARE * len(train)), replace=False
    )
    targets = sorted(set(manifest["label"]) - {SOURCE})
    root = project / "data/01_raw/images"
    moved = {}
    for index, old in enumerate(sorted(chosen)):
        new = f"{targets[index % len(targets)]}/{Path(old).name}"
        (root / old).rename(root / new)
        moved[new] = old
    run_cut_to_the_finding(project, reads_occlusion=False)
    return project, moved


def test_moved_images_stay_in_training_under_their_new_label(planted_run):
    project, moved = planted_run
    manifest, _, _, _ = read_outputs(project)
    rows = manifest.set_index("path").loc[list(moved)]
    assert (rows["split"] == "train").all()
    assert (rows["label"] == [path.split("/")[0] for path in moved]).all()


def test_the_diagnosis_names_label_noise(planted_run):
    project, _ = planted_run
    _, findings, estimate, _ = read_outputs(project)
    rules = [finding["rule"] for finding in findings]
    assert "label_noise" in rules, rules
    source = next(row for row in estimate["classes"] if row["class"] == SOURCE)
    assert source["noise_rate"] >= 0.1


def test_most_moved_images_lead_label_issues(planted_run):
    project, moved = planted_run
    _, _, _, issues = read_outputs(project)
    top = issues.sort_values("rank").head(len(moved))
    found = top[top["path"].isin(list(moved))]
    assert len(found) >= len(moved) / 2, (len(found), len(moved), issues.head(20))
    assert (found["suggested_label"] == SOURCE).all()


def test_reviewed_issues_leave_training_on_the_next_run(
    planted_run, project_copy_factory, run_kedro
):
    # The README's workflow, in a fresh copy: label_issues.csv kept as it is (as if
    # a person agreed with every row), the switch on, ingestion run again.
    planted, _ = planted_run
    manifest, _, _, issues = read_outputs(planted)
    project = project_copy_factory("label_exclusions")
    images = project / "data/01_raw/images"
    shutil.rmtree(images)
    shutil.copytree(planted / "data/01_raw/images", images)
    issues.to_csv(project / "data/01_raw/label_exclusions.csv", index=False)
    (project / "conf/smoke/parameters_ingestion.yml").write_text(
        "ingestion:\n  apply_label_exclusions: true\n"
    )
    result = run_kedro(["run", "--env", "smoke", "--pipeline", "ingestion"], project)
    assert result.returncode == 0, result.stderr[-3000:]
    after = pd.read_csv(project / "data/02_intermediate/image_manifest.csv")
    rejected = pd.read_csv(project / "data/02_intermediate/rejected_images.csv")
    assert set(manifest["path"]) - set(after["path"]) == set(issues["path"])
    reviewed = rejected[rejected["reason"].str.contains("label review")]
    assert set(reviewed["path"]) == set(issues["path"])
    kept = manifest.set_index("path").loc[after["path"], "split"]
    assert (kept.to_numpy() == after["split"].to_numpy()).all()


def test_a_clean_run_raises_no_label_noise(smoke_run):
    project, _, _ = smoke_run
    _, findings, estimate, issues = read_outputs(project)
    assert "label_noise" not in [finding["rule"] for finding in findings]
    assert estimate["estimated"] is True
    assert len(issues) == estimate["n_flagged"]
