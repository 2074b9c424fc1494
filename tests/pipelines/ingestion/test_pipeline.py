"""`kedro run --env smoke --pipeline ingestion` on a copy of the demo images."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from irv2_pipeline.pipelines.ingestion import create_pipeline
from tests.pipelines.ingestion.test_nodes import add_blank_pair

# DESIGN.md's key columns of image_manifest.
MANIFEST_COLUMNS = {
    "path",
    "label",
    "split",
    "group",
    "sha256",
    "phash",
    "width",
    "height",
}


@pytest.fixture(scope="module")
def ingested(project_copy_factory, run_kedro, folder_digest) -> tuple[Path, str]:
    """A project copy after one ingestion run, and the raw tree's digest before it."""
    project = project_copy_factory("ingestion")
    before = folder_digest(project / "data" / "01_raw")
    result = run_kedro(["run", "--env", "smoke", "--pipeline", "ingestion"], project)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project, before


def test_pipeline_has_the_four_nodes_and_persisted_outputs():
    pipeline = create_pipeline()
    assert [node.name for node in pipeline.nodes] == [
        "scan_images",
        "group_duplicates",
        "split_images",
        "summarize_dataset",
    ]
    assert pipeline.inputs() == {
        "raw_images",
        "label_exclusions",
        "params:images",
        "params:ingestion",
    }
    assert {
        "image_manifest",
        "rejected_images",
        "duplicate_report",
        "dataset_summary",
        "class_distribution_plot",
    } <= pipeline.all_outputs()


def test_run_writes_every_output(ingested):
    project, _ = ingested
    for relative in (
        "data/02_intermediate/image_manifest.csv",
        "data/02_intermediate/rejected_images.csv",
        "data/02_intermediate/duplicate_report.csv",
        "data/08_reporting/dataset_summary.json",
        "data/08_reporting/class_distribution.png",
    ):
        path = project / relative
        assert path.is_file() and path.stat().st_size > 0, relative
    png = (project / "data/08_reporting/class_distribution.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_manifest_covers_the_demo_images(ingested):
    project, _ = ingested
    raw = project / "data" / "01_raw" / "images"
    manifest = pd.read_csv(project / "data/02_intermediate/image_manifest.csv")
    rejected = pd.read_csv(project / "data/02_intermediate/rejected_images.csv")
    assert MANIFEST_COLUMNS <= set(manifest.columns)
    assert list(rejected.columns) == ["path", "reason"]
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert manifest["path"].is_unique
    assert manifest.groupby("group")["split"].nunique().max() == 1
    labels = sorted(p.name for p in raw.iterdir() if p.is_dir())
    assert sorted(manifest["label"].unique()) == labels
    assert (manifest["label"] == manifest["path"].str.split("/").str[0]).all()
    on_disk = {p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()}
    assert set(manifest["path"]) | set(rejected["path"]) == on_disk
    assert set(manifest["path"]).isdisjoint(rejected["path"])

    summary = json.loads(
        (project / "data/08_reporting/dataset_summary.json").read_text()
    )
    assert summary["n_images"] == len(manifest)
    assert summary["n_rejected"] == len(rejected)
    assert summary["classes"] == labels


def test_raw_images_are_left_untouched(ingested, folder_digest):
    project, before = ingested
    assert folder_digest(project / "data" / "01_raw") == before


@pytest.fixture(scope="module")
def ingested_with_blanks(
    project_copy_factory, run_kedro, folder_digest
) -> tuple[Path, list[str], str]:
    """Ingestion of the demo images plus a flat red CMYK JPEG among the bags and an
    all-black PNG among the trousers.

    Returns:
        The project, the two blank images' manifest paths and the raw tree's digest
        before the run.
    """
    project = project_copy_factory("ingestion_blanks")
    blank = add_blank_pair(project / "data/01_raw/images", ("bag", "trouser"))
    before = folder_digest(project / "data" / "01_raw")
    result = run_kedro(["run", "--env", "smoke", "--pipeline", "ingestion"], project)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project, blank, before


def test_blank_images_are_flagged_not_a_label_conflict(ingested_with_blanks):
    # Their pHashes are equal (pHash ignores colour and the DC term), and
    # they used to be grouped as near duplicates, reported as a label conflict and
    # dropped from training.
    project, blank, _ = ingested_with_blanks
    data = project / "data"
    manifest = pd.read_csv(data / "02_intermediate/image_manifest.csv")
    rejected = pd.read_csv(data / "02_intermediate/rejected_images.csv")
    duplicates = pd.read_csv(data / "02_intermediate/duplicate_report.csv")
    summary = json.loads((data / "08_reporting/dataset_summary.json").read_text())
    assert sorted(manifest.loc[manifest["blank"], "path"]) == sorted(blank)
    assert not manifest["label_conflict"].any()
    assert set(blank).isdisjoint(rejected["path"])
    grouped = duplicates["paths"].str.split("; ").explode()
    assert set(blank).isdisjoint(grouped), duplicates
    assert not duplicates["label_conflict"].any()
    assert summary["blank_images"] == sorted(blank)
    assert summary["label_conflict_groups"] == 0
    assert any("2 blank or near-constant images" in w for w in summary["warnings"])


def test_raw_images_with_blanks_are_left_untouched(ingested_with_blanks, folder_digest):
    project, _, before = ingested_with_blanks
    assert folder_digest(project / "data" / "01_raw") == before
