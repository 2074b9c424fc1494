"""Nodes of the `evaluation` pipeline: predict the test split, score it, explain it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from irv2_pipeline.backbone import preprocessed_zero
from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.hints import KerasModel
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import image_dataset, model_classes
from irv2_pipeline.pipelines.feature_shift.shift import block_shift
from irv2_pipeline.plan_rules import learning_rate_problems
from irv2_pipeline.predict import (
    in_full_batches,
    padded_probabilities,
    probabilities_and_features,
)
from irv2_pipeline.progress import ProgressLog
from irv2_pipeline.sources import planned_source

from . import checks, diagnosis, plots, verdict
from .attribution import (
    OcclusionSpec,
    flip_table,
    grad_cam,
    occlude,
    occlusion_masks,
    random_squares,
)
from .label_issues import (
    ISSUE_COLUMNS,
    METHOD,
    check_settings,
    confident_learning,
    out_of_sample_probabilities,
    usable_folds,
)
from .metrics import (
    TTA_PREFIX,
    calibration_bins,
    classes_of,
    classification_metrics,
    expected_calibration_error,
    has_tta,
    label_indices,
    per_class_report,
    prediction_table,
    probabilities_of,
)
from .report import render_report
from .report_html import render_html_report

logger = logging.getLogger(__name__)

# The report's title of the Grad-CAM plot (evaluation.report.plots), which the
# shortcut finding names as evidence.
GRAD_CAM_TITLE = "Grad-CAM heatmaps"


class EvaluationError(ValueError):
    """The evaluation cannot run on these inputs; the message says what to change."""


def predict_test_split(
    *,
    finetuned_model: KerasModel,
    class_names: list[str],
    image_manifest: pd.DataFrame,
    raw_images: ImageFolder,
    model: dict[str, Any],
    images: dict[str, Any],
    evaluation: dict[str, Any],
) -> pd.DataFrame:
    """Runs the fine-tuned model over exactly the manifest's test split, streaming.

    Args:
        finetuned_model: Takes ``[0, 255]`` RGB, outputs softmax probabilities.
        class_names: The model's output order, as ``finetune`` saved it.
        image_manifest: The ingestion manifest.
        raw_images: The image root.
        model: The ``model`` parameters (``image_size``).
        images: The ``images`` parameters (how images are opened).
        evaluation: The ``evaluation`` parameters (``batch_size``,
            ``test_time_augmentation``).

    Returns:
        ``test_predictions``: one row per test image, in manifest order.

    Raises:
        EvaluationError: No test images, or a model whose input size or classes do
            not match the manifest and parameters, or whose outputs are not
            probabilities.
    """
    test = image_manifest[image_manifest["split"] == "test"]
    if test.empty:
        raise EvaluationError(
            "image_manifest has no test images: raise ingestion.split.test and rerun "
            "`kedro run --pipeline ingestion`."
        )
    classes = model_classes(class_names, image_manifest, EvaluationError)
    outputs = probabilities_and_features(
        finetuned_model,
        classes,
        [raw_images.path_of(path) for path in test["path"]],
        image_size=int(model["image_size"]),
        policy=OpenPolicy.from_params(images),
        batch_size=int(evaluation["batch_size"]),
        error=EvaluationError,
        what="test images predicted",
        flip_tta=bool(evaluation["test_time_augmentation"]),
    )
    return prediction_table(
        test["path"],
        test["label"],
        classes,
        outputs.probabilities,
        outputs.tta_probabilities,
    )


def score_predictions(
    test_predictions: pd.DataFrame, evaluation: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Computes ``evaluation_metrics`` and the per-class report from the predictions.

    Test-time-augmentation figures, when the table has them, go under ``tta``; the
    plain figures stay where they are.

    Args:
        test_predictions: The prediction table.
        evaluation: The ``evaluation`` parameters (``top_k``, ``calibration_bins``,
            ``bootstrap``).

    Returns:
        ``evaluation_metrics`` and ``classification_report``.
    """
    classes = classes_of(test_predictions)
    y_true = label_indices(test_predictions["label"], classes)
    settings = {
        "top_k": int(evaluation["top_k"]),
        "calibration_bins_count": int(evaluation["calibration_bins"]),
        "resamples": int(evaluation["bootstrap"]["resamples"]),
        "seed": int(evaluation["bootstrap"]["seed"]),
    }
    probabilities = probabilities_of(test_predictions, classes)
    metrics = classification_metrics(y_true, probabilities, **settings)
    metrics["classes"] = classes
    if has_tta(test_predictions):
        metrics["tta"] = classification_metrics(
            y_true, probabilities_of(test_predictions, classes, TTA_PREFIX), **settings
        )
    logger.info(
        "test accuracy %.3f (95%% CI %.3f-%.3f), macro F1 %.3f on %d images",
        metrics["accuracy"],
        *metrics["accuracy_ci95"],
        metrics["macro_f1"],
        metrics["n_test"],
    )
    report = per_class_report(y_true, probabilities.argmax(axis=1), classes)
    return metrics, report


