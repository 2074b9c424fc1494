"""Nodes of the `feature_shift` pipeline: measure the domain gap and plan fine-tuning."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits

from irv2_pipeline import backbone as irv2
from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import class_names, image_dataset
from irv2_pipeline.plan_rules import (
    PlanError,
    blocks_reaching,
    learning_rate_problems,
    shift_start,
    validate_stages,
)
from irv2_pipeline.probe import fit_probe
from irv2_pipeline.sources import Source, candidate_sources, forced_source

from . import ranking, shift, twosample
from .logme import logme
from .plan import Measurements, plan_stages
from .plots import shift_by_depth_plot

if TYPE_CHECKING:
    from . import moments

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# NumPy's BLAS threads and TensorFlow's threads share the cores of this process: on a
# busy 2-core machine an SVD of 156 x 1536 features took 2.6 s with 2 BLAS threads
# after a Keras predict and 0.07 s with one. The linear algebra here is small enough
# for one thread on any machine.
BLAS_THREADS = 1
RANDOM_WEIGHTS_WARNING = (
    "model.weights is null: the backbone has random weights, so its BN statistics are "
    "not ImageNet's and the shift figures are meaningless; the plan is "
    "feature_shift.default_stages."
)
ADAPT_WITH_RANDOM_WEIGHTS = (
    "Stages with bn_policy adapt re-estimate BatchNorm statistics on the training "
    "images first: random weights store the initializer's statistics (mean 0, "
    "variance 1), with which frozen BatchNorm normalizes nothing and the pooled "
    "features shrink towards a constant."
)


SHIFT_DEFINITION = (
    "per BN layer, the median over channels of (KL(yours || source) + KL(source || "
    "yours)) / 2, per-channel Gaussians of the layer's input; per block, the mean over "
    "its layers. 1.0: half the channels or more have their mean moved by 1.4 standard "
    "deviations (or their variance 5.8x larger or smaller)"
)


class FeatureShiftError(ValueError):
    """Inputs or parameters the pipeline cannot use; the message names them."""


@dataclass(frozen=True)
class SplitMeasurements:
    """What the backbone pass measured on one split's sampled images."""

    labels: np.ndarray
    features: dict[str, np.ndarray]  # depth -> (images, channels) pooled features
    bn_means: dict[str, np.ndarray]
    bn_variances: dict[str, np.ndarray]
    grayscale_share: float = 0.0  # of the split's images, those with equal channels
    # Per BN layer, (resamples, channels): the bootstrap's, for the training split.
    bn_resampled_means: dict[str, np.ndarray] = field(default_factory=dict)
    bn_resampled_variances: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class BackboneMeasurements:
    """The backbone pass over every split, with the BN layers it measured."""

    weights_pretrained: bool
    batch_norms: tuple[moments.BatchNormLayer, ...]
    depths: tuple[str, ...]
    depth_layers: tuple[str, ...]
    splits: dict[str, SplitMeasurements]


def sample_images(
    image_manifest: pd.DataFrame, model: dict[str, Any], feature_shift: dict[str, Any]
) -> pd.DataFrame:
    """Draws up to ``max_images_per_split`` images of each split, with ``model.seed``.

    Args:
        image_manifest: ``path``, ``label`` and ``split`` of every image.
        model: The shared ``model`` parameters (``seed``).
        feature_shift: The ``feature_shift`` parameters.

    Returns:
        ``path``, ``label``, ``label_index`` (index in the sorted labels) and
        ``split`` of the sampled images, in manifest order within each split.

    Raises:
        FeatureShiftError: Missing columns or no training images.
    """
    missing = {"path", "label", "split"} - set(image_manifest.columns)
    if missing:
        raise FeatureShiftError(
            f"image_manifest lacks the columns {sorted(missing)}; rerun `kedro run "
            "--pipeline ingestion`"
        )
    cap = feature_shift.get("max_images_per_split")
    if cap is not None and (
        isinstance(cap, bool) or not isinstance(cap, int) or cap < 2
    ):
        raise FeatureShiftError(
            f"feature_shift.max_images_per_split = {cap!r}: use a whole number of at "
            "least 2, or null for every image"
        )
    rng = np.random.default_rng(int(model["seed"]))
    index_of = {label: i for i, label in enumerate(class_names(image_manifest))}
    parts = []
    for split in SPLITS:
        rows = image_manifest[image_manifest["split"] == split]
        if cap is not None and len(rows) > int(cap):
            chosen = np.sort(rng.choice(len(rows), size=int(cap), replace=False))
            rows = rows.iloc[chosen]
        parts.append(rows[["path", "label", "split"]])
    sample = pd.concat(parts, ignore_index=True)
    if not (sample["split"] == "train").any():
        raise FeatureShiftError(
            "image_manifest has no training images (split == 'train')"
        )
    sample.insert(2, "label_index", sample["label"].map(index_of))
    counts = sample["split"].value_counts().reindex(list(SPLITS), fill_value=0)
    logger.info("Feature shift sample: %s", counts.to_dict())
    return sample


