"""Nodes of the `inference` pipeline: predict a folder of new images, flag the unfamiliar.

TensorFlow and Keras are imported inside the nodes that run the model, so that
``kedro`` commands which never touch a model start fast.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.hints import KerasModel
from irv2_pipeline.images import OpenPolicy, fingerprint
from irv2_pipeline.parallel import process_map
from irv2_pipeline.pipelines.evaluation.metrics import TTA_PREFIX, probability_columns
from irv2_pipeline.pipelines.feature_shift.twosample import compare
from irv2_pipeline.predict import probabilities_and_features

from .ood import calibrate_threshold, fit_mahalanobis

logger = logging.getLogger(__name__)

REJECTED_COLUMNS = ["path", "reason"]
OOD_METHOD = (
    "Mahalanobis distance of the pooled features to the nearest class mean of the "
    "training originals, with one Ledoit-Wolf shrunk covariance shared by the classes"
)


class InferenceError(ValueError):
    """The inference cannot run on these inputs; the message says what to change."""


def scan_new_images(
    new_images: ImageFolder, images: dict[str, Any], inference: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validates every file under the new-image folder, as ingestion does, on all cores.

    Files may sit at any depth (no label folders: the images are unlabelled).

    Args:
        new_images: The folder of images to predict (never changed).
        images: The ``images`` parameters (how images are opened).
        inference: The ``inference`` parameters (``workers``).

    Returns:
        The usable images (``path``, ``width``, ``height``) and the rejected files
        (``path``, ``reason``), both sorted by path.

    Raises:
        InferenceError: The folder holds no file at all.
    """
    policy = OpenPolicy.from_params(images)
    candidates, rejected = [], []
    for entry in new_images.entries():
        if entry.reason is None:
            candidates.append(entry.path)
        else:
            rejected.append((entry.path, entry.reason))
    if not candidates and not rejected:
        raise InferenceError(
            f"The folder of images to predict, {new_images.root}, is empty. Put the "
            "images there (any names, sub-folders allowed, no label folders needed) "
            "and rerun `kedro run --pipeline inference`."
        )
    results = process_map(
        partial(fingerprint, policy=policy),
        (str(new_images.path_of(path)) for path in candidates),
        inference.get("workers", "auto"),
        parameter="inference.workers",
    )
    usable = []
    for path, result in zip(candidates, results, strict=True):
        if isinstance(result, str):
            rejected.append((path, result))
        else:
            usable.append((path, result["width"], result["height"]))
    logger.info("%d new images usable, %d files rejected", len(usable), len(rejected))
    return (
        pd.DataFrame(usable, columns=["path", "width", "height"]),
        pd.DataFrame(rejected, columns=REJECTED_COLUMNS).sort_values(
            "path", ignore_index=True
        ),
    )


def reference_sample(
    reference_features: dict[str, Any],
    model: dict[str, Any],
    inference: dict[str, Any],
) -> dict[str, np.ndarray]:
    """The training and validation features the OOD score is fitted and calibrated on.

    At most ``inference.max_reference_images`` of each split, drawn with
    ``model.seed`` from the stored reference features (``embed_reference_images``
    embeds every training original and validation image), so the fit's cost and the
    batch test's memory stay bounded for any training set.

    Args:
        reference_features: From ``reference_features.embed_reference_images``.
        model: The ``model`` parameters (``seed``).
        inference: The ``inference`` parameters (``max_reference_images``).

    Returns:
        ``train`` and ``val`` feature arrays, ``train_labels`` (class names).

    Raises:
        InferenceError: No training or no validation images.
    """
    limit = inference.get("max_reference_images")
    chosen = {}
    for split in ("train", "val"):
        count = len(reference_features[split])
        if count == 0:
            raise InferenceError(
                f"image_manifest has no {split} images to fit the OOD score on: "
                "rerun `kedro run --pipeline ingestion`."
            )
        rows = np.arange(count)
        if limit is not None and count > int(limit):
            # pandas' DataFrame.sample with this seed, in manifest order.
            rows = np.sort(
                np.random.RandomState(int(model["seed"])).choice(
                    count, int(limit), replace=False
                )
            )
        chosen[split] = rows
    return {
        "train": np.asarray(reference_features["train"])[chosen["train"]],
        "val": np.asarray(reference_features["val"])[chosen["val"]],
        "train_labels": np.asarray(reference_features["train_labels"])[chosen["train"]],
    }


