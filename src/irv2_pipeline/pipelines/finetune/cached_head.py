"""Pooled backbone features, computed once for a head-only stage.

With the whole backbone frozen and BatchNorm in inference mode, the backbone maps
each image to the same pooled features in every epoch (augmentation happened on disk,
before training). A head-only stage of E epochs therefore runs the backbone once over
the training and validation images and trains the head on the features: about one
backbone pass instead of E. The head is ``classifier.head``, the very layers of
``classifier.model``, so the trained head is already in place in the full model.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import keras
import numpy as np

from irv2_pipeline.classifier import Classifier
from irv2_pipeline.inputs import image_dataset
from irv2_pipeline.progress import ProgressLog

from .examples import Examples

if TYPE_CHECKING:
    from .training import TrainingSettings

logger = logging.getLogger(__name__)


def pooled_features(
    classifier: Classifier,
    examples: Examples,
    settings: TrainingSettings,
    batch_size: int,
) -> np.ndarray:
    """Runs the frozen backbone once over the images, in their order.

    Args:
        classifier: Its ``features`` view (pixels to pooled features) is used.
        examples: The images.
        settings: Image size and how images are opened.
        batch_size: Images per forward pass.

    Returns:
        One row of pooled features per image.
    """
    images = image_dataset(
        examples.paths,
        None,
        image_size=settings.image_size,
        batch_size=batch_size,
        policy=settings.policy,
        generated=examples.generated,
    )
    progress = _PredictProgress(len(examples), batch_size)
    features = classifier.features.predict(images, verbose=0, callbacks=[progress])
    logger.info(
        "Cached %d pooled features of %d values (one backbone pass)",
        len(features),
        features.shape[-1],
    )
    return np.asarray(features)


class _PredictProgress(keras.callbacks.Callback):
    def __init__(self, total: int, batch_size: int):
        super().__init__()
        self._log = ProgressLog("images through the frozen backbone", total, logger)
        self._total = total
        self._batch_size = batch_size
        self._done = 0

    def on_predict_batch_end(self, batch, logs=None):
        count = min(self._batch_size, self._total - self._done)
        self._done += count
        self._log.advance(count)
