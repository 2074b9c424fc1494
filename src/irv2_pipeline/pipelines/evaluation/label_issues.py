"""Mislabelled training images: confident learning on out-of-sample probabilities.

Each training original gets class probabilities from a linear probe
(``probe.fit_probe``) that never saw it: k-fold cross-validation on the fine-tuned
model's pooled features, folds stratified by label and grouped by duplicate group (a
near duplicate in the training folds would vouch for its twin's label). Confident
learning (Northcutt, Jiang and Chuang, 2021, "Confident Learning: Estimating
Uncertainty in Dataset Labels"), as the ``cleanlab`` library implements it, then
counts the images confidently of another class than their label (per-class
thresholds at the mean self-confidence, the calibrated confident joint), estimates
the noise rates from it, and flags as many images per (given, true) pair as it
estimates (``prune_by_noise_rate``), ranked by self-confidence, the probability the
probe gives the image's own label.

cleanlab is imported by the functions that use it: it costs a second to import.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from irv2_pipeline.probe import fit_probe

logger = logging.getLogger(__name__)

ISSUE_COLUMNS = [
    "rank",
    "path",
    "given_label",
    "suggested_label",
    "self_confidence",
    "suggested_probability",
]
METHOD = (
    "confident learning (Northcutt et al., 2021) by cleanlab: per-class thresholds "
    "at the mean self-confidence, calibrated confident joint, prune by noise rate, "
    "ranked by self-confidence"
)


class LabelIssuesError(ValueError):
    """The label-issue settings cannot work; the message names the parameter."""


def check_settings(settings: dict[str, Any]) -> None:
    """Stops with a message naming ``evaluation.label_issues.<key>`` when a value is off.

    Raises:
        LabelIssuesError: Fewer than two folds, a non-positive ``c`` or
            ``max_iter``.
    """
    problems = []
    if int(settings["folds"]) < 2:
        problems.append(f"folds = {settings['folds']}: cross-validation needs >= 2")
    if float(settings["c"]) <= 0:
        problems.append(f"c = {settings['c']}: the inverse L2 strength must be > 0")
    if int(settings["max_iter"]) < 1:
        problems.append(f"max_iter = {settings['max_iter']}: must be >= 1")
    if problems:
        raise LabelIssuesError(
            "evaluation.label_issues: " + "; ".join(problems) + " (conf/base/"
            "parameters_evaluation.yml)"
        )


def usable_folds(labels: np.ndarray, groups: Sequence[str], folds: int) -> int:
    """The folds the data allow: at most the training groups of the smallest class.

    Returns:
        ``folds``, lowered to that count; below 2 when some class has one group.
    """
    per_class = pd.DataFrame({"label": labels, "group": groups}).groupby("label")
    return min(int(folds), int(per_class["group"].nunique().min()))


def out_of_sample_probabilities(
    features: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[str],
    classes: int,
    *,
    folds: int,
    c: float,
    max_iter: int,
    seed: int,
) -> np.ndarray:
    """Class probabilities of every image from a probe fitted on the other folds.

    Args:
        features: ``(images, dims)`` pooled features.
        labels: Class indices.
        groups: Duplicate group of each image: a group stays in one fold.
        classes: Number of classes.
        folds: Folds (at least 2, at most :func:`usable_folds`).
        c: Inverse L2 strength of the probe.
        max_iter: L-BFGS iteration cap.
        seed: Of the fold assignment and the solver.

    Returns:
        ``(images, classes)`` probabilities, each row from the fold that held it out.
    """
    from sklearn.model_selection import StratifiedGroupKFold  # noqa: PLC0415

    labels = np.asarray(labels)
    probabilities = np.zeros((len(labels), classes))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fitted, held_out in splitter.split(features, labels, np.asarray(groups)):
        probe = fit_probe(
            features[fitted],
            labels[fitted],
            classes,
            c=c,
            max_iter=max_iter,
            seed=seed,
        )
        probabilities[held_out] = np.exp(probe.log_probabilities(features[held_out]))
    return probabilities


def confident_learning(
    paths: Sequence[str],
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Flags the images whose label is probably wrong and estimates the noise rates.

    Args:
        paths: One per image.
        labels: Given class indices.
        probabilities: Out-of-sample class probabilities, a row per image.
        class_names: In index order.

    Returns:
        ``label_issues`` (:data:`ISSUE_COLUMNS`, most suspect first) and the
        estimates: ``estimated_noise_rate`` (share of images whose given label is
        not their true one), ``out_of_sample_accuracy`` and per class
        ``training_images``, ``noise_rate`` (share of the class's images filed
        under another label), ``mislabelled_share`` (share of the images labelled
        with it that belong to another class) and ``flagged``.
    """
    from cleanlab.count import (  # noqa: PLC0415 - see the module docstring
        compute_confident_joint,
        estimate_joint,
        estimate_latent,
    )
    from cleanlab.filter import find_label_issues  # noqa: PLC0415

    labels = np.asarray(labels)
    names = np.asarray(class_names)
    flagged = find_label_issues(
        labels,
        probabilities,
        filter_by="prune_by_noise_rate",
        return_indices_ranked_by="self_confidence",
        # In the Kedro process: no pool of workers for a few thousand rows.
        n_jobs=1,
    )
    others = probabilities.copy()
    others[np.arange(len(labels)), labels] = -1.0
    suggested = others.argmax(axis=1)
    issues = pd.DataFrame(
        {
            "rank": np.arange(1, len(flagged) + 1),
            "path": np.asarray(paths, dtype=object)[flagged],
            "given_label": names[labels[flagged]],
            "suggested_label": names[suggested[flagged]],
            "self_confidence": probabilities[flagged, labels[flagged]],
            "suggested_probability": probabilities[flagged, suggested[flagged]],
        },
        columns=ISSUE_COLUMNS,
    )
    confident_joint = compute_confident_joint(labels, probabilities)
    _, noise_matrix, inverse_noise_matrix = estimate_latent(confident_joint, labels)
    joint = estimate_joint(labels, probabilities)
    given = np.bincount(labels, minlength=len(names))
    flagged_per_class = np.bincount(labels[flagged], minlength=len(names))
    estimates = {
        "n_images": len(labels),
        "n_flagged": len(flagged),
        "out_of_sample_accuracy": float(
            np.mean(probabilities.argmax(axis=1) == labels)
        ),
        "estimated_noise_rate": float(1.0 - np.trace(joint)),
        "classes": [
            {
                "class": str(name),
                "training_images": int(given[index]),
                # cleanlab's matrices: noise_matrix[i, j] = P(given i | true j),
                # inverse_noise_matrix[i, j] = P(true i | given j).
                "noise_rate": float(1.0 - noise_matrix[index, index]),
                "mislabelled_share": float(1.0 - inverse_noise_matrix[index, index]),
                "flagged": int(flagged_per_class[index]),
            }
            for index, name in enumerate(names)
        ],
    }
    return issues, estimates
