"""The head-only stage on cached features: the same training, one backbone pass."""

from __future__ import annotations

import numpy as np
from PIL import Image

from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import feature_dataset, image_dataset

from .conftest import IMAGE_SIZE, demo_examples, mini_classifier, stage, train


def pixels(examples) -> np.ndarray:
    batches = image_dataset(
        examples.paths, None, image_size=IMAGE_SIZE, batch_size=4, policy=OpenPolicy()
    )
    return np.concatenate([batch.numpy() for batch in batches])


def test_features_come_in_the_order_the_images_would_for_the_same_seed():
    examples, _ = demo_examples(train_per_class=4, val_per_class=1)
    codes = np.arange(len(examples), dtype=np.float32)[:, None]
    images = image_dataset(
        examples.paths,
        list(range(len(examples))),
        image_size=IMAGE_SIZE,
        batch_size=5,
        policy=OpenPolicy(),
        shuffle_seed=11,
    )
    features = feature_dataset(
        codes, list(range(len(examples))), batch_size=5, shuffle_seed=11
    )
    orders = []
    for _ in range(2):  # two epochs: each reshuffles, both the same way
        image_order = np.concatenate([labels.numpy() for _, labels in images])
        batches = list(features)
        feature_order = np.concatenate([labels.numpy() for _, labels in batches])
        feature_rows = np.concatenate([rows.numpy()[:, 0] for rows, _ in batches])
        np.testing.assert_array_equal(image_order, feature_order)
        np.testing.assert_array_equal(feature_rows, feature_order)
        assert sorted(image_order) == list(range(len(examples)))
        orders.append(list(image_order))
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])


def test_shuffled_images_keep_their_own_labels(tmp_path):
    # Each image is one grey level; its label is that level's index.
    paths = []
    for level in range(12):
        path = tmp_path / f"{level}.png"
        Image.fromarray(np.full((16, 16, 3), level * 20, np.uint8)).save(path)
        paths.append(path)
    images = image_dataset(
        paths,
        list(range(12)),
        image_size=16,
        batch_size=5,
        policy=OpenPolicy(min_size=1),
        shuffle_seed=11,
    )
    for _ in range(2):
        for batch, labels in images:
            np.testing.assert_array_equal(batch.numpy()[:, 0, 0, 0] / 20, labels)


def test_head_trained_on_cached_features_is_the_models_head(tmp_path):
    examples = demo_examples(train_per_class=3, val_per_class=1)
    classifier = mini_classifier()
    before = classifier.head.get_weights()
    state = train(classifier, [stage("head", None)], examples, tmp_path)
    assert state.stage_records[0]["cached_features"]
    assert state.history[0]["cached_features"]
    assert not np.array_equal(before[0], classifier.head.get_weights()[0])
    images = pixels(examples[1])
    grafted = classifier.model.predict(images, batch_size=4, verbose=0)
    features = classifier.features.predict(images, batch_size=4, verbose=0)
    np.testing.assert_array_equal(
        grafted, classifier.head.predict(features, batch_size=4, verbose=0)
    )


def test_cached_and_uncached_head_stages_reach_the_same_weights(tmp_path):
    examples = demo_examples(train_per_class=4, val_per_class=1)
    head_stage = stage("head", None, epochs=2, learning_rate=1e-3)
    results = {}
    for cached in (True, False):
        classifier = mini_classifier(seed=5, dropout=0.0)
        state = train(
            classifier,
            [head_stage],
            examples,
            tmp_path / str(cached),
            cache_head_features=cached,
            # Epoch by epoch in both, to compare the two ways of running the backbone.
            head_solver="minibatch",
        )
        assert state.stage_records[0]["cached_features"] == cached
        results[cached] = (classifier.head.get_weights(), state.history)
    initial = mini_classifier(seed=5, dropout=0.0).head.get_weights()
    (cached_weights, cached_history), (plain_weights, plain_history) = (
        results[True],
        results[False],
    )
    for start, fast, plain in zip(initial, cached_weights, plain_weights, strict=True):
        assert np.abs(plain - start).max() > 1e-3  # the head did train
        np.testing.assert_allclose(fast, plain, atol=2e-5)
    for fast, plain in zip(cached_history, plain_history, strict=True):
        np.testing.assert_allclose(fast["loss"], plain["loss"], rtol=1e-5)
        np.testing.assert_allclose(fast["val_loss"], plain["val_loss"], rtol=1e-5)
