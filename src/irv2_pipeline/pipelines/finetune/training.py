"""Staged training: each stage unfreezes, sets BatchNorm, and trains epoch by epoch.

Every epoch is one ``fit`` call on a dataset shuffled with a seed derived from the
run's seed, the stage and the epoch, followed by a checkpoint; so a run killed
anywhere resumes at the last finished epoch of its stage. Head-only stages train the
head on pooled features computed once (``cached_head``) instead of running the
frozen backbone every epoch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from irv2_pipeline.backbone import adapt_batchnorm, set_trainable_from
from irv2_pipeline.classifier import Classifier, training_model
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import (
    batch_sizes,
    check_pixel_range,
    feature_dataset,
    image_dataset,
)
from irv2_pipeline.progress import ProgressLog

from .cached_head import pooled_features
from .checkpoints import (
    CheckpointStore,
    TrainingState,
    optimizer_arrays,
    restore_optimizer,
)
from .examples import Examples
from .optimizer import (
    layerwise_multipliers,
    make_optimizer,
    warmup_cosine,
)
from .stages import Stage

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; nothing was saved as a result."""


@dataclass(frozen=True)
class TrainingSettings:
    """How stages train, from the ``finetune``, ``model`` and ``images`` parameters.

    Attributes:
        image_size: Input side in pixels.
        seed: Seed of every shuffle.
        batch_size: Images per batch on each replica.
        optimizer: ``adamw`` or ``sgd``.
        layerwise_lr_decay: Learning-rate factor per block group away from the head.
        final_lr_fraction: The cosine schedule ends at this fraction of the peak.
        label_smoothing: Of the cross-entropy loss.
        class_weights: Weight the loss by inverse class frequency in training.
        patience: Epochs without improvement of ``val_loss`` before a stage stops;
            ``None`` never stops early.
        min_delta: The least decrease of ``val_loss`` that counts as improvement.
        cache_head_features: Train head-only stages on cached pooled features.
        jit_compile: XLA compilation (``True``, ``False`` or ``"auto"``).
        policy: How images are opened.
        tensorboard_dir: Where TensorBoard logs go (``None``: no logs).
    """

    image_size: int
    seed: int
    batch_size: int
    optimizer: str = "adamw"
    layerwise_lr_decay: float = 1.0
    final_lr_fraction: float = 0.0
    label_smoothing: float = 0.0
    class_weights: bool = False
    patience: int | None = None
    min_delta: float = 0.0
    cache_head_features: bool = True
    jit_compile: bool | str = False
    policy: OpenPolicy = OpenPolicy()
    tensorboard_dir: Path | None = None

    @classmethod
    def from_params(
        cls,
        finetune: Mapping[str, Any],
        model: Mapping[str, Any],
        images: Mapping[str, Any],
        tensorboard_dir: Path | None,
    ) -> TrainingSettings:
        """Builds the settings from the parameter blocks."""
        stopping = finetune.get("early_stopping") or {}
        batch_size = int(finetune["batch_size"])
        if batch_size < 1:
            raise ValueError(f"finetune.batch_size = {batch_size} must be at least 1")
        patience = stopping.get("patience")
        return cls(
            image_size=int(model["image_size"]),
            seed=int(model["seed"]),
            batch_size=batch_size,
            optimizer=str(finetune.get("optimizer", "adamw")),
            layerwise_lr_decay=float(finetune.get("layerwise_lr_decay", 1.0)),
            final_lr_fraction=float(finetune.get("final_lr_fraction", 0.0)),
            label_smoothing=float(finetune.get("label_smoothing", 0.0)),
            class_weights=bool(finetune.get("class_weights", False)),
            patience=None if patience is None else int(patience),
            min_delta=float(stopping.get("min_delta", 0.0)),
            cache_head_features=bool(finetune.get("cache_head_features", True)),
            jit_compile=finetune.get("jit_compile", False),
            policy=OpenPolicy.from_params(images),
            tensorboard_dir=tensorboard_dir,
        )


