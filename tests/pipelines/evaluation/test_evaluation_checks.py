"""The checks on the images and predictions fire on planted causes, and on clean data
no more often than their error rate allows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from irv2_pipeline.images import OpenPolicy, fingerprint
from irv2_pipeline.pipelines.evaluation import checks, diagnosis

from .conftest import CLASSES, colour_predictions, predictions_of, textured
from .test_evaluation_diagnosis import base_parameter_keys

# Clean runs simulated per false-positive check, and the most firings allowed: the
# rules hold the family-wise rate to alpha (5%); 200 runs at 5% fire 10 times on
# average, and more than 17 with a chance under 1%.
CLEAN_RUNS = 200
MAX_CLEAN_FIRINGS = 17


def write_images(
    root: Path, count: int, *, seed: int, scale: float = 1.0, size=(24, 24)
) -> pd.DataFrame:
    """``count`` real PNGs of random colours (brightness times ``scale``) and their
    manifest rows, the statistics from ``images.fingerprint`` as ingestion takes them.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        label = CLASSES[index % len(CLASSES)]
        colour = rng.integers(40, 220, size=3)
        width, height = size
        pixels = textured(tuple(colour), seed=seed * 1000 + index, size=max(size))
        pixels = (pixels[:height, :width] * scale).astype(np.uint8)
        path = f"{label}/{seed}_{index}.png"
        (root / label).mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / path)
        record = fingerprint(root / path, OpenPolicy())
        rows.append({"path": path, "label": label, **record})
    return pd.DataFrame(rows)


def with_split(images: pd.DataFrame, split: str) -> pd.DataFrame:
    return images.assign(split=split, group=images["path"])


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> pd.DataFrame:
    """60 real images of one distribution (random colours), no split yet."""
    return write_images(tmp_path_factory.mktemp("pool"), 60, seed=1)


@pytest.fixture
def thresholds(evaluation_params) -> dict:
    return evaluation_params["diagnosis"]


# ---------------------------------------------------------------- Holm and KS


