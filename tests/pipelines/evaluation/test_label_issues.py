"""Label issues: cross-validated probabilities, confident learning, the label_noise rule.

Features are Gaussian clusters, one per class, as pooled features of well-separated
classes are; a planted share of one class's labels is moved to the other classes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from irv2_pipeline.pipelines.evaluation import diagnosis
from irv2_pipeline.pipelines.evaluation.label_issues import (
    ISSUE_COLUMNS,
    LabelIssuesError,
    check_settings,
    usable_folds,
)
from irv2_pipeline.pipelines.evaluation.nodes import find_label_issues

from .conftest import noise_estimate

CLASSES = ["bag", "sneaker", "trouser"]
PER_CLASS = 50


def clusters(seed: int = 0, dims: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``PER_CLASS`` images per class around three well-separated centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=1.2, size=(len(CLASSES), dims))
    labels = np.repeat(np.arange(len(CLASSES)), PER_CLASS)
    return centres[labels] + rng.normal(size=(len(labels), dims)), labels


def planted(labels: np.ndarray, share: float, seed: int = 1) -> tuple[np.ndarray, list]:
    """Moves ``share`` of class 0's labels to the other classes, alternately."""
    rng = np.random.default_rng(seed)
    moved = rng.choice(np.flatnonzero(labels == 0), round(share * PER_CLASS), False)
    noisy = labels.copy()
    noisy[moved] = [1 + i % 2 for i in range(len(moved))]
    return noisy, sorted(moved.tolist())


def training_features(features, labels, groups=None) -> dict:
    """What ``training_features`` hands on (from ``embed_reference_images``)."""
    return {
        "paths": [
            f"{CLASSES[label]}/img_{i:03d}.png" for i, label in enumerate(labels)
        ],
        "labels": labels,
        "groups": groups
        if groups is not None
        else [f"g{i}" for i in range(len(labels))],
        "features": features,
    }


@pytest.fixture
def settings(evaluation_params) -> dict:
    """conf/base's ``evaluation`` parameters."""
    return evaluation_params


def test_moved_labels_are_found_and_ranked_first(settings):
    features, labels = clusters()
    noisy, moved = planted(labels, 0.2)
    issues, estimate = find_label_issues(
        training_features(features, noisy), CLASSES, settings
    )
    assert list(issues.columns) == ISSUE_COLUMNS
    moved_paths = {f"{CLASSES[noisy[i]]}/img_{i:03d}.png" for i in moved}
    top = set(issues["path"].head(len(moved)))
    assert len(top & moved_paths) >= len(moved) / 2
    assert (
        issues.loc[issues["path"].isin(moved_paths), "suggested_label"] == "bag"
    ).all()
    assert list(issues["rank"]) == list(range(1, len(issues) + 1))
    assert issues["self_confidence"].is_monotonic_increasing
    bag = estimate["classes"][0]
    assert bag["class"] == "bag" and bag["noise_rate"] >= 0.1
    finding = diagnosis.label_noise(
        estimate, len(CLASSES), settings["diagnosis"]["label_noise"]
    )
    assert finding is not None
    assert "class 'bag'" in " ".join(finding.evidence)


def test_clean_labels_raise_no_finding_and_the_run_is_reproducible(settings):
    features, labels = clusters()
    issues, estimate = find_label_issues(
        training_features(features, labels), CLASSES, settings
    )
    again, _ = find_label_issues(training_features(features, labels), CLASSES, settings)
    pd.testing.assert_frame_equal(issues, again)
    assert estimate["out_of_sample_accuracy"] > 0.95
    assert len(issues) < 3
    rule = settings["diagnosis"]["label_noise"]
    assert diagnosis.label_noise(estimate, len(CLASSES), rule) is None