def plot_confusion_matrix(test_predictions: pd.DataFrame) -> Figure:
    """The confusion matrix, counts and row-normalised."""
    classes = classes_of(test_predictions)
    return plots.confusion_matrix_figure(
        label_indices(test_predictions["label"], classes),
        label_indices(test_predictions["predicted"], classes),
        classes,
    )


def plot_reliability(
    test_predictions: pd.DataFrame, evaluation: dict[str, Any]
) -> Figure:
    """The reliability diagram of the plain predictions."""
    correct = (test_predictions["label"] == test_predictions["predicted"]).to_numpy()
    confidence = test_predictions["confidence"].to_numpy(dtype=np.float64)
    n_bins = int(evaluation["calibration_bins"])
    return plots.reliability_figure(
        calibration_bins(confidence, correct, n_bins),
        expected_calibration_error(confidence, correct, n_bins),
    )


def plot_confidently_wrong(
    test_predictions: pd.DataFrame,
    raw_images: ImageFolder,
    images: dict[str, Any],
    evaluation: dict[str, Any],
) -> Figure:
    """The misclassified test images the model was surest of, opened via images.py."""
    settings = evaluation["confidently_wrong"]
    wrong = test_predictions[test_predictions["label"] != test_predictions["predicted"]]
    worst = wrong.sort_values(["confidence", "path"], ascending=[False, True]).head(
        int(settings["max_images"])
    )
    policy = OpenPolicy.from_params(images)
    pixels = [raw_images.load(path, policy).pixels for path in worst["path"]]
    titles = [
        f"{row.label} → {row.predicted} ({row.confidence:.2f})"
        for row in worst.itertuples()
    ]
    return plots.image_grid_figure(
        pixels,
        titles,
        int(settings["columns"]),
        "Most confidently wrong test images\n(true → predicted, confidence)",
        "No test image is misclassified: none to show.",
    )


