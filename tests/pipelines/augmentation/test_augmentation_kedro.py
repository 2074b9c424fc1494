"""`kedro run --env smoke --pipeline augmentation` on a copy of the project."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog
from kedro_viz.models.flowchart.node_metadata import DataNodeMetadata
from kedro_viz.models.flowchart.nodes import GraphNode
from PIL import Image

from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.images import OpenPolicy, load_image
from irv2_pipeline.pipelines.augmentation.nodes import write_augmented_images
from tests.conftest import project_parameters

from .conftest import IMAGE_SIZE

AUGMENTED = Path("data/05_model_input/augmented")


@pytest.fixture(scope="module")
def smoke_project(project_copy_factory, run_kedro) -> tuple[Path, str]:
    """A project copy: augmentation alone first (refused), then after ingestion."""
    project = project_copy_factory("augmentation")
    refused = run_kedro(
        ["run", "--env", "smoke", "--pipeline", "augmentation"], project
    )
    result = run_kedro(
        ["run", "--env", "smoke", "--pipelines", "ingestion,augmentation"], project
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project, refused


def test_without_a_manifest_the_run_stops_and_names_ingestion(smoke_project):
    project, refused = smoke_project
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "`image_manifest`" in output
    assert "data/02_intermediate/image_manifest.csv" in output
    assert "run `kedro run --pipeline ingestion` first" in output


def test_the_smoke_run_writes_copies_of_every_training_image(smoke_project):
    project, _ = smoke_project
    image_manifest = pd.read_csv(project / "data/02_intermediate/image_manifest.csv")
    manifest = pd.read_csv(project / "data/05_model_input/augmented_manifest.csv")
    train = image_manifest[image_manifest["split"] == "train"]

    assert {"path", "source_path", "label", "copy", "seed", "ops"} <= set(
        manifest.columns
    )
    assert sorted(manifest["source_path"].unique()) == sorted(train["path"])
    assert len(manifest) == len(train)  # conf/smoke: one copy each
    for row in manifest.sample(10, random_state=0).itertuples():
        pixels = load_image(project / AUGMENTED / row.path, OpenPolicy()).pixels
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert all({"op", "params"} == set(op) for op in json.loads(row.ops))
    assert (project / "data/08_reporting/augmentation_preview.png").stat().st_size


def test_copies_rendered_in_another_process_are_byte_identical(smoke_project):
    project, _ = smoke_project
    manifest = pd.read_csv(project / "data/05_model_input/augmented_manifest.csv")
    params = project_parameters("smoke")["augmentation"]
    model = {"image_size": IMAGE_SIZE}  # the operations come from the manifest
    sample = manifest.sample(12, random_state=1)

    jobs, _ = write_augmented_images(
        sample, ImageFolder(project / "data/01_raw/images"), {}, model, params
    )
    for job in jobs.jobs:
        for rel, content in job.render(list(job.outputs)).items():
            assert content == (project / AUGMENTED / rel).read_bytes(), rel


def test_kedro_viz_shows_the_preview_of_the_preview_dataset(smoke_project, monkeypatch):
    project, _ = smoke_project
    monkeypatch.chdir(project)
    config = OmegaConfigLoader(
        str(project / "conf"), base_env="base", default_run_env="smoke"
    )
    catalog = DataCatalog.from_config(config["catalog"])

    for name, layer in (
        ("augmentation_preview", "reporting"),
        ("augmented_images", "model_input"),
    ):
        dataset = catalog.get(name)
        node = GraphNode.create_data_node(
            dataset_id=name,
            dataset_name=name,
            layer=layer,
            tags=set(),
            dataset=dataset,
            modular_pipelines=set(),
        )
        metadata = DataNodeMetadata(data_node=node)
        assert metadata.preview_type == "ImagePreview", name
        image = Image.open(io.BytesIO(base64.b64decode(metadata.preview)))
        assert image.format == "PNG" and min(image.size) > 60, name
