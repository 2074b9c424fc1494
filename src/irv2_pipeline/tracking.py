"""Experiment tracking for the optional ``mlflow`` extra (kedro-mlflow).

kedro-mlflow, registered through its entry point, opens one MLflow run per
``kedro run`` and logs every node's parameters. ``MlflowArtifactsHook`` adds what it
cannot see as parameters: the per-epoch training history as metrics, the test metrics,
the model file, the evaluation report with its plots, and the one-file HTML report
(MLflow's UI shows it as a page). ``settings.py`` registers the
hook only when kedro-mlflow is installed, so without the extra this module is never
imported.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import mlflow
import pandas as pd
from kedro.framework.context import KedroContext
from kedro.framework.hooks import hook_impl
from kedro.io import CatalogProtocol
from mlflow.entities import Metric
from omegaconf import OmegaConf

logger = logging.getLogger(__name__)

# Columns of `training_history` logged per epoch; `stage_index` marks stage boundaries.
HISTORY_METRICS = (
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "stage_index",
)
# The model and its output order travel together.
MODEL_DATASETS = ("finetuned_model", "class_names")
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


class MlflowArtifactsHook:
    """Logs the history, test metrics, model and report to the active MLflow run.

    Nothing is logged when no run is active (a pipeline listed in kedro-mlflow's
    ``disable_tracking.pipelines``): logging then would start a stray run.
    """

    def __init__(self):
        self._catalog: CatalogProtocol | None = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: KedroContext) -> None:
        """Gives ``mlflow.yml`` the ``${irv2.project_root:}`` resolver.

        It runs before kedro-mlflow reads ``mlflow.yml``. A relative SQLite URI would
        follow the working directory, and ``kedro run`` also starts in subfolders.
        """
        root = Path(context.project_path).resolve().as_posix()
        OmegaConf.register_resolver("irv2.project_root", lambda: root, replace=True)

    @hook_impl
    def after_catalog_created(self, catalog: CatalogProtocol) -> None:
        """Keeps the catalog, to find the files that datasets are saved to."""
        self._catalog = catalog

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        """Logs the dataset just saved, if it is one that tracking wants."""
        run = mlflow.active_run()
        if run is None:
            return
        if dataset_name == "training_history":
            mlflow.MlflowClient().log_batch(
                run.info.run_id, metrics=history_metrics(data)
            )
        elif dataset_name == "evaluation_metrics":
            mlflow.log_metrics(evaluation_scalars(data))
        elif dataset_name in MODEL_DATASETS:
            self._log_file(dataset_name, "model")
        elif dataset_name == "evaluation_report":
            report = self._log_file(dataset_name, "report")
            # The report links its plots by relative path: keep them beside it.
            if report is not None:
                for image in linked_images(data, report.parent):
                    mlflow.log_artifact(str(image), "report")
        elif dataset_name == "report_html":
            self._log_file(dataset_name, "report")

    def _log_file(self, dataset_name: str, folder: str) -> Path | None:
        """Logs the dataset's saved file under ``folder``; returns its path."""
        # A file dataset knows its path (the latest version if versioned); a dataset
        # left out of the catalog is in memory, and MLflow copies local files only.
        load_path = getattr(self._catalog.get(dataset_name), "_get_load_path", None)
        path = Path(str(load_path())) if load_path else None
        if path is None or not path.is_file():
            logger.warning(
                "`%s` is not a local file: not logged to MLflow", dataset_name
            )
            return None
        mlflow.log_artifact(str(path), folder)
        return path


def history_metrics(history: pd.DataFrame) -> list[Metric]:
    """One MLflow metric per history cell, stepped by epoch across all stages.

    Each stage's ``epoch`` restarts at 1, so the step is the row's position (1, 2,
    ...): the stages' curves follow one another, as in ``training_curves.png``.
    """
    now = int(time.time() * 1000)
    columns = [name for name in HISTORY_METRICS if name in history.columns]
    rows = history[columns].itertuples(index=False)
    return [
        Metric(key, float(value), now, step)
        for step, row in enumerate(rows, start=1)
        for key, value in zip(columns, row, strict=True)
    ]


def evaluation_scalars(evaluation_metrics: dict) -> dict[str, float]:
    """The scalar test metrics, prefixed ``test_`` to tell them from the per-epoch ones."""
    return {
        f"test_{key}": float(value)
        for key, value in evaluation_metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def linked_images(markdown: str, folder: Path) -> list[Path]:
    """The existing files that a Markdown text links to as images, from folder.

    A web address or a plot that was not made is no local file, and is left out.
    """
    paths = [folder / unquote(link) for link in IMAGE_LINK.findall(markdown)]
    return [path for path in dict.fromkeys(paths) if path.is_file()]
