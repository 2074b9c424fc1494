"""Test metrics from a prediction table: scikit-learn's metrics, ECE, bootstrap CIs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

PROB_PREFIX = "prob_"
TTA_PREFIX = "tta_"
PREDICTION_COLUMNS = ["path", "label", "predicted", "confidence"]


class PredictionTableError(ValueError):
    """A prediction table that cannot be scored; the message says what is wrong."""


def prediction_table(
    paths: Sequence[str],
    labels: Sequence[str],
    classes: Sequence[str],
    probabilities: np.ndarray,
    tta_probabilities: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per image: its label, the prediction, its confidence, every probability.

    Args:
        paths: Image paths, as in the manifest.
        labels: True class names.
        classes: Class names in the model's output order.
        probabilities: ``(n, classes)`` softmax outputs.
        tta_probabilities: The same with test-time augmentation, or ``None``; written
            to ``tta_``-prefixed columns next to the plain ones, never instead of them.

    Returns:
        ``path``, ``label``, ``predicted``, ``confidence``, ``prob_<class>`` (and the
        ``tta_`` columns).
    """
    table = pd.DataFrame({"path": list(paths), "label": list(labels)})
    blocks = [("", probabilities)]
    if tta_probabilities is not None:
        blocks.append((TTA_PREFIX, tta_probabilities))
    for prefix, block in blocks:
        for name, column in probability_columns(classes, block, prefix).items():
            table[name] = column
    return table


def probability_columns(
    classes: Sequence[str], probabilities: np.ndarray, prefix: str = ""
) -> dict[str, np.ndarray]:
    """The prediction columns of a table of probabilities, in their order.

    Args:
        classes: Class names in the model's output order.
        probabilities: ``(n, classes)`` softmax outputs.
        prefix: Put before every column name (``"tta_"`` for TTA's).

    Returns:
        ``predicted`` (the most probable class), ``confidence`` (its probability)
        and ``prob_<class>`` for each class, each name with ``prefix``.
    """
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(classes))
    columns = {
        f"{prefix}predicted": np.asarray(classes)[probs.argmax(axis=1)],
        f"{prefix}confidence": probs.max(axis=1),
    }
    for index, name in enumerate(classes):
        columns[f"{prefix}{PROB_PREFIX}{name}"] = probs[:, index]
    return columns


def classes_of(predictions: pd.DataFrame) -> list[str]:
    """The class names in output order, read from the ``prob_<class>`` columns."""
    classes = [
        column.removeprefix(PROB_PREFIX)
        for column in predictions.columns
        if column.startswith(PROB_PREFIX)
    ]
    if len(classes) < 2:
        raise PredictionTableError(
            "test_predictions needs one prob_<class> column per class (at least two); "
            f"found columns {list(predictions.columns)}"
        )
    return classes


def has_tta(predictions: pd.DataFrame) -> bool:
    """Whether the table carries test-time-augmentation columns."""
    return f"{TTA_PREFIX}predicted" in predictions.columns


def probabilities_of(
    predictions: pd.DataFrame, classes: Sequence[str], prefix: str = ""
) -> np.ndarray:
    """The ``(n, classes)`` probabilities of the table (``prefix="tta_"`` for TTA)."""
    columns = [f"{prefix}{PROB_PREFIX}{name}" for name in classes]
    return predictions[columns].to_numpy(dtype=np.float64)


def label_indices(names: pd.Series, classes: Sequence[str]) -> np.ndarray:
    """Class names to indices in ``classes``; an unknown name is an error."""
    position = {name: index for index, name in enumerate(classes)}
    unknown = sorted(set(names) - set(position))
    if unknown:
        raise PredictionTableError(
            f"Labels {unknown} are not among the model's classes {list(classes)}"
        )
    return names.map(position).to_numpy(dtype=np.int64)


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int
) -> pd.DataFrame:
    """Groups predictions into equal-width confidence bins.

    Bin ``b`` holds confidences in ``(b / n_bins, (b + 1) / n_bins]`` (the first bin
    also holds 0).

    Args:
        confidence: The top probability of each prediction.
        correct: Whether each prediction is right.
        n_bins: How many bins split ``[0, 1]``.

    Returns:
        One row per bin: ``lower``, ``upper``, ``count``, ``accuracy`` and
        ``confidence`` (their means, NaN for an empty bin).
    """
    edges, which = _confidence_bins(confidence, n_bins)
    frame = pd.DataFrame(
        {"bin": which, "correct": correct.astype(float), "confidence": confidence}
    )
    grouped = frame.groupby("bin").agg(
        count=("correct", "size"),
        accuracy=("correct", "mean"),
        confidence=("confidence", "mean"),
    )
    bins = grouped.reindex(range(n_bins))
    bins["count"] = bins["count"].fillna(0).astype(int)
    bins.insert(0, "upper", edges[1:])
    bins.insert(0, "lower", edges[:-1])
    return bins.reset_index(drop=True)