def measure_sources(
    *,
    feature_shift_sample: pd.DataFrame,
    raw_images: ImageFolder,
    model: dict[str, Any],
    images: dict[str, Any],
    feature_shift: dict[str, Any],
    finetune: dict[str, Any],
) -> dict[str, BackboneMeasurements]:
    """Measures every candidate source (``model.sources``, or ``model.weights``).

    Args:
        feature_shift_sample: The sampled images, from ``sample_images``.
        raw_images: The image root.
        model: The shared ``model`` parameters (sources or weights, image size).
        images: The ``images`` parameters (how images are opened).
        feature_shift: The ``feature_shift`` parameters (depths, batch size).
        finetune: The ``finetune`` parameters (the one source's ``input_scaling``).

    Returns:
        Per source name, :func:`measure_backbone`'s measurements.

    Raises:
        SourceError: Candidates that cannot be used, or a ``model.source`` that
            names none of them: found before any image is read.
    """
    candidates = candidate_sources(model, finetune)
    forced_source(model, candidates)
    if model.get("sources"):
        logger.info(
            "%d candidate sources (model.sources: %s); model.weights is not read",
            len(candidates),
            ", ".join(source.name for source in candidates),
        )
    return {
        source.name: measure_backbone(
            feature_shift_sample=feature_shift_sample,
            raw_images=raw_images,
            model=model,
            images=images,
            feature_shift=feature_shift,
            finetune=finetune,
            source=source,
        )
        for source in candidates
    }


def measure_backbone(
    *,
    feature_shift_sample: pd.DataFrame,
    raw_images: ImageFolder,
    model: dict[str, Any],
    images: dict[str, Any],
    feature_shift: dict[str, Any],
    finetune: dict[str, Any],
    source: Source | None = None,
) -> BackboneMeasurements:
    """Runs every sampled image through IRv2 once, measuring inside the graph.

    Per split: the per-channel moments of every BN layer's input and the pooled
    features at ``feature_shift.depths``; for the training split, also those moments
    under ``feature_shift.bootstrap.resamples`` Poisson bootstrap resamples of its
    images (the shift's interval). Random weights and the resamples are drawn from
    ``model.seed``.

    Args:
        feature_shift_sample: The sampled images, from ``sample_images``.
        raw_images: The image root.
        model: The shared ``model`` parameters (image size, seed).
        images: The ``images`` parameters (how images are opened).
        feature_shift: The ``feature_shift`` parameters (depths, batch size).
        finetune: The ``finetune`` parameters (``input_scaling``, for the default
            source).
        source: The backbone measured, fed its own preprocessing and grayscale
            rule; default the first candidate (``model.weights`` without
            ``model.sources``).

    Returns:
        The measurements of every split.
    """
    # Keras (and TensorFlow) load when this node runs, not with the pipeline.
    import keras  # noqa: PLC0415

    from . import moments  # noqa: PLC0415

    source = source or candidate_sources(model, finetune)[0]
    logger.info(
        "Measuring source `%s`: weights %s, preprocessing %s, grayscale %s",
        source.name,
        source.weights,
        source.preprocessing,
        source.grayscale,
    )
    weights = source.weights
    size = int(model["image_size"])
    depths = [str(depth) for depth in feature_shift["depths"]]
    if not depths:
        raise FeatureShiftError("feature_shift.depths is empty; name at least one")
    # Random-init weights (model.weights: null) are drawn from this seed.
    keras.utils.set_random_seed(int(model["seed"]))
    try:
        backbone = irv2.load_irv2(weights, size)
    except irv2.WeightsError as error:
        raise irv2.WeightsError(f"Source `{source.name}`: {error}") from error
    probe, layout = moments.build_probe(
        backbone, depths, source.preprocessing, source.grayscale
    )
    batch_size = int(feature_shift["batch_size"])
    if batch_size < 1:
        raise FeatureShiftError(
            f"feature_shift.batch_size = {batch_size}: use at least 1 image per batch"
        )
    # No batch larger than the largest split: padding a few images to a big batch
    # would only waste time.
    batch_size = min(
        batch_size, int(feature_shift_sample["split"].value_counts().max())
    )
    policy = OpenPolicy.from_params(images)
    resamples = int(feature_shift["bootstrap"]["resamples"])
    if resamples < 0:
        raise FeatureShiftError(
            f"feature_shift.bootstrap.resamples = {resamples}: use 0 (no interval) "
            "or more"
        )
    splits = {}
    for split in SPLITS:
        rows = feature_shift_sample[feature_shift_sample["split"] == split]
        if rows.empty:
            continue
        batches = image_dataset(
            [raw_images.path_of(path) for path in rows["path"]],
            None,
            image_size=size,
            batch_size=batch_size,
            policy=policy,
        )
        measured = moments.run_pass(
            probe,
            layout,
            batches,
            batch_size=batch_size,
            n_images=len(rows),
            what=split,
            logger=logger,
            # The shift is measured on the training split only.
            resamples=resamples if split == "train" else 0,
            seed=int(model["seed"]),
        )
        splits[split] = SplitMeasurements(
            labels=rows["label_index"].to_numpy(),
            features=measured.features,
            bn_means=measured.bn_means,
            bn_variances=measured.bn_variances,
            grayscale_share=measured.grayscale_images / max(measured.n_images, 1),
            bn_resampled_means=measured.bn_resampled_means,
            bn_resampled_variances=measured.bn_resampled_variances,
        )
    return BackboneMeasurements(
        weights_pretrained=weights is not None,
        batch_norms=layout.batch_norms,
        depths=layout.depths,
        depth_layers=layout.depth_layers,
        splits=splits,
    )


