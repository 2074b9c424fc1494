"""Diagnosis rules: one small pure function per cause of poor test accuracy.

Each rule reads this run's outputs and its thresholds (``evaluation.diagnosis.<rule>``)
and returns a :class:`Finding` quoting the numbers it rests on, ``None`` when the
cause is not present, or a :class:`NotJudged` saying why this run gives it too little
to judge (random weights for ``domain_gap``, a probe too weak for ``label_noise``, too
few test images for ``image_property_drift``): a rule that could not look is not a rule
that passed. ``parameters`` of a finding names the parameters its suggestion
changes, as dotted keys of ``conf/base/parameters*.yml``.

A rule fires on a cause, not on a figure that merely follows from another cause: a
model that is poor everywhere is not an imbalance (``class_imbalance`` compares a class
with the others and with chance), its confidence is not judged against an accuracy it
does not have (``miscalibration``), and random weights have no pretrained features to
distort (``feature_distortion``, ``domain_gap``).

:func:`in_priority` orders the findings by :data:`PRIORITY`, the cause that explains
the others first, then by severity: ``random_weights`` (no transfer learning: every
figure after it follows), ``leakage`` and ``label_conflicts`` (the held-out figures
cannot be trusted), ``label_noise`` (wrong training labels cap the fit and the test
figures), ``unstable_training`` (a diverging loss explains a poor fit),
``underfitting`` / ``overfitting`` / ``feature_distortion`` (how training fit),
``domain_gap``, ``split_shift`` / ``image_property_drift`` (test images unlike the
training images, in features or in brightness, contrast, shape or colour),
``validation_test_gap`` (which a split shift explains), ``dummy_baseline`` (a model no
better than guessing the most frequent class, which the causes before it explain),
``shortcut`` (a cue the test split shares, so it does not lower this test accuracy: it
warns that the accuracy will not hold on images without the cue), ``class_imbalance``,
``weak_segment`` (a slice of the test images by an image property), ``miscalibration``,
and last ``small_test_set``, a caveat on every test figure rather than a cause.
``new_test_labels`` (test classes without training images) comes right after
``label_conflicts``: no figure of those classes can be trusted. The rules that read the
images and predictions themselves live in :mod:`.checks`.

A rule that names a class judges it only on at least ``min_test_images`` test images
(``class_imbalance``, ``dummy_baseline``): one test image cannot single a class out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from irv2_pipeline.backbone import GROUPS, group_of
from irv2_pipeline.pipelines.feature_shift.shift import block_shift
from irv2_pipeline.plan_rules import (
    FIRST_UNIT,
    GRAYSCALE_SHARE,
    shift_start,
)

SEVERITIES = ("high", "medium", "low")
# Findings in this order, the cause that explains the others first (module docstring);
# rules in one tuple are peers, ordered by severity.
PRIORITY = (
    ("random_weights",),
    ("leakage",),
    ("label_conflicts",),
    ("new_test_labels",),
    ("label_noise",),
    ("unstable_training",),
    ("underfitting", "overfitting", "feature_distortion"),
    ("domain_gap",),
    ("split_shift", "image_property_drift"),
    ("validation_test_gap",),
    ("dummy_baseline",),
    ("shortcut",),
    ("class_imbalance",),
    ("weak_segment",),
    ("miscalibration",),
    ("small_test_set",),
)
RANK = {rule: rank for rank, peers in enumerate(PRIORITY) for rule in peers}
HISTORY_COLUMNS = ("stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy")
STAGE_COLUMNS = ("stage", "unfreeze_from", "epochs", "learning_rate", "bn_policy")
# What feature_shift's block_shift reads from bn_shift_profile.
SHIFT_PROFILE_COLUMNS = (
    "layer",
    "block",
    "depth",
    "shift",
    "shift_low",
    "shift_high",
    "mean_part",
    "variance_part",
)
# Held-out x training hash pairs compared at once by the leakage rule (~256 MB).
LEAKAGE_CHUNK_PAIRS = 2**25


class DiagnosisInputError(ValueError):
    """An upstream output lacks what a rule needs; the message names it."""


@dataclass(frozen=True)
class Finding:
    """One cause of poor accuracy found in this run.

    Attributes:
        rule: The rule that found it.
        cause: What is wrong, in one sentence.
        severity: ``high``, ``medium`` or ``low``.
        suggestion: What to change, in words.
        parameters: The parameters the suggestion changes (dotted keys).
        evidence: The measurements behind it, numbers quoted.
    """

    rule: str
    cause: str
    severity: str
    suggestion: str
    parameters: list[str]
    evidence: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The finding as a JSON-able dict."""
        return asdict(self)


@dataclass(frozen=True)
class NotJudged:
    """A rule that this run gives too little to judge; it raises no finding.

    Attributes:
        rule: The rule.
        reason: Why it could not judge, with the figures and the threshold.
    """

    rule: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        """The rule and its reason as a JSON-able dict."""
        return asdict(self)


Judgement = Finding | NotJudged | None


def require_columns(table: pd.DataFrame, columns: Sequence[str], dataset: str) -> None:
    """Stops with a clear error when ``table`` lacks columns a rule needs."""
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise DiagnosisInputError(
            f"{dataset} lacks the columns {missing} that the evaluation diagnosis "
            f"needs (it has {list(table.columns)})"
        )


