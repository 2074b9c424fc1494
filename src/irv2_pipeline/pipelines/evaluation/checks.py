"""Diagnosis rules on the images and the test predictions themselves.

Beside the rules of :mod:`.diagnosis`, which read how training went, these read what
the run was tested on: whether the test images look like the training images
(:func:`image_property_drift`), whether the model beats always guessing the most
frequent class (:func:`dummy_baseline`), whether a slice of the test images is
classified far worse than the rest (:func:`weak_segment`), and whether the test split
has classes that training never saw (:func:`new_test_labels`). Each returns a
:class:`~.diagnosis.Finding`, ``None`` or a :class:`~.diagnosis.NotJudged`, in the
style of :mod:`.diagnosis`.

They judge many figures at once (six properties, every bin of every property), so
each holds its p-values to a family-wise error rate with Holm's correction
(:func:`holm_adjusted`): on data where nothing differs, a rule fires on at most
``alpha`` of runs, however many figures it looks at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .diagnosis import (
    DiagnosisInputError,
    Finding,
    Judgement,
    NotJudged,
    require_columns,
)
from .metrics import (
    accuracy,
    class_f1,
    classes_of,
    label_indices,
    paired_bootstrap_difference,
)

# The properties compared between the splits, with what each measures. Ingestion
# computes them where it decodes every image (images.fingerprint); the manifest
# carries them.
IMAGE_PROPERTIES = {
    "brightness": "mean grey level, 0-255",
    "contrast": "standard deviation of the grey levels, 0-255",
    "aspect_ratio": "width / height",
    "mean_red": "mean red level, 0-255",
    "mean_green": "mean green level, 0-255",
    "mean_blue": "mean blue level, 0-255",
}
PROPERTY_COLUMNS = ("path", "split", "width", "height", "mean_colour")
PROPERTY_COLUMNS += ("brightness", "contrast")


def holm_adjusted(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the order given.

    Rejecting where the adjusted p-value is below ``alpha`` keeps the chance of any
    false rejection at most ``alpha`` (Holm, 1979), whatever the dependence between
    the tests; it rejects everything Bonferroni does, and more.
    """
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def image_properties(image_manifest: pd.DataFrame) -> pd.DataFrame:
    """``path``, ``split`` and the :data:`IMAGE_PROPERTIES` of every manifest image.

    Raises:
        DiagnosisInputError: The manifest predates the brightness and contrast
            columns, or lacks others; the message says to rerun ingestion.
    """
    missing = [c for c in PROPERTY_COLUMNS if c not in image_manifest.columns]
    if missing:
        raise DiagnosisInputError(
            f"image_manifest lacks the columns {missing} that the image-property "
            "checks need: rerun `kedro run --pipeline ingestion` to write them"
        )
    colours = np.frombuffer(
        bytes.fromhex("".join(image_manifest["mean_colour"].str[1:])), np.uint8
    ).reshape(-1, 3)
    return pd.DataFrame(
        {
            "path": image_manifest["path"].to_numpy(),
            "split": image_manifest["split"].to_numpy(),
            "brightness": image_manifest["brightness"].to_numpy(dtype=np.float64),
            "contrast": image_manifest["contrast"].to_numpy(dtype=np.float64),
            "aspect_ratio": image_manifest["width"].to_numpy(dtype=np.float64)
            / image_manifest["height"].to_numpy(dtype=np.float64),
            "mean_red": colours[:, 0].astype(np.float64),
            "mean_green": colours[:, 1].astype(np.float64),
            "mean_blue": colours[:, 2].astype(np.float64),
        }
    )


