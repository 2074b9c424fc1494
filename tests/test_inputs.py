"""Tests of inputs.py: tf.data pipelines built from manifests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from irv2_pipeline import inputs
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import (
    PixelRangeError,
    ReplicaShard,
    batch_sizes,
    check_pixel_range,
    class_names,
    feature_dataset,
    image_dataset,
)


@pytest.fixture
def coloured_files(tmp_path):
    """Six 20x30 images of known flat colours, one of them CMYK."""
    paths = []
    for i in range(6):
        colour = (40 * i, 255 - 40 * i, 7 * i)
        path = tmp_path / f"img_{i}.png"
        Image.new("RGB", (30, 20), colour).save(path)
        paths.append(path)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(cmyk, quality=100)
    return paths, cmyk


def test_images_come_resized_in_order_as_float_pixels(coloured_files):
    paths, _ = coloured_files
    dataset = image_dataset(
        paths, [0, 1, 2, 0, 1, 2], image_size=16, batch_size=4, policy=OpenPolicy()
    )
    batches = list(dataset.as_numpy_iterator())
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert [b[0].shape[0] for b in batches] == [4, 2]
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.float32
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    for i in range(6):
        assert images[i, 8, 8].tolist() == [40 * i, 255 - 40 * i, 7 * i]


def test_images_are_opened_through_images_py(coloured_files):
    _, cmyk = coloured_files
    (batch,) = list(
        image_dataset([cmyk], None, image_size=8, batch_size=1, policy=OpenPolicy())
    )
    red, green, blue = batch.numpy()[0, 4, 4]
    assert red > 240 and green < 15 and blue < 15


def test_shuffle_is_seeded_and_reshuffles_each_epoch(coloured_files):
    paths, _ = coloured_files
    labels = list(range(6))

    def epochs(seed):
        dataset = image_dataset(
            paths,
            labels,
            image_size=8,
            batch_size=6,
            policy=OpenPolicy(),
            shuffle_seed=seed,
        )
        return [next(iter(dataset))[1].numpy().tolist() for _ in range(2)]

    first, second = epochs(3)
    assert sorted(first) == labels
    assert first != second
    assert epochs(3) == [first, second]


def test_class_names_are_sorted_labels():
    manifest = pd.DataFrame({"label": ["dog", "cat", "dog", "bird"]})
    assert class_names(manifest) == ["bird", "cat", "dog"]


@pytest.mark.parametrize(
    ("low", "high", "message"),
    [(0.0, 1.0, "1/255"), (-1.0, 1.0, r"\[-1, 1\]"), (0.0, 300.0, r"\[0, 255\]")],
)
def test_wrongly_scaled_batches_stop_with_a_clear_error(low, high, message):
    batch = np.linspace(low, high, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    with pytest.raises(PixelRangeError, match=message):
        check_pixel_range(batch)


def test_plain_pixels_pass_the_range_check():
    check_pixel_range(np.linspace(0, 255, 48, dtype=np.float32).reshape(1, 4, 4, 3))


def _noise_copies(folder, size: int = 32) -> list:
    """Copies as augmentation writes them: RGB JPEG (quality 95) and PNG, at size."""
    rng = np.random.default_rng(0)
    paths = []
    for i, kind in enumerate(["JPEG", "PNG", "JPEG", "PNG"]):
        path = folder / f"copy_{i}.{kind.lower()}"
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, kind, quality=95)
        paths.append(path)
    return paths


def _read(paths, generated, image_size: int = 32) -> np.ndarray:
    dataset = image_dataset(
        paths,
        None,
        image_size=image_size,
        batch_size=2,
        policy=OpenPolicy(),
        generated=generated,
    )
    return np.concatenate(list(dataset.as_numpy_iterator()))


def test_generated_copies_decode_in_the_graph_to_the_same_pixels(tmp_path):
    paths = _noise_copies(tmp_path)
    in_graph = _read(paths, [True] * 4)
    np.testing.assert_array_equal(in_graph, _read(paths, None))
    # A copy written at another size is resized; within rounding of images.resize.
    resized = _read(paths, [True] * 4, image_size=24)
    assert np.abs(resized - _read(paths, None, image_size=24)).max() <= 1


def test_generated_and_user_images_mixed_keep_their_labels(coloured_files):
    paths, _ = coloured_files
    dataset = image_dataset(
        paths,
        list(range(6)),
        image_size=16,
        batch_size=3,
        policy=OpenPolicy(),
        shuffle_seed=3,
        generated=[False, True] * 3,
    )
    for images, labels in dataset.as_numpy_iterator():
        for image, i in zip(images, labels, strict=True):
            assert image[8, 8].tolist() == [40 * i, 255 - 40 * i, 7 * i]


def test_generated_flags_must_match_the_paths(coloured_files):
    paths, _ = coloured_files
    with pytest.raises(ValueError, match="5 generated flags for 6 paths"):
        image_dataset(
            paths,
            None,
            image_size=8,
            batch_size=2,
            policy=OpenPolicy(),
            generated=[1] * 5,
        )


@pytest.mark.parametrize("replicas", [2, 3, 4, 8])
@pytest.mark.parametrize("per_replica", [1, 2, 4, 32])
def test_every_batch_gives_every_replica_an_image(replicas, per_replica):
    # tf.distribute splits each batch evenly over the replicas: a batch of fewer
    # images than replicas leaves one empty, and an unevenly split first batch stops
    # Keras from building the model.
    batch = per_replica * replicas
    for count in range(2 * replicas, 3 * batch + 2 * replicas):
        sizes = batch_sizes(count, batch, replicas)
        assert sum(sizes) == count
        assert min(sizes) >= replicas, (count, sizes)
        assert sizes[0] % replicas == 0, (count, sizes)
        assert max(sizes) < batch + replicas, (count, sizes)
        # Only the end of a pass is cut differently from plain batches.
        assert sizes[: len(sizes) - 2] == [batch] * max(0, len(sizes) - 2)


def test_one_replica_and_even_passes_batch_plainly():
    assert batch_sizes(10, 4) == [4, 4, 2]
    assert batch_sizes(0, 4) == []
    assert batch_sizes(12, 8, replicas=2) == [8, 4]
    assert batch_sizes(9, 8, replicas=2) == [4, 5]
    assert batch_sizes(17, 8, replicas=2) == [8, 9]


def test_too_few_images_for_the_replicas_is_a_clear_error():
    with pytest.raises(ValueError, match="3 images cannot be spread over 2 replicas"):
        batch_sizes(3, 4, replicas=2)
    assert batch_sizes(2, 4, replicas=2) == [2]


def test_datasets_cut_their_batches_for_the_replicas(coloured_files):
    paths, _ = coloured_files
    paths = [*paths, *paths[:3]]
    images = image_dataset(
        paths,
        list(range(9)),
        image_size=8,
        batch_size=8,
        policy=OpenPolicy(),
        shuffle_seed=3,
        replicas=2,
    )
    batches = list(images.as_numpy_iterator())
    assert [len(labels) for _, labels in batches] == [4, 5]
    assert sorted(np.concatenate([labels for _, labels in batches])) == list(range(9))
    features = feature_dataset(
        np.arange(9.0)[:, None], list(range(9)), batch_size=8, replicas=2
    )
    assert [len(y) for _, y in features.as_numpy_iterator()] == [4, 5]


@pytest.mark.parametrize(("workers", "local"), [(2, 1), (3, 1), (2, 2)])
@pytest.mark.parametrize("count", [8, 9, 13, 21, 40])
def test_worker_shards_split_every_global_batch_and_take_the_same_steps(
    workers, local, count
):
    batch = 4 * workers * local
    plans = [
        ReplicaShard(worker, workers, local).plan(count, batch)
        for worker in range(workers)
    ]
    masks = np.stack([mask for mask, _ in plans])
    # Each example is read by exactly one worker.
    assert (masks.sum(axis=0) == 1).all()
    global_batches = batch_sizes(count, batch, workers * local)
    for mask, sizes in plans:
        # One per-replica batch per local replica per global step, on every
        # worker: the same number of steps (a mismatch deadlocks the all-reduce).
        assert len(sizes) == local * len(global_batches)
        assert sum(sizes) == mask.sum()
        assert min(sizes) >= 1


def test_shards_concatenated_per_step_give_the_examples_back_in_order():
    # Keras concatenates the replicas' predictions worker by worker within each
    # step (one replica per worker here): the shards must follow that order.
    features = np.arange(13.0)[:, None]
    shards = [
        [
            x[:, 0].tolist()
            for x, _ in feature_dataset(
                features,
                list(range(13)),
                batch_size=4,
                replicas=2,
                shuffle_seed=3,
                shard=ReplicaShard(worker, 2),
            ).as_numpy_iterator()
        ]
        for worker in range(2)
    ]
    whole = [
        x[:, 0].tolist()
        for x, _ in feature_dataset(
            features, list(range(13)), batch_size=4, replicas=2, shuffle_seed=3
        ).as_numpy_iterator()
    ]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    assert [a + b for a, b in zip(*shards, strict=True)] == whole


def test_a_worker_opens_only_its_own_images(coloured_files, monkeypatch):
    paths, _ = coloured_files
    opened = []
    real = inputs.load_resized

    def recording(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(inputs, "load_resized", recording)
    shard = ReplicaShard(1, 2)
    images = image_dataset(
        paths, None, image_size=8, batch_size=4, policy=OpenPolicy(), shard=shard
    )
    list(images.as_numpy_iterator())
    mask, _ = shard.plan(len(paths), 4)
    assert sorted(opened) == sorted(
        str(p) for p, m in zip(paths, mask, strict=True) if m
    )


KEYS = {"image_size": 8, "batch_size": 4, "policy": OpenPolicy()}


@pytest.mark.parametrize(
    "dataset",
    [
        lambda paths: image_dataset(paths, None, **KEYS),
        lambda paths: image_dataset(
            paths, list(range(6)), **KEYS, shuffle_seed=1, replicas=2
        ),
        lambda paths: image_dataset(paths, None, **KEYS, shard=ReplicaShard(1, 2)),
        lambda _: feature_dataset(np.zeros((6, 2)), list(range(6)), batch_size=4),
        lambda _: feature_dataset(
            np.zeros((6, 2)),
            list(range(6)),
            batch_size=4,
            replicas=2,
            shard=ReplicaShard(0, 2),
        ),
    ],
    ids=["images", "training images", "a worker's images", "features", "a shard's"],
)
def test_no_dataset_starts_the_autotuning_thread(coloured_files, dataset):
    # Deleting an iterator joins that thread, which may first sleep out its
    # optimisation period: seconds at the end of a pass (bench/input_pipeline.py
    # passes).
    paths, _ = coloured_files
    made = dataset(paths)
    assert made.options().autotune.enabled is False
    assert sum(1 for _ in made) > 0