def stages_of(history: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The history split by stage, in the order the stages ran, epochs sorted."""
    require_columns(history, HISTORY_COLUMNS, "training_history")
    if history.empty:
        raise DiagnosisInputError("training_history has no epochs")
    order = list(dict.fromkeys(history["stage"]))
    return [
        (str(stage), history[history["stage"] == stage].sort_values("epoch"))
        for stage in order
    ]


def stage_history(history: pd.DataFrame, stage: str) -> pd.DataFrame:
    """The epochs of one stage, sorted.

    Raises:
        DiagnosisInputError: The history has no epoch of ``stage``.
    """
    for name, epochs in stages_of(history):
        if name == stage:
            return epochs
    raise DiagnosisInputError(
        f"training_history has no epochs of stage {stage!r}, which finetune_stages "
        "names: both must come from the same `kedro run --pipeline finetune`"
    )


def val_accuracy_at(history: pd.DataFrame, stage: str, epoch: int) -> float:
    """Validation accuracy of ``stage`` at ``epoch`` (1-based); NaN if not recorded."""
    epochs = stage_history(history, stage)
    rows = epochs[epochs["epoch"] == epoch]
    return float(rows["val_accuracy"].iloc[-1]) if len(rows) else math.nan


def restored_epoch(finetune_stages: pd.DataFrame) -> tuple[str, int]:
    """The stage and epoch whose weights the saved model has.

    ``finetune`` saves the stage with the best validation loss, at its ``best_epoch``,
    and marks it ``selected``. Outputs written before it did so have no ``selected``
    column: they saved the last stage, at its ``best_epoch``.

    Raises:
        DiagnosisInputError: No stage, or ``selected`` marks more than one.
    """
    require_columns(finetune_stages, ("stage", "best_epoch"), "finetune_stages")
    if "selected" in finetune_stages.columns:
        kept = finetune_stages[finetune_stages["selected"].astype(bool)]
    else:
        kept = finetune_stages.tail(1)
    if len(kept) != 1:
        raise DiagnosisInputError(
            f"finetune_stages marks {len(kept)} stages as the one the model was saved "
            "from (column `selected`); exactly one must be: rerun `kedro run "
            "--pipeline finetune`"
        )
    row = kept.iloc[0]
    return str(row["stage"]), int(row["best_epoch"])


def stage_records(finetune_stages: pd.DataFrame) -> list[dict[str, Any]]:
    """The stages ``finetune`` trained, as the plan's stage dicts.

    ``finetune_stages`` names a stage in its ``stage`` column; the plan (and
    ``plan_rules.learning_rate_problems``) calls it ``name``. Read from CSV,
    the head stage's ``unfreeze_from`` comes back as NaN; it is ``None`` again here.
    """
    require_columns(finetune_stages, STAGE_COLUMNS, "finetune_stages")
    records = finetune_stages.rename(columns={"stage": "name"}).to_dict("records")
    for record in records:
        start = record["unfreeze_from"]
        if isinstance(start, float) and math.isnan(start):
            record["unfreeze_from"] = None
    return records


def describe_stages(stages: Sequence[dict[str, Any]]) -> list[str]:
    """One line per stage: what it unfreezes and how it trains."""
    return [
        f"{stage['name']}: "
        + (
            f"unfreeze from {stage['unfreeze_from']}"
            if stage["unfreeze_from"]
            else "head only"
        )
        + f", {stage['epochs']} epochs, learning rate {stage['learning_rate']:g}, "
        f"BatchNorm {stage['bn_policy']}"
        for stage in stages
    ]


def skill_over_chance(score: np.ndarray | float, n_classes: int) -> np.ndarray:
    """Where an accuracy or recall lies from chance (0) to perfect (1).

    Chance, ``1 / n_classes``, is what guessing scores. Below chance counts as 0: a
    class recalled less often than a guess is no better recognised than one at chance,
    how far below depends only on where a poor model's predictions happen to pile up.
    """
    chance = 1.0 / n_classes
    return np.clip((np.asarray(score, dtype=np.float64) - chance) / (1 - chance), 0, 1)


def overfitting(history: pd.DataFrame, settings: dict[str, Any]) -> Judgement:
    """Training accuracy far above validation, or validation loss rising late.

    Per stage: the accuracy gap at its last epoch above ``max_accuracy_gap``, or the
    last validation loss more than ``max_val_loss_rise`` (relative) above the stage's
    best while the training loss kept falling. Not judged when no epoch recorded
    both the training and the validation figures.
    """
    max_gap = float(settings["max_accuracy_gap"])
    max_rise = float(settings["max_val_loss_rise"])
    evidence, worst_gap, compared = [], 0.0, 0
    for stage, epochs in stages_of(history):
        rows = epochs.dropna(subset=["loss", "accuracy", "val_loss", "val_accuracy"])
        if rows.empty:
            continue
        compared += 1
        last = rows.iloc[-1]
        gap = float(last["accuracy"] - last["val_accuracy"])
        if gap > max_gap:
            worst_gap = max(worst_gap, gap)
            evidence.append(
                f"stage {stage!r}, epoch {int(last['epoch'])}: training accuracy "
                f"{last['accuracy']:.3f} vs validation {last['val_accuracy']:.3f} "
                f"(gap {gap:.3f} > {max_gap})"
            )
        best = rows.loc[rows["val_loss"].idxmin()]
        rise = float((last["val_loss"] - best["val_loss"]) / best["val_loss"])
        if rise > max_rise and last["loss"] < best["loss"]:
            evidence.append(
                f"stage {stage!r}: validation loss rose from {best['val_loss']:.3f} "
                f"(epoch {int(best['epoch'])}) to {last['val_loss']:.3f} (epoch "
                f"{int(last['epoch'])}, +{rise:.0%} > {max_rise:.0%}) while training "
                f"loss fell from {best['loss']:.3f} to {last['loss']:.3f}"
            )
    if not compared:
        return NotJudged(
            "overfitting",
            "no epoch of any stage recorded both training and validation loss and "
            "accuracy, so training and validation cannot be compared",
        )
    if not evidence:
        return None
    return Finding(
        rule="overfitting",
        cause="The model memorises the training images: it does much better on them "
        "than on the validation images.",
        severity="high" if worst_gap > 2 * max_gap else "medium",
        suggestion="Write more augmented copies (augmentation.copies) or use the "
        "stronger randaugment preset, raise the head's dropout, unfreeze fewer blocks "
        "(a later unfreeze_from in finetune.stages) and stop earlier (a smaller "
        "early-stopping patience).",
        parameters=[
            "augmentation.copies",
            "augmentation.preset",
            "finetune.head.dropout",
            "finetune.stages",
            "finetune.early_stopping.patience",
        ],
        evidence=evidence,
    )


def underfitting(
    history: pd.DataFrame,
    finetune_stages: pd.DataFrame,
    n_classes: int,
    settings: dict[str, Any],
) -> Judgement:
    """Accuracy low on the training images and on the validation images alike.

    Both the best training and the best validation accuracy of the stage the model
    was saved from (:func:`restored_epoch`) must stay below ``min_train_accuracy``:
    training accuracy alone is measured under augmentation and dropout, averaged over
    an epoch, and can lag a model that already classifies held-out images well.
    """
    minimum = float(settings["min_train_accuracy"])
    stage, _ = restored_epoch(finetune_stages)
    rows = stage_history(history, stage)
    train = float(rows["accuracy"].max())
    validation = float(rows["val_accuracy"].max())
    if np.isnan(train):
        return NotJudged(
            "underfitting",
            f"the stage the model was saved from, {stage!r}, recorded no training "
            "accuracy",
        )
    if train >= minimum or validation >= minimum:
        return None
    chance = 1.0 / n_classes
    return Finding(
        rule="underfitting",
        cause="The model does not even fit its training images.",
        severity="high" if train < (chance + minimum) / 2 else "medium",
        suggestion="Unfreeze deeper (an earlier unfreeze_from in finetune.stages, or "
        "a lower feature_shift.plan.shift_threshold), raise the head stage's learning "
        "rate and train more epochs per stage; see random_weights if it is listed.",
        parameters=[
            "finetune.stages",
            "feature_shift.plan.shift_threshold",
            "feature_shift.plan.head.learning_rate",
            "feature_shift.plan.head.epochs",
            "feature_shift.plan.backbone.epochs",
        ],
        evidence=[
            f"the stage the model was saved from, {stage!r}, reached at most "
            f"{train:.3f} training and {validation:.3f} validation accuracy in "
            f"{len(rows)} epochs, below {minimum} (chance is {chance:.3f} for "
            f"{n_classes} classes)"
        ],
    )


def feature_distortion(
    history: pd.DataFrame,
    finetune_stages: pd.DataFrame,
    weights: str | None,
    settings: dict[str, Any],
) -> Judgement:
    """A backbone stage that validated worse than the stages before it.

    Each stage after the first is held against the lowest best validation loss of
    the stages before it: a rise (relative) above ``min_val_loss_rise`` means that
    unfreezing more of the backbone distorted the pretrained features, and
    ``finetune`` kept an earlier stage's weights. High when that stage's validation
    accuracy (at its best epoch) is more than ``high_val_accuracy_drop`` below the
    earlier stage's. With random weights there are no pretrained features to
    distort; the finding then says that the stage's own training undid what the
    stage before it had fitted, so its rate and length are the suspects. Not judged
    with fewer than two stages that have a validation loss: nothing to compare.

    Args:
        history: One row per epoch of every stage.
        finetune_stages: The stages ``finetune`` trained, one row each.
        weights: ``model.weights``.
        settings: ``min_val_loss_rise`` and ``high_val_accuracy_drop``.
    """
    require_columns(
        finetune_stages, ("stage", "best_epoch", "best_val_loss"), "finetune_stages"
    )
    min_rise = float(settings["min_val_loss_rise"])
    high_drop = float(settings["high_val_accuracy_drop"])
    stages = finetune_stages.reset_index(drop=True)
    # A stage without a validation loss (None, or NaN from CSV) has nothing to compare.
    losses = pd.to_numeric(stages["best_val_loss"], errors="coerce")
    if losses.notna().sum() < 2:
        return NotJudged(
            "feature_distortion",
            f"{int(losses.notna().sum())} of the {len(stages)} stages trained have a "
            "validation loss: a stage needs one before it to be compared with",
        )
    accuracies = [
        val_accuracy_at(history, str(row["stage"]), int(row["best_epoch"]))
        for row in stages.to_dict("records")
    ]
    evidence, distorting, worst_drop = [], [], 0.0
    for index in range(1, len(stages)):
        before = losses.iloc[:index].dropna()
        if before.empty:
            continue
        best = int(before.idxmin())
        rise = float((losses[index] - losses[best]) / losses[best])
        if not rise > min_rise:
            continue
        drop = accuracies[best] - accuracies[index]
        worst_drop = max(worst_drop, drop)
        name, earlier = str(stages.loc[index, "stage"]), str(stages.loc[best, "stage"])
        distorting.append(repr(name))
        evidence.append(
            f"stage {name!r}: best val_loss {losses[index]:.3f} (val accuracy "
            f"{accuracies[index]:.3f}), {rise:.0%} above stage {earlier!r} before it: "
            f"{losses[best]:.3f} (val accuracy {accuracies[best]:.3f})"
        )
    if not evidence:
        return None
    kept, epoch = restored_epoch(finetune_stages)
    evidence.append(f"the model keeps the weights of stage {kept!r}, epoch {epoch}")
    return Finding(
        rule="feature_distortion",
        cause="Fine-tuning the backbone made validation worse (it distorted the "
        "pretrained features)."
        if weights is not None
        else "Training the backbone made validation worse than the stage before it "
        "(with random weights there were no pretrained features to distort: the "
        "stage's updates undid what the earlier stage had fitted).",
        severity="high" if worst_drop > high_drop else "medium",
        suggestion=f"Fine-tune stage {', '.join(distorting)} more gently: lower its "
        "learning rate (in finetune.stages, or feature_shift.plan.backbone."
        "learning_rate for the plan's stages), unfreeze fewer blocks (a later "
        "unfreeze_from) or change its bn_policy (adapt re-estimates BatchNorm "
        "statistics on your images, frozen keeps ImageNet's).",
        parameters=["finetune.stages", "feature_shift.plan.backbone.learning_rate"],
        evidence=evidence,
    )


def miscalibration(metrics: dict[str, Any], settings: dict[str, Any]) -> Judgement:
    """Confidence that does not match accuracy: ECE above ``max_ece``, beyond chance.

    The ECE must also be one a calibrated model would rarely reach on this many test
    images: its ``ece_p_value`` (``metrics.calibration_p_value``) below ``alpha``.
    Silent when the test accuracy is less than ``min_skill`` of the way from chance
    to perfect (:func:`skill_over_chance`): a model that barely beats chance has no
    accuracy for its confidence to match, and calibrating it would not help;
    ``underfitting`` or ``random_weights`` says why it is poor.
    """
    ece = float(metrics["ece"])
    limit = float(settings["max_ece"])
    skill = float(skill_over_chance(metrics["accuracy"], len(metrics["classes"])))
    min_skill = float(settings["min_skill"])
    if skill < min_skill:
        return NotJudged(
            "miscalibration",
            f"test accuracy {float(metrics['accuracy']):.3f} is {skill:.2f} of the way "
            f"from chance to perfect, below min_skill {min_skill:g}: there is no "
            "accuracy for the confidence to match",
        )
    p_value = float(metrics["ece_p_value"])
    alpha = float(settings["alpha"])
    if ece <= limit or p_value >= alpha:
        return None
    confidence = float(metrics["mean_confidence"])
    accuracy = float(metrics["accuracy"])
    over = confidence > accuracy
    return Finding(
        rule="miscalibration",
        cause="The predicted probabilities cannot be taken at face value: the model "
        + ("is over-confident." if over else "is under-confident."),
        severity="medium" if over else "low",
        suggestion=(
            "Raise finetune.label_smoothing, or calibrate the probabilities on the "
            "validation split (temperature scaling) before acting on them."
            if over
            else "Train longer (more epochs per stage) and lower "
            "finetune.label_smoothing; the argmax predictions are unaffected."
        ),
        parameters=["finetune.label_smoothing"]
        + ([] if over else ["feature_shift.plan.backbone.epochs"]),
        evidence=[
            f"expected calibration error {ece:.3f} > {limit}: mean confidence "
            f"{confidence:.3f} vs accuracy {accuracy:.3f}",
            f"a calibrated model reaches that ECE on these {metrics['n_test']} test "
            f"images with probability {p_value:.3g} < alpha {alpha:g}",
        ],
    )


def domain_gap(
    bn_shift_profile: pd.DataFrame,
    stages: Sequence[dict[str, Any]],
    weights: str | None,
    settings: dict[str, Any],
    depth_limit: dict[str, Any] | None = None,
) -> Judgement:
    """Large source-to-target BN shift, and whether the stages trained unfroze it.

    The block named is where the shift starts (``plan_rules.shift_start``: the
    shallowest block at or above the threshold, the stem passed over for greyscale
    images), as the plan reads it. When the stages stop above it because the plan's
    ``depth_limit`` bound them (too few images for a deeper fine-tune), the finding
    names that cap instead of a threshold: a lower threshold would change nothing.
    Not judged with random weights: the stored BN statistics are then no source's, so
    the shift means nothing (the ``random_weights`` rule says so). Where feature_shift
    resampled the training images (``feature_shift.bootstrap.resamples``), it fires
    only when some block's ``shift_low``, the 5th percentile over the resamples, also
    reaches the threshold: one unusual image among a few dozen can lift a deep
    block's shift several-fold.

    Args:
        bn_shift_profile: One row per BN layer (``feature_shift``).
        stages: The stages ``finetune`` trained (:func:`stage_records`).
        weights: ``model.weights``.
        settings: ``max_block_shift``: a block whose shift reaches it is far from the
            source (compared as the plan compares ``shift_threshold``).
        depth_limit: ``finetune_plan``'s ``depth_limit``, if the plan had one.
    """
    if weights is None:
        return NotJudged(
            "domain_gap",
            "model.weights is null: the BatchNorm statistics the shift is measured "
            "against are no pretrained source's",
        )
    require_columns(bn_shift_profile, SHIFT_PROFILE_COLUMNS, "bn_shift_profile")
    threshold = float(settings["max_block_shift"])
    blocks = block_shift(bn_shift_profile)
    shifts = dict(zip(blocks["block"], blocks["shift"], strict=True))
    lows = dict(zip(blocks["block"], blocks["shift_low"], strict=True))
    grey = (
        float(bn_shift_profile["grayscale_share"].iloc[0])
        if "grayscale_share" in bn_shift_profile
        else 0.0
    )
    # Named where the plan reads the start, so that the two agree ...
    start = shift_start(shifts, threshold, grey)
    if start is None:
        return None
    # ... and raised only when some block's shift stays over the threshold at the
    # bootstrap's low end: a shift that other images of the same kind would put
    # under it is no evidence of a gap.
    resampled = not blocks["shift_low"].isna().all()
    certain = shift_start(lows, threshold, grey) if resampled else start
    if certain is None:
        return None
    # Stages given by layer index (``unfreeze_from: 500``) name no unit to compare.
    units = [
        stage["unfreeze_from"]
        for stage in stages
        if isinstance(stage["unfreeze_from"], str)
    ]
    deepest = min(units, key=lambda unit: GROUPS.index(group_of(unit)), default=None)
    covered = deepest is not None and GROUPS.index(group_of(deepest)) <= GROUPS.index(
        start
    )
    capped = not covered and bool(depth_limit) and deepest == depth_limit["unit"]
    per_block = ", ".join(f"{block} {shift:.3g}" for block, shift in shifts.items())
    evidence = [
        f"BN shift per block: {per_block}",
        f"the shift starts at {start} ({shifts[start]:.3g}, at or above {threshold:g})",
        "stages trained: " + ("; ".join(describe_stages(stages)) or "none"),
    ]
    if resampled:
        evidence.append(
            f"from {certain} on it stays at or above {threshold:g} at the 5th "
            f"percentile of the bootstrap resamples of the training images "
            f"({certain} {lows[certain]:.3g})"
        )
    if grey >= GRAYSCALE_SHARE and "stem" in shifts:
        evidence.append(
            f"{grey:.0%} of the training images are greyscale: the stem's shift "
            f"({shifts['stem']:.3g}) is their missing colour, not counted"
        )
    target = FIRST_UNIT[start]
    far = f"Your images are far from the source weights from {start} on"
    if covered:
        return Finding(
            rule="domain_gap",
            cause=f"{far}; the stages trained fine-tune the shifted blocks.",
            severity="medium",
            suggestion="The depth is right; if accuracy is still poor, re-estimate "
            "BatchNorm statistics (bn_policy: adapt in finetune.stages, or a lower "
            "feature_shift.plan.adapt_bn_threshold) and add training images.",
            parameters=["finetune.stages", "feature_shift.plan.adapt_bn_threshold"],
            evidence=evidence,
        )
    if capped:
        evidence.append(
            f"the plan stopped at {depth_limit['unit']} ({depth_limit['setting']}): "
            f"{depth_limit['reason']}"
        )
        return Finding(
            rule="domain_gap",
            cause=f"{far}, but the plan stopped at {depth_limit['unit']}: too few "
            f"images to fine-tune down to {start} without overfitting.",
            severity="medium",
            suggestion="Add training images (at least feature_shift.plan."
            "scarce_images_per_class in the smallest class) so that the plan reaches "
            f"{target}, or set {depth_limit['setting']}: {target} to accept the risk "
            "of overfitting; a pretrained source nearer your images shifts less "
            "(add it to model.sources: feature_shift ranks the candidates).",
            parameters=[
                "feature_shift.plan.scarce_images_per_class",
                str(depth_limit["setting"]),
                "model.sources",
            ],
            evidence=evidence,
        )
    return Finding(
        rule="domain_gap",
        cause=f"{far}, but no stage unfroze {start}.",
        severity="high",
        suggestion=f"Fine-tune from {target}: a stage with unfreeze_from: {target} and "
        "bn_policy: adapt in finetune.stages, or a feature_shift.plan."
        f"shift_threshold of at most {threshold:g} so that the plan reaches it.",
        parameters=["finetune.stages", "feature_shift.plan.shift_threshold"],
        evidence=evidence,
    )


def split_shift(table: pd.DataFrame, settings: dict[str, Any]) -> Judgement:
    """Validation or test features that differ from training features.

    Needs ``pair`` (e.g. ``train-vs-test``) and ``p_value`` (NaN: not compared);
    quotes ``mmd2``, ``frechet`` and the image counts when present. Not judged when
    no pair was compared.
    """
    require_columns(table, ("pair", "p_value"), "split_shift")
    if table["p_value"].isna().all():
        return NotJudged(
            "split_shift",
            "feature_shift compared no pair of splits (split_shift has no p-value): "
            "a split has too few images for the two-sample test",
        )
    alpha = float(settings["alpha"])
    differing = table[table["p_value"] < alpha]
    if differing.empty:
        return None
    evidence = []
    for row in differing.to_dict("records"):
        figures = [f"p = {row['p_value']:.3g} < {alpha}"]
        figures += [
            f"{name} = {row[name]:.4g}" for name in ("mmd2", "frechet") if name in row
        ]
        if "n_compared" in row and "n_reference" in row:
            figures.append(f"{row['n_compared']} vs {row['n_reference']} images")
        evidence.append(f"{row['pair']}: {', '.join(figures)}")
    test_differs = differing["pair"].astype(str).str.contains("test").any()
    return Finding(
        rule="split_shift",
        cause="The "
        + ("test" if test_differs else "validation")
        + " images look different from the training images, so validation accuracy "
        "does not predict test accuracy.",
        severity="high" if test_differs else "medium",
        suggestion="Draw the splits from the same conditions and add training images "
        "taken under the test conditions; if images of one subject or source must "
        "stay together, say so with ingestion.duplicates.group_key_pattern.",
        parameters=["ingestion.duplicates.group_key_pattern"],
        evidence=evidence,
    )


def validation_test_gap(
    history: pd.DataFrame,
    finetune_stages: pd.DataFrame,
    metrics: dict[str, Any],
    settings: dict[str, Any],
) -> Judgement:
    """Test accuracy far below the validation accuracy of the saved weights.

    The validation accuracy is the one at the epoch whose weights the model has
    (:func:`restored_epoch`), not a stage's best: an epoch with a higher validation
    accuracy but a worse validation loss was not kept, and the test never saw it.
    Fires when it exceeds the test accuracy by more than ``max_gap`` and lies above
    the test accuracy's 95% interval, so that the gap is not test-set noise.
    """
    stage, epoch = restored_epoch(finetune_stages)
    validation = val_accuracy_at(history, stage, epoch)
    test = float(metrics["accuracy"])
    low, high = metrics["accuracy_ci95"]
    limit = float(settings["max_gap"])
    if np.isnan(validation):
        return NotJudged(
            "validation_test_gap",
            f"the epoch the model was saved from (stage {stage!r}, epoch {epoch}) "
            "recorded no validation accuracy",
        )
    if validation - test <= limit or validation <= high:
        return None
    return Finding(
        rule="validation_test_gap",
        cause="The test images are classified much worse than the validation images "
        "the training was tuned on.",
        severity="high",
        suggestion="Look at the split_shift and leakage findings: a test split from "
        "other conditions, or validation images that resemble training images, cause "
        "this; otherwise the validation split is too small to select on.",
        parameters=["ingestion.split.val"],
        evidence=[
            f"validation accuracy of the saved weights (stage {stage!r}, epoch "
            f"{epoch}): {validation:.3f}; test accuracy {test:.3f} (95% interval "
            f"[{low:.3f}, {high:.3f}]), "
            f"{validation - test:.3f} lower (> {limit})"
        ],
    )


def leakage(image_manifest: pd.DataFrame, settings: dict[str, Any]) -> Finding | None:
    """Test or validation images that are exact or near copies of training images.

    Exact copies share a SHA-256; near copies have perceptual hashes at most
    ``max_hamming`` bits apart. Checked independently of ingestion's own grouping,
    so it also catches a run whose ingestion looked for exact duplicates only.
    """
    require_columns(
        image_manifest, ("path", "split", "sha256", "phash"), "image_manifest"
    )
    max_hamming = int(settings["max_hamming"])
    train = image_manifest[image_manifest["split"] == "train"]
    train_hashes = _hash_array(train["phash"])
    train_sha = set(train["sha256"])
    evidence = []
    for split in ("val", "test"):
        held_out = image_manifest[image_manifest["split"] == split]
        is_exact = held_out["sha256"].isin(train_sha).to_numpy()
        near = (
            _nearest_bits(_hash_array(held_out["phash"]), train_hashes) <= max_hamming
        )
        for kind, copies in (
            ("exact copies", held_out[is_exact]),
            (
                f"near copies (pHash within {max_hamming} bits)",
                held_out[near & ~is_exact],
            ),
        ):
            if len(copies):
                evidence.append(
                    f"{len(copies)} of {len(held_out)} {split} images are {kind} of "
                    f"training images (e.g. {copies['path'].iloc[0]})"
                )
    if not evidence:
        return None
    return Finding(
        rule="leakage",
        cause="Copies of training images sit in the held-out splits, so validation "
        "and test accuracy are inflated.",
        severity="high",
        suggestion=f"Set ingestion.duplicates.max_hamming to at least {max_hamming} "
        "and rerun from ingestion, so that duplicates share a split.",
        parameters=["ingestion.duplicates.max_hamming"],
        evidence=evidence,
    )


def label_conflicts(
    dataset_summary: dict[str, Any], duplicate_report: pd.DataFrame
) -> Finding | None:
    """Duplicate groups carrying different labels, and whether any remain in use."""
    groups = int(dataset_summary.get("label_conflict_groups", 0))
    if groups == 0:
        return None
    kept = int(dataset_summary.get("label_conflict_images_kept", 0))
    evidence = [
        f"{groups} duplicate groups carry different labels; {kept} of their images "
        "are still in the manifest"
    ]
    if "label_conflict" in duplicate_report.columns:
        conflicts = duplicate_report[duplicate_report["label_conflict"].astype(bool)]
        evidence += [
            f"group {row['group']}: labels {row['labels']} ({row['paths']})"
            for row in conflicts.head(3).to_dict("records")
        ]
    return Finding(
        rule="label_conflicts",
        cause="The same picture is labelled differently in different folders"
        + (
            ", and those images are still used for training and testing."
            if kept
            else "; those images were left out."
        ),
        severity="high" if kept else "low",
        suggestion=(
            "Fix the labels of the listed images, or set "
            "ingestion.duplicates.exclude_label_conflicts: true."
            if kept
            else "Relabel the listed images (rejected_images.csv) to use them again."
        ),
        parameters=["ingestion.duplicates.exclude_label_conflicts"] if kept else [],
        evidence=evidence,
    )


def label_noise(
    estimate: dict[str, Any], n_classes: int, settings: dict[str, Any]
) -> Judgement:
    """Training labels that confident learning estimates to be wrong.

    A class is noisy when the share of its images filed under another label
    (``noise_rate``) or the share of the images labelled with it that belong to
    another class (``mislabelled_share``) reaches ``max_class_noise_rate``, with at
    least ``min_flagged`` images flagged in all. Not judged when the cross-validated
    probe's out-of-sample accuracy is less than ``min_skill`` of the way from chance
    to perfect: its mistakes would then pass for wrong labels.

    Args:
        estimate: ``label_noise_estimate`` (``find_label_issues``).
        n_classes: Number of classes.
        settings: ``max_class_noise_rate``, ``min_flagged``, ``min_skill``.
    """
    if not estimate.get("estimated"):
        return NotJudged(
            "label_noise",
            str(estimate.get("statement", "the label noise was not estimated")),
        )
    skill = float(skill_over_chance(estimate["out_of_sample_accuracy"], n_classes))
    min_skill = float(settings["min_skill"])
    if skill < min_skill:
        return NotJudged(
            "label_noise",
            "the cross-validated probe's out-of-sample accuracy "
            f"{estimate['out_of_sample_accuracy']:.3f} is {skill:.2f} of the way from "
            f"chance to perfect, below min_skill {min_skill:g}: its mistakes would "
            "pass for wrong labels",
        )
    limit = float(settings["max_class_noise_rate"])
    noisy = [
        row
        for row in estimate["classes"]
        if max(row["noise_rate"], row["mislabelled_share"]) >= limit
    ]
    if not noisy or estimate["n_flagged"] < int(settings["min_flagged"]):
        return None
    worst = max(max(row["noise_rate"], row["mislabelled_share"]) for row in noisy)
    evidence = [
        f"estimated label noise {estimate['estimated_noise_rate']:.1%} of "
        f"{estimate['n_images']} training images; {estimate['n_flagged']} flagged "
        "in label_issues (out-of-sample accuracy of the cross-validated probe "
        f"{estimate['out_of_sample_accuracy']:.3f})"
    ]
    evidence += [
        f"class {row['class']!r}: {row['noise_rate']:.1%} of its images carry "
        f"another label, {row['mislabelled_share']:.1%} of the images labelled "
        f"{row['class']!r} belong to another class ({row['flagged']} flagged under this label; "
        f"limit {limit:.1%})"
        for row in noisy
    ]
    return Finding(
        rule="label_noise",
        cause="Some training images probably carry the wrong label, which caps "
        "what the model can learn and blurs the classes.",
        severity="high" if worst >= 2 * limit else "medium",
        suggestion="Review label_issues.csv and label_issues.png, the most suspect "
        "first: fix the labels in your image folder, or copy the rows you agree with "
        "to data/01_raw/label_exclusions.csv and set "
        "ingestion.apply_label_exclusions: true to train without them.",
        parameters=["ingestion.apply_label_exclusions"],
        evidence=evidence,
    )


def judged_classes(
    classification_report: pd.DataFrame, settings: dict[str, Any]
) -> pd.DataFrame:
    """The rows of the classes with at least ``min_test_images`` test images."""
    minimum = max(1, int(settings["min_test_images"]))
    return classification_report[classification_report["support"] >= minimum]


def accuracy_gap(
    metrics: dict[str, Any], classes: pd.DataFrame, settings: dict[str, Any]
) -> tuple[float, float, str]:
    """Accuracy and balanced accuracy over the classes judged, and how they were got.

    When every class with test images is judged (:func:`judged_classes`), they are
    the test metrics. Otherwise the classes with fewer test images count as one
    class, pooled, when together they have ``min_test_images``, and are left out
    when they have not; both figures are then recomputed from the per-class recalls.
    So one missed test image of a class does not pull the balanced accuracy down by
    a whole class's share, while rare classes that the model misses together still
    show.
    """
    tested = classes[classes["support"] > 0]
    judged = judged_classes(tested, settings)
    if len(judged) == len(tested):
        return float(metrics["accuracy"]), float(metrics["balanced_accuracy"]), ""
    minimum = int(settings["min_test_images"])
    few = tested[tested["support"] < minimum]
    few_support = few["support"].to_numpy(dtype=np.float64)
    support = judged["support"].to_numpy(dtype=np.float64)
    recall = judged["recall"].to_numpy(dtype=np.float64)
    pooled = few_support.sum() >= minimum
    if pooled:
        few_recall = few["recall"].to_numpy(dtype=np.float64)
        support = np.append(support, few_support.sum())
        recall = np.append(recall, (few_recall * few_support).sum() / support[-1])
    if not len(support):
        return math.nan, math.nan, ""
    names = ", ".join(repr(name) for name in few["class"])
    return (
        float((recall * support).sum() / support.sum()),
        float(recall.mean()),
        f" over the {len(judged)} classes with at least {minimum} test images"
        + (
            f" and, as one, the {len(few)} with fewer ({names}: "
            f"{int(few_support.sum())} test images)"
            if pooled
            else f" ({names}, with {int(few_support.sum())} test images in all, "
            "left out)"
        ),
    )


def weak_classes(
    classification_report: pd.DataFrame, n_classes: int, settings: dict[str, Any]
) -> pd.DataFrame:
    """The classes recognised far worse than the others, beyond test-set noise.

    Each class with at least ``min_test_images`` test images is held against the
    mean recall of the other such classes, not against a fixed bar, so a model that
    is poor on every class has no weak class; a class with fewer is not judged (one
    test image, missed, is a recall of 0). Both recalls are measured from chance
    (:func:`skill_over_chance`); the class is weak when its skill lies more than
    ``min_skill_gap`` below theirs and its recall more than ``noise_z`` binomial
    standard errors (for its support, at the others' recall) below theirs.

    Returns:
        The weak classes' rows of ``classification_report``, with ``others`` (the
        mean recall of the other classes), ``skill_gap`` and ``noise`` (``noise_z``
        standard errors) added.
    """
    tested = judged_classes(classification_report, settings)
    if len(tested) < 2:
        return tested.head(0).assign(others=[], skill_gap=[], noise=[])
    recall = tested["recall"].to_numpy(dtype=np.float64)
    others = (recall.sum() - recall) / (len(recall) - 1)
    support = tested["support"].to_numpy(dtype=np.float64)
    scored = tested.assign(
        others=others,
        skill_gap=skill_over_chance(others, n_classes)
        - skill_over_chance(recall, n_classes),
        noise=float(settings["noise_z"]) * np.sqrt(others * (1 - others) / support),
    )
    weak = (scored["skill_gap"] > float(settings["min_skill_gap"])) & (
        scored["others"] - scored["recall"] > scored["noise"]
    )
    return scored[weak]


def describe_rare_class(
    name: str, classification_report: pd.DataFrame, train_counts: dict[str, int]
) -> str:
    """A rare class's training images and test recall, as evidence quotes them."""
    tested = classification_report[
        (classification_report["class"] == name)
        & (classification_report["support"] > 0)
    ]
    if tested.empty:
        return f"{name!r} ({train_counts[name]} training images, no test images)"
    row = tested.iloc[0]
    return (
        f"{name!r} ({train_counts[name]} training images, test recall "
        f"{row['recall']:.3f} on {int(row['support'])})"
    )


def untested_rare_classes(
    classes: pd.DataFrame, train_counts: dict[str, int], settings: dict[str, Any]
) -> str | None:
    """Evidence on the rare classes that have too few test images to be judged.

    Rare: fewer training images than the largest class's over
    ``max_train_imbalance_ratio``. When such classes have test images, each fewer
    than ``min_test_images``, and their recall pooled over those images is below the
    mean recall of the classes judged (:func:`judged_classes`), the imbalance may
    cost them accuracy that the test split is too small to show.

    Returns:
        The evidence line, or ``None``.
    """
    limit = float(settings["max_train_imbalance_ratio"])
    largest = max(train_counts.values())
    rare = [name for name, count in train_counts.items() if count * limit < largest]
    minimum = int(settings["min_test_images"])
    tested = classes[classes["support"] > 0]
    few = tested[tested["class"].isin(rare) & (tested["support"] < minimum)]
    judged = judged_classes(tested, settings)
    if few.empty or judged.empty:
        return None
    support = few["support"].to_numpy(dtype=np.float64)
    pooled = float((few["recall"].to_numpy(dtype=np.float64) * support).sum())
    pooled /= support.sum()
    others = float(judged["recall"].mean())
    if pooled >= others:
        return None
    return (
        f"rare classes with fewer than {minimum} test images each, too few to judge "
        f"one by one: {', '.join(repr(name) for name in few['class'])}, recall "
        f"{pooled:.3f} pooled over their {int(support.sum())} test images vs "
        f"{others:.3f} on average for the {len(judged)} classes judged"
    )


def class_imbalance(
    metrics: dict[str, Any],
    classification_report: pd.DataFrame,
    train_counts: dict[str, int],
    settings: dict[str, Any],
) -> Judgement:
    """Balanced accuracy well below accuracy, or a class far weaker than the others.

    Both accuracies are over the classes judged (:func:`accuracy_gap`); weak classes
    are those of :func:`weak_classes`. Rare classes with too few test images to be
    judged, recognised worse than the others on the few they have
    (:func:`untested_rare_classes`), make a low finding on their own: the imbalance
    is measured on the training images, its cost cannot be on the test images. The training images per class
    decide what the finding says: an imbalance, with class weights as advice, when
    the training set is imbalanced (largest over smallest class above
    ``max_train_imbalance_ratio``); classes that are hard to tell apart, with more
    varied images of them as advice, when it is not. An imbalanced finding names
    every rare class (fewer training images than the largest class's over
    ``max_train_imbalance_ratio``) with its test recall: a class of a dozen images has
    one or two test images, too few for its own recall to single it out, yet the
    imbalance concerns it as much as the smallest. Not judged when fewer than two
    classes have ``min_test_images`` test images: there is no class to compare with.
    """
    max_gap = float(settings["max_balanced_accuracy_gap"])
    min_skill_gap = float(settings["min_skill_gap"])
    classes = classification_report[
        classification_report["class"].isin(list(train_counts))
    ]
    judged = judged_classes(classes, settings)
    if len(judged) < 2:
        return NotJudged(
            "class_imbalance",
            f"{len(judged)} of the {len(classes)} classes have at least "
            f"{int(settings['min_test_images'])} test images (min_test_images): "
            "too few to compare a class with the others",
        )
    accuracy, balanced, over = accuracy_gap(metrics, classes, settings)
    gap = accuracy - balanced
    weak = weak_classes(classes, len(train_counts), settings)
    evidence = []
    if gap > max_gap:
        evidence.append(
            f"accuracy {accuracy:.3f} vs balanced accuracy {balanced:.3f}{over} "
            f"(gap {gap:.3f} > {max_gap})"
        )
    evidence += [
        f"class {row['class']!r}: recall {row['recall']:.3f} vs {row['others']:.3f} "
        f"on average for the other classes (chance {1 / len(train_counts):.3f}), "
        f"{row['skill_gap']:.2f} of the way from chance to perfect below them "
        f"(> {min_skill_gap}) and more than test noise ({row['noise']:.3f} for "
        f"{int(row['support'])} test images); {train_counts[row['class']]} training "
        "images"
        for row in weak.to_dict("records")
    ]
    measured = bool(evidence)
    untested = untested_rare_classes(classes, train_counts, settings)
    if untested is not None:
        evidence.append(untested)
    if not evidence:
        return None
    smallest = min(train_counts, key=train_counts.__getitem__)
    largest = max(train_counts, key=train_counts.__getitem__)
    ratio = train_counts[largest] / max(1, train_counts[smallest])
    limit = float(settings["max_train_imbalance_ratio"])
    imbalanced = ratio > limit
    evidence.append(
        f"training images per class: from {train_counts[smallest]} ({smallest!r}) "
        f"to {train_counts[largest]} ({largest!r}), {ratio:.1f}x "
        + ("above" if imbalanced else "within")
        + f" {limit}x"
    )
    # Classes whose largest-over-them ratio alone crosses the limit.
    rare = sorted(
        name
        for name, count in train_counts.items()
        if count * limit < train_counts[largest]
    )
    if rare:
        evidence.append(
            f"classes with under 1/{limit:g} of {largest!r}'s training images: "
            + ", ".join(
                describe_rare_class(name, classes, train_counts) for name in rare
            )
        )
    names = ", ".join(repr(name) for name in weak["class"]) or "the weaker classes"
    return Finding(
        rule="class_imbalance",
        cause=(
            "Some classes are recognised far worse than others"
            + (
                ", and the training set is imbalanced."
                if imbalanced
                else "; the training set is balanced, so they are hard to tell apart."
            )
            if measured
            else "Rare classes may be recognised worse: the training set is "
            "imbalanced, and they have too few test images to show what that costs."
        ),
        severity="high" if len(weak) else "medium" if measured else "low",
        suggestion=(
            "Weight the loss by class (finetune.class_weights: true) or give rare "
            "classes more augmented copies (augmentation.balance.enabled: true), and "
            "add training images of the rare classes ("
            + ", ".join(repr(name) for name in rare)
            + ")."
            if imbalanced
            else f"See in the confusion matrix which classes {names} are taken for; "
            "add more varied training images of them and write more augmented copies."
        ),
        parameters=(
            ["finetune.class_weights", "augmentation.balance.enabled"]
            if imbalanced
            else ["augmentation.copies"]
        ),
        evidence=evidence,
    )


def shortcut(
    occlusion_flips: pd.DataFrame,
    classification_report: pd.DataFrame,
    heatmaps: str,
    settings: dict[str, Any],
) -> Judgement:
    """A class whose predictions hang on the image's border rather than its centre.

    From ``occlusion_flips`` (``attribution.flip_table``): a class fires when masking
    the border band changes at least ``min_border_flip_rate`` of its test
    predictions and at least ``min_ratio`` times as many as masking a centre square
    of the same area, and the difference is beyond noise: of the images that only one
    mask changes, the border's count exceeds the centre's by more than ``noise_z``
    standard errors (a sign test on the pairs, ``(b - c) / sqrt(b + c)``). The
    border must also do more than the same square at random places: its empirical
    p-value against them (``border_p_value``, the share of places changing at least
    as many predictions, the border counted in) is at most ``max_p_value``. The
    centre alone is one place, where the object usually is; the random places say
    what hiding that many pixels does anywhere on these images. A class the model
    does not recognise (recall less than ``min_skill`` of the way from chance to
    perfect, :func:`skill_over_chance`) is not judged: its predictions change with
    any mask, and a poor model is not a shortcut; when no class is judged, neither
    is the rule.

    Args:
        occlusion_flips: Per class: ``n``, border and centre flips and rates, the
            flips only one mask causes, the masks' areas, and the random squares'
            flip rates (least, median, most) and the border's p-value.
        classification_report: Per-class recall (``class``, ``recall``).
        heatmaps: The Grad-CAM plot's file, named as evidence.
        settings: ``min_border_flip_rate``, ``min_ratio``, ``noise_z``,
            ``min_skill``, ``max_p_value``.
    """
    require_columns(
        occlusion_flips,
        ("class", "n", "border_flips", "centre_flips", "border_flip_rate")
        + ("centre_flip_rate", "border_only_flips", "centre_only_flips")
        + ("border_px", "centre_px", "random_patches", "random_flip_rate_min")
        + ("random_flip_rate_median", "random_flip_rate_max", "border_p_value"),
        "occlusion_flips",
    )
    recall = dict(
        zip(
            classification_report["class"], classification_report["recall"], strict=True
        )
    )
    n_classes = len(occlusion_flips)
    min_rate = float(settings["min_border_flip_rate"])
    min_ratio = float(settings["min_ratio"])
    noise_z = float(settings["noise_z"])
    min_skill = float(settings["min_skill"])
    max_p = float(settings["max_p_value"])
    evidence, names, worst, judged = [], [], 0.0, 0
    for row in occlusion_flips.to_dict("records"):
        border, centre = row["border_flip_rate"], row["centre_flip_rate"]
        only_border, only_centre = row["border_only_flips"], row["centre_only_flips"]
        pairs = only_border + only_centre
        z = (only_border - only_centre) / math.sqrt(pairs) if pairs else 0.0
        skill = float(skill_over_chance(recall.get(row["class"], 0.0), n_classes))
        judged += bool(row["n"] > 0 and skill >= min_skill)
        if not (
            row["n"] > 0
            and border >= min_rate
            and border >= min_ratio * centre
            and z > noise_z
            and row["border_p_value"] <= max_p
            and skill >= min_skill
        ):
            continue
        worst = max(worst, border)
        names.append(repr(row["class"]))
        patches = int(row["random_patches"])
        # The p-value's count back: (1 + as_many) / (1 + K).
        as_many = round(row["border_p_value"] * (1 + patches)) - 1
        low, high = row["random_flip_rate_min"], row["random_flip_rate_max"]
        spread = f"{low:.0%}" if low == high else f"{low:.0%}–{high:.0%}"
        evidence.append(
            f"class {row['class']!r}: masking the border band ({row['border_px']} "
            f"px) changes {row['border_flips']} of its {row['n']} test predictions "
            f"({border:.0%}, >= {min_rate:.0%}); squares of the same area "
            f"({row['centre_px']} px) at {patches} random places change "
            f"{spread} (median {row['random_flip_rate_median']:.0%}), as many as the "
            f"border or more at {as_many} of them (p = {row['border_p_value']:.2f} "
            f"<= {max_p:g} with K={patches}); the square at the centre "
            f"{row['centre_flips']} ({centre:.0%}; the border at least "
            f"{min_ratio:g}x as many); {only_border} change with the border alone vs "
            f"{only_centre} with the centre alone ({z:.1f} standard errors > "
            f"{noise_z}); recall {recall.get(row['class'], 0.0):.3f}"
        )
    if not judged:
        return NotJudged(
            "shortcut",
            f"no class of the {n_classes} has test images and a recall at least "
            f"{min_skill:g} of the way from chance to perfect (min_skill): a model "
            "that does not recognise a class changes its predictions with any mask",
        )
    if not evidence:
        return None
    evidence.append(
        f"Grad-CAM heatmaps of the surest correct images of each class and the "
        f"surest mistakes: {heatmaps}"
    )
    return Finding(
        rule="shortcut",
        cause=f"The model recognises {', '.join(names)} by something in the image's "
        "border (a mark, frame or background that goes with the class) rather than "
        "the object: accuracy will not hold on images without it.",
        severity="high" if worst >= 2 * min_rate else "medium",
        suggestion="Look at the heatmaps and at the class's images for what only "
        "they have near the edges (a watermark, a frame, a background colour); "
        "crop or remove it, or add images of the other classes that have it too, "
        "and retrain.",
        parameters=[],
        evidence=evidence,
    )


def unstable_training(
    history: pd.DataFrame,
    learning_rate_problems: Sequence[str],
    settings: dict[str, Any],
) -> Finding | None:
    """NaN or infinite losses, loss spikes within a stage, or flagged learning rates.

    A spike is an epoch whose training or validation loss exceeds ``max_loss_jump``
    times the previous epoch's in the same stage.

    Args:
        history: One row per epoch of every stage.
        learning_rate_problems: What the plan rules
            (``plan_rules.learning_rate_problems``) say of the stages trained.
        settings: ``max_loss_jump``.
    """
    jump = float(settings["max_loss_jump"])
    evidence, severity = [], "medium"
    for stage, rows in stages_of(history):
        for column in ("loss", "val_loss"):
            values = rows[column].to_numpy(dtype=np.float64)
            epochs = rows["epoch"].to_numpy()
            broken = ~np.isfinite(values)
            if broken.any():
                severity = "high"
                evidence.append(
                    f"stage {stage!r}: {column} is NaN or infinite at epoch "
                    f"{int(epochs[broken.argmax()])}"
                )
            ratios = values[1:] / values[:-1]
            for index in np.flatnonzero(np.isfinite(ratios) & (ratios > jump)):
                evidence.append(
                    f"stage {stage!r}: {column} jumped from {values[index]:.3g} to "
                    f"{values[index + 1]:.3g} at epoch {int(epochs[index + 1])} "
                    f"({ratios[index]:.1f}x > {jump}x)"
                )
    evidence += list(learning_rate_problems)
    if not evidence:
        return None
    return Finding(
        rule="unstable_training",
        cause="Training was unstable: the loss diverged or spiked, or a learning rate "
        "is too high for the layers it trains.",
        severity=severity,
        suggestion="Lower the learning rate of the stages named (in finetune.stages, "
        "or the plan's feature_shift.plan.head / backbone learning_rate) and warm up "
        "for an epoch (finetune.warmup_epochs: 1).",
        parameters=[
            "finetune.stages",
            "feature_shift.plan.head.learning_rate",
            "feature_shift.plan.backbone.learning_rate",
            "finetune.warmup_epochs",
        ],
        evidence=evidence,
    )


def random_weights(weights: str | None) -> Finding | None:
    """The backbone started from random weights: no transfer learning took place."""
    if weights is not None:
        return None
    return Finding(
        rule="random_weights",
        cause="The backbone started from random weights, so this run is not transfer "
        "learning and its ImageNet shift figures are meaningless.",
        severity="high",
        suggestion="Set model.weights: imagenet, or the path of the IRv2 notop "
        "weights file on machines without internet; or list pretrained candidates "
        "(ImageNet, a domain model, your own checkpoint) in model.sources for "
        "feature_shift to choose from.",
        parameters=["model.weights", "model.sources"],
        evidence=["the plan's source has no weights (null)"],
    )


def small_test_set(metrics: dict[str, Any], settings: dict[str, Any]) -> Finding | None:
    """A test set too small to measure accuracy to within ``max_ci_width``."""
    low, high = metrics["accuracy_ci95"]
    width = high - low
    limit = float(settings["max_ci_width"])
    if width <= limit:
        return None
    return Finding(
        rule="small_test_set",
        cause="The test set is too small to tell accuracies apart: differences smaller "
        "than the interval are noise.",
        severity="low",
        suggestion="Add test images, or raise the test fraction of the split.",
        parameters=["ingestion.split.test"],
        evidence=[
            f"{metrics['n_test']} test images: accuracy {metrics['accuracy']:.3f}, 95% "
            f"interval [{low:.3f}, {high:.3f}] (width {width:.3f} > {limit})"
        ],
    )


def in_priority(results: Sequence[Judgement]) -> list[dict[str, Any]]:
    """The findings that fired, as JSON-able dicts, in :data:`PRIORITY` order.

    Peers (rules in one tuple of it) are ordered most severe first.
    """
    fired = [result for result in results if isinstance(result, Finding)]
    fired.sort(
        key=lambda finding: (RANK[finding.rule], SEVERITIES.index(finding.severity))
    )
    return [finding.as_dict() for finding in fired]


def not_judged(results: Sequence[Judgement]) -> list[dict[str, str]]:
    """The rules that could not judge this run, with why, in :data:`PRIORITY` order."""
    skipped = [result for result in results if isinstance(result, NotJudged)]
    skipped.sort(key=lambda result: RANK[result.rule])
    return [result.as_dict() for result in skipped]


def _hash_array(phashes: pd.Series) -> np.ndarray:
    """64-bit perceptual hashes (hex strings) as unsigned integers."""
    return np.array([int(value, 16) for value in phashes], dtype=np.uint64)


def _nearest_bits(hashes: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each hash, the fewest bits in which it differs from any reference hash."""
    nearest = np.full(len(hashes), 65, dtype=np.int64)
    if not len(hashes) or not len(reference):
        return nearest
    rows = max(1, LEAKAGE_CHUNK_PAIRS // len(reference))
    for start in range(0, len(hashes), rows):
        block = hashes[start : start + rows]
        bits = np.bitwise_count(block[:, None] ^ reference[None, :])
        nearest[start : start + rows] = bits.min(axis=1)
    return nearest