def profile_bn_shift(
    feature_shift_measurements: BackboneMeasurements, *, warn: bool = True
) -> pd.DataFrame:
    """The shift of every BN layer: the source's stored vs training-image statistics.

    Args:
        feature_shift_measurements: From ``measure_backbone``.
        warn: Log that random weights make the shift meaningless (once a run: the
            ranking profiles every candidate without it).

    Returns:
        ``bn_shift_profile``: one row per BN layer (see ``shift.PROFILE_COLUMNS``).
    """
    measured = feature_shift_measurements
    train = measured.splits["train"]
    profile = shift.shift_profile(
        list(measured.batch_norms),
        train.bn_means,
        train.bn_variances,
        measured.weights_pretrained,
        train.grayscale_share,
        resampled_means=train.bn_resampled_means,
        resampled_variances=train.bn_resampled_variances,
    )
    if warn and not measured.weights_pretrained:
        logger.warning(RANDOM_WEIGHTS_WARNING)
    return profile


def rank_sources(
    source_measurements: dict[str, BackboneMeasurements],
    model: dict[str, Any],
    feature_shift: dict[str, Any],
    finetune: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], Figure]:
    """Ranks the candidate sources on the training images and chooses one.

    The best by LogME at the top depth (``ranking``), unless ``model.source``
    names one.

    Args:
        source_measurements: From ``measure_sources``.
        model: The shared ``model`` parameters (``sources``, ``source``, ``seed``).
        feature_shift: The ``feature_shift`` parameters.
        finetune: The ``finetune`` parameters (the one source's ``input_scaling``).

    Returns:
        ``source_ranking`` (one row per candidate, best first),
        ``source_transferability`` (every candidate's ``transferability`` rows, with
        a ``source`` column), ``chosen_source`` (``source``: its fields; ``reason``:
        why) and ``source_ranking_plot``.
    """
    candidates = candidate_sources(model, finetune)
    profiles = {
        name: profile_bn_shift(measured, warn=False)
        for name, measured in source_measurements.items()
    }
    tables = {
        name: score_transferability(measured, model, feature_shift)
        for name, measured in source_measurements.items()
    }
    table, chosen, reason = ranking.rank(
        candidates,
        profiles,
        tables,
        forced=forced_source(model, candidates),
        shift_threshold=float(feature_shift["plan"]["shift_threshold"]),
    )
    logger.info("Source: %s", reason)
    by_depth = pd.concat(
        [frame.assign(source=name) for name, frame in tables.items()],
        ignore_index=True,
    )
    return (
        table,
        by_depth[["source", *tables[chosen.name].columns]],
        {"source": chosen.as_dict(), "reason": reason},
        ranking.ranking_plot(table, tables),
    )


