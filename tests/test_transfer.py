"""The measured path end to end: a pretrained source, a near target and a far one.

``kedro run --env smoke`` with ``model.weights`` set to a source made here
(``irv2_pipeline.make_source``, AdaBN on fractal images): the shift is measured
against statistics that describe a real source, the plan is built from it, finetune
trains that plan and the report's ``domain_gap`` reads it. The near target is new
fractal classes (the source's own generator); the far one is greyscale pen strokes,
another modality.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from irv2_pipeline.backbone import GROUPS, group_of
from irv2_pipeline.synthetic_images import write_image_folder

from .conftest import copy_project, kedro, project_parameters

pytestmark = pytest.mark.slow

TARGETS = {"near": "fractal", "far": "strokes"}


@pytest.fixture(scope="module")
def transfer_runs(adabn_source, tmp_path_factory) -> dict[str, Path]:
    """The finished project of each target (read only)."""
    runs = {}
    for name, generator in TARGETS.items():
        project = copy_project(tmp_path_factory.mktemp(name))
        images = project / "data" / "01_raw" / "images"
        shutil.rmtree(images)
        (project / "data" / "01_raw" / "label_exclusions.csv").write_text("path\n")
        write_image_folder(
            images, generator, classes=4, images_per_class=20, seed=7, size=96
        )
        result = kedro(
            ["run", "--env", "smoke", "--params", f"model.weights={adabn_source}"],
            cwd=project,
            timeout=1500,
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        runs[name] = project
    return runs


def read(project: Path, path: str):
    file = project / "data" / path
    return json.loads(file.read_text()) if file.suffix == ".json" else pd.read_csv(file)


def findings(project: Path) -> dict[str, dict]:
    return {f["rule"]: f for f in read(project, "08_reporting/diagnosis.json")}


def deepest_unit(plan: dict) -> int:
    """How far down the plan fine-tunes, as the index of its deepest block group
    (``len(GROUPS)`` for the head only)."""
    groups = [
        GROUPS.index(group_of(stage["unfreeze_from"]))
        for stage in plan["stages"]
        if stage["unfreeze_from"] is not None
    ]
    return min(groups, default=len(GROUPS))


def test_the_near_target_is_near_and_the_report_says_so(transfer_runs):
    project = transfer_runs["near"]
    summary = read(project, "08_reporting/feature_shift_summary.json")
    assert summary["shift_meaningful"] is True
    assert summary["blocks_over_threshold"] == []
    assert summary["shift_starts_at"] is None
    rules = findings(project)
    assert "domain_gap" not in rules
    assert "random_weights" not in rules


def test_the_far_target_is_shifted_from_the_stem_and_the_gap_is_named_where_it_starts(
    transfer_runs,
):
    project = transfer_runs["far"]
    summary = read(project, "08_reporting/feature_shift_summary.json")
    shift = {block["block"]: block["shift"] for block in summary["blocks"]}
    near = {
        block["block"]: block["shift"]
        for block in read(
            transfer_runs["near"], "08_reporting/feature_shift_summary.json"
        )["blocks"]
    }
    # Far from the source from the stem on, at every depth many times the near one.
    assert all(shift[block] > 20 * near[block] for block in shift)
    assert summary["grayscale_share"] == 1.0
    start = summary["shift_starts_at"]
    assert start is not None and start != "stem"
    threshold = summary["shift_threshold"]
    assert shift[start] >= threshold
    gap = findings(project)["domain_gap"]
    assert f"from {start} on" in gap["cause"]
    assert "greyscale" in " ".join(gap["evidence"])


def test_the_far_plan_is_at_least_as_deep_as_the_near_one(transfer_runs):
    near = read(transfer_runs["near"], "05_model_input/finetune_plan.json")
    far = read(transfer_runs["far"], "05_model_input/finetune_plan.json")
    assert near["basis"] == far["basis"] == "measured"
    assert deepest_unit(far) <= deepest_unit(near)
    assert deepest_unit(far) < len(GROUPS)
    # 20 images a class is scarce: the plan says which cap bound it, if one did.
    limit = far["depth_limit"]
    scarce = project_parameters("smoke")["feature_shift"]["plan"]
    if limit is not None:
        assert limit["unit"] == scarce["scarce_deepest_unit"]


@pytest.mark.parametrize("target", list(TARGETS))
def test_the_rationale_and_finetune_stages_agree_on_every_learning_rate(
    transfer_runs, target
):
    project = transfer_runs[target]
    plan = read(project, "05_model_input/finetune_plan.json")
    stages = read(project, "07_model_output/finetune_stages.csv").set_index("stage")
    (sentence,) = [
        line for line in plan["rationale"] if line.startswith("Planned learning rates")
    ]
    stated = dict(re.findall(r"(\w+) ([0-9.e-]+)[,)]", sentence.split(" (")[0] + ")"))
    for stage in plan["stages"]:
        name = stage["name"]
        assert float(stated[name]) == pytest.approx(stage["learning_rate"])
        trained = stages.loc[name]
        planned = trained["planned_learning_rate"]
        # No range test ran (the L-BFGS head, or lr_find off): the planned rate ran.
        ran = stage["learning_rate"] if pd.isna(planned) else planned
        assert float(ran) == pytest.approx(stage["learning_rate"])
    backbone = [s for s in plan["stages"] if s["unfreeze_from"] is not None]
    factors = {
        round(stages.loc[s["name"], "learning_rate"] / s["learning_rate"], 9)
        for s in backbone
    }
    assert len(factors) <= 1


def test_the_model_reaches_its_own_linear_probe_on_the_near_target(transfer_runs):
    project = transfer_runs["near"]
    accuracy = read(project, "08_reporting/evaluation_metrics.json")["accuracy"]
    probe = read(project, "02_intermediate/transferability.csv")
    top = float(probe.loc[probe["layer"] == "conv_7b", "probe_val_accuracy"].iloc[0])
    n_test = read(project, "08_reporting/evaluation_metrics.json")["n_test"]
    assert accuracy >= top - 1 / n_test
