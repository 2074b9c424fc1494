"""Staged training: each stage unfreezes, sets BatchNorm, and trains epoch by epoch.

Every epoch is one ``fit`` call on a dataset shuffled with a seed derived from the
run's seed, the stage and the epoch, followed by a checkpoint (every
``checkpoint_every_epochs`` epochs or ``checkpoint_every_minutes`` minutes, written
off the training thread); so a run killed anywhere resumes at the last checkpointed
epoch of its stage and ends with the same weights. Head-only stages train the head on
pooled features computed once (``cached_head``) instead of running the frozen
backbone every epoch; a stage that unfreezes from a unit trains on the outputs of
the frozen layers below it, computed once (``cached_trunk``).

The host reads the training loss once per ``steps_per_execution`` steps (Keras runs
that many steps per call and its callbacks see the logs after each call): NaN
detection and progress work from those logs, so no step waits for the device to
hand its loss to Python.
"""

from __future__ import annotations

import dataclasses
import functools
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

from irv2_pipeline.backbone import (
    adapt_batchnorm,
    batchnorm_layers,
    set_trainable_from,
)
from irv2_pipeline.classifier import Classifier, training_model
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import (
    ReplicaShard,
    batch_sizes,
    check_pixel_range,
    feature_dataset,
    image_dataset,
)
from irv2_pipeline.probe import select_probe
from irv2_pipeline.progress import ProgressLog

from .cached_head import shared_pooled_features
from .cached_trunk import TrunkOutputs, cached_trunk, features_with_trunks
from .checkpoints import (
    CheckpointStore,
    TrainingState,
    changing_variables,
    host_copy,
    optimizer_arrays,
    restore_optimizer,
    restore_variables,
)
from .examples import Examples
from .lr_find import (
    RangeTest,
    RangeTestSettings,
    clip_to_rules,
    range_test,
    suggest_over_seeds,
)
from .optimizer import (
    LR_SCHEDULES,
    layerwise_multipliers,
    make_optimizer,
    stage_schedule,
)
from .runtime import Workers
from .stages import Stage

logger = logging.getLogger(__name__)


