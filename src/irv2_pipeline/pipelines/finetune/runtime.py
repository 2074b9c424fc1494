"""Where and how precisely training runs: mixed precision and tf.distribute."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import keras
import numpy as np
import tensorflow as tf

from irv2_pipeline.cluster import ClusterRole, cluster_role
from irv2_pipeline.inputs import ReplicaShard

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")
# bfloat16 tensor cores arrived with compute capability 8.0 (Ampere).
BFLOAT16_CAPABILITY = (8, 0)


def precision_policy(setting: str, gpu_capabilities: Sequence[tuple[int, int]]) -> str:
    """The Keras dtype policy for ``finetune.mixed_precision``.

    ``auto`` is ``float32`` without a GPU, ``mixed_bfloat16`` when every GPU has
    bfloat16 tensor cores (no loss scaling needed), ``mixed_float16`` otherwise.

    Args:
        setting: One of :data:`PRECISIONS`.
        gpu_capabilities: The compute capability of each visible GPU.
    """
    if setting not in PRECISIONS:
        raise ValueError(
            f"finetune.mixed_precision = {setting!r}; use one of {', '.join(PRECISIONS)}"
        )
    if setting != "auto":
        return setting
    if not gpu_capabilities:
        return "float32"
    if all(tuple(c) >= BFLOAT16_CAPABILITY for c in gpu_capabilities):
        return "mixed_bfloat16"
    return "mixed_float16"


def gpu_capabilities() -> list[tuple[int, int]]:
    """The compute capability of each GPU TensorFlow sees (empty on CPU)."""
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability", (0, 0))))
    return capabilities


@contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Sets Keras's global dtype policy for the block and restores it afterwards."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def distribution_strategy(
    setting: str, cluster_timeout_s: float = 300.0
) -> tf.distribute.Strategy:
    """The tf.distribute strategy for ``finetune.distribution``.

    ``none``: the default (one device); ``mirrored``: every local GPU (or CPU device);
    ``multi_worker``: several machines, configured by the ``TF_CONFIG`` environment
    variable as tf.distribute documents.

    Args:
        setting: One of :data:`DISTRIBUTIONS`.
        cluster_timeout_s: ``multi_worker``: how long to wait for every worker to
            join before the process stops, naming the workers that do not answer.
    """
    if setting not in DISTRIBUTIONS:
        raise ValueError(
            f"finetune.distribution = {setting!r}; use one of {', '.join(DISTRIBUTIONS)}"
        )
    if setting != "none" and keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"finetune.distribution = {setting!r} uses tf.distribute and needs the "
            f"TensorFlow backend; KERAS_BACKEND is {keras.backend.backend()!r}."
        )
    if setting == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif setting == "multi_worker":
        if not cluster_timeout_s > 0:
            raise ValueError(
                f"finetune.cluster_timeout_s = {cluster_timeout_s}: must be a "
                "positive number of seconds"
            )
        strategy = _multi_worker_strategy(cluster_role(), cluster_timeout_s)
    else:
        return tf.distribute.get_strategy()
    logger.info(
        "Training with %s on %d replicas",
        type(strategy).__name__,
        strategy.num_replicas_in_sync,
    )
    return strategy


def _multi_worker_strategy(
    role: ClusterRole, timeout_s: float
) -> tf.distribute.MultiWorkerMirroredStrategy:
    """Joins the cluster of ``TF_CONFIG``; the process ends after ``timeout_s``
    without it.

    Creating the strategy blocks inside TensorFlow's C++ runtime, holding the
    interpreter lock, until every worker has joined, with no deadline that
    TensorFlow 2.21 honours there (neither the coordination service's registration
    timeout nor the collective health check's initial timeout ends it). A small
    watchdog process (``cluster.watch``) therefore logs which workers do not
    answer and ends this one when the time is up.
    """
    logger.info(
        "Worker %d of %d (%s, chief: %s): waiting up to %gs for %s",
        role.worker_index,
        len(role.addresses),
        role.address,
        role.is_chief,
        timeout_s,
        ", ".join(role.peers),
    )
    watchdog = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments
        [
            sys.executable,
            "-m",
            "irv2_pipeline.cluster",
            str(os.getpid()),
            str(timeout_s),
        ]
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    finally:
        watchdog.terminate()
        watchdog.wait()


class WorkerMismatchError(RuntimeError):
    """The workers of one run are not at the same point of training."""


class Workers:
    """How one training run shares its input and results among its workers.

    On one machine (``strategy`` is not multi-worker) it changes nothing. Under
    ``MultiWorkerMirroredStrategy`` each worker reads its own :class:`ReplicaShard`
    of every dataset, and what a worker computes alone (a fitted head, BatchNorm
    statistics) is replaced by the chief's, so every worker holds the same model.

    Args:
        strategy: The run's strategy.
        role: This worker's place in the cluster (multi-worker runs only).
    """

    def __init__(
        self,
        strategy: tf.distribute.Strategy | None = None,
        role: ClusterRole | None = None,
    ):
        multi = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        if multi and role is None:
            raise ValueError("A multi-worker strategy needs the worker's role")
        self._strategy = strategy if multi else None
        self.role = role if multi else None
        self.shard = (
            ReplicaShard(
                worker=role.worker_index,
                workers=len(role.addresses),
                local_replicas=strategy.num_replicas_in_sync // len(role.addresses),
            )
            if multi
            else None
        )

    @property
    def is_chief(self) -> bool:
        """Whether this worker writes checkpoints and logs (always on one machine)."""
        return self.role is None or self.role.is_chief

    def dataset(
        self, build: Callable[[ReplicaShard | None], tf.data.Dataset]
    ) -> tf.data.Dataset | tf.distribute.DistributedDataset:
        """What ``fit``, ``evaluate`` and ``predict`` take: ``build(None)`` on one
        machine, each worker's ``build(shard)`` distributed to its replicas."""
        if self._strategy is None:
            return build(None)
        return self._strategy.distribute_datasets_from_function(
            lambda context: build(self._checked(context))
        )

    def local(
        self, build: Callable[[ReplicaShard | None], tf.data.Dataset]
    ) -> tf.data.Dataset:
        """This worker's own part, as a plain dataset (for ``train_on_batch``)."""
        return build(self.shard)

    def from_chief(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The chief's ``arrays`` on every worker (one all-reduce of their sum with
        zeros from the others); ``arrays`` themselves on one machine."""
        if self._strategy is None or not arrays:
            return [np.asarray(a) for a in arrays]
        shapes = [np.shape(a) for a in arrays]
        flat = np.concatenate([np.ravel(a).astype(np.float64) for a in arrays])
        total = self._sum_over_workers(flat if self.is_chief else np.zeros_like(flat))
        out, start = [], 0
        for array, shape in zip(arrays, shapes, strict=True):
            size = int(np.prod(shape))
            out.append(
                total[start : start + size]
                .reshape(shape)
                .astype(np.asarray(array).dtype)
            )
            start += size
        return out

    def check_same_checkpoint(self, position: Sequence[int]) -> None:
        """Raises on every worker when one resumes from another checkpoint than the
        chief (a ``checkpoint_dir`` that not all workers share): they would train
        different stages in lockstep, or wait for each other forever.

        Args:
            position: Where this worker's checkpoint is (stage, epochs, saves);
                the same on every worker of a consistent run.
        """
        if self._strategy is None:
            return
        mine = np.asarray(position, dtype=np.float64)
        (chief,) = self.from_chief([mine])
        differs = float(not np.array_equal(chief, mine))
        if self._sum_over_workers(np.asarray([differs]))[0] > 0:
            raise WorkerMismatchError(
                "The workers resume from different checkpoints (the chief's is at "
                f"{chief.astype(int).tolist()}, worker {self.shard.worker}'s at "
                f"{mine.astype(int).tolist()}: stage, epochs, saves). Every worker "
                "must read the chief's finetune.checkpoint_dir: put it on storage "
                "all workers share."
            )

    def _sum_over_workers(self, vector: np.ndarray) -> np.ndarray:
        """The sum of each worker's ``vector`` (counted once per worker), on all."""

        def first_local_replica(context):
            local = context.replica_id_in_sync_group % self.shard.local_replicas
            return vector if local == 0 else 0.0 * vector

        values = self._strategy.experimental_distribute_values_from_function(
            first_local_replica
        )
        return np.asarray(
            self._strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None)
        )

    def _checked(self, context: tf.distribute.InputContext) -> ReplicaShard:
        if context.input_pipeline_id != self.shard.worker:
            raise RuntimeError(
                f"tf.distribute calls this worker input pipeline "
                f"{context.input_pipeline_id}; TF_CONFIG makes it worker "
                f"{self.shard.worker}"
            )
        return self.shard


