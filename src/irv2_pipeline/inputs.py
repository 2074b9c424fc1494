"""tf.data input pipelines built from manifests.

Users' images are opened through ``images.load_image`` (the one safe way: EXIF
orientation, every colour mode, no silent truncation) on parallel threads and resized
to the model's size. Files this project generated (the augmented copies: plain RGB
JPEG or PNG, upright, already at the model's size) are decoded by TensorFlow's own
decoders inside the graph instead, without Python, which reads them about twice as
fast. Either way images come as ``float32`` RGB in ``[0, 255]``: the model itself
preprocesses them (``finetune.input_scaling``).

TensorFlow is imported by the functions that build datasets: ``class_names``,
``model_classes`` and ``check_pixel_range`` serve node modules that every ``kedro`` command loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from irv2_pipeline.images import OpenPolicy, load_resized

if TYPE_CHECKING:
    import tensorflow as tf


class PixelRangeError(ValueError):
    """A batch whose pixel values are not plain ``[0, 255]`` RGB."""


def batch_sizes(count: int, batch_size: int, replicas: int = 1) -> list[int]:
    """The sizes of the batches one pass over ``count`` examples is cut into.

    On one replica: full batches, the last one holding the rest. On several,
    ``tf.distribute`` splits every batch evenly across the replicas, and two batch
    shapes break training: a batch of fewer examples than replicas gives a replica an
    empty batch (TensorFlow's CPU convolution then returns a wrongly shaped tensor), and
    a first batch that does not split evenly stops Keras from building the model (it
    averages the first batch's replica shares). So the rest of a pass too small to give
    every replica an example joins the batch before it, and when that would make the
    first batch uneven, the pass is cut into two batches of at least one example per
    replica, the first a multiple of ``replicas``. Every example is used: validation
    and prediction see every image, training every image of every epoch.

    Args:
        count: Examples in one pass.
        batch_size: The global batch size (a multiple of ``replicas``).
        replicas: Replicas in sync.

    Returns:
        Batch sizes summing to ``count`` (none for no examples).

    Raises:
        ValueError: Fewer examples than it takes to give every replica one in each
            batch (fewer than ``2 * replicas`` and not a multiple of ``replicas``).
    """
    if count < 0 or batch_size < 1:
        raise ValueError(f"No batches of {batch_size} from {count} examples")
    full, rest = divmod(count, batch_size)
    sizes = [batch_size] * full + ([rest] if rest else [])
    if (
        replicas == 1
        or rest == 0
        or (rest >= replicas and (full or rest % replicas == 0))
    ):
        return sizes
    if full >= 2:
        return [*sizes[:-2], batch_size + rest]
    if count < 2 * replicas:
        raise ValueError(
            f"{count} images cannot be spread over {replicas} replicas with an image "
            f"for each replica in every batch: use at least {2 * replicas} images, "
            f"a multiple of {replicas}, or fewer replicas."
        )
    first = replicas * (count // (2 * replicas))
    return [first, count - first]


@dataclass(frozen=True)
class ReplicaShard:
    """The part of every global batch one worker of a multi-worker run reads.

    Each global batch (cut by :func:`batch_sizes`) is split into one contiguous chunk
    per replica, as evenly as possible. Chunk ``k`` belongs to local replica
    ``k // workers`` of worker ``k % workers``: the order in which Keras concatenates
    the replicas' predictions under ``MultiWorkerMirroredStrategy``, so predicting
    over the shards gives the examples back in their order. Every worker cuts the
    same global batches, so all run the same number of steps (a worker with one step
    more would wait forever in its all-reduce).

    Attributes:
        worker: This worker's index (the chief is 0).
        workers: Workers in the cluster.
        local_replicas: Replicas on each worker.
    """

    worker: int
    workers: int
    local_replicas: int = 1

    @property
    def replicas(self) -> int:
        """Replicas in sync, all workers together."""
        return self.workers * self.local_replicas

    def plan(self, count: int, batch_size: int) -> tuple[np.ndarray, list[int]]:
        """Which of ``count`` ordered examples this worker reads, and how it batches them.

        Args:
            count: Examples in one pass.
            batch_size: The global batch size.

        Returns:
            A mask over the examples' positions, and this worker's per-replica batch
            sizes, in the order its replicas take them (one per local replica per
            global batch).
        """
        mask = np.zeros(count, dtype=bool)
        sizes = []
        offset = 0
        for size in batch_sizes(count, batch_size, self.replicas):
            parts = [
                size // self.replicas + (k < size % self.replicas)
                for k in range(self.replicas)
            ]
            starts = np.concatenate([[0], np.cumsum(parts)]) + offset
            for local in range(self.local_replicas):
                chunk = local * self.workers + self.worker
                mask[starts[chunk] : starts[chunk + 1]] = True
                sizes.append(parts[chunk])
            offset += size
        return mask, sizes


def class_names(manifest: pd.DataFrame) -> list[str]:
    """The class names in index order (sorted labels): one order for every pipeline."""
    return sorted(manifest["label"].unique())


def model_classes(
    model_class_names: Sequence[str],
    manifest: pd.DataFrame,
    error: type[Exception] = ValueError,
) -> list[str]:
    """The manifest's classes, checked to be the model's, in its output order.

    Raises:
        error: The model was trained on other classes than the manifest has.
    """
    classes = class_names(manifest)
    if list(model_class_names) != classes:
        raise error(
            f"finetuned_model was trained on the classes {list(model_class_names)} "
            f"but image_manifest has {classes}: rerun `kedro run --pipeline finetune`."
        )
    return classes


def image_dataset(
    paths: Sequence[str],
    labels: Sequence[int] | None,
    *,
    image_size: int,
    batch_size: int,
    policy: OpenPolicy,
    shuffle_seed: int | None = None,
    generated: Sequence[bool] | None = None,
    replicas: int = 1,
    shard: ReplicaShard | None = None,
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
        replicas: Replicas the batches are split across (see :func:`batch_sizes`).
        shard: In a multi-worker run, this worker's part: only its images are
            opened, and the batches are its replicas' shares of each global batch
            of ``batch_size`` (``replicas`` is then the shard's).

    Returns:
        A ``tf.data.Dataset`` of ``float32`` images of shape
        ``(batch, image_size, image_size, 3)`` in ``[0, 255]``.
    """
    import tensorflow as tf  # noqa: PLC0415 - see the module docstring

    paths = [str(path) for path in paths]
    index = _example_order(tf.data.Dataset.range(len(paths)), shuffle_seed)
    # Sharded before the images are opened: each worker reads its own images only.
    index = _kept(index, len(paths), batch_size, shard)
    flags = [False] * len(paths) if generated is None else [bool(g) for g in generated]
    if len(flags) != len(paths):
        raise ValueError(f"{len(flags)} generated flags for {len(paths)} paths")
    path_tensor = tf.constant(paths, dtype=tf.string)
    generated_tensor = tf.constant(flags, dtype=tf.bool)

    def load(i: np.int64) -> np.ndarray:
        return load_resized(paths[int(i)], policy, image_size)

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
    return _batched(examples, len(paths), batch_size, replicas, shard)


def feature_dataset(
    features: np.ndarray,
    labels: Sequence[int],
    *,
    batch_size: int,
    shuffle_seed: int | None = None,
    replicas: int = 1,
    shard: ReplicaShard | None = None,
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
        replicas: As in :func:`image_dataset`.
        shard: As in :func:`image_dataset`.
    """
    import tensorflow as tf  # noqa: PLC0415 - see the module docstring

    features = np.asarray(features)
    label_array = np.asarray(labels, dtype=np.int32)
    if len(features) != len(label_array):
        raise ValueError(f"{len(features)} feature rows but {len(label_array)} labels")
    pairs = _example_order(
        tf.data.Dataset.from_tensor_slices((features, label_array)), shuffle_seed
    )
    pairs = _kept(pairs, len(features), batch_size, shard)
    return _batched(pairs, len(features), batch_size, replicas, shard)


def _kept(
    examples: tf.data.Dataset,
    count: int,
    batch_size: int,
    shard: ReplicaShard | None,
) -> tf.data.Dataset:
    """The examples of ``shard`` (all of them without one), in their order."""
    if shard is None:
        return examples
    import tensorflow as tf  # noqa: PLC0415 - see the module docstring

    mask = tf.constant(shard.plan(count, batch_size)[0])
    return (
        examples.enumerate()
        .filter(lambda position, _: tf.gather(mask, position))
        .map(lambda _, example: example)
    )


def _batched(
    examples: tf.data.Dataset,
    count: int,
    batch_size: int,
    replicas: int,
    shard: ReplicaShard | None = None,
) -> tf.data.Dataset:
    """Batches as :func:`batch_sizes` cuts them (or the shard's share), prefetched."""
    import tensorflow as tf  # noqa: PLC0415 - see the module docstring

    if shard is not None:
        sizes = shard.plan(count, batch_size)[1]
        if not sizes:
            return _prefetched(examples.batch(1))
        return _prefetched(
            examples.batch(max(sizes))
            .rebatch(sizes)
            .apply(tf.data.experimental.assert_cardinality(len(sizes)))
        )
    batches = examples.batch(batch_size)
    sizes = batch_sizes(count, batch_size, replicas)
    if sizes != batch_sizes(count, batch_size):
        # `rebatch` re-cuts the stream of examples, cycling through `sizes`: one
        # cycle is exactly one pass. It loses the count of batches, which Keras
        # needs to tell the end of a pass from input that ran out.
        batches = batches.rebatch(sizes).apply(
            tf.data.experimental.assert_cardinality(len(sizes))
        )
    return _prefetched(batches)


def _prefetched(batches: tf.data.Dataset) -> tf.data.Dataset:
    """``batches`` prefetched, with tf.data's autotuning thread off.

    Deleting an iterator joins that thread, which can first sleep out its
    optimisation period: 4 to 9 s at the end of about half the passes over a test
    split (bench/input_pipeline.py passes). Without it, parallel maps run one call
    per core, up to 16; a pass that did not wait took as long either way.
    """
    import tensorflow as tf  # noqa: PLC0415 - see the module docstring

    options = tf.data.Options()
    options.autotune.enabled = False
    return batches.prefetch(tf.data.AUTOTUNE).with_options(options)


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
            "[0, 255] and preprocesses them itself."
        )
    if high <= 1.0 and values.size > 0:
        raise PixelRangeError(
            f"Input pixels span [{low:.3g}, {high:.3g}]: they look scaled by 1/255. "
            "Feed plain [0, 255] RGB: the model preprocesses them itself."
        )
