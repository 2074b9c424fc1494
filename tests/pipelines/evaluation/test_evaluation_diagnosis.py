"""Each diagnosis rule fires on a run that has its problem and not on one without."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from irv2_pipeline.pipelines.evaluation import diagnosis
from irv2_pipeline.pipelines.evaluation.nodes import diagnose_run
from tests.conftest import planned_source

from .conftest import (
    PROJECT_ROOT,
    colour_predictions,
    healthy_history,
    history_frame,
    noise_estimate,
    shift_profile,
    stages_after,
    stages_frame,
)

# The classes of the hand-written metrics below.
CATS = ["cat", "dog", "eel"]


def trained(*unfreeze_from: str | None) -> list[dict]:
    """The stage records of finetune_stages, after its CSV round trip."""
    return diagnosis.stage_records(stages_frame(*unfreeze_from))


@pytest.fixture
def thresholds(evaluation_params) -> dict:
    return evaluation_params["diagnosis"]


def test_overfitting_fires_on_a_large_accuracy_gap(thresholds):
    history = history_frame(
        {"head": [(0.6, 0.80, 0.70, 0.75), (0.2, 0.99, 0.75, 0.60)]}
    )
    finding = diagnosis.overfitting(history, thresholds["overfitting"])
    assert finding is not None
    assert finding.severity == "high"  # gap 0.39 > 2 x 0.15
    assert finding.evidence == [
        "stage 'head', epoch 2: training accuracy 0.990 vs validation 0.600 "
        "(gap 0.390 > 0.15)"
    ]
    assert "dropout" in finding.suggestion


def test_overfitting_fires_on_validation_loss_rising_while_training_loss_falls(
    thresholds,
):
    history = history_frame(
        {
            "block8": [
                (0.50, 0.85, 0.40, 0.84),
                (0.35, 0.88, 0.45, 0.83),
                (0.20, 0.90, 0.60, 0.82),
            ]
        }
    )
    finding = diagnosis.overfitting(history, thresholds["overfitting"])
    assert finding is not None
    assert "rose from 0.400 (epoch 1) to 0.600" in finding.evidence[0]


def test_overfitting_is_silent_on_a_healthy_run(thresholds):
    assert diagnosis.overfitting(healthy_history(), thresholds["overfitting"]) is None


def underfitting(history: pd.DataFrame, thresholds: dict) -> diagnosis.Finding | None:
    """The underfitting rule on a three-class run, its stages as finetune wrote them."""
    return diagnosis.underfitting(
        history, stages_after(history), 3, thresholds["underfitting"]
    )


def test_underfitting_fires_when_training_accuracy_stays_low(thresholds):
    history = history_frame(
        {"head": [(1.1, 0.34, 1.1, 0.33)], "block8_1": [(1.0, 0.40, 1.0, 0.41)]}
    )
    finding = underfitting(history, thresholds)
    assert finding is not None
    assert finding.severity == "high"
    assert (
        "'block8_1', reached at most 0.400 training and 0.410 validation"
        in (finding.evidence[0])
    )
    assert "chance is 0.333" in finding.evidence[0]


def test_underfitting_judges_the_stage_the_model_was_saved_from(thresholds):
    # The backbone stage fits its training images but validates worse than the head
    # stage, so the model keeps the head stage's weights, which underfit.
    history = history_frame(
        {"head": [(0.9, 0.50, 0.9, 0.48)], "block8_1": [(0.2, 0.95, 1.2, 0.45)]}
    )
    finding = underfitting(history, thresholds)
    assert finding is not None
    assert "'head', reached at most 0.500 training" in finding.evidence[0]


def test_underfitting_is_silent_when_validation_accuracy_is_high(thresholds):
    # One epoch under augmentation: the epoch's running training accuracy lags.
    history = history_frame({"block8_1": [(1.08, 0.51, 1.07, 0.89)]})
    assert underfitting(history, thresholds) is None


def distorted_history() -> pd.DataFrame:
    """block8_1 reaches more validation accuracy (0.91) than the head stage, but a
    worse best validation loss (0.45 vs 0.40): the model keeps the head's epoch 2
    (0.84 validation accuracy)."""
    return history_frame(
        {
            "head": [(0.9, 0.70, 0.85, 0.72), (0.5, 0.86, 0.40, 0.84)],
            "block8_1": [(0.4, 0.92, 0.45, 0.90), (0.3, 0.95, 0.50, 0.91)],
        }
    )


def feature_distortion(history: pd.DataFrame, thresholds: dict):
    """The rule on ``history``, its stages as finetune wrote them."""
    return diagnosis.feature_distortion(
        history, stages_after(history), "imagenet", thresholds["feature_distortion"]
    )


def test_feature_distortion_fires_when_a_backbone_stage_validates_worse(
    thresholds,
):
    finding = feature_distortion(distorted_history(), thresholds)
    assert finding is not None
    # Its validation accuracy did not fall: the loss alone says the features suffered.
    assert finding.severity == "medium"
    assert finding.evidence == [
        "stage 'block8_1': best val_loss 0.450 (val accuracy 0.900), 12% above stage "
        "'head' before it: 0.400 (val accuracy 0.840)",
        "the model keeps the weights of stage 'head', epoch 2",
    ]
    assert "'block8_1'" in finding.suggestion


def test_feature_distortion_holds_a_stage_against_the_best_before_it(thresholds):
    # block17_1 beats the head stage but not block8_1, and loses 0.08 accuracy to it.
    history = history_frame(
        {
            "head": [(0.9, 0.70, 0.60, 0.75)],
            "block8_1": [(0.5, 0.85, 0.40, 0.88)],
            "block17_1": [(0.3, 0.95, 0.50, 0.80)],
        }
    )
    finding = feature_distortion(history, thresholds)
    assert finding is not None
    assert finding.severity == "high"
    assert finding.evidence == [
        "stage 'block17_1': best val_loss 0.500 (val accuracy 0.800), 25% above "
        "stage 'block8_1' before it: 0.400 (val accuracy 0.880)",
        "the model keeps the weights of stage 'block8_1', epoch 1",
    ]


def test_feature_distortion_is_silent_on_a_rise_within_the_noise(thresholds):
    # 0.400 -> 0.408, a 2 % rise, at a better validation accuracy: no evidence.
    history = history_frame(
        {
            "head": [(0.9, 0.70, 0.85, 0.72), (0.5, 0.86, 0.400, 0.84)],
            "block8_1": [(0.4, 0.92, 0.408, 0.86), (0.3, 0.95, 0.42, 0.86)],
        }
    )
    assert thresholds["feature_distortion"]["min_val_loss_rise"] > 0.02
    assert feature_distortion(history, thresholds) is None


def test_feature_distortion_is_silent_when_every_stage_improves(thresholds):
    assert feature_distortion(healthy_history(), thresholds) is None


def test_feature_distortion_with_random_weights_blames_the_stage_not_features(
    thresholds,
):
    # Without pretrained features nothing was distorted, but the worse stage and the
    # one kept are still worth saying.
    history = distorted_history()
    finding = diagnosis.feature_distortion(
        history, stages_after(history), None, thresholds["feature_distortion"]
    )
    assert finding is not None
    assert "no pretrained features" in finding.cause
    assert "distorted the pretrained features" not in finding.cause


# An ECE on 200 test images that no draw of a calibrated model reached.
BEYOND_CHANCE = {"ece_p_value": 0.001, "n_test": 200, "classes": CATS}


def test_miscalibration_fires_on_over_and_under_confidence(thresholds):
    settings = thresholds["miscalibration"]
    over = {**BEYOND_CHANCE, "ece": 0.3, "mean_confidence": 0.95, "accuracy": 0.65}
    under = {**BEYOND_CHANCE, "ece": 0.6, "mean_confidence": 0.35, "accuracy": 0.96}
    over_finding = diagnosis.miscalibration(over, settings)
    under_finding = diagnosis.miscalibration(under, settings)
    assert over_finding is not None
    assert under_finding is not None
    assert "over-confident" in over_finding.cause
    assert "under-confident" in under_finding.cause
    assert over_finding.evidence == [
        "expected calibration error 0.300 > 0.1: mean confidence 0.950 vs accuracy "
        "0.650",
        "a calibrated model reaches that ECE on these 200 test images with "
        "probability 0.001 < alpha 0.05",
    ]


def test_miscalibration_is_silent_on_an_ece_a_calibrated_model_reaches_by_chance(
    thresholds,
):
    # 46 test images: a calibrated model at accuracy 0.6 gets ECE > 0.1 in most draws.
    small = {
        "ece": 0.16,
        "ece_p_value": 0.45,
        "n_test": 46,
        "mean_confidence": 0.62,
        "accuracy": 0.6,
        "classes": CATS,
    }
    assert diagnosis.miscalibration(small, thresholds["miscalibration"]) is None
    convincing = {**small, "ece_p_value": 0.01}
    assert diagnosis.miscalibration(convincing, thresholds["miscalibration"])


def test_miscalibration_is_silent_when_calibrated(thresholds):
    calibrated = {
        "ece": 0.03,
        "ece_p_value": 0.6,
        "n_test": 200,
        "mean_confidence": 0.9,
        "accuracy": 0.88,
        "classes": CATS,
    }
    assert diagnosis.miscalibration(calibrated, thresholds["miscalibration"]) is None


def test_miscalibration_is_silent_on_a_model_near_chance(thresholds):
    # Ten classes at 0.18 accuracy: the confidence has no accuracy to match.
    poor = {
        "ece": 0.3,
        "ece_p_value": 0.001,
        "n_test": 200,
        "mean_confidence": 0.48,
        "accuracy": 0.18,
        "classes": [f"c{index}" for index in range(10)],
    }
    result = diagnosis.miscalibration(poor, thresholds["miscalibration"])
    assert isinstance(result, diagnosis.NotJudged)
    assert result.reason.startswith(
        "test accuracy 0.180 is 0.09 of the way from chance"
    )


def test_underfitting_is_silent_when_the_model_fits(thresholds):
    assert underfitting(healthy_history(), thresholds) is None


def test_domain_gap_fires_when_shifted_blocks_stay_frozen(thresholds):
    profile = shift_profile({"stem": 0.2, "block35_2": 0.4, "block17_5": 2.5})
    finding = diagnosis.domain_gap(
        profile, trained(None, "block8_1"), "imagenet", thresholds["domain_gap"]
    )
    assert finding is not None
    assert finding.severity == "high"
    assert finding.evidence[1] == "the shift starts at block17 (2.5, at or above 1)"
    assert finding.evidence[2] == (
        "stages trained: head: head only, 2 epochs, learning rate 0.001, BatchNorm "
        "frozen; block8_1: unfreeze from block8_1, 2 epochs, learning rate 0.0001, "
        "BatchNorm frozen"
    )
    assert "unfreeze_from: block17_1" in finding.suggestion


def test_domain_gap_is_silent_on_a_shift_other_images_would_put_under_it(thresholds):
    # block8 at 2.5 on the images measured, 0.3 at the bootstrap's 5th percentile:
    # a few unusual images lift it (as measured on fractal images of the source's
    # own kind); the rule then judges block8 unshifted.
    settings = thresholds["domain_gap"]
    profile = shift_profile({"stem": 0.02, "block8_5": 2.5}, low={"block8_5": 0.3})
    trained_head = trained(None)
    assert diagnosis.domain_gap(profile, trained_head, "imagenet", settings) is None
    certain = shift_profile({"stem": 0.02, "block8_5": 2.5}, low={"block8_5": 1.4})
    finding = diagnosis.domain_gap(certain, trained_head, "imagenet", settings)
    assert finding is not None
    assert finding.evidence[1] == "the shift starts at block8 (2.5, at or above 1)"
    assert finding.evidence[-1] == (
        "from block8 on it stays at or above 1 at the 5th percentile of the "
        "bootstrap resamples of the training images (block8 1.4)"
    )


def test_domain_gap_names_the_block_the_plan_names_when_a_deeper_one_is_certain(
    thresholds,
):
    # block17 just over the threshold (its low end under it), block8 far over: the
    # gap is certain, and named where the plan reads its start.
    profile = shift_profile(
        {"stem": 0.02, "block17_5": 1.04, "block8_5": 3.0},
        low={"block17_5": 0.7, "block8_5": 2.0},
    )
    finding = diagnosis.domain_gap(
        profile, trained(None), "imagenet", thresholds["domain_gap"]
    )
    assert finding is not None
    assert "from block17 on" in finding.cause
    assert finding.evidence[-1].startswith("from block8 on it stays at or above 1")


def test_domain_gap_without_resamples_is_judged_on_the_shift_itself(thresholds):
    profile = shift_profile({"stem": 0.02, "block8_5": 2.5}).assign(
        shift_low=float("nan"), shift_high=float("nan")
    )
    finding = diagnosis.domain_gap(
        profile, trained(None), "imagenet", thresholds["domain_gap"]
    )
    assert finding is not None
    assert finding.evidence[1] == "the shift starts at block8 (2.5, at or above 1)"


def test_domain_gap_fires_on_a_block_exactly_at_the_threshold_as_the_plan_does(
    thresholds,
):
    # The plan unfreezes a block whose shift reaches shift_threshold (>=); the finding
    # suggests shift_threshold = max_block_shift, so it must flag that block too.
    settings = thresholds["domain_gap"]
    at_threshold = settings["max_block_shift"]
    profile = shift_profile({"stem": 0.2, "block17_5": at_threshold})
    finding = diagnosis.domain_gap(
        profile, trained(None, "block8_1"), "imagenet", settings
    )
    assert finding is not None
    assert "unfreeze_from: block17_1" in finding.suggestion


def test_domain_gap_is_medium_when_the_plan_already_unfreezes_the_shifted_blocks(
    thresholds,
):
    profile = shift_profile({"stem": 0.2, "block17_5": 2.5})
    finding = diagnosis.domain_gap(
        profile, trained(None, "block17_1"), "imagenet", thresholds["domain_gap"]
    )
    assert finding is not None
    assert finding.severity == "medium"


def test_domain_gap_names_the_scarce_data_cap_that_stopped_the_plan(thresholds):
    # Scarce data: the plan stops at mixed_7a although the shift starts at block17.
    profile = shift_profile({"stem": 0.2, "block17_5": 2.5, "block8_2": 4.0})
    limit = {
        "setting": "feature_shift.plan.scarce_deepest_unit",
        "unit": "mixed_7a",
        "wanted": "block17_1",
        "reason": "30 training images in the smallest class, under "
        "scarce_images_per_class 100",
    }
    settings = thresholds["domain_gap"]
    finding = diagnosis.domain_gap(
        profile, trained(None, "block8_1", "mixed_7a"), "imagenet", settings, limit
    )
    assert finding is not None
    assert finding.severity == "medium"
    assert "the plan stopped at mixed_7a" in finding.cause
    assert "shift_threshold" not in finding.suggestion
    assert "feature_shift.plan.scarce_images_per_class" in finding.parameters
    assert finding.evidence[-1] == (
        "the plan stopped at mixed_7a (feature_shift.plan.scarce_deepest_unit): 30 "
        "training images in the smallest class, under scarce_images_per_class 100"
    )
    # Stages a user wrote deeper or shallower than the cap are not the cap's doing.
    mine = diagnosis.domain_gap(
        profile, trained(None, "block8_1"), "imagenet", settings, limit
    )
    assert mine.severity == "high"
    assert "shift_threshold" in mine.suggestion


def test_domain_gap_passes_over_a_greyscale_stem(thresholds):
    settings = thresholds["domain_gap"]
    grey_stem = shift_profile({"stem": 2.2, "block35_2": 0.4})
    assert diagnosis.domain_gap(grey_stem, trained(None), "imagenet", settings)
    grey_stem["grayscale_share"] = 1.0
    assert diagnosis.domain_gap(grey_stem, trained(None), "imagenet", settings) is None
    grey = shift_profile({"stem": 2.2, "block35_2": 1.4})
    grey["grayscale_share"] = 1.0
    finding = diagnosis.domain_gap(grey, trained(None), "imagenet", settings)
    assert "from block35 on" in finding.cause
    assert "greyscale" in finding.evidence[-1]


def test_domain_gap_is_silent_on_a_small_shift_or_random_weights(thresholds):
    small = shift_profile({"stem": 0.2, "block8_1": 0.3})
    large = shift_profile({"stem": 5.0})
    settings = thresholds["domain_gap"]
    assert diagnosis.domain_gap(small, trained(None), "imagenet", settings) is None
    random_init = diagnosis.domain_gap(large, trained(None), None, settings)
    assert random_init == diagnosis.NotJudged(
        "domain_gap",
        "model.weights is null: the BatchNorm statistics the shift is measured "
        "against are no pretrained source's",
    )


def split_table(val_p: float, test_p: float) -> pd.DataFrame:
    """``split_shift`` as feature_shift writes it (a NaN p-value: not compared)."""
    return pd.DataFrame(
        {
            "pair": ["train-vs-val", "train-vs-test"],
            "n_reference": [120, 120],
            "n_compared": [25, 30],
            "frechet": [3.0, 40.0],
            "mmd2": [0.001, 0.08],
            "p_value": [val_p, test_p],
            "shifted": [val_p < 0.01, test_p < 0.01],
            "verdict": ["no evidence that val differs", "test differs from train"],
        }
    )


def test_split_shift_fires_when_the_test_split_differs(thresholds):
    finding = diagnosis.split_shift(split_table(0.5, 0.002), thresholds["split_shift"])
    assert finding is not None
    assert finding.severity == "high"
    assert finding.evidence == [
        "train-vs-test: p = 0.002 < 0.01, mmd2 = 0.08, frechet = 40, 30 vs 120 images"
    ]


def test_split_shift_is_medium_when_only_validation_differs(thresholds):
    finding = diagnosis.split_shift(
        split_table(0.001, math.nan), thresholds["split_shift"]
    )
    assert finding is not None
    assert finding.severity == "medium"
    assert [line.split(":")[0] for line in finding.evidence] == ["train-vs-val"]


def test_split_shift_is_silent_when_no_split_differs(thresholds):
    assert (
        diagnosis.split_shift(split_table(0.5, 0.3), thresholds["split_shift"]) is None
    )


def test_split_shift_names_the_columns_it_needs(thresholds):
    with pytest.raises(diagnosis.DiagnosisInputError, match=r"split_shift.*'p_value'"):
        diagnosis.split_shift(
            pd.DataFrame({"pair": ["train-vs-test"], "pvalue": [0.1]}),
            thresholds["split_shift"],
        )


def validation_test_gap(
    history: pd.DataFrame, test: float, interval: list[float], thresholds: dict
) -> diagnosis.Finding | None:
    """The rule on ``history``, its stages as finetune wrote them, and a test score."""
    return diagnosis.validation_test_gap(
        history,
        stages_after(history),
        {"accuracy": test, "accuracy_ci95": interval},
        thresholds["validation_test_gap"],
    )


def test_validation_test_gap_fires_when_test_falls_clearly_below_validation(
    thresholds,
):
    finding = validation_test_gap(healthy_history(), 0.62, [0.55, 0.69], thresholds)
    assert finding is not None
    assert finding.evidence == [
        "validation accuracy of the saved weights (stage 'block8_1', epoch 2): 0.900; "
        "test accuracy 0.620 (95% interval [0.550, 0.690]), 0.280 lower (> 0.1)"
    ]


def test_validation_test_gap_is_silent_within_the_gap_or_the_interval(thresholds):
    history = healthy_history()
    assert validation_test_gap(history, 0.86, [0.80, 0.92], thresholds) is None
    assert validation_test_gap(history, 0.70, [0.45, 0.92], thresholds) is None


def test_diagnose_run_on_a_run_that_kept_an_earlier_stage(diagnosis_inputs):
    history = distorted_history()
    metrics = diagnosis_inputs["evaluation_metrics"]
    findings, _ = diagnose_run(
        **{
            **diagnosis_inputs,
            "training_history": history,
            "finetune_stages": stages_after(history),
            # 0.84 - 0.78 is within the gap; block8_1's 0.91 - 0.78 is not.
            "evaluation_metrics": {
                **metrics,
                "accuracy": 0.78,
                "accuracy_ci95": [0.72, 0.84],
            },
        },
    )
    rules = [finding["rule"] for finding in findings]
    assert "validation_test_gap" not in rules
    assert "feature_distortion" in rules


def test_validation_test_gap_reads_the_restored_epoch_of_older_outputs(thresholds):
    # finetune_stages written before `selected`: the model has the last stage's best
    # epoch (0.80), not the later epoch with more validation accuracy (0.93).
    history = history_frame(
        {"block8_1": [(0.5, 0.85, 0.40, 0.80), (0.3, 0.95, 0.50, 0.93)]}
    )
    older = stages_after(history).drop(columns="selected")
    metrics = {"accuracy": 0.76, "accuracy_ci95": [0.70, 0.82]}
    settings = thresholds["validation_test_gap"]
    assert diagnosis.validation_test_gap(history, older, metrics, settings) is None


def test_restored_epoch_needs_exactly_one_selected_stage():
    stages = stages_after(healthy_history()).assign(selected=True)
    with pytest.raises(diagnosis.DiagnosisInputError, match="2 stages"):
        diagnosis.restored_epoch(stages)


def test_leakage_fires_on_exact_and_near_copies_across_splits(
    colour_images, thresholds
):
    _, manifest = colour_images
    leaky = manifest.copy()
    train = leaky.index[leaky["split"] == "train"]
    test = leaky.index[leaky["split"] == "test"]
    leaky.loc[test[0], "sha256"] = leaky.loc[train[0], "sha256"]
    leaky.loc[test[0], "phash"] = leaky.loc[train[0], "phash"]
    near = f"{int(leaky.loc[train[1], 'phash'], 16) ^ 0b101:016x}"  # 2 bits apart
    leaky.loc[test[1], "phash"] = near
    finding = diagnosis.leakage(leaky, thresholds["leakage"])
    assert finding is not None
    assert finding.evidence == [
        f"1 of 6 test images are exact copies of training images "
        f"(e.g. {leaky.loc[test[0], 'path']})",
        f"1 of 6 test images are near copies (pHash within 4 bits) of training "
        f"images (e.g. {leaky.loc[test[1], 'path']})",
    ]


def test_leakage_is_silent_without_copies(colour_images, thresholds):
    _, manifest = colour_images
    assert diagnosis.leakage(manifest, thresholds["leakage"]) is None


def conflicts_report() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "group": ["g1"],
            "kind": ["exact"],
            "size": [2],
            "labels": ["cat, dog"],
            "label_conflict": [True],
            "paths": ["cat/1.jpg; dog/1.jpg"],
        }
    )


def test_label_conflicts_fire_high_when_conflicting_images_remain():
    summary = {"label_conflict_groups": 1, "label_conflict_images_kept": 2}
    finding = diagnosis.label_conflicts(summary, conflicts_report())
    assert finding is not None
    assert finding.severity == "high"
    assert "2 of their images are still in the manifest" in finding.evidence[0]
    assert "cat/1.jpg; dog/1.jpg" in finding.evidence[1]


def test_label_conflicts_are_low_when_removed_and_silent_when_absent():
    removed = {"label_conflict_groups": 1, "label_conflict_images_kept": 0}
    finding = diagnosis.label_conflicts(removed, conflicts_report())
    assert finding is not None
    assert finding.severity == "low"
    none = {"label_conflict_groups": 0, "label_conflict_images_kept": 0}
    assert diagnosis.label_conflicts(none, conflicts_report().head(0)) is None


def class_report(recalls: dict[str, float], support: int = 10) -> pd.DataFrame:
    rows = [
        {
            "class": name,
            "precision": 0.9,
            "recall": recall,
            "f1_score": 0.9,
            "support": support,
        }
        for name, recall in recalls.items()
    ]
    rows.append(
        {
            "class": "macro avg",
            "precision": 0.9,
            "recall": 0.1,
            "f1_score": 0.9,
            "support": 30,
        }
    )
    return pd.DataFrame(rows)


def test_class_imbalance_fires_on_low_recall_and_advises_class_weights(thresholds):
    metrics = {"accuracy": 0.90, "balanced_accuracy": 0.70}
    finding = diagnosis.class_imbalance(
        metrics,
        class_report({"cat": 0.95, "dog": 0.3, "eel": 0.9}),
        {"cat": 300, "dog": 20, "eel": 250},
        thresholds["class_imbalance"],
    )
    assert finding is not None
    assert finding.evidence == [
        "accuracy 0.900 vs balanced accuracy 0.700 (gap 0.200 > 0.05)",
        "class 'dog': recall 0.300 vs 0.925 on average for the other classes (chance "
        "0.333), 0.89 of the way from chance to perfect below them (> 0.3) and more "
        "than test noise (0.167 for 10 test images); 20 training images",
        "training images per class: from 20 ('dog') to 300 ('cat'), 15.0x above 1.5x",
        "classes with under 1/1.5 of 'cat''s training images: 'dog' (20 training "
        "images, test recall 0.300 on 10)",
    ]
    assert "finetune.class_weights" in finding.parameters
    assert finding.suggestion.endswith(
        "add training images of the rare classes ('dog')."
    )


def test_class_imbalance_with_balanced_training_points_at_the_confusion(thresholds):
    metrics = {"accuracy": 0.60, "balanced_accuracy": 0.60}
    finding = diagnosis.class_imbalance(
        metrics,
        class_report({"cat": 0.9, "dog": 0.2, "eel": 0.7}),
        {"cat": 100, "dog": 100, "eel": 95},
        thresholds["class_imbalance"],
    )
    assert finding is not None
    assert "finetune.class_weights" not in finding.parameters
    assert "'dog'" in finding.suggestion


TEN_CLASSES = [f"class_{index}" for index in range(10)]


def test_class_imbalance_is_silent_on_a_balanced_run_poor_on_every_class(thresholds):
    # Every recall in 0.05-0.3 (mean 0.18): the model is poor, not imbalanced.
    recalls = [0.05, 0.1, 0.1, 0.15, 0.15, 0.2, 0.2, 0.25, 0.3, 0.3]
    metrics = {"accuracy": 0.18, "balanced_accuracy": 0.18}
    assert (
        diagnosis.class_imbalance(
            metrics,
            class_report(dict(zip(TEN_CLASSES, recalls, strict=True)), support=50),
            dict.fromkeys(TEN_CLASSES, 200),
            thresholds["class_imbalance"],
        )
        is None
    )


def test_class_imbalance_names_the_one_class_far_below_the_others(thresholds):
    recalls = dict.fromkeys(TEN_CLASSES, 0.9) | {"class_3": 0.1}
    metrics = {"accuracy": 0.82, "balanced_accuracy": 0.82}
    finding = diagnosis.class_imbalance(
        metrics,
        class_report(recalls),
        dict.fromkeys(TEN_CLASSES, 200),
        thresholds["class_imbalance"],
    )
    assert finding is not None
    assert "hard to tell apart" in finding.cause
    assert finding.evidence[0].startswith("class 'class_3': recall 0.100 vs 0.900")
    assert len(finding.evidence) == 2  # the class, then the training counts
    assert "'class_3'" in finding.suggestion
    assert "finetune.class_weights" not in finding.parameters


def test_class_imbalance_from_an_imbalanced_training_set_advises_class_weights(
    thresholds,
):
    # The rare classes' recalls are below the common one's, but by less than test
    # noise on 10 images each: balanced accuracy far below accuracy is the sign.
    report = pd.concat(
        [
            class_report({"cat": 0.95}, support=80),
            class_report({"dog": 0.5, "eel": 0.5}, support=10),
        ]
    )
    metrics = {"accuracy": 0.86, "balanced_accuracy": 0.65}
    finding = diagnosis.class_imbalance(
        metrics,
        report,
        {"cat": 400, "dog": 40, "eel": 40},
        thresholds["class_imbalance"],
    )
    assert finding is not None
    assert "the training set is imbalanced" in finding.cause
    assert finding.evidence == [
        "accuracy 0.860 vs balanced accuracy 0.650 (gap 0.210 > 0.05)",
        "training images per class: from 40 ('dog') to 400 ('cat'), 10.0x above 1.5x",
        # Both rare classes, though the recall of neither singles it out.
        "classes with under 1/1.5 of 'cat''s training images: 'dog' (40 training "
        "images, test recall 0.500 on 10), 'eel' (40 training images, test recall "
        "0.500 on 10)",
    ]
    assert "rare classes ('dog', 'eel')" in finding.suggestion
    assert finding.parameters == [
        "finetune.class_weights",
        "augmentation.balance.enabled",
    ]


def test_class_imbalance_is_silent_on_balanced_results(thresholds):
    metrics = {"accuracy": 0.90, "balanced_accuracy": 0.89}
    report = class_report({"cat": 0.9, "dog": 0.88, "eel": 0.9})
    counts = {"cat": 300, "dog": 20, "eel": 250}
    assert (
        diagnosis.class_imbalance(
            metrics, report, counts, thresholds["class_imbalance"]
        )
        is None
    )


def flips(
    random: tuple[float, float, float, float] = (0.0, 0.05, 0.1, 1 / 17),
    **per_class: tuple[int, int, int, int, int],
) -> pd.DataFrame:
    """``occlusion_flips``: per class (n, border, centre, border only, centre only);
    ``random``: the 16 random squares' least, median and most flip rate and the
    border's p-value, the same for every class."""
    low, median, high, p_value = random
    return pd.DataFrame(
        [
            {
                "class": name,
                "n": n,
                "border_flips": border,
                "centre_flips": centre,
                "border_flip_rate": border / n,
                "centre_flip_rate": centre / n,
                "border_only_flips": border_only,
                "centre_only_flips": centre_only,
                "border_px": 2144,
                "centre_px": 2116,
                "random_patches": 16,
                "random_flip_rate_min": low,
                "random_flip_rate_median": median,
                "random_flip_rate_max": high,
                "border_p_value": p_value,
            }
            for name, (n, border, centre, border_only, centre_only) in per_class.items()
        ]
    )