def image_property_drift(
    image_manifest: pd.DataFrame, settings: dict[str, Any]
) -> Judgement:
    """Test images whose brightness, contrast, shape or colour differ from training's.

    Per property of :data:`IMAGE_PROPERTIES`, a two-sample Kolmogorov-Smirnov test of
    the training against the test images; a property drifts when its Holm-adjusted
    p-value (over the properties) is below ``alpha``. High when a drifting
    property's KS statistic (the largest gap between the two cumulative
    distributions) reaches ``high_statistic``. Not judged with fewer than
    ``min_images`` images in either split.

    Args:
        image_manifest: The ingestion manifest, with its image properties.
        settings: ``alpha``, ``min_images``, ``high_statistic``.
    """
    properties = image_properties(image_manifest)
    train = properties[properties["split"] == "train"]
    test = properties[properties["split"] == "test"]
    minimum = int(settings["min_images"])
    if min(len(train), len(test)) < minimum:
        return NotJudged(
            "image_property_drift",
            f"{len(train)} training and {len(test)} test images: the KS test needs "
            f"at least {minimum} in each (min_images)",
        )
    alpha = float(settings["alpha"])
    tests = [stats.ks_2samp(train[name], test[name]) for name in IMAGE_PROPERTIES]
    adjusted = holm_adjusted([result.pvalue for result in tests])
    drifting, evidence, worst = [], [], 0.0
    for name, result, p_adjusted in zip(IMAGE_PROPERTIES, tests, adjusted, strict=True):
        if not p_adjusted < alpha:
            continue
        worst = max(worst, float(result.statistic))
        drifting.append(name)
        evidence.append(
            f"{name} ({IMAGE_PROPERTIES[name]}): median {train[name].median():.3g} "
            f"in {len(train)} training vs {test[name].median():.3g} in {len(test)} "
            f"test images; KS statistic {result.statistic:.3f}, p = "
            f"{result.pvalue:.2g}, Holm-adjusted over {len(tests)} properties "
            f"{p_adjusted:.2g} < {alpha}"
        )
    if not evidence:
        return None
    names = ", ".join(drifting)
    return Finding(
        rule="image_property_drift",
        cause=f"The test images differ from the training images in {names}: they "
        "were taken under other conditions, which the model did not learn.",
        severity="high" if worst >= float(settings["high_statistic"]) else "medium",
        suggestion=f"Sort the images of both splits by {names} and look at the ends: "
        "add training images taken under the test conditions (light, camera, crop), "
        "or draw the splits from one pool; if images of one source must stay "
        "together, say so with ingestion.duplicates.group_key_pattern.",
        parameters=["ingestion.duplicates.group_key_pattern"],
        evidence=evidence,
    )


