"""The measured path end to end: pretrained sources, a near target and a far one.

``kedro run --env smoke`` with two candidate sources made here
(``irv2_pipeline.make_source``): AdaBN on fractal images and AdaBN on greyscale pen
strokes. feature_shift ranks them on each target; the shift is measured against
statistics that describe a real source, the plan is built from it, finetune trains
that plan from the chosen source and the report's ``domain_gap`` reads it. The near
target is new fractal classes (the fractal source's own generator); the far one is
pen strokes, another modality, on which the run is made to keep the fractal source
(``model.source``) so that its gap can be read.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml

from irv2_pipeline.backbone import GROUPS, group_of, load_irv2
from irv2_pipeline.classifier import split_saved
from irv2_pipeline.datasets.atomic_model import AtomicTensorFlowModelDataset
from irv2_pipeline.synthetic_images import write_image_folder

from .conftest import copy_project, kedro, project_parameters

pytestmark = pytest.mark.slow

TARGETS = {"near": "fractal", "far": "strokes"}
# The far target keeps the fractal source, the one it is far from.
FORCED = {"near": [], "far": ["--params", "model.source=fractal"]}


@pytest.fixture(scope="module")
def transfer_runs(
    adabn_source, adabn_strokes_source, tmp_path_factory
) -> dict[str, Path]:
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
        with_sources(
            project,
            {"fractal": adabn_source, "strokes": adabn_strokes_source},
        )
        result = kedro(
            ["run", "--env", "smoke", *FORCED[name]], cwd=project, timeout=1500
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        runs[name] = project
    return runs


def with_sources(project: Path, sources: dict[str, Path]) -> None:
    """Lists ``sources`` as the smoke run's ``model.sources`` (their cards say the
    rest)."""
    file = project / "conf" / "smoke" / "parameters.yml"
    params = yaml.safe_load(file.read_text())
    params["model"]["sources"] = [
        {"name": name, "weights": str(weights)} for name, weights in sources.items()
    ]
    file.write_text(yaml.safe_dump(params, sort_keys=False))


def stem_statistics(weights: Path | keras.Model) -> np.ndarray:
    """The moving mean of the backbone's first BatchNorm layer, which no stage of a
    near plan unfreezes or re-estimates."""
    if isinstance(weights, keras.Model):
        backbone = split_saved(weights).backbone
    else:
        backbone = load_irv2(str(weights), 75)
    first = next(
        layer
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    return first.moving_mean.numpy()


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


def test_the_sources_are_ranked_nearest_first_on_both_targets(transfer_runs):
    near = read(transfer_runs["near"], "08_reporting/source_ranking.csv")
    far = read(transfer_runs["far"], "08_reporting/source_ranking.csv")
    assert list(near["source"]) == ["fractal", "strokes"]
    assert list(far["source"]) == ["strokes", "fractal"]
    for ranking in (near, far):
        assert list(ranking["rank"]) == [1, 2]
        assert ranking["logme"].is_monotonic_decreasing
        assert ranking["pretrained"].all()
    by_depth = read(transfer_runs["near"], "02_intermediate/source_transferability.csv")
    assert sorted(set(by_depth["source"])) == ["fractal", "strokes"]
    assert len(by_depth) == 2 * len(
        project_parameters("smoke")["feature_shift"]["depths"]
    )
    # Each source is measured against its own statistics: the fractal one is the
    # nearer to fractal images, the strokes one to strokes.
    assert near.set_index("source")["mean_bn_shift"].idxmin() == "fractal"
    assert far.set_index("source")["mean_bn_shift"].idxmin() == "strokes"


def test_the_run_fine_tunes_from_the_source_it_chose(
    transfer_runs, adabn_source, adabn_strokes_source
):
    near = read(transfer_runs["near"], "05_model_input/finetune_plan.json")
    far = read(transfer_runs["far"], "05_model_input/finetune_plan.json")
    assert near["source"]["name"] == "fractal"
    assert near["source"]["weights"] == str(adabn_source)
    assert near["source_reason"].startswith("Source `fractal` ranks first of 2")
    assert near["rationale"][0] == near["source_reason"]
    assert far["source"]["name"] == "fractal"
    assert "forced by model.source" in far["source_reason"]
    ranking = read(transfer_runs["far"], "08_reporting/source_ranking.csv")
    assert ranking.set_index("source")["chosen"].to_dict() == {
        "strokes": False,
        "fractal": True,
    }

    model = AtomicTensorFlowModelDataset(
        filepath=str(transfer_runs["near"] / "data/06_models/finetuned_model.keras")
    ).load()
    trained = stem_statistics(model)
    np.testing.assert_allclose(trained, stem_statistics(adabn_source), atol=1e-6)
    assert np.abs(trained - stem_statistics(adabn_strokes_source)).max() > 1e-3
    report = (
        transfer_runs["near"] / "data/08_reporting/evaluation_report.md"
    ).read_text()
    assert "Backbone: source `fractal`" in report
    assert "## Candidate sources" in report


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
