"""The whole DAG on the demo images, as a user runs it: `kedro run --env smoke`.

One smoke run (``smoke_run``, made once for the whole test run) feeds the checks of
what users meet after it: every output of DESIGN.md on disk, the notebook, and
Kedro-Viz's build with previews.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import nbformat
import pandas as pd
from nbclient import NotebookClient

from irv2_pipeline.pipeline_registry import register_pipelines
from tests.conftest import PROJECT_ROOT, kedro

PIPELINES = ("ingestion", "augmentation", "feature_shift", "finetune", "evaluation")
OUTPUTS = {
    "data/02_intermediate/image_manifest.csv": "csv",
    "data/02_intermediate/rejected_images.csv": "csv",
    "data/02_intermediate/duplicate_report.csv": "csv",
    "data/08_reporting/dataset_summary.json": "json",
    "data/05_model_input/augmented_manifest.csv": "csv",
    "data/08_reporting/augmentation_preview.png": "png",
    "data/02_intermediate/bn_shift_profile.csv": "csv",
    "data/02_intermediate/split_shift.csv": "csv",
    "data/02_intermediate/transferability.csv": "csv",
    "data/05_model_input/finetune_plan.json": "json",
    "data/06_models/finetuned_model.keras": "keras",
    "data/07_model_output/training_history.csv": "csv",
    "data/08_reporting/training_curves.png": "png",
    "data/07_model_output/test_predictions.csv": "csv",
    "data/08_reporting/evaluation_metrics.json": "json",
    "data/08_reporting/classification_report.csv": "csv",
    "data/08_reporting/confusion_matrix.png": "png",
    "data/08_reporting/diagnosis.json": "json",
    "data/07_model_output/reference_features.npz": "npz",
    "data/07_model_output/label_issues.csv": "csv",
    "data/08_reporting/label_noise_estimate.json": "json",
    "data/08_reporting/label_issues.png": "png",
    "data/08_reporting/evaluation_report.md": "md",
    "data/08_reporting/report.html": "html",
    "data/08_reporting/node_timings.csv": "csv",
    "data/08_reporting/node_timings.md": "md",
}


def test_the_whole_dag_writes_every_output(smoke_run):
    project, log, seconds = smoke_run
    for relative, kind in OUTPUTS.items():
        path = project / relative
        assert path.is_file() and path.stat().st_size > 0, relative
        if kind == "json":
            json.loads(path.read_text())
        if kind == "png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", relative
    manifest = pd.read_csv(project / "data/02_intermediate/image_manifest.csv")
    predictions = pd.read_csv(project / "data/07_model_output/test_predictions.csv")
    assert sorted(predictions["path"]) == sorted(
        manifest.loc[manifest["split"] == "test", "path"]
    )
    # Every node logs its duration and has its row in node_timings
    # (hooks.NodeTimingHook).
    nodes = [node.name for node in register_pipelines()["__default__"].nodes]
    for name in nodes:
        assert f"Node {name} took" in log, name
    timings = pd.read_csv(project / "data/08_reporting/node_timings.csv")
    assert sorted(timings["node"]) == sorted(nodes)
    print(f"smoke run: {seconds:.0f} s")  # noqa: T201 - the figure the README quotes


def test_a_clean_run_flags_no_blank_image(smoke_run):
    # The demo images (Fashion-MNIST) have content: none is blank. The clean run's
    # other new findings are checked next to their planted causes:
    # test_label_noise_planted.py and test_shortcut_planted.py.
    project, _, _ = smoke_run
    manifest = pd.read_csv(project / "data/02_intermediate/image_manifest.csv")
    summary = json.loads(
        (project / "data/08_reporting/dataset_summary.json").read_text()
    )
    assert not manifest["blank"].any(), manifest[manifest["blank"]]
    assert summary["blank_images"] == []
    assert not any("blank" in warning for warning in summary["warnings"])


def test_evaluation_runs_alone_from_persisted_outputs(smoke_copy):
    project = smoke_copy
    result = kedro(["run", "--env", "smoke", "--pipeline", "evaluation"], cwd=project)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    reporting = project / "data" / "08_reporting"
    findings = json.loads((reporting / "diagnosis.json").read_text())
    assert "random_weights" in [finding["rule"] for finding in findings]
    metrics = json.loads((reporting / "evaluation_metrics.json").read_text())
    predictions = pd.read_csv(project / "data/07_model_output/test_predictions.csv")
    assert metrics["n_test"] == len(predictions)


def test_the_notebook_runs_top_to_bottom(smoke_run, monkeypatch):
    project, _, _ = smoke_run
    notebook = nbformat.read(
        PROJECT_ROOT / "notebooks" / "walkthrough.ipynb", as_version=4
    )
    (project / "notebooks").mkdir(exist_ok=True)
    # The kernel inherits this process's environment. Set through monkeypatch, so
    # KEDRO_ENV=smoke does not stay for the tests after this one on the same worker.
    for name, value in {
        "KEDRO_ENV": "smoke",
        "KEDRO_DISABLE_TELEMETRY": "1",
        "MPLBACKEND": "Agg",
    }.items():
        monkeypatch.setenv(name, value)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(project / "notebooks")}},
    )
    client.execute()
    outputs = [
        o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
    ]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5


def test_viz_build_has_every_pipeline_layer_and_preview(smoke_copy):
    project = smoke_copy
    result = subprocess.run(
        [sys.executable, "-m", "kedro", "viz", "build", "--include-previews"],
        cwd=project,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "KEDRO_ENV": "smoke"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    api = project / "build" / "api"
    main = json.loads((api / "main").read_text())
    assert {p["id"] for p in main["pipelines"]} >= {*PIPELINES, "__default__"}
    assert set(main["layers"]) >= {
        "raw",
        "intermediate",
        "model_input",
        "models",
        "reporting",
    }
    previews = {}
    for node_file in (api / "nodes").iterdir():
        node = json.loads(node_file.read_text())
        if node.get("preview_type"):
            previews.setdefault(node["preview_type"], []).append(node_file.name)
    assert {"ImagePreview", "TablePreview", "JSONPreview"} <= set(previews), previews


def test_a_second_run_at_the_same_time_is_refused(smoke_copy):
    project = smoke_copy
    # feature_shift runs long enough for the second run to start while it holds the lock.
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kedro",
            "run",
            "--env=smoke",
            "--pipeline=feature_shift",
        ],
        cwd=project,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = project / "data" / ".kedro_run.lock"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and f"pid {first.pid}" not in _read(lock):
            time.sleep(0.2)
        second = kedro(
            ["run", "--env", "smoke", "--pipeline", "ingestion"], cwd=project
        )
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0
    assert second.returncode != 0
    assert "Another `kedro run` is already writing" in second.stdout + second.stderr


def _read(path):
    return path.read_text() if path.exists() else ""