def select_source(
    source_measurements: dict[str, BackboneMeasurements],
    chosen_source: dict[str, Any],
) -> BackboneMeasurements:
    """The measurements of the chosen source, which the profile, the split shift,
    the transferability table and the plan are made of.

    Args:
        source_measurements: From ``measure_sources``.
        chosen_source: From ``rank_sources``.

    Returns:
        ``feature_shift_measurements``.
    """
    return source_measurements[chosen_source["source"]["name"]]


def summarize_bn_shift(
    bn_shift_profile: pd.DataFrame,
    chosen_source: dict[str, Any],
    model: dict[str, Any],
    feature_shift: dict[str, Any],
) -> tuple[dict[str, Any], Figure]:
    """The per-block summary for the report, and the plot of shift against depth.

    Args:
        bn_shift_profile: From ``profile_bn_shift``.
        chosen_source: From ``rank_sources``.
        model: The shared ``model`` parameters (``image_size``).
        feature_shift: The ``feature_shift`` parameters (``plan.shift_threshold``).

    Returns:
        ``feature_shift_summary`` and ``bn_shift_plot``.
    """
    source = Source.from_dict(chosen_source["source"])
    blocks = shift.block_shift(bn_shift_profile)
    by_block = {
        str(b): float(v) for b, v in zip(blocks["block"], blocks["shift"], strict=True)
    }
    meaningful = source.pretrained
    threshold = float(feature_shift["plan"]["shift_threshold"])
    peak = blocks.loc[blocks["shift"].idxmax()]
    summary = {
        "source": source.name,
        "weights": source.weights,
        "image_size": int(model["image_size"]),
        "weights_image_size": source.image_size,
        "shift_meaningful": meaningful,
        "warning": (
            image_size_warning(source, int(model["image_size"]))
            if meaningful
            else RANDOM_WEIGHTS_WARNING
        ),
        "shift_definition": SHIFT_DEFINITION,
        "shift_threshold": threshold,
        "grayscale_share": grayscale_share(bn_shift_profile),
        "shift_starts_at": shift_start(
            by_block, threshold, grayscale_share(bn_shift_profile)
        ),
        "most_shifted_block": str(peak["block"]),
        "blocks_over_threshold": blocks_reaching(by_block, threshold),
        "blocks": [
            {key: _plain(value) for key, value in row.items()}
            for row in blocks.to_dict("records")
        ],
    }
    note = "" if meaningful else " (random weights: meaningless)"
    return summary, shift_by_depth_plot(bn_shift_profile, blocks, threshold, note)


def measure_split_shift(
    feature_shift_measurements: BackboneMeasurements,
    model: dict[str, Any],
    feature_shift: dict[str, Any],
) -> pd.DataFrame:
    """Compares validation and test features with training features.

    Args:
        feature_shift_measurements: From ``measure_backbone``.
        model: The shared ``model`` parameters (``seed`` of the permutations).
        feature_shift: The ``feature_shift`` parameters (``split_shift``).

    Returns:
        ``split_shift``: one row per pair (``train-vs-val``, ``train-vs-test``) with
        ``frechet``, ``mmd2``, ``p_value``, ``shifted`` and a ``verdict`` sentence.
    """
    measured = feature_shift_measurements
    settings = feature_shift["split_shift"]
    depth = str(settings["depth"])
    if depth not in measured.depths:
        raise FeatureShiftError(
            f"feature_shift.split_shift.depth = {depth!r} must be one of "
            f"feature_shift.depths ({', '.join(measured.depths)})"
        )
    alpha = float(settings["alpha"])
    min_images = max(2, int(settings["min_images"]))
    reference = measured.splits["train"].features[depth]
    rows = []
    for compared in ("val", "test"):
        split = measured.splits.get(compared)
        other = split.features[depth] if split else np.zeros((0, reference.shape[1]))
        row = {
            "pair": f"train-vs-{compared}",
            "reference": "train",
            "compared": compared,
            "depth": depth,
            "n_reference": len(reference),
            "n_compared": len(other),
        }
        if min(len(reference), len(other)) < min_images:
            rows.append(
                {
                    **row,
                    "components": 0,
                    "frechet": math.nan,
                    "mmd2": math.nan,
                    "p_value": math.nan,
                    "shifted": False,
                    "verdict": f"too few images to compare {compared} with train "
                    f"({len(other)} vs {len(reference)}; "
                    f"feature_shift.split_shift.min_images is {min_images})",
                }
            )
            continue
        with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
            result = twosample.compare(
                reference,
                other,
                max_components=int(settings["max_components"]),
                permutations=int(settings["permutations"]),
                seed=int(model["seed"]),
            )
        shifted = result.p_value < alpha
        figures = (
            f"p = {result.p_value:.3g}; MMD² = {result.mmd2:.4g}, Fréchet distance "
            f"= {result.frechet:.4g} on {depth} features, {len(other)} vs "
            f"{len(reference)} images"
        )
        verdict = (
            f"{compared} differs from train, {figures}"
            if shifted
            else f"no evidence that {compared} differs from train, {figures}"
        )
        rows.append(
            {
                **row,
                "components": result.components,
                "frechet": result.frechet,
                "mmd2": result.mmd2,
                "p_value": result.p_value,
                "shifted": shifted,
                "verdict": verdict,
            }
        )
        (logger.warning if shifted else logger.info)("Split shift: %s", verdict)
    table = pd.DataFrame(rows)
    table["weights_pretrained"] = measured.weights_pretrained
    return table