def _confidence_bins(
    confidence: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_bins + 1`` bin edges and each confidence's bin (see
    :func:`calibration_bins`)."""
    if n_bins < 1:
        raise ValueError(f"evaluation.calibration_bins = {n_bins} must be at least 1")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    return edges, which


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int
) -> float:
    """ECE: the count-weighted mean gap between accuracy and confidence per bin."""
    bins = calibration_bins(confidence, correct, n_bins)
    filled = bins[bins["count"] > 0]
    gaps = (filled["accuracy"] - filled["confidence"]).abs()
    return float((gaps * filled["count"]).sum() / len(confidence))


def calibration_p_value(
    confidence: np.ndarray,
    correct: np.ndarray,
    n_bins: int,
    *,
    resamples: int,
    seed: int,
) -> float:
    """How often a calibrated model's ECE reaches the observed one, on these images.

    The null is the model's own confidences taken at their word (consistency
    resampling, Broecker & Smith 2007): each test prediction drawn right with
    probability its confidence, ``resamples`` times. A few dozen test images give a
    perfectly calibrated model an ECE of 0.1 or more by chance alone, so a threshold
    on the ECE without this test fires on small test sets whatever the model.

    Args:
        confidence: The top probability of each prediction.
        correct: Whether each prediction is right.
        n_bins: Bins of the ECE (:func:`calibration_bins`).
        resamples: Datasets drawn under the null.
        seed: Seed of the draws.

    Returns:
        ``(1 + #{null ECE >= observed}) / (1 + resamples)``.
    """
    _require_resamples(resamples)
    _, which = _confidence_bins(confidence, n_bins)
    members = np.eye(n_bins)[which]
    draws = np.random.default_rng(seed).random((resamples, len(confidence)))
    # Row 0 is what was observed, the others the null's draws: one formula for both
    # (a bin's |accuracy - confidence| x count is |sum of (right - confidence)| in
    # it), so equal outcomes give bit-equal ECEs.
    outcomes = np.vstack([correct, draws < confidence]).astype(np.float64)
    eces = np.abs((outcomes - confidence) @ members).sum(axis=1) / len(confidence)
    return (1 + int((eces[1:] >= eces[0]).sum())) / (1 + resamples)


def bootstrap_interval(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    *,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a metric over resampled test images.

    Args:
        y_true: True class indices.
        y_pred: Predicted class indices.
        metric: ``metric(y_true, y_pred)``.
        resamples: How many resamples with replacement.
        seed: Seed of the resampling.
        level: Coverage of the interval.

    Returns:
        The lower and upper bounds.
    """
    scores = np.array(
        [
            metric(y_true[index], y_pred[index])
            for index in _resamples(len(y_true), resamples, seed)
        ]
    )
    return _percentiles(scores, level)


def paired_bootstrap_difference(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    y_reference: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    *,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """A metric's difference between two models on the same test images, paired.

    Each resample draws test images with replacement and scores *both* models on
    the images drawn, so the interval holds only the disagreement between the
    models, not the luck of which images the test set has (which an unpaired
    comparison of two intervals counts twice).

    Args:
        y_true: True class indices.
        y_pred: The model's predicted class indices.
        y_reference: The reference model's, for the same images in the same order.
        metric: ``metric(y_true, y_pred)``.
        resamples: How many resamples with replacement.
        seed: Seed of the resampling.
        level: Coverage of the interval.

    Returns:
        ``metric(model) - metric(reference)``, and the interval's bounds.
    """
    if not len(y_true) == len(y_pred) == len(y_reference):
        raise ValueError(
            f"Paired predictions need the same images: {len(y_true)} labels, "
            f"{len(y_pred)} and {len(y_reference)} predictions"
        )
    differences = np.array(
        [
            metric(y_true[index], y_pred[index])
            - metric(y_true[index], y_reference[index])
            for index in _resamples(len(y_true), resamples, seed)
        ]
    )
    low, high = _percentiles(differences, level)
    difference = metric(y_true, y_pred) - metric(y_true, y_reference)
    return float(difference), low, high


def _resamples(n: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, n)`` indices of test images drawn with replacement."""
    _require_resamples(resamples)
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _require_resamples(resamples: int) -> None:
    if resamples < 1:
        raise ValueError(
            f"evaluation.bootstrap.resamples = {resamples} must be at least 1"
        )


def _percentiles(scores: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(scores, [tail, 100.0 - tail])
    return float(low), float(high)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The share of images predicted right."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean F1 over the classes that are true or predicted for at least one image.

    A class that is neither, e.g. a rare class a bootstrap resample happened to miss,
    has no F1 (no true positive, false positive or false negative); counting it as 0
    would drag every resample that misses a class down, and the interval with it.
    scikit-learn's ``f1_score(..., labels=present, average="macro")`` in counts
    (F1 = 2 TP / (true + predicted)): bootstraps call it thousands of times, and
    scikit-learn's checks cost a millisecond a call.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    size = int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
    right = np.bincount(y_true[y_true == y_pred], minlength=size)
    counts = np.bincount(y_true, minlength=size) + np.bincount(y_pred, minlength=size)
    present = counts > 0
    if not present.any():
        return 0.0
    return float(np.mean(2.0 * right[present] / counts[present]))


def class_f1(y_true: np.ndarray, y_pred: np.ndarray, index: int) -> float:
    """F1 of one class (2 TP / (true + predicted)); 0 when it is neither."""
    true = np.asarray(y_true) == index
    predicted = np.asarray(y_pred) == index
    counts = int(true.sum() + predicted.sum())
    return 2.0 * int((true & predicted).sum()) / counts if counts else 0.0


def classification_metrics(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    *,
    top_k: int,
    calibration_bins_count: int,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Every figure of ``evaluation_metrics`` for one set of predictions.

    Args:
        y_true: True class indices.
        probabilities: ``(n, classes)`` predicted probabilities.
        top_k: ``k`` of top-k accuracy; reported only when there are more than ``k``
            classes (otherwise it is 1 by definition).
        calibration_bins_count: Bins of the expected calibration error.
        resamples: Bootstrap resamples for the intervals, and datasets drawn under
            the calibration test's null.
        seed: Seed of both.

    Returns:
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``, (``top_k_accuracy``,
        ``top_k``), ``ece``, ``ece_p_value`` (:func:`calibration_p_value`),
        ``mean_confidence``, ``log_loss``, ``accuracy_ci95``,
        ``macro_f1_ci95``, ``n_test``.
    """
    n_classes = probabilities.shape[1]
    labels = np.arange(n_classes)
    y_pred = probabilities.argmax(axis=1)
    result: dict[str, Any] = {
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": macro_f1(y_true, y_pred),
    }
    if n_classes > top_k:
        result["top_k"] = int(top_k)
        result["top_k_accuracy"] = float(
            skm.top_k_accuracy_score(y_true, probabilities, k=top_k, labels=labels)
        )
    confidence = probabilities.max(axis=1)
    result["ece"] = expected_calibration_error(
        confidence, y_pred == y_true, calibration_bins_count
    )
    result["ece_p_value"] = calibration_p_value(
        confidence,
        y_pred == y_true,
        calibration_bins_count,
        resamples=resamples,
        seed=seed,
    )
    result["mean_confidence"] = float(confidence.mean())
    result["log_loss"] = float(skm.log_loss(y_true, probabilities, labels=labels))
    for name, metric in (("accuracy", accuracy), ("macro_f1", macro_f1)):
        low, high = bootstrap_interval(
            y_true, y_pred, metric, resamples=resamples, seed=seed
        )
        result[f"{name}_ci95"] = [low, high]
    result["n_test"] = len(y_true)
    return result


def per_class_report(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]
) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support, then the macro and weighted means.

    Returns:
        Columns ``class``, ``precision``, ``recall``, ``f1_score``, ``support``.
    """
    report = skm.classification_report(
        y_true,
        y_pred,
        labels=np.arange(len(classes)),
        target_names=list(classes),
        output_dict=True,
        zero_division=0,
    )
    rows = [
        {
            "class": name,
            "precision": values["precision"],
            "recall": values["recall"],
            "f1_score": values["f1-score"],
            "support": int(values["support"]),
        }
        for name, values in report.items()
        if isinstance(values, dict)
    ]
    return pd.DataFrame(rows)