def object_reading_flips() -> pd.DataFrame:
    """A model that reads the object: the centre mask changes far more."""
    return flips(cat=(12, 1, 9, 0, 8), dog=(12, 0, 7, 0, 7), eel=(12, 2, 10, 1, 9))


def test_shortcut_names_the_class_whose_border_decides(thresholds):
    table = object_reading_flips()
    table.loc[1] = flips(dog=(12, 11, 1, 10, 0)).iloc[0]
    report = class_report({"cat": 0.9, "dog": 1.0, "eel": 0.9}, support=12)
    finding = diagnosis.shortcut(table, report, "grad_cam.png", thresholds["shortcut"])
    assert finding is not None and finding.rule == "shortcut"
    assert finding.severity == "high"
    assert "'dog'" in finding.cause and "'cat'" not in finding.cause
    assert finding.evidence[0].startswith("class 'dog': masking the border band")
    assert "11 of its 12" in finding.evidence[0]
    assert "3.2 standard errors" in finding.evidence[0]
    # The null it was held against, quoted.
    assert "at 16 random places change 0%–10% (median 5%)" in finding.evidence[0]
    assert "or more at 0 of them (p = 0.06 <= 0.1 with K=16)" in finding.evidence[0]
    assert "grad_cam.png" in finding.evidence[-1]