def fit_ood_detector(
    reference_features: dict[str, np.ndarray], inference: dict[str, Any]
) -> dict[str, Any]:
    """Fits the Mahalanobis score on the training features, calibrates it on val.

    Args:
        reference_features: From :func:`reference_sample`.
        inference: The ``inference`` parameters (``false_alarm_rate``).

    Returns:
        ``scorer`` (an ``ood.MahalanobisScorer``), ``threshold`` and ``calibration``
        (how the threshold was chosen, for the report).
    """
    scorer = fit_mahalanobis(
        reference_features["train"], reference_features["train_labels"]
    )
    val_scores = scorer.scores(reference_features["val"])
    rate = float(inference["false_alarm_rate"])
    threshold = calibrate_threshold(val_scores, rate)
    return {
        "scorer": scorer,
        "threshold": threshold,
        "calibration": {
            "method": OOD_METHOD,
            "threshold": threshold,
            "false_alarm_rate": rate,
            "rule": f"the {1 - rate:.3g} quantile of the validation images' scores",
            "n_train": len(reference_features["train"]),
            "n_val": len(val_scores),
            "val_flagged": float((val_scores > threshold).mean()),
            "shrinkage": scorer.shrinkage,
        },
    }


def predict_new_images(
    *,
    finetuned_model: KerasModel,
    class_names: list[str],
    new_image_list: pd.DataFrame,
    new_images: ImageFolder,
    model: dict[str, Any],
    images: dict[str, Any],
    inference: dict[str, Any],
) -> dict[str, np.ndarray]:
    """Runs the model over the usable new images, streaming, in one pass.

    With ``inference.test_time_augmentation`` each batch is also predicted mirrored
    left-right, as evaluation does (``predict.mirrored``, ``predict.flip_averaged``).

    Returns:
        ``probabilities`` ``(n, classes)``, pooled ``features`` ``(n, features)`` (of
        the images as they are) and, with flip TTA, ``tta_probabilities``.
    """
    outputs = probabilities_and_features(
        finetuned_model,
        class_names,
        [new_images.path_of(path) for path in new_image_list["path"]],
        **_run_settings(model, images, inference),
        what="new images predicted",
        flip_tta=bool(inference["test_time_augmentation"]),
    )
    return {
        name: value for name, value in outputs._asdict().items() if value is not None
    }


def prediction_table(
    new_image_list: pd.DataFrame,
    model_outputs: dict[str, np.ndarray],
    ood_detector: dict[str, Any],
    class_names: list[str],
    inference: dict[str, Any],
) -> pd.DataFrame:
    """One row per usable image: prediction, top-k, every probability, OOD score.

    Args:
        new_image_list: The usable images, in the order the model saw them.
        model_outputs: From :func:`predict_new_images`.
        ood_detector: From :func:`fit_ood_detector`.
        class_names: The model's output order.
        inference: The ``inference`` parameters (``top_k``).

    Returns:
        ``path``, ``predicted``, ``confidence``, ``prob_<class>``, ``top<i>_class``
        and ``top<i>_prob`` for i = 1..k, with flip TTA the ``tta_`` columns as
        evaluation writes them (``tta_predicted``, ``tta_confidence``,
        ``tta_prob_<class>``), then ``ood_score`` and ``ood_flag``.
    """
    probs = np.asarray(model_outputs["probabilities"], dtype=np.float64)
    classes = np.asarray(class_names)
    table = pd.DataFrame({"path": new_image_list["path"].to_list()})
    for name, column in probability_columns(class_names, probs).items():
        table[name] = column
    order = np.argsort(-probs, axis=1, kind="stable")
    for rank in range(min(int(inference["top_k"]), len(classes))):
        picked = order[:, rank]
        table[f"top{rank + 1}_class"] = classes[picked]
        table[f"top{rank + 1}_prob"] = probs[np.arange(len(probs)), picked]
    if "tta_probabilities" in model_outputs:
        tta = model_outputs["tta_probabilities"]
        for name, column in probability_columns(class_names, tta, TTA_PREFIX).items():
            table[name] = column
    scores = (
        ood_detector["scorer"].scores(model_outputs["features"])
        if len(probs)
        else np.empty(0)
    )
    table["ood_score"] = scores
    table["ood_flag"] = scores > ood_detector["threshold"]
    return table


