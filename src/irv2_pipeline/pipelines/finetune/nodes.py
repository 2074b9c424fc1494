"""Nodes of the `finetune` pipeline: staged fine-tuning of IRv2, and its curves.

The modules that import Keras or TensorFlow are imported by the nodes that run them:
every ``kedro`` command loads this module (through the pipeline registry), and
TensorFlow costs seconds and most of a gigabyte to import.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

import irv2_pipeline
from irv2_pipeline.backbone import load_irv2, unit_order
from irv2_pipeline.cluster import cluster_role
from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.hints import KerasModel
from irv2_pipeline.inputs import class_names
from irv2_pipeline.sources import planned_source, training_preprocessing

from .examples import (
    ResizedImages,
    resized_identity,
    split_examples,
    training_examples,
)
from .report import training_curves_figure
from .stages import resolve_stages

logger = logging.getLogger(__name__)

HISTORY_COLUMNS = [
    "stage",
    "epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "stage_index",
    "cached_features",
    "seconds",
]
# Parameters that say where and how often files are written or how long to wait,
# not how the model trains: not in the key (a run resumes whatever they are).
_LOCATION_PARAMETERS = (
    "checkpoint_dir",
    "checkpoint_every_epochs",
    "checkpoint_every_minutes",
    "tensorboard_dir",
    "feature_cache_dir",
    "cluster_timeout_s",
)


def train_classifier(
    *,
    image_manifest: pd.DataFrame,
    augmented_manifest: pd.DataFrame,
    finetune_plan: dict[str, Any],
    resized_manifest: pd.DataFrame,
    resized_images: ImageFolder,
    augmented_images: ImageFolder,
    model: dict[str, Any],
    images: dict[str, Any],
    finetune: dict[str, Any],
    plan_rules: dict[str, Any],
) -> tuple[KerasModel, pd.DataFrame, pd.DataFrame, list[str], pd.DataFrame]:
    """Fine-tunes IRv2 in stages, resuming from a checkpoint when one matches.

    Args:
        image_manifest: Accepted images and their split.
        augmented_manifest: Augmented copies of training images (empty: none).
        finetune_plan: ``{"stages": [...], "rationale": [...]}``; followed unless
            ``finetune.stages`` is set.
        resized_manifest: The resized file of each ``image_manifest`` image.
        resized_images: The folder of ``resized_manifest``: every accepted image
            at ``model.image_size``, which training and validation read.
        augmented_images: The folder of ``augmented_manifest``.
        model: ``model`` parameters (image size, seed; the weights are the plan's
            source).
        images: ``images`` parameters (how images are opened).
        finetune: ``finetune`` parameters.
        plan_rules: ``feature_shift.plan_rules`` (learning-rate limits, which the
            learning-rate range test's suggestions keep too).

    Returns:
        The model (``[0, 255]`` RGB in, class probabilities out, in
        ``inputs.class_names`` order; the weights of the stage of lowest validation
        loss), the history (one row per epoch), one record per stage (trainable
        parameters, BN policy, epochs, best epoch, whether it was kept and why, its
        range test), the class names, and the range tests' curves.
    """
    # Imported here, not at the top: see the module docstring.
    import keras  # noqa: PLC0415

    from irv2_pipeline.classifier import HeadSpec, build_classifier  # noqa: PLC0415
    from irv2_pipeline.keys import content_key  # noqa: PLC0415

    from .checkpoints import CheckpointStore  # noqa: PLC0415
    from .lr_find import curves_table  # noqa: PLC0415
    from .runtime import (  # noqa: PLC0415
        Workers,
        distribution_strategy,
        dtype_policy,
        gpu_capabilities,
        keras_multi_worker_fixes,
        precision_policy,
    )
    from .training import TrainingSettings, found_curves, run_stages  # noqa: PLC0415

    # Before anything is read or built: a mismatch is a configuration error. The
    # backbone is the source the plan measured and chose, not model.weights.
    source = planned_source(finetune_plan)
    input_scaling = training_preprocessing(source, finetune)
    classes = class_names(image_manifest)
    resized = ResizedImages.checked(
        resized_manifest, resized_images, image_manifest, int(model["image_size"])
    )
    train = training_examples(
        image_manifest, augmented_manifest, resized, augmented_images, classes
    )
    val = split_examples(image_manifest, resized, classes, "val")
    adapt_on = train.originals()
    if finetune.get("adapt_bn_transductive", False):
        # Unlabelled use of the held-out images: their statistics, not their labels.
        adapt_on = (
            adapt_on + val + split_examples(image_manifest, resized, classes, "test")
        )
        logger.info(
            "BatchNorm adaptation is transductive: it also sees the %d validation "
            "and test images (their pixels, not their labels)",
            len(adapt_on) - len(train.originals()),
        )
    logger.info(
        "Training on %d images (%d augmented copies), validating on %d, %d classes",
        len(train),
        train.augmented,
        len(val),
        len(classes),
    )
    distribution = str(finetune.get("distribution", "none"))
    strategy = distribution_strategy(
        distribution, float(finetune.get("cluster_timeout_s", 300))
    )
    workers = Workers(
        strategy, cluster_role() if distribution == "multi_worker" else None
    )
    precision = precision_policy(
        str(finetune.get("mixed_precision", "auto")), gpu_capabilities()
    )
    logger.info("Dtype policy: %s", precision)
    seed = int(model["seed"])
    with ExitStack() as context:
        context.enter_context(dtype_policy(precision))
        context.enter_context(strategy.scope())
        if workers.role is not None:
            context.enter_context(keras_multi_worker_fixes())
        keras.utils.set_random_seed(seed)
        backbone = load_irv2(source.weights, int(model["image_size"]))
        stages = resolve_stages(
            finetune_plan, finetune, plan_rules, unit_order(backbone)
        )
        classifier = build_classifier(
            backbone,
            classes,
            HeadSpec.from_params(finetune.get("head") or {}),
            seed,
            input_scaling,
            grayscale=source.grayscale,
        )
        key = content_key(
            {k: v for k, v in finetune.items() if k not in _LOCATION_PARAMETERS},
            model,
            source.as_dict(),
            images,
            [stage.as_dict() for stage in stages],
            classes,
            precision,
            strategy.num_replicas_in_sync,
            irv2_pipeline.__version__,
            image_manifest[["path", "label", "split", "sha256"]],
            augmented_manifest,
            # Training reads the resized files, not the raw ones: another resized
            # set must not resume a run on the pixels of the old one.
            resized_identity(resized_manifest),
        )
        store = CheckpointStore(finetune["checkpoint_dir"], key)
        logs = finetune.get("tensorboard_dir")
        if not workers.is_chief:
            # TensorFlow's rule: only the chief writes checkpoints and logs; the
            # others resume from the chief's and write to a folder removed at the end.
            scratch = context.enter_context(
                tempfile.TemporaryDirectory(prefix="irv2-worker-")
            )
            store = store.copy_to(scratch)
            logs = None
        settings = TrainingSettings.from_params(
            finetune, model, images, None if logs is None else Path(logs) / key
        )
        state = run_stages(
            classifier,
            stages,
            train=train,
            val=val,
            settings=settings,
            store=store,
            replicas=strategy.num_replicas_in_sync,
            adapt_on=adapt_on,
            plan_rules=plan_rules,
            workers=workers,
        )
    # The checkpoint stays until the model file is saved (hooks.FinishedCheckpointsHook).
    history = pd.DataFrame(state.history, columns=HISTORY_COLUMNS)
    return (
        classifier.model,
        history,
        pd.DataFrame(state.stage_records),
        classes,
        curves_table(found_curves(state)),
    )


def plot_training_curves(training_history: pd.DataFrame) -> Figure:
    """Loss, accuracy and learning rate per epoch, with stage boundaries marked.

    Args:
        training_history: One row per epoch of every stage.

    Returns:
        The figure.
    """
    return training_curves_figure(training_history)


def plot_lr_finder(lr_finder_curves: pd.DataFrame) -> Figure:
    """Loss against learning rate of each stage's range test, suggestion marked.

    Args:
        lr_finder_curves: One row per sweep step (empty when ``finetune.lr_find`` is
            off: the figure then says so).

    Returns:
        The figure.
    """
    # lr_find imports Keras; see the module docstring.
    from .lr_find import curves_from_table, lr_finder_figure  # noqa: PLC0415

    return lr_finder_figure(curves_from_table(lr_finder_curves))