def test_shortcut_is_silent_when_random_squares_change_as_much_as_the_border(
    thresholds,
):
    # The border beats the centre square by far, but hiding that many pixels at 4
    # of 16 random places changes as much: the border is not special (p = 5 / 17).
    table = flips(
        (0.0, 0.3, 0.95, 5 / 17),
        cat=(12, 1, 9, 0, 8),
        dog=(12, 11, 1, 10, 0),
        eel=(12, 2, 10, 1, 9),
    )
    report = class_report({"cat": 0.9, "dog": 1.0, "eel": 0.9}, support=12)
    assert (
        diagnosis.shortcut(table, report, "grad_cam.png", thresholds["shortcut"])
        is None
    )
    # The same flips fire where max_p_value lets a p-value of 5 / 17 through.
    lenient = {**thresholds["shortcut"], "max_p_value": 0.3}
    finding = diagnosis.shortcut(table, report, "grad_cam.png", lenient)
    assert finding is not None and "'dog'" in finding.cause
    assert "or more at 4 of them (p = 0.29" in finding.evidence[0]


def test_shortcut_is_silent_when_the_model_reads_the_object(thresholds):
    report = class_report({"cat": 0.9, "dog": 1.0, "eel": 0.9}, support=12)
    finding = diagnosis.shortcut(
        object_reading_flips(), report, "grad_cam.png", thresholds["shortcut"]
    )
    assert finding is None


