"""What a stage trains: exactly the unfrozen units, and BatchNorm as its policy says."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from irv2_pipeline.backbone import (
    adapt_batchnorm,
    batchnorm_layers,
    preprocessing_layer,
    set_trainable_from,
    unit_map,
)
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import image_dataset

from .conftest import (
    IMAGE_SIZE,
    MINI_UNITS,
    demo_examples,
    mini_classifier,
    stage,
    train,
)


@pytest.fixture(scope="module")
def examples():
    return demo_examples(train_per_class=3, val_per_class=1)


def snapshot(backbone: keras.Model) -> dict[str, list[np.ndarray]]:
    return {layer.name: layer.get_weights() for layer in backbone.layers}


def changed(before: list[np.ndarray], after: list[np.ndarray]) -> list[bool]:
    return [not np.array_equal(b, a) for b, a in zip(before, after, strict=True)]


def moving_statistics(layer: keras.layers.BatchNormalization) -> list[np.ndarray]:
    return [layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()]


def test_frozen_stage_trains_the_unfrozen_units_and_keeps_bn_statistics(
    examples, tmp_path
):
    classifier = mini_classifier()
    backbone = classifier.backbone
    before = snapshot(backbone)
    state = train(
        classifier, [stage("top", "block8_1", bn_policy="frozen")], examples, tmp_path
    )
    units = unit_map(backbone)
    first = MINI_UNITS.index("block8_1")
    for layer in backbone.layers:
        if not layer.weights:
            continue
        unfrozen = MINI_UNITS.index(units[layer.name]) >= first
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = changed(
                before[layer.name], layer.get_weights()
            )
            assert (gamma, beta) == (unfrozen, unfrozen), layer.name
            assert not mean and not variance, f"{layer.name} statistics moved"
        else:
            assert all(changed(before[layer.name], layer.get_weights())) == unfrozen, (
                layer.name
            )
    record = state.stage_records[0]
    head = sum(w.numpy().size for w in classifier.head.trainable_weights)
    assert record["trainable_params"] == set_trainable_from(backbone, "block8_1") + head
    assert record["bn_policy"] == "frozen" and not record["cached_features"]


def test_train_stage_updates_bn_statistics_of_unfrozen_units_only(examples, tmp_path):
    classifier = mini_classifier()
    backbone = classifier.backbone
    units = unit_map(backbone)
    before = {b.name: moving_statistics(b) for b in batchnorm_layers(backbone)}
    train(
        classifier, [stage("deep", "block17_1", bn_policy="train")], examples, tmp_path
    )
    first = MINI_UNITS.index("block17_1")
    for layer in batchnorm_layers(backbone):
        moved = changed(before[layer.name], moving_statistics(layer))
        unfrozen = MINI_UNITS.index(units[layer.name]) >= first
        assert moved == [unfrozen, unfrozen], layer.name


def test_adapt_re_estimates_bn_statistics_before_the_stage_then_freezes_them(
    examples, tmp_path
):
    classifier = mini_classifier()
    layers = batchnorm_layers(classifier.backbone)
    initial = [moving_statistics(layer) for layer in layers]

    class StatisticsAtStart(keras.callbacks.Callback):
        seen: list = []

        def on_train_begin(self, logs=None):
            self.seen.append([moving_statistics(layer) for layer in layers])

    at_start = StatisticsAtStart()
    state = train(
        classifier,
        [stage("top", "block8_1", bn_policy="adapt")],
        examples,
        tmp_path,
        callbacks=(at_start,),
    )
    adapted = at_start.seen[0]
    final = [moving_statistics(layer) for layer in layers]
    for layer, start, after, end in zip(layers, initial, adapted, final, strict=True):
        assert all(changed(start, after)), f"{layer.name} was not adapted"
        assert not any(changed(after, end)), f"{layer.name} moved while training"
    assert state.stage_records[0]["bn_policy"] == "adapt"


# Probabilistic rounding-error bounds hold except with probability 2 exp(-36 / 2).
LAMBDA = 6.0


def test_adapted_statistics_are_those_of_all_images():
    classifier = mini_classifier()
    backbone = classifier.backbone
    first_bn = batchnorm_layers(backbone)[0]
    train_examples, _ = demo_examples(train_per_class=2, val_per_class=1)

    def images(batch_size):
        return image_dataset(
            train_examples.paths,
            None,
            image_size=IMAGE_SIZE,
            batch_size=batch_size,
            policy=OpenPolicy(),
        )

    # 6 images in batches of 4 and 2, in class order (bag, bag, sneaker, sneaker,
    # trouser, trouser): the batches differ, and their variances alone miss that.
    assert adapt_batchnorm(backbone, images(4)) == 6
    conv = keras.Model(backbone.input, first_bn.input)
    pixels = np.concatenate([batch.numpy() for batch in images(6)])
    values = conv.predict(preprocessing_layer()(pixels), verbose=0).astype(np.float64)
    batches = (values[:4], values[4:])
    means = [batch.mean(axis=(0, 1, 2)) for batch in batches]
    # BN sums each batch's pixels in float32: n terms err by at most
    # LAMBDA * sqrt(n) * u * (sum of the terms' magnitudes), except with probability
    # 2 exp(-LAMBDA^2 / 2) (Higham and Mary's probabilistic bound); the variance is
    # two-pass (tf.nn.moments), so its terms are the squared deviations, and the
    # batch means' errors enter the merge through the squared gap between them.
    n = 4 * values.shape[1] * values.shape[2]
    scale = LAMBDA * np.sqrt(n) * np.finfo(np.float32).eps / 2
    mean_tolerance = scale * np.abs(values).mean(axis=(0, 1, 2))
    mean_error = np.abs(first_bn.moving_mean.numpy() - values.mean(axis=(0, 1, 2)))
    assert (mean_error <= mean_tolerance).all(), mean_error / mean_tolerance
    overall = values.var(axis=(0, 1, 2))
    variance_tolerance = scale * overall + 2 * np.abs(means[0] - means[1]) * (
        mean_tolerance
    )
    variance_error = np.abs(first_bn.moving_variance.numpy() - overall)
    assert (variance_error <= variance_tolerance).all(), (
        variance_error / variance_tolerance
    )
    # What an average of the batches' variances would have given: less, by more than
    # ten times the tolerance, so the check tells the two apart.
    per_batch = (
        4 * batches[0].var(axis=(0, 1, 2)) + 2 * batches[1].var(axis=(0, 1, 2))
    ) / 6
    assert (overall - per_batch > 10 * variance_tolerance).any()
    assert first_bn.trainable and first_bn.momentum == 0.99