def dummy_baseline(
    test_predictions: pd.DataFrame,
    train_counts: dict[str, int],
    bootstrap: dict[str, Any],
    settings: dict[str, Any],
) -> Finding | None:
    """A model no better than always predicting the most frequent training class.

    The gain is the model's figure minus the baseline's on the same test images, with
    a 95% paired bootstrap interval (:func:`.metrics.paired_bootstrap_difference`):
    accuracy overall, F1 per class (the baseline's F1 is 0 on every class but the
    most frequent). It fires when an interval does not lie above 0, that is when the
    test images do not show the model to be better. A class is judged only with at
    least ``min_test_images`` test images. High when the model's accuracy is at
    most the baseline's, medium when only its interval reaches 0, low when only
    classes fall short.

    Args:
        test_predictions: ``path``, ``label``, ``predicted`` and the probabilities.
        train_counts: Training images per class.
        bootstrap: ``evaluation.bootstrap`` (``resamples``, ``seed``).
        settings: ``min_test_images``.
    """
    classes = classes_of(test_predictions)
    y_true = label_indices(test_predictions["label"], classes)
    y_pred = label_indices(test_predictions["predicted"], classes)
    majority = max(classes, key=lambda name: train_counts.get(name, 0))
    y_dummy = np.full_like(y_true, classes.index(majority))
    difference = partial(
        paired_bootstrap_difference,
        y_true,
        y_pred,
        y_dummy,
        resamples=int(bootstrap["resamples"]),
        seed=int(bootstrap["seed"]),
    )
    gain, low, high = difference(accuracy)
    overall = (
        f"accuracy {accuracy(y_true, y_pred):.3f} vs {accuracy(y_true, y_dummy):.3f} "
        f"for always predicting {majority!r} (the most frequent training class: "
        f"{train_counts.get(majority, 0)} of {sum(train_counts.values())} training "
        f"images): gain {gain:+.3f}, 95% paired bootstrap interval [{low:+.3f}, "
        f"{high:+.3f}] on {len(y_true)} test images"
    )
    minimum = int(settings["min_test_images"])
    short, falling_short = [], []
    for index, name in enumerate(classes):
        support = int((y_true == index).sum())
        if support < minimum:
            continue
        class_gain, class_low, class_high = difference(partial(class_f1, index=index))
        if class_low <= 0:
            falling_short.append(repr(name))
            short.append(
                f"class {name!r}: F1 {class_f1(y_true, y_pred, index):.3f} vs "
                f"{class_f1(y_true, y_dummy, index):.3f} for the baseline, gain "
                f"{class_gain:+.3f}, 95% interval [{class_low:+.3f}, "
                f"{class_high:+.3f}] on {support} test images"
            )
    if low > 0 and not short:
        return None
    severity = "high" if gain <= 0 else "medium" if low <= 0 else "low"
    names = ", ".join(falling_short)
    return Finding(
        rule="dummy_baseline",
        cause=(
            "The model does no better than always predicting the most frequent class."
            if low <= 0
            else f"On {names} the model does no better than always predicting the "
            "most frequent class."
        ),
        severity=severity,
        suggestion=(
            "Nothing the model learnt shows on the test images: read the findings "
            "above it (random_weights, leakage, underfitting, domain_gap), check the "
            "labels, and add test images if the interval is wide."
            if low <= 0
            else f"Add varied training images of {names}, or weight the loss by "
            "class (finetune.class_weights: true) if they are rare in training."
        ),
        parameters=[] if low <= 0 else ["finetune.class_weights"],
        evidence=[
            overall,
            f"classes judged: those with at least {minimum} test images",
            *short,
        ],
    )