def test_shortcut_is_silent_on_a_poor_model_whose_predictions_flip_anyway(
    thresholds,
):
    # Border flips far above centre flips, but the class is recalled near chance.
    table = flips(cat=(12, 10, 1, 9, 0), dog=(12, 6, 6, 3, 3), eel=(12, 7, 5, 4, 2))
    report = class_report({"cat": 0.42, "dog": 0.33, "eel": 0.25}, support=12)
    poor = diagnosis.shortcut(table, report, "grad_cam.png", thresholds["shortcut"])
    assert isinstance(poor, diagnosis.NotJudged)
    assert poor.reason.startswith("no class of the 3 has test images and a recall")
    # The same flips with the class well recognised do fire.
    recognised = class_report({"cat": 0.9, "dog": 0.33, "eel": 0.25}, support=12)
    finding = diagnosis.shortcut(
        table, recognised, "grad_cam.png", thresholds["shortcut"]
    )
    assert finding is not None and "'cat'" in finding.cause


def test_shortcut_is_silent_on_flips_within_noise(thresholds):
    # 3 of 4 border flips against none: a ratio that three images make is noise
    # (3 / sqrt(3) = 1.7 standard errors < 2).
    table = flips(cat=(4, 3, 0, 3, 0), dog=(12, 0, 7, 0, 7), eel=(12, 2, 10, 1, 9))
    report = class_report({"cat": 1.0, "dog": 0.9, "eel": 0.9}, support=12)
    assert (
        diagnosis.shortcut(table, report, "grad_cam.png", thresholds["shortcut"])
        is None
    )