HEAD_SOLVERS = ("lbfgs", "minibatch")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; nothing was saved as a result."""


@dataclass(frozen=True)
class TrainingSettings:
    """How stages train, from the ``finetune``, ``model`` and ``images`` parameters.

    Attributes:
        image_size: Input side in pixels.
        seed: Seed of every shuffle.
        batch_size: Images per batch on each replica.
        optimizer: ``adamw``, ``sgd`` or ``adam`` (plain, for the textbook recipes).
        lr_schedule: ``warmup_cosine`` (ours) or ``constant`` (no schedule).
        layerwise_lr_decay: Learning-rate factor per block group away from the head.
        final_lr_fraction: The cosine schedule ends at this fraction of the peak.
        label_smoothing: Of the cross-entropy loss.
        class_weights: Weight the loss by inverse class frequency in training.
        patience: Epochs without improvement of ``val_loss`` before a stage stops;
            ``None`` never stops early.
        min_delta: The least decrease of ``val_loss`` that counts as improvement.
        restore_best_weights: A stage ends with the weights of its epoch of lowest
            ``val_loss``; ``False``: with its last epoch's, as Keras's
            ``fit`` (and ``EarlyStopping``'s default) leaves them.
        cache_head_features: Train head-only stages on cached pooled features.
        cache_trunk_outputs: Train a stage that unfreezes from a unit on the
            outputs of the frozen layers below it, computed once
            (``cached_trunk``).
        trunk_cache_max_mb: The most memory those outputs may take; a stage whose
            outputs would take more runs its frozen layers in every step.
        head_solver: ``lbfgs``: a linear head on cached features is fitted to
            convergence as ``probe.select_probe`` does, its L2 strength chosen on
            validation; ``minibatch``: trained by the optimizer for the stage's
            epochs, like every other stage.
        head_c_grid: Inverse L2 strengths ``lbfgs`` chooses from.
        head_max_iter: L-BFGS iteration cap.
        lr_find: The learning-rate range test run before each trained stage, whose
            suggestion (within ``feature_shift.plan_rules``) replaces the stage's
            rate; ``None``: off.
        jit_compile: XLA compilation (``True``, ``False`` or ``"auto"``).
        steps_per_execution: Training steps per call into the compiled step; the
            host reads the loss (NaN check, progress) once per call.
        checkpoint_every_epochs: Checkpoint after this many epochs since the last
            one; ``None``: only by time.
        checkpoint_every_minutes: Checkpoint at the end of the first epoch this many
            minutes after the last one; ``None``: only by epochs.
        policy: How images are opened.
        tensorboard_dir: Where TensorBoard logs go (``None``: no logs).
        feature_cache_dir: Where runs share the pooled features of head-only stages
            (``cached_head.shared_pooled_features``); ``None``: each run computes
            its own.
    """

    image_size: int
    seed: int
    batch_size: int
    optimizer: str = "adamw"
    lr_schedule: str = "warmup_cosine"
    layerwise_lr_decay: float = 1.0
    final_lr_fraction: float = 0.0
    label_smoothing: float = 0.0
    class_weights: bool = False
    patience: int | None = None
    min_delta: float = 0.0
    restore_best_weights: bool = True
    cache_head_features: bool = True
    cache_trunk_outputs: bool = True
    trunk_cache_max_mb: float = 2048.0
    head_solver: str = "lbfgs"
    head_c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    head_max_iter: int = 1000
    lr_find: RangeTestSettings | None = None
    jit_compile: bool | str = False
    steps_per_execution: int = 1
    checkpoint_every_epochs: int | None = 1
    checkpoint_every_minutes: float | None = None
    policy: OpenPolicy = OpenPolicy()
    tensorboard_dir: Path | None = None
    feature_cache_dir: Path | None = None

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
        linear_head = finetune.get("linear_head") or {}
        solver = str(linear_head.get("solver", cls.head_solver))
        if solver not in HEAD_SOLVERS:
            raise ValueError(
                f"finetune.linear_head.solver = {solver!r}; use one of "
                f"{', '.join(HEAD_SOLVERS)}"
            )
        lr_schedule = str(finetune.get("lr_schedule", cls.lr_schedule))
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"finetune.lr_schedule = {lr_schedule!r}; use one of "
                f"{', '.join(LR_SCHEDULES)}"
            )
        every_epochs = finetune.get("checkpoint_every_epochs", 1)
        every_minutes = finetune.get("checkpoint_every_minutes")
        if every_epochs is None and every_minutes is None:
            raise ValueError(
                "finetune.checkpoint_every_epochs and checkpoint_every_minutes are "
                "both null: set at least one (a killed run resumes from the last "
                "checkpoint)"
            )
        if (every_epochs is not None and int(every_epochs) < 1) or (
            every_minutes is not None and float(every_minutes) <= 0
        ):
            raise ValueError(
                f"finetune.checkpoint_every_epochs = {every_epochs} must be at least 1 "
                f"and checkpoint_every_minutes = {every_minutes} above 0 (or null)"
            )
        trunk_cache_max_mb = float(
            finetune.get("trunk_cache_max_mb", cls.trunk_cache_max_mb)
        )
        if not trunk_cache_max_mb >= 0:
            raise ValueError(
                f"finetune.trunk_cache_max_mb = {trunk_cache_max_mb:g} must be at "
                "least 0 (0: no stage caches the frozen layers' outputs)"
            )
        steps_per_execution = int(finetune.get("steps_per_execution", 1))
        if steps_per_execution < 1:
            raise ValueError(
                f"finetune.steps_per_execution = {steps_per_execution} must be at "
                "least 1"
            )
        return cls(
            image_size=int(model["image_size"]),
            seed=int(model["seed"]),
            batch_size=batch_size,
            optimizer=str(finetune.get("optimizer", "adamw")),
            lr_schedule=lr_schedule,
            layerwise_lr_decay=float(finetune.get("layerwise_lr_decay", 1.0)),
            final_lr_fraction=float(finetune.get("final_lr_fraction", 0.0)),
            label_smoothing=float(finetune.get("label_smoothing", 0.0)),
            class_weights=bool(finetune.get("class_weights", False)),
            patience=None if patience is None else int(patience),
            min_delta=float(stopping.get("min_delta", 0.0)),
            restore_best_weights=bool(
                stopping.get("restore_best_weights", cls.restore_best_weights)
            ),
            cache_head_features=bool(finetune.get("cache_head_features", True)),
            cache_trunk_outputs=bool(
                finetune.get("cache_trunk_outputs", cls.cache_trunk_outputs)
            ),
            trunk_cache_max_mb=trunk_cache_max_mb,
            head_solver=solver,
            head_c_grid=tuple(
                float(c) for c in linear_head.get("c_grid", cls.head_c_grid)
            ),
            head_max_iter=int(linear_head.get("max_iter", cls.head_max_iter)),
            lr_find=RangeTestSettings.from_params(finetune.get("lr_find")),
            jit_compile=finetune.get("jit_compile", False),
            steps_per_execution=steps_per_execution,
            checkpoint_every_epochs=None if every_epochs is None else int(every_epochs),
            checkpoint_every_minutes=(
                None if every_minutes is None else float(every_minutes)
            ),
            policy=OpenPolicy.from_params(images),
            tensorboard_dir=tensorboard_dir,
            feature_cache_dir=(
                None
                if finetune.get("feature_cache_dir") is None
                else Path(finetune["feature_cache_dir"])
            ),
        )


@dataclass
class _StageGraph:
    """What one stage trains and on what.

    ``trainee`` is what ``fit`` runs; ``holder`` the model whose weights the
    checkpoints and early stopping keep (the head alone on cached features).
    ``train`` takes the epoch's shuffle seed, and both take the worker's shard in a
    multi-worker run (``None`` otherwise): see ``runtime.Workers``. ``cached`` says
    the trainee is the head on cached pooled features; ``cached_trunk`` names the
    unit whose input the trainee takes (the frozen layers' outputs, cached).
    """

    trainee: keras.Model
    holder: keras.Model
    train: Callable[[int | None, ReplicaShard | None], tf.data.Dataset]
    val: Callable[[ReplicaShard | None], tf.data.Dataset]
    cached: bool
    cached_trunk: str | None = None
    optimizer: keras.optimizers.Optimizer | None = None
    # A number for a constant rate (finetune.lr_schedule: constant).
    schedule: keras.optimizers.schedules.LearningRateSchedule | float | None = None


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
    adapt_on: Examples | None = None,
    plan_rules: Mapping[str, Any] | None = None,
    workers: Workers | None = None,
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
        adapt_on: The images ``adapt`` stages estimate BatchNorm statistics on;
            ``None``: the original training images (not their augmented copies,
            whose statistics the augmentation shifted).
        plan_rules: ``feature_shift.plan_rules``, the limits the range test's
            suggestions are kept within (needed when ``settings.lr_find`` is set).
        workers: A multi-worker run's sharing of input and results among its
            workers; ``None``: one machine.

    Returns:
        The final state: history rows and one record per stage.

    Raises:
        TrainingDivergedError: The loss became NaN or infinite.
    """
    run = _Run(
        classifier,
        stages,
        train=train,
        val=val,
        settings=settings,
        store=store,
        replicas=replicas,
        callbacks=callbacks,
        adapt_on=train.originals() if adapt_on is None else adapt_on,
        plan_rules=plan_rules,
        workers=workers or Workers(),
    )
    try:
        state = run.start()
        for index, stage in enumerate(stages):
            if index >= state.stage_index:
                run.train_stage(index, stage, state)
        if not state.finished:
            run.finish(state)
    finally:
        # Whatever stopped the run, the checkpoint being written is finished first.
        store.wait()
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
        stages: Sequence[Stage],
        *,
        train: Examples,
        val: Examples,
        settings: TrainingSettings,
        store: CheckpointStore,
        replicas: int,
        callbacks: Sequence[keras.callbacks.Callback],
        adapt_on: Examples,
        plan_rules: Mapping[str, Any] | None,
        workers: Workers,
    ):
        if settings.lr_find is not None and plan_rules is None:
            raise ValueError("The learning-rate range test needs the plan_rules")
        self.classifier = classifier
        self.stages = tuple(stages)
        self.adapt_on = adapt_on
        self.plan_rules = plan_rules
        self.train = train
        self.val = val
        self.settings = settings
        self.store = store
        self.workers = workers
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
        # Per unit, later stages' frozen outputs computed in the features' pass.
        self.trunk_outputs: dict[str, TrunkOutputs] = {}

    def start(self) -> TrainingState:
        """Checks the input, then loads the checkpoint or starts afresh."""
        stages = self.stages
        self._check_first_batch()
        state = self.store.load()
        self.workers.check_same_checkpoint(
            (-1, -1, -1)
            if state is None
            else (state.stage_index, state.epochs_done, state.saves)
        )
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
        """Trains one stage to its end, restores the epoch it keeps, checkpoints."""
        started = time.monotonic()
        set_trainable_from(self.classifier.backbone, stage.unfreeze_from)
        # Outputs of layers this stage trains would not be theirs after it.
        self.trunk_outputs = {
            unit: outputs
            for unit, outputs in self.trunk_outputs.items()
            if not outputs.trunk.trainable_weights
        }
        if stage.bn_policy == "adapt" and not state.adapted:
            if not _statistics_current(state.stage_records):
                self._adapt()
            state.adapted = True
            self.store.save(state, {"base": self.classifier.model.get_weights()})
        graph = self._graph(index, stage)
        solved = graph.cached and self._solves_head()
        if self.settings.lr_find is not None and not solved:
            self._compile(graph, stage)
            stage = self._find_rate(index, stage, graph, state)
        self._compile(graph, stage)
        if solved:
            head_c = self._solve_head(index, stage, graph, state)
        else:
            head_c = None
            self._train(index, stage, graph, state)
        selected = self._select(index, state)
        trainable = sum(int(np.prod(w.shape)) for w in graph.trainee.trainable_weights)
        state.next_stage(
            {
                "stage_index": index,
                "stage": stage.name,
                **{k: v for k, v in stage.as_dict().items() if k != "name"},
                "epochs_trained": state.epochs_done,
                "best_epoch": state.best_epoch,
                "best_val_loss": state.best_val_loss,
                "best_val_accuracy": state.best_val_accuracy,
                "stopped_early": not solved and state.epochs_done < stage.epochs,
                "solver": "lbfgs" if solved else self.settings.optimizer,
                "head_c": head_c,
                **_found_rate_columns(state.found_rates.get(str(index))),
                "trainable_params": trainable,
                "train_images": len(self.train),
                "global_batch_size": self.batch,
                "augmented_images": self.train.augmented,
                "cached_features": graph.cached,
                "cached_trunk": graph.cached_trunk,
                "selected": False,
                "selection": "",
                "seconds": round(time.monotonic() - started, 1),
            }
        )
        weights = self.classifier.model.get_weights()
        self.store.save(
            state,
            {
                "base": weights,
                "progress": [],
                "best": [],
                "optimizer": [],
                # The same list: one file for both roles.
                **({"selected": weights} if selected else {}),
            },
        )

    def finish(self, state: TrainingState) -> None:
        """Ends the run with the weights of the stage of lowest validation loss."""
        chosen = state.selected_stage
        if chosen is not None and chosen != len(state.stage_records) - 1:
            self.classifier.model.set_weights(self.store.arrays(state, "selected"))
        for record in state.stage_records:
            record["selected"] = record["stage_index"] == chosen
            record["selection"] = _selection_reason(record, state)
        kept = state.stage_records[chosen] if chosen is not None else None
        if kept is not None:
            logger.info(
                "The model keeps the weights of stage %r: %s",
                kept["stage"],
                kept["selection"],
            )
        state.finished = True
        self.store.save(
            state, {"base": self.classifier.model.get_weights(), "selected": []}
        )

    def _train(
        self, index: int, stage: Stage, graph: _StageGraph, state: TrainingState
    ) -> None:
        """The stage's remaining epochs, then the weights of the epoch it keeps."""
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
            restore_variables(changing_variables(graph.holder), best, "best weights")

    def _find_rate(
        self, index: int, stage: Stage, graph: _StageGraph, state: TrainingState
    ) -> Stage:
        """The stage at the rate its range test suggests, within the plan's limits.

        The first stage of each kind (head only, or backbone) sweeps; the later ones
        of that kind take their planned rate times the factor the sweep found
        (found over planned), so the plan's ratios between stages
        (``lr_factor_per_step``) hold at the scale the sweep measured. The result is
        checkpointed: a resumed stage trains at the same rate without sweeping again.
        """
        found = state.found_rates.get(str(index))
        if found is None:
            swept = _swept_rate(state, stage.head_only)
            found = (
                self._sweep(index, stage, graph)
                if swept is None
                else self._scaled_rate(stage, swept)
            )
            found["head_only"] = stage.head_only
            state.found_rates[str(index)] = found
            self.store.save(state, {})
            logger.info(
                "Learning rate of stage %r: %s; %s",
                stage.name,
                found["reason"],
                found["clip_note"],
            )
        return dataclasses.replace(stage, learning_rate=found["clipped_rate"])

    def _sweep(self, index: int, stage: Stage, graph: _StageGraph) -> dict[str, Any]:
        """The range test of one stage, over every seed of ``lr_find.seeds``."""
        finder = self.settings.lr_find
        summary = suggest_over_seeds(
            lambda seed: range_test(
                graph.trainee,
                # Shuffled with seeds no epoch uses (epochs count from 0).
                self.workers.local(
                    lambda shard, seed=seed: graph.train(
                        epoch_seed(self.settings.seed, index, -1 - seed), shard
                    )
                ),
                min_lr=finder.min_lr,
                max_lr=finder.max_lr,
                steps=finder.steps,
                seed=seed,
                class_weight=self.class_weight,
            ),
            finder.seeds,
        )
        curve: RangeTest = summary.pop("curve")
        if summary["suggestion"] is None:
            rate = stage.learning_rate
            note = f"no suggestion: the planned {rate:g} is kept"
        else:
            rate, note = clip_to_rules(
                summary["suggestion"],
                head_only=stage.head_only,
                plan_rules=self.plan_rules,
            )
        summary["reason"] = (
            f"range test ({len(finder.seeds)} seeds of {finder.steps} steps): "
            f"{summary['reason']}"
        )
        return {
            **summary,
            "planned_rate": stage.learning_rate,
            "clipped_rate": rate,
            "clip_note": note,
            "curve": {
                "learning_rates": curve.learning_rates.tolist(),
                "losses": curve.losses.tolist(),
                "smoothed": curve.smoothed.tolist(),
                "suggestion": curve.suggestion,
            },
        }

    def _scaled_rate(self, stage: Stage, swept: Mapping[str, Any]) -> dict[str, Any]:
        """A stage's planned rate scaled as an earlier stage's range test scaled its."""
        factor = float(swept["clipped_rate"]) / float(swept["planned_rate"])
        rate, note = clip_to_rules(
            stage.learning_rate * factor,
            head_only=stage.head_only,
            plan_rules=self.plan_rules,
        )
        return {
            "suggestion": None,
            "geometric_std": None,
            "reason": f"planned {stage.learning_rate:g} times {factor:.3g}, the factor "
            f"the range test of stage {swept['stage']!r} found",
            "planned_rate": stage.learning_rate,
            "clipped_rate": rate,
            "clip_note": note.replace("suggestion", "scaled rate"),
        }

    def _solves_head(self) -> bool:
        """Whether the head is one dense layer that L-BFGS fits (``lbfgs``)."""
        dense = [
            layer
            for layer in self.classifier.head.layers
            if isinstance(layer, keras.layers.Dense)
        ]
        return self.settings.head_solver == "lbfgs" and len(dense) == 1

    def _solve_head(
        self, index: int, stage: Stage, graph: _StageGraph, state: TrainingState
    ) -> float:
        """Fits the linear head to convergence on the cached features.

        The head is the linear probe ``feature_shift`` scores the features with, its
        L2 strength chosen on validation. Its history row is measured with the
        stage's compiled loss, like every epoch of the other stages, so that stages
        compare by validation loss. Returns the inverse L2 strength chosen.
        """
        started = time.monotonic()
        train_features, val_features = self.features
        broken = int((~np.isfinite(train_features).all(axis=1)).sum()) + int(
            (~np.isfinite(val_features).all(axis=1)).sum()
        )
        if broken:
            raise TrainingDivergedError(
                f"Stage {stage.name!r}: the frozen backbone gives NaN or infinite "
                f"pooled features for {broken} images, so no head can be fitted. No "
                "model was saved. Check model.weights (a damaged weights file) and the "
                "images for extreme values."
            )
        weights = None
        if self.class_weight is not None:
            weights = np.array([self.class_weight[int(y)] for y in self.train.labels])
        probe, grid = select_probe(
            (train_features, np.asarray(self.train.labels)),
            (val_features, np.asarray(self.val.labels)),
            self.classes,
            c_grid=self.settings.head_c_grid,
            max_iter=self.settings.head_max_iter,
            seed=self.settings.seed,
            sample_weight=weights,
            label_smoothing=self.settings.label_smoothing,
        )
        logger.info(
            "Linear head by L-BFGS, C (inverse L2) chosen on validation: %s",
            ", ".join(
                f"C={row.c:g}: val accuracy {row.val_accuracy:.3f}, val loss "
                f"{row.val_loss:.4f}{' (chosen)' if row.selected else ''}"
                for row in grid.itertuples()
            ),
        )
        logits = self.classifier.head.get_layer("logits")
        # Every worker fits the same features; the chief's head is kept by all, so
        # that no rounding difference between machines splits the replicas.
        logits.set_weights(
            self.workers.from_chief(
                [
                    probe.kernel.astype(logits.kernel.dtype),
                    probe.bias.astype(logits.bias.dtype),
                ]
            )
        )
        fitted = graph.trainee.evaluate(
            self.workers.dataset(lambda shard: graph.train(None, shard)),
            verbose=0,
            return_dict=True,
        )
        checked = graph.trainee.evaluate(
            self.workers.dataset(graph.val), verbose=0, return_dict=True
        )
        row = {
            "stage": stage.name,
            "epoch": 1,
            "loss": float(fitted["loss"]),
            "accuracy": float(fitted["accuracy"]),
            "val_loss": float(checked["loss"]),
            "val_accuracy": float(checked["accuracy"]),
            "learning_rate": math.nan,
            "stage_index": index,
            "cached_features": True,
            "seconds": round(time.monotonic() - started, 3),
        }
        _log_epoch(row, 1)
        state.history.append(row)
        state.epochs_done = 1
        state.best_epoch = 1
        state.best_val_loss = row["val_loss"]
        state.best_val_accuracy = row["val_accuracy"]
        return probe.c

    def _select(self, index: int, state: TrainingState) -> bool:
        """Whether the stage just ended is the best so far (lowest val loss)."""
        loss = state.best_val_loss
        if loss is None or not (
            state.selected_val_loss is None or loss < state.selected_val_loss
        ):
            return False
        state.selected_stage = index
        state.selected_val_loss = loss
        return True

    def _check_first_batch(self) -> None:
        for images in self._images(self.train).take(1):
            check_pixel_range(keras.ops.convert_to_numpy(images))

    def _images(
        self, examples: Examples, shuffle_seed: int | None = None
    ) -> tf.data.Dataset:
        return image_dataset(
            examples.paths,
            None,
            image_size=self.settings.image_size,
            batch_size=self.batch,
            policy=self.settings.policy,
            shuffle_seed=shuffle_seed,
            generated=examples.generated,
        )

    def _adapt(self) -> None:
        # Shuffled: a batch of one class would leave the spread between classes
        # to the merge alone, and BN's batch statistics would differ from the
        # model's use.
        seen = adapt_batchnorm(
            self.classifier.backbone,
            self._images(self.adapt_on, shuffle_seed=self.settings.seed),
            self.classifier.input_scaling,
            self.classifier.grayscale,
        )
        # Each worker estimated them alone (the same images): all keep the chief's.
        statistics = [
            variable
            for layer in batchnorm_layers(self.classifier.backbone)
            for variable in (layer.moving_mean, layer.moving_variance)
        ]
        for variable, value in zip(
            statistics,
            self.workers.from_chief(
                [keras.ops.convert_to_numpy(v) for v in statistics]
            ),
            strict=True,
        ):
            variable.assign(value)
        self.features = None
        self.trunk_outputs = {}
        logger.info("BatchNorm statistics re-estimated (adapt) on %d images", seen)

    def _one_hot(self, x, y):
        return x, tf.one_hot(y, self.classes)

    def _graph(self, index: int, stage: Stage) -> _StageGraph:
        if self.settings.cache_head_features and stage.head_only:
            return self._cached_graph(index)
        trunk = (
            cached_trunk(
                self.classifier,
                stage,
                self.train,
                self.val,
                max_mb=self.settings.trunk_cache_max_mb,
                image_size=self.settings.image_size,
                policy=self.settings.policy,
                batch_size=self.batch,
                replicas=self.replicas,
                workers=self.workers,
                computed=self.trunk_outputs.pop(stage.unfreeze_from, None),
            )
            if self.settings.cache_trunk_outputs
            else None
        )
        if trunk is not None:
            return _StageGraph(
                trainee=trunk.trainee,
                holder=self.classifier.model,
                train=lambda seed, shard: self._cached_batches(
                    trunk.train, self.train, seed, shard
                ),
                val=lambda shard: self._cached_batches(
                    trunk.val, self.val, None, shard
                ),
                cached=False,
                cached_trunk=trunk.unit,
            )

        def images(
            examples: Examples, seed: int | None, shard: ReplicaShard | None
        ) -> tf.data.Dataset:
            return image_dataset(
                examples.paths,
                examples.labels,
                image_size=self.settings.image_size,
                batch_size=self.batch,
                policy=self.settings.policy,
                shuffle_seed=seed,
                generated=examples.generated,
                replicas=self.replicas,
                shard=shard,
            ).map(self._one_hot)

        return _StageGraph(
            trainee=training_model(self.classifier, stage.bn_policy),
            holder=self.classifier.model,
            train=lambda seed, shard: images(self.train, seed, shard),
            val=lambda shard: images(self.val, None, shard),
            cached=False,
        )

    def _cached_graph(self, index: int) -> _StageGraph:
        if self.features is None:
            how = {
                "image_size": self.settings.image_size,
                "policy": self.settings.policy,
                "batch_size": self.batch,
                "replicas": self.replicas,
                "workers": self.workers,
            }
            cache = self.settings.feature_cache_dir
            if cache is not None:
                self.features = tuple(
                    shared_pooled_features(
                        self.classifier, examples, cache_dir=cache, **how
                    )
                    for examples in (self.train, self.val)
                )
            else:
                later = (
                    self.stages[index + 1 :]
                    if self.settings.cache_trunk_outputs
                    else ()
                )
                self.features, computed = features_with_trunks(
                    self.classifier,
                    later,
                    self.train,
                    self.val,
                    max_mb=self.settings.trunk_cache_max_mb,
                    **how,
                )
                self.trunk_outputs = {outputs.unit: outputs for outputs in computed}
        train_features, val_features = self.features
        head = self.classifier.head
        return _StageGraph(
            # A new model on the head's layers: compiling it leaves `head` uncompiled.
            trainee=keras.Model(head.inputs, head.outputs, name="head_on_features"),
            holder=head,
            train=lambda seed, shard: self._cached_batches(
                train_features, self.train, seed, shard
            ),
            val=lambda shard: self._cached_batches(val_features, self.val, None, shard),
            cached=True,
        )

    def _cached_batches(
        self,
        outputs: np.ndarray,
        examples: Examples,
        seed: int | None,
        shard: ReplicaShard | None,
    ) -> tf.data.Dataset:
        """Cached outputs with the labels of their images, batched as the images
        would be for the same seed (``inputs.feature_dataset``)."""
        return feature_dataset(
            outputs,
            examples.labels,
            batch_size=self.batch,
            shuffle_seed=seed,
            replicas=self.replicas,
            shard=shard,
        ).map(self._one_hot)

    def _compile(self, graph: _StageGraph, stage: Stage) -> None:
        graph.schedule = stage_schedule(
            self.settings.lr_schedule,
            stage.learning_rate,
            epochs=stage.epochs,
            warmup_epochs=stage.warmup_epochs,
            steps_per_epoch=len(self.train_batches),
            final_fraction=self.settings.final_lr_fraction,
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
            steps_per_execution=self._steps_per_execution(),
        )
        # Built before fit: creating its variables inside the first traced step makes
        # TensorFlow trace the whole training step twice.
        graph.optimizer.build(graph.trainee.trainable_variables)

    def _steps_per_execution(self) -> int:
        """``steps_per_execution``, or 1 under a distribution strategy: Keras 3.15's
        multi-step loop fails there ("You must feed a value for placeholder tensor",
        keras-team/keras#19246)."""
        steps = self.settings.steps_per_execution
        if steps > 1 and tf.distribute.has_strategy():
            logger.info(
                "steps_per_execution %d is 1 under a distribution strategy "
                "(keras-team/keras#19246): the loss is read after every step",
                steps,
            )
            return 1
        return steps

    def _resume(
        self, state: TrainingState, graph: _StageGraph
    ) -> list[np.ndarray] | None:
        """Loads a stage's saved progress; returns its best weights so far."""
        if state.epochs_done == 0:
            return None
        restore_variables(
            changing_variables(graph.holder),
            self.store.arrays(state, "progress"),
            "weights",
        )
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
        """Trains the stage's remaining epochs; returns the best weights.

        One ``fit`` per epoch, on that epoch's own seeded order (the same on a
        resumed run as on the first): with several steps per execution, one ``fit``
        over all epochs would run the last execution of an epoch into the next
        epoch's batches; ending each ``fit`` with its epoch's data ends the
        execution there. :class:`_EpochRecord` records and checkpoints each epoch as
        it ends.
        """
        record = _EpochRecord(self, index, stage, graph, state, best=best)
        progress = _EpochProgress(stage, self.train_batches)
        stop = _StopOnNonFiniteLoss(stage.name)
        for epoch in range(state.epochs_done, stage.epochs):
            seed = epoch_seed(self.settings.seed, index, epoch)
            graph.trainee.fit(
                self.workers.dataset(functools.partial(graph.train, seed)),
                validation_data=self.workers.dataset(graph.val),
                initial_epoch=epoch,
                epochs=epoch + 1,
                shuffle=False,
                class_weight=self.class_weight,
                callbacks=[stop, progress, record, *callbacks],
                verbose=0,
            )
            if _stopped_early(state, self.settings):
                break
        return record.best


def _found_rate_columns(found: Mapping[str, Any] | None) -> dict[str, Any]:
    """The stage record's columns of its range test (empty values without one)."""
    if found is None:
        return {
            "planned_learning_rate": None,
            "lr_suggestion": None,
            "lr_spread": None,
            "lr_note": "",
        }
    return {
        "planned_learning_rate": found["planned_rate"],
        "lr_suggestion": found["suggestion"],
        "lr_spread": found["geometric_std"],
        "lr_note": f"{found['reason']}; {found['clip_note']}",
    }


def _swept_rate(state: TrainingState, head_only: bool) -> dict[str, Any] | None:
    """The first range test of a stage of this kind (head only or backbone), with
    its stage's name, or ``None`` when none has run."""
    names = {str(r["stage_index"]): r["stage"] for r in state.stage_records}
    for index, found in sorted(state.found_rates.items(), key=lambda i: int(i[0])):
        if "curve" in found and found.get("head_only") == head_only:
            return {**found, "stage": names.get(index, index)}
    return None


def found_curves(state: TrainingState) -> dict[str, RangeTest]:
    """Stage name to the sweep its rate came from, in stage order (stages whose rate
    was scaled from an earlier sweep have none of their own)."""
    names = {str(r["stage_index"]): r["stage"] for r in state.stage_records}
    return {
        names.get(index, index): RangeTest(
            learning_rates=np.asarray(found["curve"]["learning_rates"]),
            losses=np.asarray(found["curve"]["losses"]),
            smoothed=np.asarray(found["curve"]["smoothed"]),
            suggestion=found["curve"]["suggestion"],
            reason=found["reason"],
        )
        for index, found in sorted(state.found_rates.items(), key=lambda i: int(i[0]))
        if "curve" in found
    }


def _statistics_current(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether an earlier stage adapted BatchNorm and no stage since trained the
    backbone: then the statistics are those of the backbone as it is."""
    for record in reversed(records):
        if record["unfreeze_from"] is not None:
            return False
        if record["bn_policy"] == "adapt":
            return True
    return False


def _selection_reason(record: Mapping[str, Any], state: TrainingState) -> str:
    """Why a stage's weights were kept or not, with the validation losses."""
    loss = record["best_val_loss"]
    if record["selected"]:
        return f"lowest validation loss of all stages ({loss:.4f})"
    kept = state.stage_records[state.selected_stage]
    return (
        f"validation loss {loss:.4f}, not below stage {kept['stage']!r}'s "
        f"{kept['best_val_loss']:.4f}: not kept"
    )


def _class_weight(train: Examples, classes: int) -> dict[int, float]:
    counts = train.class_counts(classes)
    if (counts == 0).any():
        empty = [int(i) for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"Classes {empty} have no training images; no class weights")
    weights = counts.sum() / (classes * counts)
    logger.info("Class weights: %s", np.round(weights, 3).tolist())
    return {i: float(w) for i, w in enumerate(weights)}


def _mean_rate(
    schedule: keras.optimizers.schedules.LearningRateSchedule | float,
    first: int,
    end: int,
) -> float:
    """The mean learning rate of the steps ``first`` to ``end - 1``."""
    if isinstance(schedule, float):
        return schedule
    if end <= first:
        return float("nan")
    # One read of all the steps' rates, not one per step.
    rates = keras.ops.stack([schedule(step) for step in range(first, end)])
    return float(np.mean(keras.ops.convert_to_numpy(rates)))


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
    """As each epoch ends: its history row, the best weights, the checkpoint when
    one is due, and early stopping.

    Weights are copied to the host on the training thread only when an epoch is the
    best so far or a checkpoint is due, and only the stage's changing variables; the
    checkpoint is written in the background (``CheckpointStore.save_in_background``).
    """

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
        self._changing = changing_variables(graph.holder)
        self.best = best
        # A resumed stage's best weights came from its checkpoint.
        self._best_saved = best is not None
        self._checkpointed_epochs = state.epochs_done
        self._checkpointed_at = time.monotonic()
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
        due = self._checkpoint_due(epoch + 1)
        improved = state.lowest_val_loss is None or logs["val_loss"] < (
            state.lowest_val_loss - settings.min_delta
        )
        if improved:
            state.lowest_val_loss = logs["val_loss"]
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        kept = improved or not settings.restore_best_weights
        weights = host_copy(self._changing) if due or kept else None
        if kept:
            state.best_val_loss = logs["val_loss"]
            state.best_val_accuracy = logs["val_accuracy"]
            state.best_epoch = epoch + 1
            self.best, self._best_saved = weights, False
        if due:
            saved = {
                "progress": weights,
                "optimizer": optimizer_arrays(graph.optimizer),
            }
            if not self._best_saved:
                # The same list as progress when this epoch is the best: one file.
                saved["best"] = self.best
                self._best_saved = True
            self._run.store.save_in_background(state, saved)
            self._checkpointed_epochs = epoch + 1
            self._checkpointed_at = time.monotonic()
        if _stopped_early(state, settings):
            self.model.stop_training = True

    def _checkpoint_due(self, epochs_done: int) -> bool:
        settings = self._run.settings
        every_epochs, every_minutes = (
            settings.checkpoint_every_epochs,
            settings.checkpoint_every_minutes,
        )
        return (
            every_epochs is not None
            and epochs_done - self._checkpointed_epochs >= every_epochs
        ) or (
            every_minutes is not None
            and time.monotonic() - self._checkpointed_at >= every_minutes * 60
        )


def _steps_done(optimizer: keras.optimizers.Optimizer) -> int:
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


class _StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises :class:`TrainingDivergedError` at the first NaN or infinite loss.

    It reads Keras's logs after each execution (``steps_per_execution`` steps):
    their loss is the epoch's running mean, which a NaN or infinite step leaves
    non-finite, so no step goes unchecked. Keras has already turned the logs into
    Python numbers; nothing here reads a tensor.
    """

    def __init__(self, stage: str):
        super().__init__()
        self._stage = stage
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss", 0.0)
        if not math.isfinite(loss):
            self._fail("loss", loss, f", by batch {batch + 1}")

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
    """Logs images trained in the epoch, their rate and the time left.

    Counts from the batch index Keras gives after each execution (its last step),
    never from a tensor.
    """

    def __init__(self, stage: Stage, batches: Sequence[int]):
        super().__init__()
        self._stage = stage
        self._batches = batches
        self._log: ProgressLog | None = None
        self._done = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._log = ProgressLog(
            f"images trained (stage {self._stage.name}, epoch {epoch + 1}/"
            f"{self._stage.epochs})",
            sum(self._batches),
            logger,
        )
        self._done = 0

    def on_train_batch_end(self, batch, logs=None):
        # The last execution of an epoch may stop short of its last step's index.
        done = min(batch + 1, len(self._batches))
        self._log.advance(sum(self._batches[self._done : done]))
        self._done = done