def score_transferability(
    feature_shift_measurements: BackboneMeasurements,
    model: dict[str, Any],
    feature_shift: dict[str, Any],
) -> pd.DataFrame:
    """LogME and a linear probe's validation accuracy of frozen features, per depth.

    Args:
        feature_shift_measurements: From ``measure_backbone``.
        model: The shared ``model`` parameters (``seed`` of the probe).
        feature_shift: The ``feature_shift`` parameters (``transferability``).

    Returns:
        ``transferability``: one row per depth, input to output: ``layer`` (the
        unit), ``output_layer``, ``dims``, ``n_train``, ``n_val``, ``logme``,
        ``probe_val_accuracy``, ``chance_accuracy`` (the majority class's share of
        val) and ``probe_skill`` (0 at chance, 1 perfect).
    """
    measured = feature_shift_measurements
    settings = feature_shift["transferability"]
    train = measured.splits["train"]
    val = measured.splits.get("val")
    rows = []
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        for depth, layer in zip(measured.depths, measured.depth_layers, strict=True):
            features = train.features[depth].astype(np.float64)
            accuracy, chance, skill = _probe_accuracy(
                features,
                train.labels,
                val.features[depth] if val is not None else None,
                val.labels if val is not None else None,
                settings=settings,
                seed=int(model["seed"]),
            )
            rows.append(
                {
                    "layer": depth,
                    "output_layer": layer,
                    "dims": features.shape[1],
                    "n_train": len(train.labels),
                    "n_val": 0 if val is None else len(val.labels),
                    "logme": logme(features, train.labels),
                    "probe_val_accuracy": accuracy,
                    "chance_accuracy": chance,
                    "probe_skill": skill,
                    "weights_pretrained": measured.weights_pretrained,
                }
            )
    table = pd.DataFrame(rows)
    logger.info(
        "Transferability (LogME / probe accuracy): %s",
        ", ".join(
            f"{row.layer} {row.logme:.3f} / {row.probe_val_accuracy:.3f}"
            for row in table.itertuples()
        ),
    )
    return table