def test_shortcut_needs_the_occlusion_columns(thresholds):
    report = class_report({"cat": 1.0}, support=12)
    with pytest.raises(diagnosis.DiagnosisInputError, match="occlusion_flips lacks"):
        diagnosis.shortcut(
            pd.DataFrame({"class": ["cat"], "n": [3]}),
            report,
            "grad_cam.png",
            thresholds["shortcut"],
        )


def test_unstable_training_fires_on_nan_and_on_loss_spikes(thresholds):
    settings = thresholds["unstable_training"]
    spiky = history_frame(
        {"head": [(0.8, 0.7, 0.8, 0.7), (2.4, 0.5, 0.9, 0.6), (0.6, 0.8, 0.7, 0.7)]}
    )
    finding = diagnosis.unstable_training(spiky, [], settings)
    assert finding is not None
    assert finding.severity == "medium"
    assert finding.evidence == [
        "stage 'head': loss jumped from 0.8 to 2.4 at epoch 2 (3.0x > 2.0x)"
    ]
    diverged = history_frame(
        {"head": [(0.8, 0.7, 0.8, 0.7), (math.nan, 0.3, math.nan, 0.3)]}
    )
    finding = diagnosis.unstable_training(diverged, [], settings)
    assert finding is not None
    assert finding.severity == "high"
    assert "loss is NaN or infinite at epoch 2" in finding.evidence[0]


