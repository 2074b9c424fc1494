"""Metrics against hand-computed values, bootstrap intervals, calibration error."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from irv2_pipeline.pipelines.evaluation.metrics import (
    PredictionTableError,
    accuracy,
    bootstrap_interval,
    calibration_p_value,
    classes_of,
    classification_metrics,
    expected_calibration_error,
    label_indices,
    macro_f1,
    paired_bootstrap_difference,
    prediction_table,
)
from irv2_pipeline.pipelines.evaluation.nodes import score_predictions

CLASSES = ["a", "b", "c"]
# Six test images: three of class a, two of b, one of c.
LABELS = ["a", "a", "a", "b", "b", "c"]
PROBABILITIES = np.array(
    [
        [0.8, 0.1, 0.1],  # a, right, confidence 0.8
        [0.6, 0.3, 0.1],  # a, right, 0.6
        [0.3, 0.6, 0.1],  # a taken for b, 0.6
        [0.2, 0.7, 0.1],  # b, right, 0.7
        [0.05, 0.9, 0.05],  # b, right, 0.9
        [0.5, 0.3, 0.2],  # c taken for a, 0.5; c is only third
    ]
)


@pytest.fixture
def small_table() -> pd.DataFrame:
    paths = [f"{label}/{index}.png" for index, label in enumerate(LABELS)]
    return prediction_table(paths, LABELS, CLASSES, PROBABILITIES)


def score(probabilities=PROBABILITIES, labels=LABELS, top_k=2, bins=10):
    return classification_metrics(
        label_indices(pd.Series(labels), CLASSES),
        probabilities,
        top_k=top_k,
        calibration_bins_count=bins,
        resamples=200,
        seed=0,
    )


def test_metrics_match_hand_computed_values():
    result = score()
    assert result["accuracy"] == pytest.approx(4 / 6)
    # Recall a 2/3, b 2/2, c 0/1.
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # F1: a (P 2/3, R 2/3) 2/3; b (P 2/3, R 1) 4/5; c 0.
    assert result["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    # Only the c image has its true class outside the top 2.
    assert result["top_k"] == 2
    assert result["top_k_accuracy"] == pytest.approx(5 / 6)
    true_probabilities = [0.8, 0.6, 0.3, 0.7, 0.9, 0.2]
    assert result["log_loss"] == pytest.approx(
        -sum(math.log(p) for p in true_probabilities) / 6
    )
    # Ten bins: 0.5 wrong (gap 0.5), 0.6 right + 0.6 wrong (0.1 x 2), 0.7 right
    # (0.3), 0.8 right (0.2), 0.9 right (0.1).
    assert result["ece"] == pytest.approx((0.5 + 0.2 + 0.3 + 0.2 + 0.1) / 6)
    assert result["mean_confidence"] == pytest.approx(4.1 / 6)
    assert result["n_test"] == 6


def test_top_k_is_left_out_when_there_are_not_more_classes_than_k():
    result = score(top_k=3)
    assert "top_k_accuracy" not in result
    assert "top_k" not in result


def test_prediction_table_carries_the_argmax_and_every_probability(small_table):
    assert list(small_table["predicted"]) == ["a", "a", "b", "b", "b", "a"]
    assert small_table["confidence"].tolist() == pytest.approx(
        [0.8, 0.6, 0.6, 0.7, 0.9, 0.5]
    )
    assert classes_of(small_table) == CLASSES
    assert small_table["prob_c"].tolist() == pytest.approx(PROBABILITIES[:, 2])


def test_unknown_labels_are_named():
    with pytest.raises(PredictionTableError, match="'z'"):
        label_indices(pd.Series(["a", "z"]), CLASSES)


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(3)

    def interval(n: int) -> tuple[float, float, float]:
        y_true = rng.integers(0, 3, size=n)
        wrong = rng.random(n) < 0.2
        y_pred = np.where(wrong, (y_true + 1) % 3, y_true)
        point = skm.accuracy_score(y_true, y_pred)
        low, high = bootstrap_interval(
            y_true, y_pred, skm.accuracy_score, resamples=500, seed=1
        )
        return low, point, high

    small_low, small_point, small_high = interval(50)
    large_low, large_point, large_high = interval(2000)
    assert small_low <= small_point <= small_high
    assert large_low <= large_point <= large_high
    assert small_high - small_low > 0
    # The width shrinks like 1 / sqrt(n): about 6x from 50 to 2000 images.
    assert (large_high - large_low) < (small_high - small_low) / 3


def test_bootstrap_is_reproducible_with_its_seed():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=97)
    p = np.where(rng.random(97) < 0.3, 1 - y, y)
    first = bootstrap_interval(y, p, skm.accuracy_score, resamples=100, seed=5)
    again = bootstrap_interval(y, p, skm.accuracy_score, resamples=100, seed=5)
    other = bootstrap_interval(y, p, skm.accuracy_score, resamples=100, seed=6)
    assert first == again
    assert first != other


def test_a_class_missing_from_a_resample_is_not_scored_as_f1_zero():
    # Every prediction is right, and class c has one test image: about a third of
    # the resamples miss it. Scored as F1 = 0 there, c put the interval at
    # [0.667, 1] for a classifier that makes no mistake.
    y_true = np.array([0] * 20 + [1] * 20 + [2])
    probabilities = np.eye(3)[y_true] * 0.9 + 0.1 / 3
    result = classification_metrics(
        y_true,
        probabilities,
        top_k=2,
        calibration_bins_count=10,
        resamples=200,
        seed=0,
    )
    assert result["macro_f1"] == 1.0
    assert result["macro_f1_ci95"] == [1.0, 1.0]


def test_ece_is_near_zero_for_calibrated_and_large_for_overconfident_predictions():
    rng = np.random.default_rng(11)
    n = 20000
    confidence = rng.uniform(0.34, 1.0, size=n)
    calibrated = rng.random(n) < confidence
    assert expected_calibration_error(confidence, calibrated, 15) < 0.02

    overconfident = np.full(n, 0.95)
    right_six_in_ten = rng.random(n) < 0.6
    assert expected_calibration_error(
        overconfident, right_six_in_ten, 15
    ) == pytest.approx(0.35, abs=0.02)


def test_a_calibrated_model_is_rarely_called_miscalibrated_on_few_test_images():
    # 500 test sets of 46 images from a model whose confidence is right: the ECE
    # passes 0.1 in most of them; the calibration test rejects at 0.05 in about 5 %
    # (0.075: 5 % plus 2.5 standard errors of a rate over 500 sets).
    rng = np.random.default_rng(3)
    eces, p_values = [], []
    for seed in range(500):
        confidence = rng.uniform(0.34, 0.9, size=46)
        correct = rng.random(46) < confidence
        eces.append(expected_calibration_error(confidence, correct, 15))
        p_values.append(
            calibration_p_value(confidence, correct, 15, resamples=200, seed=seed)
        )
    assert np.mean(np.array(eces) > 0.1) > 0.9
    assert np.mean(np.array(p_values) < 0.05) <= 0.075


def test_an_overconfident_model_is_beyond_what_a_calibrated_one_reaches():
    rng = np.random.default_rng(4)
    confidence = np.full(46, 0.95)
    right_six_in_ten = rng.random(46) < 0.6
    p_value = calibration_p_value(
        confidence, right_six_in_ten, 15, resamples=999, seed=0
    )
    assert p_value == pytest.approx(1 / 1000)


def test_the_calibration_p_value_is_seeded():
    rng = np.random.default_rng(5)
    confidence = rng.uniform(0.4, 1.0, size=30)
    correct = rng.random(30) < 0.7
    first, again = (
        calibration_p_value(confidence, correct, 15, resamples=200, seed=1)
        for _ in range(2)
    )
    assert first == again
    assert 1 / 201 <= first <= 1


def test_metrics_recomputed_from_the_saved_table_equal_the_reported_ones(
    small_table, tmp_path, evaluation_params
):
    path = tmp_path / "test_predictions.csv"
    small_table.to_csv(path, index=False)
    saved = pd.read_csv(path)
    evaluation_params["top_k"] = 2
    metrics, report = score_predictions(saved, evaluation_params)

    probabilities = saved[[f"prob_{name}" for name in CLASSES]].to_numpy()
    labels = [0, 1, 2]
    assert metrics["accuracy"] == skm.accuracy_score(saved["label"], saved["predicted"])
    assert metrics["balanced_accuracy"] == skm.balanced_accuracy_score(
        saved["label"], saved["predicted"]
    )
    assert metrics["macro_f1"] == skm.f1_score(
        saved["label"], saved["predicted"], average="macro", zero_division=0
    )
    true_index = saved["label"].map(CLASSES.index)
    assert metrics["log_loss"] == pytest.approx(
        skm.log_loss(true_index, probabilities, labels=labels), rel=1e-12
    )
    assert metrics["top_k_accuracy"] == skm.top_k_accuracy_score(
        true_index, probabilities, k=2, labels=labels
    )
    assert metrics["n_test"] == len(saved)
    assert metrics["classes"] == CLASSES
    recall = report.set_index("class")["recall"]
    assert recall[["a", "b", "c"]].tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    assert report.set_index("class").loc["a", "support"] == 3


def test_tta_figures_are_reported_separately(small_table, evaluation_params):
    flipped_agree = PROBABILITIES[[0, 1, 0, 3, 4, 5]]  # TTA fixes the third image
    table = prediction_table(
        small_table["path"], LABELS, CLASSES, PROBABILITIES, flipped_agree
    )
    plain, _ = score_predictions(small_table, evaluation_params)
    with_tta, _ = score_predictions(table, evaluation_params)
    assert with_tta["accuracy"] == plain["accuracy"] == pytest.approx(4 / 6)
    assert with_tta["tta"]["accuracy"] == pytest.approx(5 / 6)
    assert "tta" not in plain


def test_paired_difference_of_identical_predictions_is_exactly_zero():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=50)
    predicted = rng.integers(0, 3, size=50)
    for metric in (accuracy, macro_f1):
        assert paired_bootstrap_difference(
            truth, predicted, predicted.copy(), metric, resamples=300, seed=1
        ) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("n", [20, 200])
def test_one_flipped_image_is_a_difference_of_one_over_n_within_noise(n):
    truth = np.zeros(n, dtype=int)
    reference = truth.copy()
    worse = truth.copy()
    worse[n // 2] = 1  # one image the variant gets wrong and the reference right
    difference, low, high = paired_bootstrap_difference(
        truth, worse, reference, accuracy, resamples=2000, seed=3
    )
    assert difference == pytest.approx(-1 / n)
    # Every resample differs by (times the image was drawn) / n: never above 0, and
    # about a third of resamples miss the image ((1 - 1/n)^n), so 0 is in the interval.
    assert high == 0.0
    assert low < 0 and low == pytest.approx(round(low * n) / n)
    # Unpaired, each model's own interval is far wider than the paired difference's.
    own_low, own_high = bootstrap_interval(
        truth, worse, accuracy, resamples=2000, seed=3
    )
    assert own_high - own_low >= high - low


def test_paired_difference_needs_the_same_images():
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap_difference(
            np.zeros(3), np.zeros(3), np.zeros(4), accuracy, resamples=10, seed=0
        )


def test_macro_f1_and_accuracy_equal_scikit_learns_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, k = int(rng.integers(1, 30)), int(rng.integers(1, 6))
        truth, predicted = rng.integers(0, k, n), rng.integers(0, k, n)
        present = np.union1d(truth, predicted)
        expected = skm.f1_score(
            truth, predicted, labels=present, average="macro", zero_division=0
        )
        assert macro_f1(truth, predicted) == pytest.approx(expected, abs=1e-12)
        assert accuracy(truth, predicted) == skm.accuracy_score(truth, predicted)
