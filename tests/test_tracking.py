"""Tests of the optional `mlflow` extra: what a run logs, and a project without it.

The tests that need kedro-mlflow skip without it; the last test runs only without it.
Set up the extra in its own environment: ``pip install -e ".[mlflow,test]"``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog
from kedro_datasets.json import JSONDataset
from kedro_datasets.text import TextDataset

from irv2_pipeline.datasets import HTMLReportDataset, MarkdownReportDataset
from irv2_pipeline.settings import CONFIG_LOADER_ARGS
from tests.conftest import PROJECT_ROOT

HISTORY = pd.DataFrame(
    {
        "stage": ["head", "head", "from_block8_1", "from_block8_1", "from_block8_1"],
        "epoch": [1, 2, 1, 2, 3],
        "loss": [1.10, 0.90, 0.80, 0.70, 0.65],
        "accuracy": [0.40, 0.55, 0.60, 0.66, 0.70],
        "val_loss": [1.05, 0.95, 0.85, 0.84, 0.86],
        "val_accuracy": [0.45, 0.50, 0.58, 0.61, 0.60],
        "learning_rate": [1e-3, 5e-4, 1e-4, 8e-5, 2e-5],
        "stage_index": [0, 0, 1, 1, 1],
        "cached_features": [True, True, False, False, False],
    }
)
REPORT = (
    "# Report\n\n![Confusion matrix](confusion_matrix.png)\n"
    "![Remote](https://example.com/plot.png)\n![Not made](missing.png)\n"
)


@pytest.fixture
def mlflow_store(tmp_path):
    """MLflow tracking to a SQLite store in tmp_path; returns the mlflow module."""
    pytest.importorskip("kedro_mlflow")
    import mlflow  # noqa: PLC0415 - only with the extra

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    yield mlflow
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def saved_outputs(tmp_path) -> tuple[DataCatalog, dict]:
    """A catalog of the tracked datasets in tmp_path, and what each one saves."""
    (tmp_path / "08_reporting").mkdir()
    (tmp_path / "08_reporting" / "confusion_matrix.png").write_bytes(b"png bytes")
    catalog = DataCatalog(
        {
            # The hook copies the saved file whatever its format: text stands in for Keras.
            "finetuned_model": TextDataset(filepath=str(tmp_path / "model.keras")),
            "class_names": JSONDataset(filepath=str(tmp_path / "class_names.json")),
            "evaluation_report": MarkdownReportDataset(
                filepath=str(tmp_path / "08_reporting" / "evaluation_report.md")
            ),
            "report_html": HTMLReportDataset(
                filepath=str(tmp_path / "08_reporting" / "report.html")
            ),
        }
    )
    metrics = {"accuracy": 0.75, "macro_f1": 0.7, "accuracy_ci95": [0.6, 0.9]}
    data = {
        "training_history": HISTORY,
        "finetuned_model": "model weights",
        "class_names": ["bag", "sneaker", "trouser"],
        "evaluation_metrics": {**metrics, "n_test": 40, "classes": ["bag"]},
        "evaluation_report": REPORT,
        "report_html": REPORT,
    }
    return catalog, data


def _save_all(hook, catalog: DataCatalog, data: dict) -> None:
    """Saves each dataset as a Kedro run does, then calls the hook."""
    hook.after_catalog_created(catalog=catalog)
    for name, value in data.items():
        if name in catalog:
            catalog.save(name, value)
        hook.after_dataset_saved(dataset_name=name, data=value)


def test_a_run_gets_per_epoch_metrics_test_metrics_model_and_report(
    mlflow_store, saved_outputs, tmp_path
):
    from irv2_pipeline.tracking import MlflowArtifactsHook  # noqa: PLC0415

    catalog, data = saved_outputs
    with mlflow_store.start_run() as run:
        _save_all(MlflowArtifactsHook(), catalog, data)
    client = mlflow_store.MlflowClient()
    run_id = run.info.run_id

    for column in ("loss", "val_accuracy", "learning_rate", "stage_index"):
        history = client.get_metric_history(run_id, column)
        # One point per epoch, numbered across stages (each stage restarts `epoch`).
        assert [m.step for m in history] == list(range(1, len(HISTORY) + 1))
        assert [m.value for m in history] == pytest.approx(HISTORY[column].tolist())
    logged = client.get_run(run_id).data.metrics
    assert logged["test_accuracy"] == 0.75 and logged["test_n_test"] == 40
    assert not {"test_accuracy_ci95", "test_classes", "test_epoch"} & set(logged)

    downloads = Path(client.download_artifacts(run_id, "", str(tmp_path / "got")))
    assert (downloads / "model" / "model.keras").read_text() == "model weights"
    assert json.loads((downloads / "model" / "class_names.json").read_text()) == [
        "bag",
        "sneaker",
        "trouser",
    ]
    # The report with the plots it links to, side by side as in data/08_reporting,
    # and the HTML report, which holds its plots.
    assert sorted(p.name for p in (downloads / "report").iterdir()) == [
        "confusion_matrix.png",
        "evaluation_report.md",
        "report.html",
    ]
    assert (downloads / "report" / "report.html").read_text() == (
        catalog.load("report_html")
    )
    assert (downloads / "report" / "evaluation_report.md").read_text() == REPORT


def test_without_an_active_run_nothing_is_logged(mlflow_store, saved_outputs):
    """A pipeline whose tracking kedro-mlflow disables must not start a stray run."""
    from irv2_pipeline.tracking import MlflowArtifactsHook  # noqa: PLC0415

    catalog, data = saved_outputs
    _save_all(MlflowArtifactsHook(), catalog, data)
    assert mlflow_store.active_run() is None
    assert mlflow_store.search_runs(search_all_experiments=True).empty


def test_mlflow_yml_is_valid_and_tracks_to_the_project_mlruns(tmp_path):
    pytest.importorskip("kedro_mlflow")
    from kedro_mlflow.config.kedro_mlflow_config import (  # noqa: PLC0415
        KedroMlflowConfig,
    )

    from irv2_pipeline import settings  # noqa: PLC0415
    from irv2_pipeline.tracking import MlflowArtifactsHook  # noqa: PLC0415

    assert any(isinstance(hook, MlflowArtifactsHook) for hook in settings.HOOKS)
    MlflowArtifactsHook().after_context_created(SimpleNamespace(project_path=tmp_path))
    loader = OmegaConfigLoader(
        str(PROJECT_ROOT / "conf"),
        **CONFIG_LOADER_ARGS,
        config_patterns={"mlflow": ["mlflow*"]},
    )
    # kedro-mlflow refuses unknown keys, so this catches a typo in mlflow.yml.
    config = KedroMlflowConfig.model_validate(loader["mlflow"])
    expected = f"sqlite:///{tmp_path.resolve().as_posix()}/mlruns/mlflow.db"
    assert config.server.mlflow_tracking_uri == expected


@pytest.mark.skipif(
    find_spec("kedro_mlflow") is not None, reason="checks a project without the extra"
)
def test_without_the_extra_the_project_loads_and_registers_nothing_of_mlflow(
    project_copy,
):
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        from kedro.framework.session import KedroSession
        from kedro.framework.startup import bootstrap_project

        bootstrap_project(Path.cwd())
        with KedroSession.create(project_path=Path.cwd(), env="smoke") as session:
            context = session.load_context()
            datasets = list(context.catalog.keys())
            plugins = session._hook_manager.get_plugins()
        print(json.dumps({
            "hooks": sorted(type(p).__module__ + "." + type(p).__name__ for p in plugins),
            "datasets": datasets,
            "modules": sorted(m for m in sys.modules if "mlflow" in m),
        }))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=project_copy,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "irv2_pipeline.hooks.RunLockHook" in loaded["hooks"]
    assert "training_history" in loaded["datasets"]
    assert not [hook for hook in loaded["hooks"] if "mlflow" in hook.lower()]
    assert loaded["modules"] == []