def test_unstable_training_reports_learning_rates_the_plan_rules_flag(thresholds):
    problem = "stage 'block8_1': learning rate 0.01 is above 0.001 for backbone layers"
    finding = diagnosis.unstable_training(
        healthy_history(), [problem], thresholds["unstable_training"]
    )
    assert finding is not None
    assert finding.evidence == [problem]


def test_unstable_training_is_silent_on_a_smooth_run(thresholds):
    assert (
        diagnosis.unstable_training(
            healthy_history(), [], thresholds["unstable_training"]
        )
        is None
    )


def test_random_weights_fires_only_without_pretrained_weights():
    finding = diagnosis.random_weights(None)
    assert finding is not None
    assert "model.weights: imagenet" in finding.suggestion
    assert "model.sources" in finding.suggestion
    assert diagnosis.random_weights("imagenet") is None
    assert diagnosis.random_weights("/models/irv2_notop.h5") is None


def test_small_test_set_fires_on_a_wide_interval(thresholds):
    settings = thresholds["small_test_set"]
    wide = {"n_test": 20, "accuracy": 0.7, "accuracy_ci95": [0.5, 0.9]}
    narrow = {"n_test": 2000, "accuracy": 0.7, "accuracy_ci95": [0.68, 0.72]}
    finding = diagnosis.small_test_set(wide, settings)
    assert finding is not None
    assert "width 0.400 > 0.2" in finding.evidence[0]
    assert diagnosis.small_test_set(narrow, settings) is None