@dataclass
class _StageGraph:
    """What one stage trains and on what.

    ``trainee`` is what ``fit`` runs; ``holder`` the model whose weights the
    checkpoints and early stopping keep (the head alone on cached features).
    """

    trainee: keras.Model
    holder: keras.Model
    train: Callable[[int], tf.data.Dataset]
    val: tf.data.Dataset
    cached: bool
    optimizer: keras.optimizers.Optimizer | None = None
    schedule: keras.optimizers.schedules.LearningRateSchedule | None = None


def run_stages(
    classifier: Classifier,
    stages: Sequence[Stage],
    *,
    train: Examples,
    val: Examples,
    settings: TrainingSettings,
    store: CheckpointStore,
    replicas: int = 1,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> TrainingState:
    """Trains the stages in order, resuming from ``store`` when it holds a checkpoint.

    Args:
        classifier: The model; trained in place.
        stages: From ``stages.resolve_stages``.
        train: Training images (originals and augmented copies).
        val: Validation images.
        settings: How to train.
        store: This run's checkpoints.
        replicas: Replicas in sync (the global batch is ``batch_size`` times this).
        callbacks: Extra Keras callbacks for every epoch.

    Returns:
        The final state: history rows and one record per stage.

    Raises:
        TrainingDivergedError: The loss became NaN or infinite.
    """
    run = _Run(
        classifier,
        train=train,
        val=val,
        settings=settings,
        store=store,
        replicas=replicas,
        callbacks=callbacks,
    )
    state = run.start(stages)
    for index, stage in enumerate(stages):
        if index >= state.stage_index:
            run.train_stage(index, stage, state)
    if not state.finished:
        state.finished = True
        store.save(state, {})
    return state


def epoch_seed(seed: int, stage_index: int, epoch: int) -> int:
    """The shuffle seed of one epoch: the same on a resumed run as on the first."""
    digest = hashlib.sha256(f"{seed}:{stage_index}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1)


class _Run:
    """One training run: the model, its data and settings, and its checkpoints."""

    def __init__(
        self,
        classifier: Classifier,
        *,
        train: Examples,
        val: Examples,
        settings: TrainingSettings,
        store: CheckpointStore,
        replicas: int,
        callbacks: Sequence[keras.callbacks.Callback],
    ):
        self.classifier = classifier
        self.train = train
        self.val = val
        self.settings = settings
        self.store = store
        self.batch = settings.batch_size * replicas
        self.replicas = replicas
        # Raises here, before any work, when a split cannot feed every replica.
        self.train_batches = batch_sizes(len(train), self.batch, replicas)
        batch_sizes(len(val), self.batch, replicas)
        self.callbacks = list(callbacks)
        self.classes = int(classifier.head.output_shape[-1])
        self.class_weight = (
            _class_weight(train, self.classes) if settings.class_weights else None
        )
        # Pooled features of (train, val) while the backbone stays as it was.
        self.features: tuple[np.ndarray, np.ndarray] | None = None

    def start(self, stages: Sequence[Stage]) -> TrainingState:
        """Checks the input, then loads the checkpoint or starts afresh."""
        self._check_first_batch()
        state = self.store.load()
        if state is None:
            if self.settings.tensorboard_dir is not None:
                shutil.rmtree(self.settings.tensorboard_dir, ignore_errors=True)
            state = TrainingState()
            self.store.save(state, {"base": self.classifier.model.get_weights()})
            return state
        if state.finished:
            logger.info(
                "Training had finished in %s, but its model was not saved: the final "
                "weights are used, no epoch is trained again",
                self.store.folder,
            )
            self.classifier.model.set_weights(self.store.arrays(state, "base"))
            return state
        logger.info(
            "Resuming from %s: stage %d of %d (%s), %d of its epochs done",
            self.store.folder,
            state.stage_index + 1,
            len(stages),
            stages[min(state.stage_index, len(stages) - 1)].name,
            state.epochs_done,
        )
        self.classifier.model.set_weights(self.store.arrays(state, "base"))
        return state

    def train_stage(self, index: int, stage: Stage, state: TrainingState) -> None:
        """Trains one stage to its end, restores its best epoch, checkpoints."""
        started = time.monotonic()
        set_trainable_from(self.classifier.backbone, stage.unfreeze_from)
        if stage.bn_policy == "adapt" and not state.adapted:
            self._adapt()
            state.adapted = True
            self.store.save(state, {"base": self.classifier.model.get_weights()})
        graph = self._graph(stage)
        self._compile(graph, stage)
        best = self._resume(state, graph)
        tensorboard = _tensorboard(self.settings, stage)
        if state.epochs_done < stage.epochs and not _stopped_early(
            state, self.settings
        ):
            best = self._train_epochs(
                index,
                stage,
                graph,
                state,
                best=best,
                callbacks=[*tensorboard, *self.callbacks],
            )
        if best is not None:
            graph.holder.set_weights(best)
        trainable = sum(int(np.prod(w.shape)) for w in graph.trainee.trainable_weights)
        state.next_stage(
            {
                "stage_index": index,
                "stage": stage.name,
                **{k: v for k, v in stage.as_dict().items() if k != "name"},
                "epochs_trained": state.epochs_done,
                "best_epoch": state.best_epoch,
                "best_val_loss": state.best_val_loss,
                "stopped_early": state.epochs_done < stage.epochs,
                "trainable_params": trainable,
                "train_images": len(self.train),
                "global_batch_size": self.batch,
                "augmented_images": self.train.augmented,
                "cached_features": graph.cached,
                "seconds": round(time.monotonic() - started, 1),
            }
        )
        self.store.save(
            state,
            {
                "base": self.classifier.model.get_weights(),
                "progress": [],
                "best": [],
                "optimizer": [],
            },
        )

    def _check_first_batch(self) -> None:
        for images in self._images(self.train).take(1):
            check_pixel_range(keras.ops.convert_to_numpy(images))

    def _images(self, examples: Examples) -> tf.data.Dataset:
        return image_dataset(
            examples.paths,
            None,
            image_size=self.settings.image_size,
            batch_size=self.batch,
            policy=self.settings.policy,
            generated=examples.generated,
        )

    def _adapt(self) -> None:
        seen = adapt_batchnorm(self.classifier.backbone, self._images(self.train))
        self.features = None
        logger.info("BatchNorm statistics re-estimated (adapt) on %d images", seen)

    def _one_hot(self, x, y):
        return x, tf.one_hot(y, self.classes)

    def _graph(self, stage: Stage) -> _StageGraph:
        if self.settings.cache_head_features and stage.head_only:
            return self._cached_graph()

        def images(examples: Examples, seed: int | None) -> tf.data.Dataset:
            return image_dataset(
                examples.paths,
                examples.labels,
                image_size=self.settings.image_size,
                batch_size=self.batch,
                policy=self.settings.policy,
                shuffle_seed=seed,
                generated=examples.generated,
                replicas=self.replicas,
            ).map(self._one_hot)

        return _StageGraph(
            trainee=training_model(self.classifier, stage.bn_policy),
            holder=self.classifier.model,
            train=lambda seed: images(self.train, seed),
            val=images(self.val, None),
            cached=False,
        )

    def _cached_graph(self) -> _StageGraph:
        if self.features is None:
            self.features = tuple(
                pooled_features(
                    self.classifier,
                    examples,
                    image_size=self.settings.image_size,
                    policy=self.settings.policy,
                    batch_size=self.batch,
                    replicas=self.replicas,
                )
                for examples in (self.train, self.val)
            )
        train_features, val_features = self.features
        head = self.classifier.head
        return _StageGraph(
            # A new model on the head's layers: compiling it leaves `head` uncompiled.
            trainee=keras.Model(head.inputs, head.outputs, name="head_on_features"),
            holder=head,
            train=lambda seed: feature_dataset(
                train_features,
                self.train.labels,
                batch_size=self.batch,
                shuffle_seed=seed,
                replicas=self.replicas,
            ).map(self._one_hot),
            val=feature_dataset(
                val_features,
                self.val.labels,
                batch_size=self.batch,
                replicas=self.replicas,
            ).map(self._one_hot),
            cached=True,
        )

    def _compile(self, graph: _StageGraph, stage: Stage) -> None:
        graph.schedule = warmup_cosine(
            stage.learning_rate,
            stage.epochs,
            stage.warmup_epochs,
            len(self.train_batches),
            self.settings.final_lr_fraction,
        )
        graph.optimizer = make_optimizer(
            self.settings.optimizer,
            graph.schedule,
            stage.weight_decay,
            layerwise_multipliers(
                self.classifier.backbone, self.settings.layerwise_lr_decay
            ),
        )
        graph.trainee.compile(
            optimizer=graph.optimizer,
            loss=keras.losses.CategoricalCrossentropy(
                label_smoothing=self.settings.label_smoothing
            ),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            jit_compile=self.settings.jit_compile,
        )
        # Built before fit: creating its variables inside the first traced step makes
        # TensorFlow trace the whole training step twice.
        graph.optimizer.build(graph.trainee.trainable_variables)

    def _resume(
        self, state: TrainingState, graph: _StageGraph
    ) -> list[np.ndarray] | None:
        """Loads a stage's saved progress; returns its best weights so far."""
        if state.epochs_done == 0:
            return None
        graph.holder.set_weights(self.store.arrays(state, "progress"))
        restore_optimizer(graph.optimizer, self.store.arrays(state, "optimizer"))
        return self.store.arrays(state, "best")

    def _train_epochs(
        self,
        index: int,
        stage: Stage,
        graph: _StageGraph,
        state: TrainingState,
        *,
        best: list[np.ndarray] | None,
        callbacks: list[keras.callbacks.Callback],
    ) -> list[np.ndarray] | None:
        """Trains the stage's remaining epochs in one ``fit``; returns the best weights.

        One ``fit`` for all epochs, not one per epoch: each call has a fixed cost
        (iterators, callbacks), as large as a whole epoch of the head on cached
        features. Each epoch still comes in its own seeded order (the same on a
        resumed run as on the first), and :class:`_EpochRecord` records and
        checkpoints it as it ends.
        """
        first = state.epochs_done
        seed = self.settings.seed
        train = graph.train(epoch_seed(seed, index, first))
        for epoch in range(first + 1, stage.epochs):
            train = train.concatenate(graph.train(epoch_seed(seed, index, epoch)))
        record = _EpochRecord(self, index, stage, graph, state, best=best)
        graph.trainee.fit(
            train,
            validation_data=graph.val,
            initial_epoch=first,
            epochs=stage.epochs,
            # Keras keeps one iterator across epochs when this is given.
            steps_per_epoch=len(self.train_batches),
            shuffle=False,
            class_weight=self.class_weight,
            callbacks=[
                _StopOnNonFiniteLoss(stage.name),
                _EpochProgress(stage, self.train_batches),
                record,
                *callbacks,
            ],
            verbose=0,
        )
        return record.best


def _class_weight(train: Examples, classes: int) -> dict[int, float]:
    counts = train.class_counts(classes)
    if (counts == 0).any():
        empty = [int(i) for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"Classes {empty} have no training images; no class weights")
    weights = counts.sum() / (classes * counts)
    logger.info("Class weights: %s", np.round(weights, 3).tolist())
    return {i: float(w) for i, w in enumerate(weights)}


def _mean_rate(
    schedule: keras.optimizers.schedules.LearningRateSchedule, first: int, end: int
) -> float:
    """The mean learning rate of the steps ``first`` to ``end - 1``."""
    rates = [float(keras.ops.convert_to_numpy(schedule(s))) for s in range(first, end)]
    return float(np.mean(rates)) if rates else float("nan")


def _log_epoch(row: Mapping[str, Any], epochs: int) -> None:
    logger.info(
        "stage %s epoch %d/%d: loss %.4f, accuracy %.3f, val_loss %.4f, "
        "val_accuracy %.3f, mean learning rate %.3g (%.1f s)",
        row["stage"],
        row["epoch"],
        epochs,
        row["loss"],
        row["accuracy"],
        row["val_loss"],
        row["val_accuracy"],
        row["learning_rate"],
        row["seconds"],
    )


def _tensorboard(
    settings: TrainingSettings, stage: Stage
) -> list[keras.callbacks.Callback]:
    if settings.tensorboard_dir is None:
        return []
    if importlib.util.find_spec("tensorboard") is None:
        logger.warning(
            "No TensorBoard logs: the `tensorboard` package is not installed "
            "(`pip install tensorboard`, or set finetune.tensorboard_dir: null to "
            "silence this)."
        )
        return []
    return [
        keras.callbacks.TensorBoard(
            log_dir=str(settings.tensorboard_dir / stage.name),
            write_graph=False,
            profile_batch=0,
        )
    ]


def _stopped_early(state: TrainingState, settings: TrainingSettings) -> bool:
    return (
        settings.patience is not None
        and state.epochs_without_improvement >= settings.patience
    )


class _EpochRecord(keras.callbacks.Callback):
    """As each epoch ends: its history row, the best weights, the checkpoint, and
    early stopping."""

    def __init__(
        self,
        run: _Run,
        index: int,
        stage: Stage,
        graph: _StageGraph,
        state: TrainingState,
        *,
        best: list[np.ndarray] | None,
    ):
        super().__init__()
        self._run = run
        self._index = index
        self._stage = stage
        self._graph = graph
        self._state = state
        self.best = best
        self._started = 0.0
        self._first_step = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()
        self._first_step = _steps_done(self._graph.optimizer)

    def on_epoch_end(self, epoch, logs=None):
        logs = {name: float(value) for name, value in (logs or {}).items()}
        state, graph, settings = self._state, self._graph, self._run.settings
        row = {
            "stage": self._stage.name,
            "epoch": epoch + 1,
            "loss": logs["loss"],
            "accuracy": logs["accuracy"],
            "val_loss": logs["val_loss"],
            "val_accuracy": logs["val_accuracy"],
            "learning_rate": _mean_rate(
                graph.schedule, self._first_step, _steps_done(graph.optimizer)
            ),
            "stage_index": self._index,
            "cached_features": graph.cached,
            "seconds": round(time.monotonic() - self._started, 3),
        }
        _log_epoch(row, self._stage.epochs)
        state.history.append(row)
        state.epochs_done = epoch + 1
        saved = {
            "progress": graph.holder.get_weights(),
            "optimizer": optimizer_arrays(graph.optimizer),
        }
        if state.best_val_loss is None or logs["val_loss"] < (
            state.best_val_loss - settings.min_delta
        ):
            state.best_val_loss = logs["val_loss"]
            state.best_epoch = epoch + 1
            state.epochs_without_improvement = 0
            self.best = saved["best"] = saved["progress"]
        else:
            state.epochs_without_improvement += 1
        self._run.store.save(state, saved)
        if _stopped_early(state, settings):
            self.model.stop_training = True


def _steps_done(optimizer: keras.optimizers.Optimizer) -> int:
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


class _StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises :class:`TrainingDivergedError` at the first NaN or infinite loss."""

    def __init__(self, stage: str):
        super().__init__()
        self._stage = stage
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = float(keras.ops.convert_to_numpy((logs or {}).get("loss", 0.0)))
        if not math.isfinite(loss):
            self._fail("loss", loss, f", batch {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        # Before _EpochRecord (the next callback) checkpoints the epoch.
        for name in ("loss", "val_loss"):
            value = float((logs or {}).get(name, 0.0))
            if not math.isfinite(value):
                self._fail(name, value, "")

    def _fail(self, name: str, value: float, where: str) -> None:
        raise TrainingDivergedError(
            f"Training diverged in stage {self._stage!r}, epoch {self._epoch}{where}: "
            f"{name} is {value}. No model was saved. Lower the stage's learning_rate "
            "(finetune.stages or the plan), or check the images for extreme values."
        )


class _EpochProgress(keras.callbacks.Callback):
    """Logs images trained in the epoch, their rate and the time left."""

    def __init__(self, stage: Stage, batches: Sequence[int]):
        super().__init__()
        self._stage = stage
        self._batches = batches
        self._log: ProgressLog | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self._log = ProgressLog(
            f"images trained (stage {self._stage.name}, epoch {epoch + 1}/"
            f"{self._stage.epochs})",
            sum(self._batches),
            logger,
        )

    def on_train_batch_end(self, batch, logs=None):
        self._log.advance(self._batches[batch % len(self._batches)])