def occlude_test_split(
    *,
    finetuned_model: KerasModel,
    test_predictions: pd.DataFrame,
    raw_images: ImageFolder,
    model: dict[str, Any],
    images: dict[str, Any],
    evaluation: dict[str, Any],
) -> pd.DataFrame:
    """Predicts every test image with its border, its centre, then random squares
    masked.

    The test split under each of ``2 + random_patches`` masks, the masked copies
    predicted in full batches; the unmasked predictions are those of
    ``test_predictions`` (plain, not test-time augmented).

    Args:
        finetuned_model: Takes ``[0, 255]`` RGB, outputs softmax probabilities.
        test_predictions: The prediction table (``path``, ``label``, ``predicted``).
        raw_images: The image root.
        model: The ``model`` parameters (``image_size``).
        images: The ``images`` parameters (how images are opened).
        evaluation: The ``evaluation`` parameters (``batch_size``,
            ``attribution.occlusion``).

    Returns:
        ``occlusion_flips``: per class, the test predictions each mask changes
        (``attribution.flip_table``).
    """
    # Imported here: it imports Keras, which other commands need not load.
    from irv2_pipeline.classifier import (  # noqa: PLC0415
        saved_grayscale,
        saved_input_scaling,
    )

    spec = OcclusionSpec.from_params(evaluation["attribution"]["occlusion"])
    zero = preprocessed_zero(
        saved_input_scaling(finetuned_model), saved_grayscale(finetuned_model)
    )
    image_size = int(model["image_size"])
    batch_size = int(evaluation["batch_size"])
    classes = classes_of(test_predictions)
    masks = occlusion_masks(image_size, spec.border_fraction)
    squares = random_squares(
        image_size, int(masks[0].sum()), spec.random_patches, spec.seed
    )
    every_mask = [*masks, *squares]
    progress = ProgressLog("test images occluded", len(test_predictions), logger)

    def hidden_batches() -> Iterator[np.ndarray]:
        """Each test batch under each mask in turn."""
        for batch in _test_batches(
            test_predictions, raw_images, model, images, evaluation
        ):
            for mask in every_mask:
                yield occlude(batch, mask, spec.fill, zero)
            progress.advance(len(batch))

    # The masked copies run in full batches: a test split smaller than a batch
    # costs its images' forward passes under each mask, not a padded batch each.
    predicted = list(
        in_full_batches(
            lambda rows: padded_probabilities(
                finetuned_model, rows, batch_size, EvaluationError
            ),
            hidden_batches(),
            batch_size,
        )
    )
    # One array per test batch and mask, the masks in turn.
    count = len(every_mask)
    border, centre, *random = (
        np.concatenate(predicted[index::count]).argmax(axis=1) for index in range(count)
    )
    table = flip_table(
        test_predictions["label"],
        label_indices(test_predictions["predicted"], classes),
        classes,
        border_predicted=border,
        centre_predicted=centre,
        random_predicted=np.stack(random),
        masks=masks,
    )
    logger.info(
        "occlusion: border flips %s, centre flips %s, border p-values against %d "
        "random squares %s (per class %s)",
        table["border_flips"].tolist(),
        table["centre_flips"].tolist(),
        spec.random_patches,
        table["border_p_value"].round(3).tolist(),
        classes,
    )
    return table


def plot_grad_cam(
    *,
    finetuned_model: KerasModel,
    test_predictions: pd.DataFrame,
    raw_images: ImageFolder,
    model: dict[str, Any],
    images: dict[str, Any],
    evaluation: dict[str, Any],
) -> Figure:
    """Grad-CAM of the predicted class on the surest mistakes and correct images.

    The most confidently wrong test images (``max_wrong``), then the
    ``correct_per_class`` most confidently right of each class.

    Args:
        finetuned_model: The classifier ``finetune`` saved.
        test_predictions: The prediction table.
        raw_images: The image root.
        model: The ``model`` parameters (``image_size``).
        images: The ``images`` parameters (how images are opened).
        evaluation: The ``evaluation`` parameters (``batch_size``,
            ``attribution.grad_cam``).

    Returns:
        The figure of heatmaps over their images.
    """
    settings = evaluation["attribution"]["grad_cam"]
    by_confidence = test_predictions.sort_values(
        ["confidence", "path"], ascending=[False, True]
    )
    right = by_confidence["label"] == by_confidence["predicted"]
    chosen = pd.concat(
        [
            by_confidence[~right].head(int(settings["max_wrong"])),
            by_confidence[right]
            .groupby("label", sort=True)
            .head(int(settings["correct_per_class"]))
            .sort_values(["label", "confidence"], ascending=[True, False]),
        ]
    )
    pixels, heatmaps = [], []
    if len(chosen):
        batches = _test_batches(chosen, raw_images, model, images, evaluation)
        pixels = np.concatenate(list(batches))
        heatmaps = grad_cam(
            finetuned_model,
            str(settings["layer"]),
            pixels,
            label_indices(chosen["predicted"], classes_of(test_predictions)),
            int(evaluation["batch_size"]),
        )
    titles = [
        f"{row.label} → {row.predicted} ({row.confidence:.2f})"
        if row.label != row.predicted
        else f"{row.label} ({row.confidence:.2f})"
        for row in chosen.itertuples()
    ]
    return plots.image_grid_figure(
        [image / 255.0 for image in pixels],
        titles,
        int(settings["columns"]),
        f"Grad-CAM of the predicted class at {settings['layer']}:\nthe surest "
        "mistakes (true → predicted), then the surest correct images per class",
        "No test images chosen (evaluation.attribution.grad_cam).",
        heatmaps=list(heatmaps),
    )