@pytest.fixture
def diagnosis_inputs(upstream, colour_images, evaluation_params, plan_rules) -> dict:
    """Every input of ``diagnose_run`` but ``model``, for a healthy run."""
    _, manifest = colour_images
    return {
        "evaluation_metrics": {
            "accuracy": 0.8,
            "balanced_accuracy": 0.8,
            "ece": 0.05,
            "ece_p_value": 0.5,
            "mean_confidence": 0.82,
            "accuracy_ci95": [0.5, 0.95],
            "n_test": 6,
            "classes": ["blue", "green", "red"],
        },
        "classification_report": class_report({"blue": 0.8, "green": 0.8, "red": 0.8}),
        "occlusion_flips": object_reading_flips().assign(
            **{"class": ["blue", "green", "red"]}
        ),
        "image_manifest": manifest,
        "test_predictions": colour_predictions(manifest),
        "label_noise_estimate": noise_estimate(),
        "plan_rules": plan_rules,
        "evaluation": evaluation_params,
        **{
            name: upstream[name]
            for name in (
                "training_history",
                "bn_shift_profile",
                "split_shift",
                "finetune_stages",
                "finetune_plan",
                "duplicate_report",
                "dataset_summary",
            )
        },
    }


def random_source(inputs: dict) -> dict:
    """``inputs`` of a run whose plan chose a source of random weights."""
    return {
        **inputs,
        "finetune_plan": {**inputs["finetune_plan"], "source": planned_source(None)},
    }


def test_diagnose_run_lists_only_what_fired(diagnosis_inputs):
    healthy, healthy_not_judged = diagnose_run(**diagnosis_inputs)
    assert [finding["rule"] for finding in healthy] == ["small_test_set"]
    # Six test images: too few for the KS test (10) or a slice (5, not all six).
    too_few = ["image_property_drift", "weak_segment"]
    assert [rule["rule"] for rule in healthy_not_judged] == too_few
    assert healthy_not_judged[0]["reason"].startswith("6 training and 6 test images")

    random_init, random_not_judged = diagnose_run(**random_source(diagnosis_inputs))
    assert [rule["rule"] for rule in random_not_judged] == ["domain_gap", *too_few]
    assert [finding["rule"] for finding in random_init] == [
        "random_weights",
        "small_test_set",
    ]
    assert set(random_init[0]) == {
        "rule",
        "cause",
        "evidence",
        "severity",
        "suggestion",
        "parameters",
    }


def test_diagnose_run_orders_findings_by_priority_then_severity(
    diagnosis_inputs,
):
    # A random-init run that fits poorly (medium), on a shifted test split (high),
    # with a border shortcut (high) and one weak class (high), over-confident
    # (medium), on a small test set (low).
    history = history_frame({"head": [(1.0, 0.6, 1.0, 0.6), (0.8, 0.7, 0.8, 0.7)]})
    findings, _ = diagnose_run(
        **{
            **random_source(diagnosis_inputs),
            "evaluation_metrics": {
                **diagnosis_inputs["evaluation_metrics"],
                "accuracy": 0.7,
                "balanced_accuracy": 0.7,
                "ece": 0.3,
                "ece_p_value": 0.001,
                "mean_confidence": 0.95,
            },
            "classification_report": class_report(
                {"blue": 0.95, "green": 0.95, "red": 0.2}
            ),
            "training_history": history,
            "finetune_stages": stages_after(history),
            "split_shift": split_table(0.5, 0.001),
            "occlusion_flips": flips(
                blue=(12, 11, 1, 10, 0), green=(12, 0, 7, 0, 7), red=(12, 2, 10, 1, 9)
            ),
        },
    )
    rules = [finding["rule"] for finding in findings]
    assert rules == [
        "random_weights",
        "underfitting",
        "split_shift",
        "shortcut",
        "class_imbalance",
        "miscalibration",
        "small_test_set",
    ]
    ranks = [diagnosis.RANK[rule] for rule in rules]
    assert ranks == sorted(ranks)
    # Severity alone would put the high split_shift before the medium underfitting.
    assert [finding["severity"] for finding in findings[1:3]] == ["medium", "high"]


def test_stage_records_read_the_head_stage_back_from_csv_as_head_only(tmp_path):
    path = tmp_path / "finetune_stages.csv"
    stages_frame(None, "block8_1").to_csv(path, index=False)
    records = diagnosis.stage_records(pd.read_csv(path))
    assert [record["unfreeze_from"] for record in records] == [None, "block8_1"]


def test_diagnose_run_flags_a_learning_rate_the_plan_rules_reject(
    diagnosis_inputs, plan_rules
):
    reckless = stages_frame(None, "block8_1")
    reckless.loc[1, "learning_rate"] = 10 * plan_rules["max_backbone_learning_rate"]
    findings, _ = diagnose_run(**{**diagnosis_inputs, "finetune_stages": reckless})
    unstable = [f for f in findings if f["rule"] == "unstable_training"]
    assert len(unstable) == 1
    assert "above max_backbone_learning_rate" in unstable[0]["evidence"][0]