def test_a_duplicate_group_stays_in_one_fold(settings):
    # Each moved image has a twin with the same wrong label: if the twin sat in the
    # training folds, it would vouch for that label (folds ignoring the groups find
    # 7 of these 10).
    features, labels = clusters()
    noisy, moved = planted(labels, 0.2)
    twins = np.concatenate([features, features[moved] + 0.01])
    twin_labels = np.concatenate([noisy, noisy[moved]])
    groups = [f"g{i}" for i in range(len(noisy))] + [f"g{i}" for i in moved]
    issues, _ = find_label_issues(
        training_features(twins, twin_labels, groups), CLASSES, settings
    )
    flagged_moved = {int(path.split("_")[1][:3]) for path in issues["path"]} & set(
        moved
    )
    assert flagged_moved == set(moved)


def test_a_class_with_one_training_group_is_not_estimated(settings):
    features, labels = clusters()
    groups = ["one" if label == 2 else f"g{i}" for i, label in enumerate(labels)]
    issues, estimate = find_label_issues(
        training_features(features, labels, groups), CLASSES, settings
    )
    assert issues.empty and list(issues.columns) == ISSUE_COLUMNS
    assert estimate["estimated"] is False
    assert "single training image group" in estimate["statement"]
    rule = settings["diagnosis"]["label_noise"]
    result = diagnosis.label_noise(estimate, len(CLASSES), rule)
    assert result == diagnosis.NotJudged("label_noise", estimate["statement"])


def test_folds_are_lowered_to_the_smallest_class_groups():
    labels = np.array([0] * 10 + [1] * 3)
    assert usable_folds(labels, [f"g{i}" for i in range(13)], 5) == 3
    assert usable_folds(labels, [f"g{i}" for i in range(13)], 2) == 2


def test_settings_that_cannot_work_are_named():
    with pytest.raises(LabelIssuesError, match=r"folds = 1.*c = 0"):
        check_settings({"folds": 1, "c": 0, "max_iter": 10})


@pytest.mark.parametrize(
    ("changes", "fires"),
    [
        (
            {"n_flagged": 6, "classes": {"red": {"noise_rate": 0.12, "flagged": 6}}},
            True,
        ),
        # A folder whose images belong elsewhere counts as much.
        ({"n_flagged": 4, "classes": {"blue": {"mislabelled_share": 0.06}}}, True),
        ({"n_flagged": 2, "classes": {"red": {"noise_rate": 0.12}}}, False),
        ({"n_flagged": 6, "classes": {"red": {"noise_rate": 0.04}}}, False),
        # A probe near chance: its mistakes would pass for wrong labels.
        (
            {
                "n_flagged": 30,
                "out_of_sample_accuracy": 0.40,
                "classes": {"red": {"noise_rate": 0.5}},
            },
            False,
        ),
    ],
)
def test_label_noise_fires_on_a_noisy_class_only(evaluation_params, changes, fires):
    settings = evaluation_params["diagnosis"]["label_noise"]
    result = diagnosis.label_noise(noise_estimate(**changes), 3, settings)
    assert isinstance(result, diagnosis.Finding) == fires


def test_label_noise_is_not_judged_with_a_probe_near_chance(evaluation_params):
    settings = evaluation_params["diagnosis"]["label_noise"]
    estimate = noise_estimate(n_flagged=30, out_of_sample_accuracy=0.40)
    result = diagnosis.label_noise(estimate, 3, settings)
    assert isinstance(result, diagnosis.NotJudged)
    assert result.reason.startswith(
        "the cross-validated probe's out-of-sample accuracy 0.400 is 0.10 of the way"
    )


def test_label_noise_severity_is_high_at_twice_the_limit(evaluation_params):
    settings = evaluation_params["diagnosis"]["label_noise"]
    limit = settings["max_class_noise_rate"]
    for rate, severity in ((1.5 * limit, "medium"), (2 * limit, "high")):
        estimate = noise_estimate(n_flagged=5, classes={"red": {"noise_rate": rate}})
        assert diagnosis.label_noise(estimate, 3, settings).severity == severity


def test_label_noise_comes_after_label_conflicts_and_before_the_fit():
    rank = diagnosis.RANK
    assert rank["label_conflicts"] < rank["label_noise"] < rank["underfitting"]