def weak_segment(
    test_predictions: pd.DataFrame,
    image_manifest: pd.DataFrame,
    settings: dict[str, Any],
) -> Judgement:
    """A slice of the test images by an image property classified far worse.

    Each property of :data:`IMAGE_PROPERTIES` splits the test images into
    ``quantile_bins`` bins of equal count (fewer where values tie). A bin holding at
    least ``min_share`` of the test images and ``min_images`` images is weak when
    its accuracy is at most ``max_relative_accuracy`` times the accuracy over all
    test images and a one-sided binomial test of its correct predictions against
    that accuracy has a Holm-adjusted p-value (over every bin tested) below
    ``alpha``. High when the bin's accuracy is at most half the overall one. Not
    judged when no bin is large enough to be a slice.

    Args:
        test_predictions: ``path``, ``label``, ``predicted``.
        image_manifest: The ingestion manifest, with its image properties.
        settings: ``quantile_bins``, ``min_share``, ``min_images``,
            ``max_relative_accuracy``, ``alpha``.
    """
    require_columns(
        test_predictions, ("path", "label", "predicted"), "test_predictions"
    )
    properties = image_properties(image_manifest).set_index("path")
    unknown = ~test_predictions["path"].isin(properties.index)
    if unknown.any():
        raise DiagnosisInputError(
            f"{int(unknown.sum())} test predictions (e.g. "
            f"{test_predictions['path'][unknown].iloc[0]}) are of images not in "
            "image_manifest: rerun `kedro run --pipeline evaluation`"
        )
    test = properties.loc[test_predictions["path"]].reset_index()
    correct = (test_predictions["label"] == test_predictions["predicted"]).to_numpy()
    mean = float(correct.mean())
    smallest = max(
        int(settings["min_images"]), math.ceil(float(settings["min_share"]) * len(test))
    )
    ratio = float(settings["max_relative_accuracy"])
    bins = []
    for name in IMAGE_PROPERTIES:
        codes, edges = pd.qcut(
            test[name],
            int(settings["quantile_bins"]),
            labels=False,
            retbins=True,
            duplicates="drop",
        )
        for code in range(len(edges) - 1):
            inside = (codes == code).to_numpy()
            n, right = int(inside.sum()), int(correct[inside].sum())
            # A bin of every test image (the values tie) is no slice of them.
            if smallest <= n < len(test):
                p = stats.binomtest(right, n, mean, alternative="less").pvalue
                bins.append((name, code, len(edges) - 1, edges, n, right, p))
    if not bins:
        return NotJudged(
            "weak_segment",
            f"no bin of an image property holds at least {smallest} of the "
            f"{len(test)} test images (min_images, min_share) and fewer than all",
        )
    alpha = float(settings["alpha"])
    adjusted = holm_adjusted([row[-1] for row in bins])
    weak, evidence, worst = [], [], 1.0
    for (name, code, count, edges, n, right, p), p_adjusted in zip(
        bins, adjusted, strict=True
    ):
        share = right / n
        if share > ratio * mean or not p_adjusted < alpha:
            continue
        worst = min(worst, share / mean)
        weak.append(name)
        evidence.append(
            f"{name} ({IMAGE_PROPERTIES[name]}) bin {code + 1} of {count}, "
            f"{edges[code]:.3g} to {edges[code + 1]:.3g}: {n} test images "
            f"({n / len(test):.0%}), accuracy {share:.3f} vs {mean:.3f} on all "
            f"{len(test)} (at most {ratio:.0%} of it, {ratio * mean:.3f}); one-sided "
            f"binomial p = {p:.2g}, Holm-adjusted over {len(bins)} bins "
            f"{p_adjusted:.2g} < {alpha}"
        )
    if not evidence:
        return None
    names = ", ".join(dict.fromkeys(weak))
    return Finding(
        rule="weak_segment",
        cause=f"Test images in part of the range of {names} are classified far "
        "worse than the others.",
        severity="high" if worst <= 0.5 else "medium",
        suggestion="Look at the test images of the bins named: add training images "
        "like them, or augment what they differ in (augmentation.preset: "
        "randaugment varies brightness and contrast).",
        parameters=["augmentation.preset"],
        evidence=evidence,
    )


def new_test_labels(image_manifest: pd.DataFrame) -> Finding | None:
    """Classes that have test images but no training image."""
    require_columns(image_manifest, ("path", "label", "split"), "image_manifest")
    trained = set(image_manifest.loc[image_manifest["split"] == "train", "label"])
    test = image_manifest[image_manifest["split"] == "test"]
    unseen = test[~test["label"].isin(trained)]
    if unseen.empty:
        return None
    counts = unseen["label"].value_counts().sort_index()
    evidence = [
        f"class {name!r}: {count} test images (e.g. "
        f"{unseen.loc[unseen['label'] == name, 'path'].iloc[0]}), no training image"
        for name, count in counts.items()
    ]
    evidence.append(
        f"{len(unseen)} of {len(test)} test images ({len(unseen) / len(test):.0%}) "
        "carry a label the model never trained on: none can be predicted right"
    )
    return Finding(
        rule="new_test_labels",
        cause="The test split has classes that the training split does not, so "
        "the test accuracy counts images the model cannot classify.",
        severity="high",
        suggestion="Add training images of those classes and rerun from ingestion, "
        "or remove their folders if they should not be classes; if label exclusions "
        "(ingestion.apply_label_exclusions) took every training image of a class, "
        "review data/01_raw/label_exclusions.csv.",
        parameters=["ingestion.apply_label_exclusions"],
        evidence=evidence,
    )
