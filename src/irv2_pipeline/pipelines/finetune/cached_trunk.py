"""The frozen layers below a stage's first unfrozen unit, run once for the stage.

A stage that unfreezes the backbone from a unit on (``unfreeze_from: block8_1``)
keeps every layer below that unit frozen, BatchNorm in inference mode: they map each
image to the same tensor in every epoch (augmentation happened on disk, before
training). The stage then runs them once over its training and validation images
and trains the rest (the unit on, and the head) on their outputs: the same batches
in the same order, the same loss and gradients, without the frozen layers' forward
pass in every training step, range-test step and validation. The outputs are held in
memory, so only where they fit ``finetune.trunk_cache_max_mb``; a cut that no single
tensor crosses (a layer index inside a block, as the textbook recipes set) trains
through the whole backbone.

A run that starts with a head stage computes them in that stage's pass
(:func:`features_with_trunks`): the pooled features and the later stages' frozen
outputs come out of one backbone pass, since those layers stay as they are until
the stages that read them. Outputs that change before they are read (a stage
trains some of those layers, or AdaBN re-estimates their statistics) are let go and
computed again by the stage that needs them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from irv2_pipeline.backbone import split_at
from irv2_pipeline.classifier import (
    Classifier,
    features_and_trunks,
    training_model,
    trunk_model,
)
from irv2_pipeline.images import OpenPolicy

from .cached_head import frozen_outputs
from .examples import Examples
from .runtime import Workers
from .stages import Stage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrunkOutputs:
    """The outputs of the frozen layers below ``unit`` for each split's images."""

    unit: str
    # The layers that made them (``backbone.split_at``'s first part).
    trunk: keras.Model
    train: np.ndarray
    val: np.ndarray


@dataclass(frozen=True)
class CachedTrunk:
    """A stage's trainable part and the frozen part's outputs it trains on."""

    # The first unfrozen unit: the trainee takes its input.
    unit: str
    trainee: keras.Model
    train: np.ndarray
    val: np.ndarray


def cached_trunk(  # noqa: PLR0913 - the stage, its images, and how to run them
    classifier: Classifier,
    stage: Stage,
    train: Examples,
    val: Examples,
    *,
    max_mb: float,
    image_size: int,
    policy: OpenPolicy,
    batch_size: int,
    replicas: int = 1,
    workers: Workers | None = None,
    computed: TrunkOutputs | None = None,
) -> CachedTrunk | None:
    """The stage's frozen layers run once over its images, or ``None``.

    Call it once the stage's layers are frozen and unfrozen and its BatchNorm
    statistics set: the outputs are those of the frozen layers as they are now.

    Args:
        classifier: The model.
        stage: A stage that unfreezes part of the backbone.
        train: Training images (originals and augmented copies).
        val: Validation images.
        max_mb: The most memory the outputs of both splits may take
            (``finetune.trunk_cache_max_mb``).
        image_size: Input side in pixels.
        policy: How images are opened.
        batch_size: Images per forward pass (all replicas together).
        replicas: Replicas the passes are split across.
        workers: In a multi-worker run, each worker runs its shard; every worker
            gets all the outputs back, in order.
        computed: The stage's outputs computed earlier (:func:`features_with_trunks`)
            while its frozen layers were as they are now: no pass is run.

    Returns:
        The trainee and the cached outputs; ``None`` when ``unfreeze_from`` is not
        a unit with one tensor into it, or the outputs would take more than
        ``max_mb``.
    """
    unit = stage.unfreeze_from
    parts = _split(classifier, unit)
    if parts is None:
        return None
    trunk, top = parts
    if computed is not None:
        logger.info(
            "Stage %r trains on the outputs of the frozen layers below %s, computed "
            "in the head stage's backbone pass with the pooled features",
            stage.name,
            unit,
        )
        return CachedTrunk(
            unit=unit,
            trainee=training_model(classifier, stage.bn_policy, top),
            train=computed.train,
            val=computed.val,
        )
    megabytes = _megabytes(trunk, len(train) + len(val))
    shape = tuple(trunk.output_shape[1:])
    if megabytes > max_mb:
        logger.info(
            "Stage %r runs its frozen layers in every step: their outputs (the input "
            "of %s, %s values an image) for %d images would take %.0f MB, over "
            "finetune.trunk_cache_max_mb = %g",
            stage.name,
            unit,
            "x".join(map(str, shape)),
            len(train) + len(val),
            megabytes,
            max_mb,
        )
        return None
    (train_outputs,), (val_outputs,) = _both_splits(
        trunk_model(classifier, trunk),
        [f"inputs of {unit}"],
        train,
        val,
        image_size=image_size,
        policy=policy,
        batch_size=batch_size,
        replicas=replicas,
        workers=workers,
    )
    logger.info(
        "Stage %r trains on the outputs of the frozen layers below %s (%.1f MB), "
        "computed once: they do not run in its training steps",
        stage.name,
        unit,
        megabytes,
    )
    return CachedTrunk(
        unit=unit,
        trainee=training_model(classifier, stage.bn_policy, top),
        train=train_outputs,
        val=val_outputs,
    )


