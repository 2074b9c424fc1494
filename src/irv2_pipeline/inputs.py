"""tf.data input pipelines built from manifests.

Users' images are opened through ``images.load_image`` (the one safe way: EXIF
orientation, every colour mode, no silent truncation) on parallel threads and resized
to the model's size. Files this project generated (the augmented copies: plain RGB
JPEG or PNG, upright, already at the model's size) are decoded by TensorFlow's own
decoders inside the graph instead, without Python, which reads them about twice as
fast. Either way images come as ``float32`` RGB in ``[0, 255]``: the model itself maps
them to IRv2's ``[-1, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from irv2_pipeline.images import OpenPolicy, load_image, resize


class PixelRangeError(ValueError):
    """A batch whose pixel values are not plain ``[0, 255]`` RGB."""


def class_names(manifest: pd.DataFrame) -> list[str]:
    """The class names in index order (sorted labels): one order for every pipeline."""
    return sorted(manifest["label"].unique())


def image_dataset(
    paths: Sequence[str],
    labels: Sequence[int] | None,
    *,
    image_size: int,
    batch_size: int,
    policy: OpenPolicy,
    shuffle_seed: int | None = None,
    generated: Sequence[bool] | None = None,
) -> tf.data.Dataset:
    """A batched, prefetched dataset of ``(images, labels)`` (or images alone).

    Args:
        paths: Absolute image paths.
        labels: Class indices, one per path, or ``None`` for prediction.
        image_size: Output side in pixels.
        batch_size: Images per batch.
        policy: How images are opened (see ``images.OpenPolicy``).
        shuffle_seed: Shuffle with this seed every epoch (training); ``None`` keeps
            the manifest order (validation, test, feature extraction).
        generated: For each path, whether this project wrote the file (an augmented
            copy), so TensorFlow may decode it; ``None``: none of them.

    Returns:
        A ``tf.data.Dataset`` of ``float32`` images of shape
        ``(batch, image_size, image_size, 3)`` in ``[0, 255]``.
    """
    paths = [str(path) for path in paths]
    index = _example_order(tf.data.Dataset.range(len(paths)), shuffle_seed)
    flags = [False] * len(paths) if generated is None else [bool(g) for g in generated]
    if len(flags) != len(paths):
        raise ValueError(f"{len(flags)} generated flags for {len(paths)} paths")
    path_tensor = tf.constant(paths, dtype=tf.string)
    generated_tensor = tf.constant(flags, dtype=tf.bool)

    def load(i: np.int64) -> np.ndarray:
        pixels = load_image(paths[int(i)], policy).pixels
        return resize(pixels, image_size)

    def load_generated(i: tf.Tensor) -> tf.Tensor:
        data = tf.io.read_file(tf.gather(path_tensor, i))
        # The accurate integer DCT is libjpeg's default, which Pillow uses; TF's own
        # default (the fast one) would give other pixels than load_image does.
        image = tf.cond(
            tf.io.is_jpeg(data),
            lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_png(data, channels=3),
        )
        # A copy written for another model.image_size: resize it as images.resize
        # would (bilinear, antialiased); a copy at the right size is left as it is.
        return tf.cond(
            tf.reduce_all(tf.shape(image)[:2] == image_size),
            lambda: image,
            lambda: tf.cast(
                tf.round(
                    tf.image.resize(image, (image_size, image_size), antialias=True)
                ),
                tf.uint8,
            ),
        )

    def load_tensor(i: tf.Tensor) -> tf.Tensor:
        image = tf.cond(
            tf.gather(generated_tensor, i),
            lambda: load_generated(i),
            lambda: tf.numpy_function(load, [i], tf.uint8, stateful=False),
        )
        image.set_shape((image_size, image_size, 3))
        return tf.cast(image, tf.float32)

    if labels is None:
        examples = index.map(
            load_tensor, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    else:
        label_tensor = tf.constant(np.asarray(labels, dtype=np.int32))
        # Image and label from the same index in one map: zipping two maps of a
        # shuffled `index` would shuffle each branch on its own and pair images with
        # other images' labels.
        examples = index.map(
            lambda i: (load_tensor(i), tf.gather(label_tensor, i)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return examples.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def feature_dataset(
    features: np.ndarray,
    labels: Sequence[int],
    *,
    batch_size: int,
    shuffle_seed: int | None = None,
) -> tf.data.Dataset:
    """A batched dataset of ``(features, labels)`` from arrays in memory.

    For the same ``shuffle_seed`` the examples come in the same order as
    :func:`image_dataset` gives the images they were computed from, so training on
    cached features sees exactly the batches training on the images would.

    Args:
        features: One row per example (for example pooled backbone features).
        labels: Class indices, one per row.
        batch_size: Examples per batch.
        shuffle_seed: As in :func:`image_dataset`.
    """
    features = np.asarray(features)
    label_array = np.asarray(labels, dtype=np.int32)
    if len(features) != len(label_array):
        raise ValueError(f"{len(features)} feature rows but {len(label_array)} labels")
    pairs = _example_order(
        tf.data.Dataset.from_tensor_slices((features, label_array)), shuffle_seed
    )
    return pairs.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _example_order(
    examples: tf.data.Dataset, shuffle_seed: int | None
) -> tf.data.Dataset:
    """The examples in order, or reshuffled each epoch with a seed.

    The shuffle draws the same permutation for any elements of one count, so images
    and the features computed from them come in the same order for one seed.
    """
    if shuffle_seed is None:
        return examples
    count = int(examples.cardinality())
    return examples.shuffle(count, seed=shuffle_seed, reshuffle_each_iteration=True)


def check_pixel_range(batch: np.ndarray) -> None:
    """Stops with a clear error when a batch is not plain ``[0, 255]`` RGB pixels.

    Args:
        batch: One batch of images, as fed to the model.

    Raises:
        PixelRangeError: Values outside ``[0, 255]``, or all within ``[0, 1]`` (the
            textbook ``1/255`` scaling), or within ``[-1, 1]`` (already preprocessed).
    """
    values = np.asarray(batch, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 255.0:
        raise PixelRangeError(
            f"Input pixels span [{low:.3g}, {high:.3g}]; the model expects RGB in "
            "[0, 255] and applies IRv2's own preprocessing itself."
        )
    if high <= 1.0 and values.size > 0:
        raise PixelRangeError(
            f"Input pixels span [{low:.3g}, {high:.3g}]: they look scaled by 1/255. "
            "Feed plain [0, 255] RGB: the model applies IRv2's [-1, 1] preprocessing "
            "itself."
        )