def inference_report(
    *,
    predictions: pd.DataFrame,
    inference_rejected: pd.DataFrame,
    ood_detector: dict[str, Any],
    reference_features: dict[str, np.ndarray],
    model_outputs: dict[str, np.ndarray],
    model: dict[str, Any],
    inference: dict[str, Any],
) -> dict[str, Any]:
    """Counts, the OOD threshold and its calibration, and the batch shift test.

    The batch test is feature_shift's two-sample test (MMD² with a permutation
    p-value) of the new images' pooled features against the training originals'.

    Returns:
        The ``inference_report`` JSON.
    """
    shift_params = inference["shift"]
    new_features = model_outputs["features"]
    limit = shift_params.get("max_images")
    if limit is not None and len(new_features) > int(limit):
        # The test's kernel matrix is quadratic in the images: a seeded sample keeps
        # its memory the same for any folder.
        rng = np.random.default_rng(int(model["seed"]))
        new_features = new_features[
            np.sort(rng.choice(len(new_features), int(limit), replace=False))
        ]
    if len(new_features) < 2:
        shift: dict[str, Any] = {
            "statement": "fewer than 2 usable new images: no batch comparison"
        }
    else:
        result = compare(
            reference_features["train"],
            new_features,
            max_components=int(shift_params["max_components"]),
            permutations=int(shift_params["permutations"]),
            seed=int(model["seed"]),
        )
        alpha = float(shift_params["alpha"])
        differs = result.p_value < alpha
        verdict = "differ" if differs else "do not detectably differ"
        shift = {
            "test": "MMD² (RBF kernel) permutation test on pooled features, "
            "feature_shift.twosample.compare",
            "n_train": result.n_reference,
            "n_new": result.n_compared,
            "components": result.components,
            "frechet": result.frechet,
            "mmd2": result.mmd2,
            "p_value": result.p_value,
            "alpha": alpha,
            "differs": bool(differs),
            "statement": f"these new images {verdict} from the training images, "
            f"p = {result.p_value:.3g}",
        }
        logger.info("%s", shift["statement"])
    return {
        "n_files": len(predictions) + len(inference_rejected),
        "n_predicted": len(predictions),
        "n_rejected": len(inference_rejected),
        "n_ood_flagged": int(predictions["ood_flag"].sum()),
        "test_time_augmentation": "tta_probabilities" in model_outputs,
        "predicted_counts": {
            str(k): int(v) for k, v in predictions["predicted"].value_counts().items()
        },
        "rejected_reasons": {
            str(k): int(v)
            for k, v in inference_rejected["reason"].value_counts().items()
        },
        "ood": ood_detector["calibration"],
        "batch_shift": shift,
    }


def _run_settings(
    model: dict[str, Any], images: dict[str, Any], inference: dict[str, Any]
) -> dict[str, Any]:
    """The keyword arguments of ``predict.probabilities_and_features`` here."""
    return {
        "image_size": int(model["image_size"]),
        "policy": OpenPolicy.from_params(images),
        "batch_size": int(inference["batch_size"]),
        "error": InferenceError,
    }
