"""Where and how precisely training runs: mixed precision and tf.distribute."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import keras
import tensorflow as tf

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


def distribution_strategy(setting: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy for ``finetune.distribution``.

    ``none``: the default (one device); ``mirrored``: every local GPU (or CPU device);
    ``multi_worker``: several machines, configured by the ``TF_CONFIG`` environment
    variable as tf.distribute documents.
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
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        return tf.distribute.get_strategy()
    logger.info(
        "Training with %s on %d replicas",
        type(strategy).__name__,
        strategy.num_replicas_in_sync,
    )
    return strategy
