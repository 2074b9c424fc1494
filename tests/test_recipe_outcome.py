"""What a user gets from ``kedro run --env smoke``: a model as good as its features.

The run's own linear probe (``transferability``, logistic regression on the frozen
``conv_7b`` features) is the bar: the head stage must reach it, and fine-tuning the
backbone after it must not leave the model worse than the head alone.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import with_smoke_stages

pytestmark = pytest.mark.slow


def _probe_at_top(project) -> pd.Series:
    table = pd.read_csv(project / "data/02_intermediate/transferability.csv")
    return table[table["layer"] == "conv_7b"].iloc[0]


def _metrics(project) -> dict:
    return json.loads(
        (project / "data/08_reporting/evaluation_metrics.json").read_text()
    )


def test_the_head_stage_reaches_the_runs_linear_probe(smoke_run):
    project, _, _ = smoke_run
    probe = _probe_at_top(project)
    stages = pd.read_csv(project / "data/07_model_output/finetune_stages.csv")
    head = stages[stages["unfreeze_from"].isna()].iloc[0]
    one_image = 1 / probe["n_val"]
    assert head["best_val_accuracy"] >= probe["probe_val_accuracy"] - max(
        one_image, 0.01
    ), (head.to_dict(), probe.to_dict())


def test_the_demo_ends_near_its_probe_and_the_report_blames_no_underfitting(
    smoke_run,
):
    project, _, _ = smoke_run
    metrics = _metrics(project)
    assert metrics["accuracy"] >= 0.90, metrics
    findings = json.loads((project / "data/08_reporting/diagnosis.json").read_text())
    rules = [finding["rule"] for finding in findings]
    assert "underfitting" not in rules, findings


def test_fine_tuning_leaves_the_model_no_worse_than_its_head_alone(
    smoke_run, smoke_copy, run_kedro
):
    finished, _, _ = smoke_run
    metrics = _metrics(finished)
    # The same run with the head stage alone: the smoke plan's first stage.
    project = smoke_copy
    plan = json.loads((project / "data/05_model_input/finetune_plan.json").read_text())
    head_stage = plan["stages"][0]
    assert head_stage["unfreeze_from"] is None
    with_smoke_stages(project, [head_stage])
    # Up to the metrics: the attribution, label-issue and report nodes do not change them.
    result = run_kedro(
        [
            "run",
            "--env",
            "smoke",
            "--pipelines",
            "finetune,evaluation",
            "--to-outputs",
            "evaluation_metrics",
        ],
        cwd=project,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    head_only = _metrics(project)
    low, high = head_only["accuracy_ci95"]
    half_width = (high - low) / 2
    assert metrics["accuracy"] >= head_only["accuracy"] - half_width, (
        metrics["accuracy"],
        head_only["accuracy"],
        half_width,
    )