@contextmanager
def keras_multi_worker_fixes() -> Iterator[None]:
    """Makes Keras 3's ``fit``/``evaluate``/``predict`` work under
    ``MultiWorkerMirroredStrategy`` for the block.

    Keras 3.15's TensorFlow trainer fails there (keras-team/keras#20585, open):
    its symbolic build all-reduces the first batch's ``(x, y)`` tuple as one tensor,
    and it reduces every step's scalar metrics along an axis they do not have. The
    fix takes the shapes from the first local replica's batch, and averages each
    metric over all replicas (so every worker logs, and decides on, the same
    values). Restored on exit.
    """
    from keras.src import tree  # noqa: PLC0415
    from keras.src.backend.tensorflow import trainer  # noqa: PLC0415

    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = trainer.reduce_per_replica

    def symbolic_build(model, iterator=None, data_batch=None):
        strategy = model._distribute_strategy
        if strategy is None:
            return
        if iterator is not None:
            for _, _, distributed in iterator:
                data_batch = tree.map_structure(
                    lambda v: (
                        strategy.experimental_local_results(v)[0]
                        if isinstance(v, tf.distribute.DistributedValues)
                        else v
                    ),
                    next(distributed),
                )
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction="auto"):
        if reduction in ("auto", "mean"):
            return tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None), values
            )
        return original_reduce(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        trainer.TensorFlowTrainer._maybe_symbolic_build = original_build
        trainer.reduce_per_replica = original_reduce