def features_with_trunks(  # noqa: PLR0913 - the stages, their images, how to run them
    classifier: Classifier,
    later_stages: Sequence[Stage],
    train: Examples,
    val: Examples,
    *,
    max_mb: float,
    image_size: int,
    policy: OpenPolicy,
    batch_size: int,
    replicas: int = 1,
    workers: Workers | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], list[TrunkOutputs]]:
    """The pooled features of a head stage and, from the same backbone pass, the
    frozen layers' outputs of the later stages that train on them.

    Call it in the head stage, before any backbone layer trains. Each later stage
    that unfreezes from a unit with one tensor into it gets its outputs, in order,
    as long as all of them together fit ``max_mb``. They hold while the layers
    below the unit stay as they are: the caller drops them when a stage trains one
    of those layers or re-estimates BatchNorm statistics (``adapt``).

    Args:
        classifier: The model, its backbone frozen.
        later_stages: The run's stages after the head stage, in order.
        train: Training images (originals and augmented copies).
        val: Validation images.
        max_mb: As for :func:`cached_trunk`.
        image_size: Input side in pixels.
        policy: How images are opened.
        batch_size: Images per forward pass (all replicas together).
        replicas: Replicas the passes are split across.
        workers: As for :func:`cached_trunk`.

    Returns:
        The pooled features of ``(train, val)``, and the later stages' outputs.
    """
    trunks: dict[str, keras.Model] = {}
    megabytes = 0.0
    for stage in later_stages:
        unit = stage.unfreeze_from
        parts = _split(classifier, unit)
        if parts is None or unit in trunks:
            continue
        size = _megabytes(parts[0], len(train) + len(val))
        if megabytes + size > max_mb:
            break
        megabytes += size
        trunks[unit] = parts[0]
    # Without later outputs, the classifier's own features view (its pass as before).
    view = (
        features_and_trunks(classifier, list(trunks.values()))
        if trunks
        else classifier.features
    )
    train_outputs, val_outputs = _both_splits(
        view,
        ["pooled features", *(f"inputs of {unit}" for unit in trunks)],
        train,
        val,
        image_size=image_size,
        policy=policy,
        batch_size=batch_size,
        replicas=replicas,
        workers=workers,
    )
    computed = [
        TrunkOutputs(unit=unit, trunk=trunk, train=train_outputs[i], val=val_outputs[i])
        for i, (unit, trunk) in enumerate(trunks.items(), start=1)
    ]
    return (train_outputs[0], val_outputs[0]), computed


def _split(classifier: Classifier, unit: str | int | None):
    """``backbone.split_at`` of the classifier's backbone at a stage's
    ``unfreeze_from``; ``None`` also for a layer index or the head alone."""
    return split_at(classifier.backbone, unit) if isinstance(unit, str) else None


def _both_splits(
    view: keras.Model, what: list[str], train: Examples, val: Examples, **run
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """:func:`frozen_outputs` of ``view`` over the training, then the validation
    images (``run``: how, as there)."""
    return tuple(
        frozen_outputs(view, examples, what, **run) for examples in (train, val)
    )


def _megabytes(trunk: keras.Model, images: int) -> float:
    """The memory ``trunk``'s outputs for ``images`` images take."""
    values = math.prod(trunk.output_shape[1:])
    return images * values * tf.as_dtype(trunk.outputs[0].dtype).size / 2**20