def base_parameter_keys() -> set[str]:
    """Every dotted key of conf/base/parameters*.yml."""
    keys: set[str] = set()

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            keys.add(prefix + key)
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    for path in (PROJECT_ROOT / "conf" / "base").glob("parameters*.yml"):
        walk(yaml.safe_load(path.read_text()) or {}, "")
    return keys


def test_every_parameter_a_finding_names_exists(colour_images, thresholds):
    _, manifest = colour_images
    leaky = manifest.assign(sha256="same", phash="0" * 16)
    bad_history = history_frame(
        {"head": [(1.0, 0.40, 1.0, 0.3), (3.0, 0.45, 2.5, 0.2)]}
    )
    findings = [
        diagnosis.overfitting(bad_history, thresholds["overfitting"]),
        feature_distortion(distorted_history(), thresholds),
        underfitting(bad_history, thresholds),
        diagnosis.domain_gap(
            shift_profile({"stem": 5.0}),
            trained(None),
            "imagenet",
            thresholds["domain_gap"],
        ),
        diagnosis.domain_gap(
            shift_profile({"block8_1": 5.0}),
            trained(None, "block8_1"),
            "imagenet",
            thresholds["domain_gap"],
        ),
        diagnosis.split_shift(split_table(0.5, 0.001), thresholds["split_shift"]),
        validation_test_gap(healthy_history(), 0.5, [0.4, 0.6], thresholds),
        diagnosis.leakage(leaky, thresholds["leakage"]),
        diagnosis.label_conflicts(
            {"label_conflict_groups": 1, "label_conflict_images_kept": 2},
            conflicts_report(),
        ),
        diagnosis.class_imbalance(
            {"accuracy": 0.9, "balanced_accuracy": 0.5},
            class_report({"cat": 0.9, "dog": 0.1}),
            {"cat": 100, "dog": 10},
            thresholds["class_imbalance"],
        ),
        diagnosis.class_imbalance(
            {"accuracy": 0.6, "balanced_accuracy": 0.6},
            class_report({"cat": 0.9, "dog": 0.1}),
            {"cat": 100, "dog": 100},
            thresholds["class_imbalance"],
        ),
        diagnosis.unstable_training(bad_history, [], thresholds["unstable_training"]),
        diagnosis.miscalibration(
            {**BEYOND_CHANCE, "ece": 0.3, "mean_confidence": 0.95, "accuracy": 0.65},
            thresholds["miscalibration"],
        ),
        diagnosis.miscalibration(
            {**BEYOND_CHANCE, "ece": 0.6, "mean_confidence": 0.35, "accuracy": 0.96},
            thresholds["miscalibration"],
        ),
        diagnosis.random_weights(None),
        diagnosis.small_test_set(
            {"n_test": 10, "accuracy": 0.5, "accuracy_ci95": [0.2, 0.8]},
            thresholds["small_test_set"],
        ),
    ]
    assert all(finding is not None for finding in findings)
    known = base_parameter_keys()
    for finding in findings:
        assert set(finding.parameters) <= known, finding.rule


# ------------------------------------------------- rules with too little to judge

NAN = float("nan")


def test_a_rule_without_the_figures_it_compares_says_it_could_not_judge(thresholds):
    no_validation = history_frame({"head": [(1.0, 0.5, NAN, NAN)]})
    no_train_accuracy = history_frame({"head": [(1.0, NAN, 0.9, 0.5)]})
    no_val_accuracy = history_frame({"head": [(1.0, 0.5, 0.9, NAN)]})
    one_stage = history_frame({"head": [(1.0, 0.5, 0.9, 0.5)]})
    results = [
        diagnosis.overfitting(no_validation, thresholds["overfitting"]),
        underfitting(no_train_accuracy, thresholds),
        feature_distortion(one_stage, thresholds),
        validation_test_gap(no_val_accuracy, 0.5, [0.3, 0.7], thresholds),
        diagnosis.split_shift(split_table(NAN, NAN), thresholds["split_shift"]),
    ]
    assert all(isinstance(result, diagnosis.NotJudged) for result in results)
    reasons = {result.rule: result.reason for result in results}
    assert reasons["overfitting"].startswith("no epoch of any stage recorded both")
    assert reasons["underfitting"] == (
        "the stage the model was saved from, 'head', recorded no training accuracy"
    )
    assert reasons["feature_distortion"].startswith("1 of the 1 stages trained have")
    assert reasons["validation_test_gap"].startswith(
        "the epoch the model was saved from (stage 'head', epoch 1) recorded no"
    )
    assert reasons["split_shift"].startswith("feature_shift compared no pair")


def test_class_imbalance_is_not_judged_on_one_test_image_a_class(thresholds):
    settings = thresholds["class_imbalance"]
    assert settings["min_test_images"] > 1
    result = diagnosis.class_imbalance(
        {"accuracy": 0.67, "balanced_accuracy": 0.67},
        class_report({"a": 1.0, "b": 1.0, "c": 0.0}, support=1),
        {"a": 40, "b": 40, "c": 4},
        settings,
    )
    assert result == diagnosis.NotJudged(
        "class_imbalance",
        f"0 of the 3 classes have at least {settings['min_test_images']} test "
        "images (min_test_images): too few to compare a class with the others",
    )


def test_the_rules_not_judged_come_in_priority_order_and_findings_leave_them_out():
    later = diagnosis.NotJudged("miscalibration", "near chance")
    earlier = diagnosis.NotJudged("domain_gap", "random weights")
    caveat = diagnosis.Finding(
        rule="small_test_set",
        cause="Too few test images.",
        severity="low",
        suggestion="Add test images.",
        parameters=[],
    )
    results = [later, None, caveat, earlier]
    assert diagnosis.not_judged(results) == [
        {"rule": "domain_gap", "reason": "random weights"},
        {"rule": "miscalibration", "reason": "near chance"},
    ]
    assert [finding["rule"] for finding in diagnosis.in_priority(results)] == [
        "small_test_set"
    ]
