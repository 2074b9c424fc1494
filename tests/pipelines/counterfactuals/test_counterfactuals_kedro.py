"""`kedro run --env smoke --pipeline counterfactuals` after the shared smoke run, killed
while it trains a variant and resumed with ``--only-missing-outputs``.

Two variants keep it within the suite's budget: ours (the reference: the smoke plan's
L-BFGS head, then one epoch from block8_1) and textbook recipe 1 (frozen backbone:
its head trains on features computed once). Kedro runs ``all_frozen``'s training
first (nodes of one level run in name order), so the kill in ours' second stage finds
one variant finished and one half way. The smoke run's ingestion, augmentation and
feature_shift outputs are reused; ``counterfactuals.only`` picks the variants.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import kedro_killed_when

pytestmark = pytest.mark.slow

VARIANTS = ["ours", "all_frozen"]
ONLY = "counterfactuals:\n  only: [ours, all_frozen]\n"
COMMAND = ["run", "--env", "smoke", "--pipeline", "counterfactuals"]
CHECKPOINTS = Path("data/06_models/checkpoints/counterfactuals")


def checkpoint_state(project: Path, variant: str) -> dict | None:
    """The state of the variant's training checkpoint, if it has one."""
    states = list((project / CHECKPOINTS / variant).glob("*/state.json"))
    return json.loads(states[0].read_text()) if states else None


def in_second_stage(project: Path, variant: str) -> bool:
    """Whether the variant's first stage is checkpointed and its second has begun."""
    state = checkpoint_state(project, variant)
    return state is not None and state["stage_index"] == 1


@pytest.fixture(scope="module")
def counterfactual_run(smoke_run, tmp_path_factory, run_kedro):
    """The project after the killed run and its resumption, the two logs, and the
    state ours' checkpoint held when the run was killed."""
    finished, _, _ = smoke_run
    project = tmp_path_factory.mktemp("counterfactuals") / "project"
    shutil.copytree(finished, project, symlinks=True)
    # The variants are read when the pipelines are registered: from conf/local, or
    # from conf/$KEDRO_ENV when a test before this one set it.
    for env in ("local", "smoke"):
        (project / "conf" / env / "parameters_counterfactuals.yml").write_text(ONLY)
    started = time.monotonic()
    killed = kedro_killed_when(
        COMMAND, project, lambda: in_second_stage(project, "ours"), delay=2
    )
    at_kill = checkpoint_state(project, "ours")
    resumed = run_kedro([*COMMAND, "--only-missing-outputs"], cwd=project, timeout=1500)
    seconds = time.monotonic() - started
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]
    print(f"counterfactuals smoke run, {len(VARIANTS)} variants: {seconds:.0f} s")  # noqa: T201
    return project, killed, resumed.stdout + resumed.stderr, at_kill


def test_the_summary_compares_each_variant_with_ours(counterfactual_run):
    project, *_ = counterfactual_run
    summary = pd.read_csv(project / "data/08_reporting/counterfactual_summary.csv")
    manifest = pd.read_csv(project / "data/02_intermediate/image_manifest.csv")
    assert summary["variant"].to_list() == VARIANTS
    ours, frozen = summary.iloc[0], summary.iloc[1]
    assert (manifest["split"] == "test").sum() == ours["n_test"] == frozen["n_test"]
    for metric in ("accuracy", "macro_f1"):
        assert ours[f"{metric}_difference"] == 0.0
        assert (
            ours[f"{metric}_difference_low"] == ours[f"{metric}_difference_high"] == 0
        )
        for row in (ours, frozen):
            assert row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"]
        assert frozen[f"{metric}_difference"] == pytest.approx(
            frozen[metric] - ours[metric]
        )
    assert frozen["within_noise"] == (
        frozen["accuracy_difference_low"] <= 0 <= frozen["accuracy_difference_high"]
    )
    assert frozen["kind"] == "textbook" and frozen["factor"].startswith("textbook 1")
    assert (summary["training_seconds"] > 0).all()


