"""Tests of the project hooks: missing inputs and one run at a time."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline
from kedro_datasets.pandas import CSVDataset

from irv2_pipeline.hooks import (
    ConcurrentRunError,
    MissingInputError,
    MissingInputsHook,
    NodeTimingHook,
    ParameterCheckHook,
    ParameterError,
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


def _project_with(tmp_path, local_params: str) -> Path:
    (tmp_path / "conf" / "base").mkdir(parents=True)
    (tmp_path / "conf" / "local").mkdir()
    (tmp_path / "conf" / "base" / "parameters.yml").write_text(
        "model: {weights: null, image_size: 299, seed: 1}\n"
        "ingestion: {split: {train: 0.7, val: 0.15, test: 0.15}}\n"
        "augmentation: {presets: {standard: []}}\n"
    )
    (tmp_path / "conf" / "local" / "parameters.yml").write_text(local_params)
    return tmp_path


def _check(project: Path, params: dict) -> None:
    catalog = DataCatalog({"parameters": MemoryDataset(params)})
    ParameterCheckHook().before_pipeline_run(
        {"project_path": str(project), "env": "local"}, catalog
    )


def test_unknown_keys_and_impossible_values_are_named_with_their_file(tmp_path):
    project = _project_with(
        tmp_path,
        "model: {image_sise: 80, image_size: 64}\n"
        "ingestion: {split: {train: 0.8, val: 0.15, test: 0.15}}\n",
    )
    params = {
        "model": {"weights": None, "image_size": 64, "seed": 1},
        "ingestion": {"split": {"train": 0.8, "val": 0.15, "test": 0.15}},
    }
    with pytest.raises(ParameterError) as error:
        _check(project, params)
    message = str(error.value)
    assert "conf/local/parameters.yml: unknown key `model.image_sise`" in message
    assert (
        "conf/local/parameters.yml: ingestion.split" in message
        and "sum to 1" in message
    )
    assert "conf/local/parameters.yml: model.image_size = 64" in message


def test_known_keys_and_own_presets_pass(tmp_path):
    project = _project_with(
        tmp_path, "model: {image_size: 150}\naugmentation: {presets: {mine: []}}\n"
    )
    params = {
        "model": {"weights": None, "image_size": 150, "seed": 1},
        "ingestion": {"split": {"train": 0.7, "val": 0.15, "test": 0.15}},
    }
    _check(project, params)
