"""Tests of the project hooks: missing inputs and one run at a time."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from kedro.io import DataCatalog
from kedro.pipeline import Node, Pipeline
from kedro_datasets.pandas import CSVDataset

from irv2_pipeline.hooks import (
    ConcurrentRunError,
    MissingInputError,
    MissingInputsHook,
    NodeTimingHook,
    RunLockHook,
)


def _identity(frame):
    return frame


@pytest.fixture
def two_pipelines(monkeypatch):
    producer = Pipeline([Node(_identity, "raw", "image_manifest", name="make")])
    consumer = Pipeline([Node(_identity, "image_manifest", "copies", name="use")])
    registry = {"ingestion": producer, "augmentation": consumer}
    monkeypatch.setattr("kedro.framework.project.pipelines", registry)
    return consumer


def test_missing_input_names_dataset_file_and_pipeline_to_run_first(
    tmp_path, two_pipelines
):
    manifest = tmp_path / "image_manifest.csv"
    catalog = DataCatalog({"image_manifest": CSVDataset(filepath=str(manifest))})
    with pytest.raises(MissingInputError) as error:
        MissingInputsHook().before_pipeline_run({}, two_pipelines, catalog)
    message = str(error.value)
    assert "`image_manifest`" in message
    assert str(manifest) in message
    assert "kedro run --pipeline ingestion" in message


def test_existing_inputs_let_the_run_start(tmp_path, two_pipelines):
    manifest = tmp_path / "image_manifest.csv"
    pd.DataFrame({"path": ["a/1.png"]}).to_csv(manifest, index=False)
    catalog = DataCatalog({"image_manifest": CSVDataset(filepath=str(manifest))})
    MissingInputsHook().before_pipeline_run({}, two_pipelines, catalog)


def test_a_second_run_is_refused_until_the_first_ends(tmp_path):
    params = {"project_path": str(tmp_path), "run_id": "first"}
    first, second = RunLockHook(), RunLockHook()
    first.before_pipeline_run(params)
    with pytest.raises(
        ConcurrentRunError, match=r"already writing.*pid \d+, run first"
    ):
        second.before_pipeline_run({**params, "run_id": "second"})
    first.after_pipeline_run()
    second.before_pipeline_run({**params, "run_id": "second"})
    second.on_pipeline_error()


def test_each_node_logs_its_duration(caplog):
    node = Node(_identity, "a", "b", name="scan_images")
    hook = NodeTimingHook()
    with caplog.at_level("INFO", logger="irv2_pipeline.hooks"):
        hook.before_node_run(node)
        hook.after_node_run(node)
    assert re.search(r"Node scan_images took \d+\.\ds", caplog.text)