def training_features(
    reference_features: dict[str, Any], class_names: list[str]
) -> dict[str, Any]:
    """The training originals' part of the reference features, as the label pass reads it.

    Args:
        reference_features: From ``reference_features.embed_reference_images``
            (every training original and validation image, embedded once and kept).
        class_names: The model's output order.

    Returns:
        ``paths``, ``labels`` (class indices), ``groups`` and ``features`` of the
        training images, in manifest order.
    """
    return {
        "paths": [str(path) for path in reference_features["train_paths"]],
        "labels": label_indices(
            pd.Series(reference_features["train_labels"]), class_names
        ),
        "groups": [str(group) for group in reference_features["train_groups"]],
        "features": np.asarray(reference_features["train"], dtype=np.float64),
    }


def find_label_issues(
    training_features: dict[str, Any],
    class_names: list[str],
    evaluation: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Training images whose label is probably wrong, and the noise rate per class.

    Out-of-sample probabilities from a k-fold cross-validated linear probe on the
    pooled features, then confident learning (``label_issues`` module).

    Args:
        training_features: From :func:`training_features`.
        class_names: The model's output order.
        evaluation: The ``evaluation`` parameters (``label_issues``: ``folds``,
            ``c``, ``max_iter``, ``seed``).

    Returns:
        ``label_issues`` (most suspect first) and ``label_noise_estimate``.
    """
    settings = evaluation["label_issues"]
    check_settings(settings)
    labels = np.asarray(training_features["labels"])
    folds = usable_folds(labels, training_features["groups"], int(settings["folds"]))
    about = {
        "method": METHOD,
        "features": "pooled features of finetuned_model, training originals only",
        "folds": folds,
        "c": float(settings["c"]),
        "seed": int(settings["seed"]),
    }
    if folds < 2:
        statement = (
            "not estimated: a class has a single training image group, and "
            "cross-validation needs at least two per class"
        )
        logger.warning("Label issues %s", statement)
        empty = pd.DataFrame(columns=ISSUE_COLUMNS)
        return empty, {**about, "estimated": False, "statement": statement}
    probabilities = out_of_sample_probabilities(
        training_features["features"],
        labels,
        training_features["groups"],
        len(class_names),
        folds=folds,
        c=float(settings["c"]),
        max_iter=int(settings["max_iter"]),
        seed=int(settings["seed"]),
    )
    issues, estimates = confident_learning(
        training_features["paths"], labels, probabilities, class_names
    )
    statement = (
        f"{estimates['n_flagged']} of {estimates['n_images']} training images "
        "flagged as probably mislabelled; estimated label noise "
        f"{estimates['estimated_noise_rate']:.1%} (out-of-sample accuracy of the "
        f"{folds}-fold probe {estimates['out_of_sample_accuracy']:.3f})"
    )
    logger.info("Label issues: %s", statement)
    return issues, {**about, "estimated": True, **estimates, "statement": statement}


def plot_label_issues(
    label_issues: pd.DataFrame,
    raw_images: ImageFolder,
    images: dict[str, Any],
    evaluation: dict[str, Any],
) -> Figure:
    """The most suspect training images with their given and suggested labels."""
    settings = evaluation["label_issues"]["plot"]
    suspects = label_issues.head(int(settings["max_images"]))
    policy = OpenPolicy.from_params(images)
    pixels = [raw_images.load(path, policy).pixels for path in suspects["path"]]
    titles = [
        f"{row.given_label} → {row.suggested_label}? ({row.self_confidence:.2f})"
        for row in suspects.itertuples()
    ]
    return plots.image_grid_figure(
        pixels,
        titles,
        int(settings["columns"]),
        "Training images most probably mislabelled\n"
        "(given → suggested label, out-of-sample probability of the given label)",
        "Confident learning flagged no training image.",
    )


def plot_validation_curves(training_history: pd.DataFrame) -> Figure:
    """Validation and training loss and accuracy per epoch, stage by stage."""
    return plots.validation_curves_figure(training_history)


def diagnose_run(
    *,
    evaluation_metrics: dict[str, Any],
    classification_report: pd.DataFrame,
    test_predictions: pd.DataFrame,
    training_history: pd.DataFrame,
    bn_shift_profile: pd.DataFrame,
    split_shift: pd.DataFrame,
    finetune_stages: pd.DataFrame,
    finetune_plan: dict[str, Any],
    image_manifest: pd.DataFrame,
    duplicate_report: pd.DataFrame,
    dataset_summary: dict[str, Any],
    occlusion_flips: pd.DataFrame,
    label_noise_estimate: dict[str, Any],
    plan_rules: dict[str, Any],
    evaluation: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Runs every diagnosis rule on this run's outputs.

    Args:
        evaluation_metrics: The test metrics.
        classification_report: Per-class precision, recall, F1 and support.
        test_predictions: The prediction table (the checks of ``checks``).
        training_history: One row per epoch of every stage.
        bn_shift_profile: BN shift per layer (``feature_shift``).
        split_shift: Shift between the splits (``feature_shift``).
        finetune_stages: The stages ``finetune`` trained, one row each; ``selected``
            marks the one the model was saved from.
        finetune_plan: The plan ``feature_shift`` made (its ``depth_limit`` and
            source).
        image_manifest: The ingestion manifest.
        duplicate_report: Duplicate groups (ingestion).
        dataset_summary: The ingestion summary.
        occlusion_flips: Per class, the test predictions that masking the border
            and the centre change.
        label_noise_estimate: Confident learning's estimates on the training
            images (:func:`find_label_issues`).
        plan_rules: ``feature_shift.plan_rules``, the learning-rate limits every plan
            must keep.
        evaluation: The ``evaluation`` parameters (``diagnosis`` thresholds,
            ``bootstrap``).

    Returns:
        ``diagnosis``: the findings, the cause that explains the others first
        (``diagnosis.PRIORITY``), then most severe first; and
        ``diagnosis_not_judged``: the rules this run gave too little to judge
        (``rule``, ``reason``), in the same order.
    """
    thresholds = evaluation["diagnosis"]
    weights = planned_source(finetune_plan).weights
    stages = diagnosis.stage_records(finetune_stages)
    train_counts = _train_counts(image_manifest, evaluation_metrics["classes"])
    results = [
        *_data_checks(test_predictions, image_manifest, train_counts, evaluation),
        diagnosis.random_weights(weights),
        diagnosis.leakage(image_manifest, thresholds["leakage"]),
        diagnosis.label_conflicts(dataset_summary, duplicate_report),
        diagnosis.label_noise(
            label_noise_estimate,
            len(evaluation_metrics["classes"]),
            thresholds["label_noise"],
        ),
        diagnosis.split_shift(split_shift, thresholds["split_shift"]),
        diagnosis.domain_gap(
            bn_shift_profile,
            stages,
            weights,
            thresholds["domain_gap"],
            finetune_plan.get("depth_limit"),
        ),
        diagnosis.unstable_training(
            training_history,
            learning_rate_problems(stages, plan_rules),
            thresholds["unstable_training"],
        ),
        diagnosis.underfitting(
            training_history,
            finetune_stages,
            len(evaluation_metrics["classes"]),
            thresholds["underfitting"],
        ),
        diagnosis.overfitting(training_history, thresholds["overfitting"]),
        diagnosis.feature_distortion(
            training_history,
            finetune_stages,
            weights,
            thresholds["feature_distortion"],
        ),
        diagnosis.validation_test_gap(
            training_history,
            finetune_stages,
            evaluation_metrics,
            thresholds["validation_test_gap"],
        ),
        diagnosis.shortcut(
            occlusion_flips,
            classification_report,
            evaluation["report"]["plots"].get(GRAD_CAM_TITLE, "grad_cam_plot"),
            thresholds["shortcut"],
        ),
        diagnosis.class_imbalance(
            evaluation_metrics,
            classification_report,
            train_counts,
            thresholds["class_imbalance"],
        ),
        diagnosis.miscalibration(evaluation_metrics, thresholds["miscalibration"]),
        diagnosis.small_test_set(evaluation_metrics, thresholds["small_test_set"]),
    ]
    findings = diagnosis.in_priority(results)
    not_judged = diagnosis.not_judged(results)
    for finding in findings:
        logger.warning(
            "%s (%s): %s", finding["rule"], finding["severity"], finding["cause"]
        )
    for rule in not_judged:
        logger.info("%s not judged: %s", rule["rule"], rule["reason"])
    return findings, not_judged


def _data_checks(
    test_predictions: pd.DataFrame,
    image_manifest: pd.DataFrame,
    train_counts: dict[str, int],
    evaluation: dict[str, Any],
) -> list[diagnosis.Judgement]:
    """The rules of ``checks``: on the images and the test predictions themselves."""
    thresholds = evaluation["diagnosis"]
    return [
        checks.new_test_labels(image_manifest),
        checks.image_property_drift(image_manifest, thresholds["image_property_drift"]),
        checks.dummy_baseline(
            test_predictions,
            train_counts,
            evaluation["bootstrap"],
            thresholds["dummy_baseline"],
        ),
        checks.weak_segment(
            test_predictions, image_manifest, thresholds["weak_segment"]
        ),
    ]


def write_diagnosis_junit(
    diagnosis_findings: list[dict[str, Any]], diagnosis_not_judged: list[dict[str, str]]
) -> str:
    """``diagnosis_junit``: a JUnit test case per rule, failed where it fired and
    skipped where it had too little to judge."""
    return verdict.junit_xml(diagnosis_findings, diagnosis_not_judged)


def enforce_fail_on(
    diagnosis_findings: list[dict[str, Any]],
    evaluation_report: str,
    report_html: str,
    diagnosis_junit: str,
    evaluation: dict[str, Any],
) -> None:
    """Fails the run when a finding is at or above ``evaluation.fail_on``.

    It takes the reports and the JUnit XML only to run after they are written (in a
    sequential run, after every node of the pipeline): a failed run still leaves
    every report to read.

    Raises:
        verdict.DiagnosisVerdictError: Naming the findings at or above it.
    """
    del evaluation_report, report_html, diagnosis_junit
    fail_on = str(evaluation["fail_on"])
    verdict.enforce_fail_on(diagnosis_findings, fail_on)
    logger.info(
        "evaluation.fail_on = %s: no finding at or above it (%d in all)",
        fail_on,
        len(diagnosis_findings),
    )


def write_report(
    *,
    evaluation_metrics: dict[str, Any],
    classification_report: pd.DataFrame,
    diagnosis_findings: list[dict[str, Any]],
    diagnosis_not_judged: list[dict[str, str]],
    training_history: pd.DataFrame,
    bn_shift_profile: pd.DataFrame,
    split_shift: pd.DataFrame,
    transferability: pd.DataFrame,
    source_ranking: pd.DataFrame,
    finetune_plan: dict[str, Any],
    finetune_stages: pd.DataFrame,
    dataset_summary: dict[str, Any],
    occlusion_flips: pd.DataFrame,
    label_noise_estimate: dict[str, Any],
    label_issues: pd.DataFrame,
    model: dict[str, Any],
    evaluation: dict[str, Any],
) -> str:
    """Writes ``evaluation_report``: everything above in one Markdown file.

    Args:
        evaluation_metrics: The test metrics.
        classification_report: Per-class precision, recall, F1 and support.
        diagnosis_findings: ``diagnosis``.
        diagnosis_not_judged: The rules that had too little to judge.
        training_history: One row per epoch of every stage.
        bn_shift_profile: BN shift per layer.
        split_shift: Shift between the splits.
        transferability: Transferability of frozen features by depth.
        source_ranking: The candidate sources, best first.
        finetune_plan: The plan ``feature_shift`` made, with its rationale.
        finetune_stages: The stages ``finetune`` trained, one row each.
        dataset_summary: The ingestion summary.
        occlusion_flips: The occlusion test per class.
        label_noise_estimate: Confident learning's estimates on the training
            images.
        label_issues: The training images flagged as probably mislabelled.
        model: The ``model`` parameters.
        evaluation: The ``evaluation`` parameters (``report.plots`` and
            ``report.upstream_plots``: title to file name of each plot, relative to
            the report).

    Returns:
        The Markdown text.
    """
    return render_report(
        metrics=evaluation_metrics,
        classification_report=classification_report,
        findings=diagnosis_findings,
        not_judged=diagnosis_not_judged,
        training_history=training_history,
        shift_by_block=block_shift(bn_shift_profile),
        split_shift=split_shift,
        transferability=transferability,
        source_ranking=source_ranking,
        finetune_plan=finetune_plan,
        finetune_stages=finetune_stages,
        dataset_summary=dataset_summary,
        occlusion_flips=occlusion_flips,
        label_noise=label_noise_estimate,
        label_issues=label_issues,
        model=model,
        plots=evaluation["report"]["plots"],
        upstream_plots=evaluation["report"]["upstream_plots"],
    )


def write_html_report(
    evaluation_report: str,
    diagnosis_findings: list[dict[str, Any]],
    diagnosis_not_judged: list[dict[str, str]],
    evaluation: dict[str, Any],
) -> str:
    """``report_html``'s Markdown: the verdict, the findings by outcome, the report.

    Args:
        evaluation_report: The Markdown report (:func:`write_report`).
        diagnosis_findings: ``diagnosis``.
        diagnosis_not_judged: The rules that had too little to judge.
        evaluation: The ``evaluation`` parameters (``fail_on``, whose effect the
            verdict states).

    Returns:
        The Markdown that ``HTMLReportDataset`` writes as one offline page.
    """
    return render_html_report(
        evaluation_report,
        diagnosis_findings,
        diagnosis_not_judged,
        str(evaluation["fail_on"]),
    )


def _test_batches(
    table: pd.DataFrame,
    raw_images: ImageFolder,
    model: dict[str, Any],
    images: dict[str, Any],
    evaluation: dict[str, Any],
):
    """The images of ``table['path']`` at the model's size, batch by batch, in order."""
    dataset = image_dataset(
        [raw_images.path_of(path) for path in table["path"]],
        None,
        image_size=int(model["image_size"]),
        batch_size=int(evaluation["batch_size"]),
        policy=OpenPolicy.from_params(images),
    )
    return dataset.as_numpy_iterator()


def _train_counts(image_manifest: pd.DataFrame, classes: list[str]) -> dict[str, int]:
    """Training images per class, zero for a class with none."""
    train = image_manifest[image_manifest["split"] == "train"]
    counts = train["label"].value_counts()
    return {name: int(counts.get(name, 0)) for name in classes}