def test_every_variant_trains_ours_budget_in_its_own_namespace(counterfactual_run):
    project, killed, resumed, _ = counterfactual_run
    plan = json.loads((project / "data/05_model_input/finetune_plan.json").read_text())
    budget = sum(stage["epochs"] for stage in plan["stages"])
    manifest = pd.read_csv(project / "data/02_intermediate/image_manifest.csv")
    for name in VARIANTS:
        assert (
            project / f"data/06_models/counterfactuals/{name}/finetuned_model.keras"
        ).is_file()
        outputs = project / "data/07_model_output/counterfactuals" / name
        predictions = pd.read_csv(outputs / "test_predictions.csv")
        assert (
            predictions["path"].to_list()
            == manifest.loc[manifest["split"] == "test", "path"].to_list()
        )
        stages = pd.read_csv(outputs / "finetune_stages.csv")
        assert stages["epochs"].sum() == budget
        # The model is saved: its checkpoints are gone, in its own folder.
        folder = project / "data/06_models/checkpoints/counterfactuals" / name
        assert not list(folder.glob("*/state.json"))
        assert f"Node {name}.train_classifier took" in killed + resumed
    ours = pd.read_csv(
        project / "data/07_model_output/counterfactuals/ours/finetune_stages.csv"
    )
    assert ours["stage"].to_list() == [stage["name"] for stage in plan["stages"]]
    frozen = pd.read_csv(
        project / "data/07_model_output/counterfactuals/all_frozen/finetune_stages.csv"
    )
    assert frozen["cached_features"].to_list() == [True]
    assert frozen["solver"].to_list() == ["adam"]


def test_the_report_section_and_chart_are_written(counterfactual_run):
    project, *_ = counterfactual_run
    reporting = project / "data/08_reporting"
    report = (reporting / "counterfactual_report.md").read_text()
    assert report.startswith("## What each fix was worth on your data")
    assert "![Paired differences](counterfactual_chart.png)" in report
    assert "- **all_frozen** (textbook 1:" in report
    assert (reporting / "counterfactual_chart.png").read_bytes()[:4] == b"\x89PNG"
    evaluation = (reporting / "evaluation_report.md").read_text()
    assert "[counterfactual_report.md](counterfactual_report.md)" in evaluation


def test_viz_previews_the_summary_chart_and_report(counterfactual_run):
    project, *_ = counterfactual_run
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
    previews = {}
    for node_file in (project / "build" / "api" / "nodes").iterdir():
        node = json.loads(node_file.read_text())
        name = os.path.basename(str(node.get("filepath") or ""))
        if name.startswith("counterfactual_") and node.get("preview"):
            previews[name] = node["preview_type"]
    assert previews == {
        "counterfactual_summary.csv": "TablePreview",
        "counterfactual_chart.png": "ImagePreview",
        "counterfactual_report.md": "HTMLPreview",
    }


def test_a_killed_run_resumes_in_the_variant_it_was_in(counterfactual_run):
    project, killed, resumed, at_kill = counterfactual_run
    # Killed in ours' second stage, after all_frozen had finished training.
    assert (at_kill["stage_index"], at_kill["finished"]) == (1, False), killed[-3000:]
    assert "Node all_frozen.train_classifier took" in killed
    assert "Node ours.train_classifier took" not in killed
    # The rerun skips the finished variant and goes on inside the interrupted one.
    assert "Node all_frozen.train_classifier took" not in resumed
    assert "Node all_frozen.predict_test_split took" in resumed
    resuming = [line for line in resumed.splitlines() if "Resuming from" in line]
    assert len(resuming) == 1, resumed[-6000:]
    assert "counterfactuals/ours/" in resuming[0] and "stage 2 of 2" in resuming[0]
    history = pd.read_csv(
        project / "data/07_model_output/counterfactuals/ours/training_history.csv"
    )
    checkpointed = pd.DataFrame(at_kill["history"])
    # Ours' first stage is not trained again: its epochs are the checkpoint's.
    columns = ["stage", "epoch", "val_loss"]
    pd.testing.assert_frame_equal(
        history.loc[history["stage_index"] == 0, columns].reset_index(drop=True),
        checkpointed.loc[checkpointed["stage_index"] == 0, columns],
        check_exact=False,
        rtol=1e-6,
    )
    assert not list((project / CHECKPOINTS).glob("*/*/state.json"))
