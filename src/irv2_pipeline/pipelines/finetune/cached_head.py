"""Pooled backbone features, computed once for a head-only stage.

With the whole backbone frozen and BatchNorm in inference mode, the backbone maps
each image to the same pooled features in every epoch (augmentation happened on disk,
before training). A head-only stage of E epochs therefore runs the backbone once over
the training and validation images and trains the head on the features: about one
backbone pass instead of E. The head is ``classifier.head``, the very layers of
``classifier.model``, so the trained head is already in place in the full model.
The pass itself (:func:`frozen_outputs`) also runs a backbone stage's frozen layers
once (``cached_trunk``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from irv2_pipeline.atomic import replaced_atomically
from irv2_pipeline.classifier import Classifier
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import batch_sizes, image_dataset
from irv2_pipeline.progress import ProgressLog

from .examples import Examples
from .runtime import Workers

logger = logging.getLogger(__name__)


def pooled_features(
    classifier: Classifier,
    examples: Examples,
    *,
    image_size: int,
    policy: OpenPolicy,
    batch_size: int,
    replicas: int = 1,
    workers: Workers | None = None,
) -> np.ndarray:
    """Runs the frozen backbone once over the images, in their order: the
    :func:`frozen_outputs` of ``classifier.features`` (pixels to pooled features),
    the other arguments as there.

    Returns:
        One row of pooled features per image.
    """
    (features,) = frozen_outputs(
        classifier.features,
        examples,
        ["pooled features"],
        image_size=image_size,
        policy=policy,
        batch_size=batch_size,
        replicas=replicas,
        workers=workers,
    )
    return features


def frozen_outputs(  # noqa: PLR0913 - the view, its images, and how to run it
    view: keras.Model,
    examples: Examples,
    what: Sequence[str],
    *,
    image_size: int,
    policy: OpenPolicy,
    batch_size: int,
    replicas: int = 1,
    workers: Workers | None = None,
) -> np.ndarray:
    """Runs a frozen view of the classifier (pixels in) once over the images.

    Args:
        view: A model from pixels to what is cached, in inference mode: one output,
            or several computed in the same pass.
        examples: The images.
        what: What each of its outputs is, for the log.
        image_size: Input side in pixels.
        policy: How images are opened.
        batch_size: Images per forward pass (all replicas together).
        replicas: Replicas the passes are split across.
        workers: In a multi-worker run, each worker runs the view over its shard of
            the images; every worker gets all the outputs back, in order.

    Returns:
        Per output of the view, its values for each image, in the images' order.
    """
    images = (workers or Workers()).dataset(
        lambda shard: image_dataset(
            examples.paths,
            None,
            image_size=image_size,
            batch_size=batch_size,
            policy=policy,
            generated=examples.generated,
            replicas=replicas,
            shard=shard,
        )
    )
    progress = _PredictProgress(batch_sizes(len(examples), batch_size, replicas))
    predicted = view.predict(images, verbose=0, callbacks=[progress])
    outputs = [np.asarray(output) for output in keras.tree.flatten(predicted)]
    for name, output in zip(what, outputs, strict=True):
        logger.info(
            "Cached %d %s (%s values each, one backbone pass)",
            len(output),
            name,
            "x".join(str(side) for side in output.shape[1:]),
        )
    return outputs


def shared_pooled_features(
    classifier: Classifier,
    examples: Examples,
    *,
    cache_dir: Path,
    image_size: int,
    policy: OpenPolicy,
    batch_size: int,
    replicas: int = 1,
    workers: Workers | None = None,
) -> np.ndarray:
    """:func:`pooled_features`, computed once for every run that needs the same ones.

    Runs whose frozen backbones map the same images to the same features (the
    counterfactual variants with a frozen backbone, e.g. a textbook recipe and ours'
    head stage with BatchNorm frozen) share one file in ``cache_dir``, named by a hash
    of everything the features depend on: the backbone's weights and BatchNorm
    statistics, the input scaling and the grayscale rule, the pooling, the image size,
    how images are opened and each image file (path, size, modification time).

    Args:
        classifier: As for :func:`pooled_features`.
        examples: The images.
        cache_dir: Where the shared features are kept.
        image_size: Input side in pixels.
        policy: How images are opened.
        batch_size: Images per forward pass (all replicas together).
        replicas: Replicas the passes are split across.
        workers: As for :func:`pooled_features`; only the chief writes the file.

    Returns:
        One row of pooled features per image.
    """
    path = (
        Path(cache_dir)
        / f"{_features_key(classifier, examples, image_size, policy)}.npy"
    )
    if path.is_file():
        logger.info("Pooled features of %d images read from %s", len(examples), path)
        return np.load(path)
    features = pooled_features(
        classifier,
        examples,
        image_size=image_size,
        policy=policy,
        batch_size=batch_size,
        replicas=replicas,
        workers=workers,
    )
    if workers is not None and not workers.is_chief:
        return features
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as temporary, open(temporary, "wb") as file:
        np.save(file, features)
    return features


def _features_key(
    classifier: Classifier, examples: Examples, image_size: int, policy: OpenPolicy
) -> str:
    digest = hashlib.sha256()
    for array in classifier.features.get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    pooling = [layer.name for layer in classifier.pooling]
    preprocessing = (classifier.input_scaling, classifier.grayscale)
    digest.update(repr((*preprocessing, pooling, image_size, policy)).encode())
    for image, generated in zip(examples.paths, examples.generated, strict=True):
        stat = os.stat(image)
        digest.update(f"{image}|{generated}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


class _PredictProgress(keras.callbacks.Callback):
    def __init__(self, batches: Sequence[int]):
        super().__init__()
        self._log = ProgressLog(
            "images through the frozen backbone", sum(batches), logger
        )
        self._batches = batches

    def on_predict_batch_end(self, batch, logs=None):
        self._log.advance(self._batches[batch])