def test_holm_adjusted_p_values_match_the_step_down_procedure():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04, then
    # non-decreasing: 0.02, 0.03, 0.06, 0.06; back in the order given.
    adjusted = checks.holm_adjusted([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    # 0.5 x 2 caps at 1, and the larger 0.9 may not come out below it.
    np.testing.assert_allclose(checks.holm_adjusted([0.5, 0.9]), [1.0, 1.0])
    np.testing.assert_allclose(checks.holm_adjusted([0.02, 0.9]), [0.04, 0.9])


def test_image_properties_come_from_the_manifests_fingerprint_columns(pool):
    properties = checks.image_properties(with_split(pool, "train"))
    first = pool.iloc[0]
    red, green, blue = bytes.fromhex(first["mean_colour"][1:])
    assert properties.iloc[0][["mean_red", "mean_green", "mean_blue"]].tolist() == [
        red,
        green,
        blue,
    ]
    assert properties.iloc[0]["brightness"] == first["brightness"]
    assert properties.iloc[0]["aspect_ratio"] == 1.0
    # Luma weighs green most (ITU-R 601): a grey level between the channel means.
    assert min(red, green, blue) - 1 <= first["brightness"] <= max(red, green, blue) + 1


def test_image_properties_of_a_manifest_without_them_say_to_rerun_ingestion(pool):
    older = with_split(pool, "train").drop(columns=["brightness", "contrast"])
    with pytest.raises(diagnosis.DiagnosisInputError, match="--pipeline ingestion"):
        checks.image_properties(older)


# ---------------------------------------------------------------- property drift


def test_property_drift_names_the_brightness_of_darker_test_images(
    tmp_path, pool, thresholds
):
    darker = write_images(tmp_path, 30, seed=2, scale=0.45)
    manifest = pd.concat([with_split(pool, "train"), with_split(darker, "test")])
    finding = checks.image_property_drift(manifest, thresholds["image_property_drift"])
    assert finding is not None and finding.rule == "image_property_drift"
    drifting = [line.split(" ", 1)[0] for line in finding.evidence]
    assert "brightness" in drifting and "aspect_ratio" not in drifting
    assert finding.severity == "high"  # the distributions barely overlap
    assert "Holm-adjusted over 6 properties" in finding.evidence[0]


def test_property_drift_names_only_the_aspect_ratio_of_wider_test_images(
    tmp_path, pool, thresholds
):
    wide = write_images(tmp_path, 30, seed=1, size=(36, 24))
    manifest = pd.concat([with_split(pool, "train"), with_split(wide, "test")])
    finding = checks.image_property_drift(manifest, thresholds["image_property_drift"])
    assert finding is not None
    assert [line.split(" ", 1)[0] for line in finding.evidence] == ["aspect_ratio"]


def random_splits(pool: pd.DataFrame, runs: int):
    """Train/test splits of one pool of images, drawn at random: nothing differs."""
    rng = np.random.default_rng(0)
    for _ in range(runs):
        test = rng.permutation(len(pool)) < len(pool) // 3
        yield pool.assign(split=np.where(test, "test", "train"))


def test_property_drift_fires_on_clean_splits_at_most_at_its_error_rate(
    pool, thresholds
):
    settings = thresholds["image_property_drift"]
    fired = sum(
        checks.image_property_drift(manifest, settings) is not None
        for manifest in random_splits(pool, CLEAN_RUNS)
    )
    assert fired <= MAX_CLEAN_FIRINGS, f"{fired} of {CLEAN_RUNS} clean runs fired"


def test_property_drift_is_not_judged_on_too_few_images(tmp_path, pool, thresholds):
    darker = write_images(tmp_path, 4, seed=2, scale=0.45)
    manifest = pd.concat([with_split(pool, "train"), with_split(darker, "test")])
    result = checks.image_property_drift(manifest, thresholds["image_property_drift"])
    assert isinstance(result, diagnosis.NotJudged)
    assert result.reason == (
        f"{len(pool)} training and 4 test images: the KS test needs at least "
        f"{thresholds['image_property_drift']['min_images']} in each (min_images)"
    )


# ---------------------------------------------------------------- dummy baseline


def test_a_model_that_always_predicts_the_majority_is_no_better_than_the_dummy(
    thresholds, evaluation_params
):
    labels = ["blue"] * 10 + ["green"] * 6 + ["red"] * 6
    paths = [f"{label}/{i}.png" for i, label in enumerate(labels)]
    predictions = predictions_of(paths, labels, ["blue"] * len(labels))
    finding = checks.dummy_baseline(
        predictions,
        {"blue": 30, "green": 20, "red": 20},
        evaluation_params["bootstrap"],
        thresholds["dummy_baseline"],
    )
    assert finding is not None and finding.rule == "dummy_baseline"
    assert finding.severity == "high"
    assert finding.evidence[0].startswith(
        "accuracy 0.455 vs 0.455 for always predicting 'blue'"
    )
    assert (
        "gain +0.000, 95% paired bootstrap interval [+0.000, +0.000]"
        in (finding.evidence[0])
    )
    # The baseline's predictions: every class's F1 is the baseline's.
    assert [line.split(":")[0] for line in finding.evidence[2:]] == [
        "class 'blue'",
        "class 'green'",
        "class 'red'",
    ]


def test_a_model_that_never_predicts_one_class_falls_short_on_that_class(
    thresholds, evaluation_params
):
    labels = ["blue"] * 8 + ["green"] * 8 + ["red"] * 8
    predicted = ["blue"] * 8 + ["green"] * 8 + ["blue"] * 8  # red never
    paths = [f"{label}/{i}.png" for i, label in enumerate(labels)]
    finding = checks.dummy_baseline(
        predictions_of(paths, labels, predicted),
        {"blue": 30, "green": 20, "red": 20},
        evaluation_params["bootstrap"],
        thresholds["dummy_baseline"],
    )
    assert finding is not None
    assert finding.severity == "low"  # overall, 0.667 vs 0.333 beats the baseline
    assert [line.split(":")[0] for line in finding.evidence[2:]] == ["class 'red'"]
    assert "'red'" in finding.cause


def test_dummy_baseline_does_not_judge_a_class_on_one_test_image(
    thresholds, evaluation_params
):
    labels = ["blue"] * 8 + ["green"] * 8 + ["red"]
    predicted = ["blue"] * 8 + ["green"] * 8 + ["blue"]  # the one red image missed
    paths = [f"{label}/{i}.png" for i, label in enumerate(labels)]
    finding = checks.dummy_baseline(
        predictions_of(paths, labels, predicted),
        {"blue": 30, "green": 20, "red": 20},
        evaluation_params["bootstrap"],
        thresholds["dummy_baseline"],
    )
    assert finding is None


def test_dummy_baseline_is_silent_on_the_colour_classifiers_predictions(
    colour_images, thresholds, evaluation_params
):
    _, manifest = colour_images
    predictions = colour_predictions(manifest)
    assert (
        checks.dummy_baseline(
            predictions,
            {label: 2 for label in CLASSES},
            evaluation_params["bootstrap"],
            thresholds["dummy_baseline"],
        )
        is None
    )


# ---------------------------------------------------------------- weak segments


@pytest.fixture(scope="module")
def test_pool(tmp_path_factory) -> pd.DataFrame:
    """100 real test images of random colours."""
    images = write_images(tmp_path_factory.mktemp("test_pool"), 100, seed=3)
    return with_split(images, "test")


def predictions_where(manifest: pd.DataFrame, right: np.ndarray) -> pd.DataFrame:
    """Predictions of the manifest's images, right where ``right`` says."""
    labels = manifest["label"].tolist()
    wrong = {label: CLASSES[(CLASSES.index(label) + 1) % 3] for label in CLASSES}
    predicted = [
        label if ok else wrong[label] for label, ok in zip(labels, right, strict=True)
    ]
    return predictions_of(manifest["path"].tolist(), labels, predicted)


def test_weak_segment_names_the_darkest_fifth_when_it_is_misclassified(
    test_pool, thresholds
):
    darkest = test_pool["brightness"].rank(method="first") <= 20
    predictions = predictions_where(test_pool, ~darkest.to_numpy())
    finding = checks.weak_segment(predictions, test_pool, thresholds["weak_segment"])
    assert finding is not None and finding.rule == "weak_segment"
    assert finding.severity == "high"  # accuracy 0 in the bin
    assert any(
        line.startswith("brightness (mean grey level, 0-255) bin 1 of 5")
        and "20 test images (20%), accuracy 0.000 vs 0.800" in line
        for line in finding.evidence
    ), finding.evidence


def test_weak_segment_needs_enough_test_images_in_the_bin(test_pool, thresholds):
    # 20 test images: bins of 4, fewer than min_images (5), even when all are wrong.
    small = test_pool.head(20)
    darkest = small["brightness"].rank(method="first") <= 4
    predictions = predictions_where(small, ~darkest.to_numpy())
    assert checks.weak_segment(predictions, small, thresholds["weak_segment"]) is None


def test_weak_segment_fires_on_clean_predictions_at_most_at_its_error_rate(
    test_pool, thresholds
):
    # Each image right with probability 0.8 whatever its properties.
    rng = np.random.default_rng(5)
    fired = sum(
        checks.weak_segment(
            predictions_where(test_pool, rng.random(len(test_pool)) < 0.8),
            test_pool,
            thresholds["weak_segment"],
        )
        is not None
        for _ in range(CLEAN_RUNS)
    )
    assert fired <= MAX_CLEAN_FIRINGS, f"{fired} of {CLEAN_RUNS} clean runs fired"


def test_weak_segment_refuses_predictions_of_images_not_in_the_manifest(
    test_pool, thresholds
):
    predictions = predictions_where(test_pool, np.ones(len(test_pool), bool))
    predictions.loc[0, "path"] = "blue/elsewhere.png"
    with pytest.raises(diagnosis.DiagnosisInputError, match="not in image_manifest"):
        checks.weak_segment(predictions, test_pool, thresholds["weak_segment"])


# ---------------------------------------------------------------- new labels


def test_new_test_labels_names_a_class_without_training_images(colour_images):
    _, manifest = colour_images
    assert checks.new_test_labels(manifest) is None
    no_red_training = manifest[
        ~((manifest["label"] == "red") & (manifest["split"] == "train"))
    ]
    finding = checks.new_test_labels(no_red_training)
    assert finding is not None and finding.severity == "high"
    assert finding.evidence[0].startswith("class 'red': 2 test images (e.g. red/")
    assert finding.evidence[-1].startswith("2 of 6 test images (33%)")


# ---------------------------------------------------------------- one test image


def report_of(recall_support: dict[str, tuple[float, int]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"class": name, "recall": recall, "support": support}
            for name, (recall, support) in recall_support.items()
        ]
    )


def test_class_imbalance_does_not_fire_because_of_one_test_image(thresholds):
    settings = thresholds["class_imbalance"]
    assert settings["min_test_images"] == 5
    counts = {"cat": 40, "dog": 40, "eel": 40}
    # eel's one test image is missed: recall 0, balanced accuracy 0.633.
    one = report_of({"cat": (0.95, 20), "dog": (0.95, 20), "eel": (0.0, 1)})
    metrics = {"accuracy": 38 / 41, "balanced_accuracy": 1.9 / 3}
    assert diagnosis.class_imbalance(metrics, one, counts, settings) is None
    # Ten eel test images all missed is a weak class, and an accuracy gap.
    ten = report_of({"cat": (0.95, 20), "dog": (0.95, 20), "eel": (0.0, 10)})
    metrics = {"accuracy": 38 / 50, "balanced_accuracy": 1.9 / 3}
    finding = diagnosis.class_imbalance(metrics, ten, counts, settings)
    assert finding is not None
    assert any(
        line.startswith("class 'eel': recall 0.000") for line in finding.evidence
    )


def test_rare_classes_with_too_few_test_images_make_a_low_finding(thresholds):
    settings = thresholds["class_imbalance"]
    counts = {"cat": 150, "dog": 150, "eel": 12, "fox": 12}
    report = report_of(
        {"cat": (0.95, 20), "dog": (0.95, 20), "eel": (0.0, 1), "fox": (0.5, 2)}
    )
    metrics = {"accuracy": 39 / 43, "balanced_accuracy": 2.4 / 4}
    finding = diagnosis.class_imbalance(metrics, report, counts, settings)
    assert finding is not None and finding.severity == "low"
    assert "the training set is imbalanced" in finding.cause
    assert finding.evidence[0] == (
        "rare classes with fewer than 5 test images each, too few to judge one by "
        "one: 'eel', 'fox', recall 0.333 pooled over their 3 test images vs 0.950 "
        "on average for the 2 classes judged"
    )
    assert "finetune.class_weights" in finding.parameters
    # Recognised as well as the others on the few they have: nothing to say.
    recognised = report_of(
        {"cat": (0.95, 20), "dog": (0.95, 20), "eel": (1.0, 1), "fox": (1.0, 2)}
    )
    assert diagnosis.class_imbalance(metrics, recognised, counts, settings) is None


def test_the_accuracy_gap_leaves_out_classes_with_too_few_test_images(thresholds):
    settings = thresholds["class_imbalance"]
    report = report_of({"cat": (0.9, 20), "dog": (0.5, 20), "eel": (0.0, 2)})
    accuracy, balanced, over = diagnosis.accuracy_gap(
        {"accuracy": 28 / 42, "balanced_accuracy": 1.4 / 3}, report, settings
    )
    assert (accuracy, balanced) == pytest.approx((0.7, 0.7))
    assert over == (
        " over the 2 classes with at least 5 test images ('eel', with 2 test "
        "images in all, left out)"
    )


def test_rare_classes_missed_together_still_count_as_one_class(thresholds):
    settings = thresholds["class_imbalance"]
    report = report_of(
        {"cat": (0.9, 20), "dog": (0.9, 20), "eel": (0.0, 2), "fox": (0.0, 3)}
    )
    metrics = {"accuracy": 36 / 45, "balanced_accuracy": 0.45}
    accuracy, balanced, over = diagnosis.accuracy_gap(metrics, report, settings)
    # eel and fox: 5 test images together, recall 0: one class of three.
    assert (accuracy, balanced) == pytest.approx((36 / 45, 0.6))
    assert "as one, the 2 with fewer ('eel', 'fox': 5 test images)" in over
    counts = {"cat": 100, "dog": 100, "eel": 10, "fox": 10}
    finding = diagnosis.class_imbalance(metrics, report, counts, settings)
    assert finding is not None
    assert finding.evidence[0].startswith("accuracy 0.800 vs balanced accuracy 0.600")


# ---------------------------------------------------------------- in diagnose_run


def test_the_new_rules_have_a_place_in_the_priority():
    for rule in ("image_property_drift", "dummy_baseline", "weak_segment"):
        assert rule in diagnosis.RANK
    assert diagnosis.RANK["new_test_labels"] < diagnosis.RANK["label_noise"]
    assert diagnosis.RANK["image_property_drift"] == diagnosis.RANK["split_shift"]


def test_every_parameter_a_new_finding_names_exists(tmp_path, pool, thresholds):
    darker = write_images(tmp_path, 30, seed=2, scale=0.45)
    manifest = pd.concat([with_split(pool, "train"), with_split(darker, "test")])
    labels = ["blue"] * 8 + ["green"] * 8 + ["red"] * 8
    paths = [f"{label}/{i}.png" for i, label in enumerate(labels)]
    bootstrap = {"resamples": 50, "seed": 1}
    counts = {"blue": 30, "green": 20, "red": 20}
    darkest = manifest["brightness"].rank(method="first") <= 18
    findings = [
        checks.image_property_drift(manifest, thresholds["image_property_drift"]),
        checks.dummy_baseline(
            predictions_of(paths, labels, ["blue"] * 24),
            counts,
            bootstrap,
            thresholds["dummy_baseline"],
        ),
        checks.dummy_baseline(
            predictions_of(paths, labels, labels[:16] + ["blue"] * 8),
            counts,
            bootstrap,
            thresholds["dummy_baseline"],
        ),
        checks.weak_segment(
            predictions_where(manifest, ~darkest.to_numpy()),
            manifest,
            thresholds["weak_segment"],
        ),
        checks.new_test_labels(
            manifest[manifest["label"] != "red"].assign(
                label=lambda m: np.where(m["split"] == "test", "eel", m["label"])
            )
        ),
    ]
    assert all(finding is not None for finding in findings)
    known = base_parameter_keys()
    for finding in findings:
        assert set(finding.parameters) <= known, finding.rule
        assert finding.severity in diagnosis.SEVERITIES