def plan_finetuning(
    *,
    bn_shift_profile: pd.DataFrame,
    transferability: pd.DataFrame,
    image_manifest: pd.DataFrame,
    chosen_source: dict[str, Any],
    model: dict[str, Any],
    feature_shift: dict[str, Any],
) -> dict[str, Any]:
    """The stages ``finetune`` runs, and why (see ``plan.plan_stages`` for the rule).

    With random weights the shift means nothing: the plan is
    ``feature_shift.default_stages``, and its rationale says so.

    Args:
        bn_shift_profile: From ``profile_bn_shift``.
        transferability: From ``score_transferability``.
        image_manifest: All images (training images per class).
        chosen_source: From ``rank_sources``: the source the plan is for.
        model: The shared ``model`` parameters (``image_size``).
        feature_shift: The ``feature_shift`` parameters (``plan``, ``plan_rules``,
            ``default_stages``).

    Returns:
        ``finetune_plan``: ``stages``, ``rationale`` (why this source first),
        ``basis`` (``measured`` or ``default_stages``), ``shift_meaningful``,
        ``source`` (the chosen source's fields, which finetune builds the backbone
        from), ``source_reason`` (why it), ``weights`` (its weights), ``depth_limit`` (the setting that capped
        the depth, see ``plan.Plan``; ``None`` if none did) and ``warnings`` (what
        makes the measurements less trustworthy).

    Raises:
        PlanError: Stages that break ``feature_shift.plan_rules``.
    """
    source = Source.from_dict(chosen_source["source"])
    units = shift.unit_order(bn_shift_profile)
    defaults = validate_stages(
        feature_shift["default_stages"], "feature_shift.default_stages", units
    )
    meaningful = source.pretrained
    if meaningful:
        blocks = shift.block_shift(bn_shift_profile)
        train = image_manifest[image_manifest["split"] == "train"]
        measured = Measurements(
            block_shift=dict(zip(blocks["block"], blocks["shift"], strict=True)),
            logme=dict(
                zip(transferability["layer"], transferability["logme"], strict=True)
            ),
            probe_skill=dict(
                zip(
                    transferability["layer"],
                    transferability["probe_skill"],
                    strict=True,
                )
            ),
            probe_accuracy=dict(
                zip(
                    transferability["layer"],
                    transferability["probe_val_accuracy"],
                    strict=True,
                )
            ),
            train_images_per_class=int(train["label"].value_counts().min()),
            units=units,
            grayscale_share=grayscale_share(bn_shift_profile),
        )
        plan = plan_stages(measured, feature_shift["plan"])
        stages, rationale, depth_limit = plan.stages, plan.rationale, plan.depth_limit
        stages_from = "feature_shift.plan"
    else:
        stages, rationale, depth_limit = defaults, [RANDOM_WEIGHTS_WARNING], None
        if any(stage.get("bn_policy") == "adapt" for stage in stages):
            rationale.append(ADAPT_WITH_RANDOM_WEIGHTS)
        stages_from = "feature_shift.default_stages"
    problems = learning_rate_problems(stages, feature_shift["plan_rules"])
    if problems:
        raise PlanError(
            f"The stages from {stages_from} break feature_shift.plan_rules: "
            + "; ".join(problems)
        )
    rationale = [chosen_source["reason"], *rationale]
    for line in rationale:
        logger.info("Plan: %s", line)
    warning = image_size_warning(source, int(model["image_size"]))
    return {
        "stages": stages,
        "rationale": rationale,
        "basis": "measured" if meaningful else "default_stages",
        "shift_meaningful": meaningful,
        "source": source.as_dict(),
        "source_reason": chosen_source["reason"],
        "weights": source.weights,
        "depth_limit": depth_limit,
        "warnings": [warning] if warning else [],
    }


def image_size_warning(source: Source, image_size: int) -> str | None:
    """A sentence when ``model.image_size`` is not the size the source's weights were
    trained at (299 for ImageNet; a local file's card or ``model.sources`` says its
    own), else ``None``.

    BatchNorm statistics depend on the resolution by themselves (Touvron et al.,
    FixRes, 2019): at another size the shift mixes resolution with domain.
    """
    native, size = source.image_size, int(image_size)
    if native is None or int(native) == size:
        return None
    return (
        f"model.image_size is {size} px but the weights of source `{source.name}` "
        f"were trained at {native} px: "
        "BatchNorm statistics change with the resolution alone, so part of every "
        "shift here is the size, not your images. Measure at "
        f"model.image_size: {native} to read the shift as a domain gap."
    )


def grayscale_share(bn_shift_profile: pd.DataFrame) -> float:
    """The share of grey training images the profile was measured on (0 for a
    profile written before the column existed)."""
    if "grayscale_share" not in bn_shift_profile or bn_shift_profile.empty:
        return 0.0
    return float(bn_shift_profile["grayscale_share"].iloc[0])


def _probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray | None,
    val_labels: np.ndarray | None,
    *,
    settings: dict[str, Any],
    seed: int,
) -> tuple[float, float, float]:
    """A logistic-regression probe's validation accuracy, chance and skill.

    NaN when there are no validation images or only one training class.
    """
    if val_labels is None or not len(val_labels) or len(np.unique(train_labels)) < 2:
        return math.nan, math.nan, math.nan
    probe = fit_probe(
        train_features,
        train_labels,
        int(max(train_labels.max(), val_labels.max())) + 1,
        c=float(settings["probe_c"]),
        max_iter=int(settings["probe_max_iter"]),
        seed=seed,
    )
    accuracy = probe.accuracy(val_features, val_labels)
    chance = float(np.bincount(val_labels).max() / len(val_labels))
    skill = (accuracy - chance) / (1.0 - chance) if chance < 1 else math.nan
    return accuracy, chance, skill


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python number JSON can hold."""
    return value.item() if isinstance(value, np.generic) else value
