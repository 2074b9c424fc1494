"""Instruments a node's input pipeline to show whether it streams its images.

:class:`DecodeCounter` stands in for ``inputs.load_resized`` and counts the images
decoded; :class:`CountingModel` wraps the model a node predicts with and records, at
each ``predict_on_batch``, how many images had been decoded by then. An image decoded
but not yet handed to the model waits in memory (in tf.data's buffers, or in a list
when a node materialises its data set), so the largest lead of decoding over
prediction bounds the decoded images alive at once. A streaming node keeps that lead
to a few batches, however many images there are; one that loads every image first
has decoded all of them before its first prediction. (Users' images, which both
nodes read, are decoded by ``load_resized``; copies this project wrote are decoded by
TensorFlow and not counted.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np


def lead_limit(batch_size: int) -> int:
    """The most images a streaming pipeline may decode ahead of the model.

    tf.data's look-ahead in ``inputs.image_dataset``: the batch being assembled, the
    prefetched batches (autotuned: more when the model keeps up with decoding) and
    the parallel decodes in flight (up to one per core). With 2 cores, batches of 4
    and a model faster than decoding, 1 to 8 batches were seen, for 48 to 800 images.
    """
    return 16 * batch_size + 2 * (os.cpu_count() or 1)


def images_to_stream(batch_size: int) -> int:
    """Enough images that decoding all of them first is 3x :func:`lead_limit`."""
    return 3 * (lead_limit(batch_size) + batch_size)


class DecodeCounter:
    """Wraps ``load_resized`` and counts the images decoded (thread-safe).

    Args:
        load: The real ``load_resized``.
    """

    def __init__(self, load: Callable[..., Any]):
        self._load = load
        self._lock = threading.Lock()
        self.count = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        loaded = self._load(*args, **kwargs)
        with self._lock:
            self.count += 1
        return loaded


class CountingModel:
    """A model (or probe) whose ``predict_on_batch`` notes the images decoded so far.

    Every other attribute is the wrapped model's.

    Args:
        model: The model the node predicts with.
        decoded: The counter that replaced ``load_resized``.
    """

    def __init__(self, model: Any, decoded: DecodeCounter):
        self._model = model
        self._decoded = decoded
        self.decoded_at_batch: list[int] = []

    def predict_on_batch(self, batch: np.ndarray) -> Any:
        """Notes the decoded count, then predicts with the wrapped model."""
        self.decoded_at_batch.append(self._decoded.count)
        return self._model.predict_on_batch(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def largest_lead(self, batch_size: int, n_images: int) -> int:
        """The most images decoded beyond those handed to the model, over the run.

        At batch ``k`` (from 0) the model has been given ``min((k + 1) * batch_size,
        n_images)`` images, counting the batch it is being given.
        """
        return max(
            decoded - min((k + 1) * batch_size, n_images)
            for k, decoded in enumerate(self.decoded_at_batch)
        )
