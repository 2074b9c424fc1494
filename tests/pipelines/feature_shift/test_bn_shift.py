"""A backbone whose BN statistics come from image set A: no shift on A, shift on B
(A heavily blurred), and a plan that unfreezes more for B."""

from __future__ import annotations

import copy

import keras
import numpy as np
import pytest
from PIL import Image, ImageFilter

from irv2_pipeline.backbone import preprocessing_layer
from irv2_pipeline.images import OpenPolicy, load_image, resize
from irv2_pipeline.pipelines.feature_shift.moments import batch_norm_layers
from irv2_pipeline.pipelines.feature_shift.plan import Measurements, plan_stages
from irv2_pipeline.pipelines.feature_shift.shift import (
    block_shift,
    shift_profile,
    unit_order,
)

from .conftest import (
    DEPTHS,
    IMAGE_SIZE,
    feature_shift_params,
    load_pixels,
    write_images,
)


@pytest.fixture
def statistics_from(irv2_probe):
    """``statistics_from(pixels)`` sets every BN layer's moving statistics to the
    statistics of its input over ``pixels`` (AdaBN with one batch); undone after."""
    layers = [
        layer
        for layer in irv2_probe.backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    saved = [
        (layer.moving_mean.numpy(), layer.moving_variance.numpy(), layer.momentum)
        for layer in layers
    ]

    def set_from(pixels: np.ndarray) -> None:
        # In training mode each BN layer normalizes with the batch's own statistics;
        # with momentum 0 its moving statistics become exactly those, layer after
        # layer, so inference on the same images then sees what training mode saw.
        for layer in layers:
            layer.momentum = 0.0
        irv2_probe.backbone(preprocessing_layer()(pixels), training=True)

    yield set_from
    for layer, (mean, variance, momentum) in zip(layers, saved, strict=True):
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(variance)
        layer.momentum = momentum


def plan_for(profile, settings) -> list[dict]:
    """The plan for a shift profile, with the transferability held fixed and good."""
    blocks = block_shift(profile)
    measured = Measurements(
        block_shift=dict(zip(blocks["block"], blocks["shift"], strict=True)),
        logme=dict(zip(DEPTHS, (0.1, 0.2, 0.3, 0.4), strict=True)),
        probe_skill=dict.fromkeys(DEPTHS, 0.9),
        probe_accuracy=dict.fromkeys(DEPTHS, 0.95),
        train_images_per_class=500,
        units=unit_order(profile),
    )
    return plan_stages(measured, settings).stages


def test_shift_is_near_zero_on_the_bn_images_and_large_on_blurred_ones(
    irv2_probe, statistics_from, demo_paths, tmp_path
):
    paths_a = (
        demo_paths["bag"][:4] + demo_paths["sneaker"][:4] + demo_paths["trouser"][:4]
    )
    pixels_a = np.stack(
        [resize(load_image(path, OpenPolicy()).pixels, IMAGE_SIZE) for path in paths_a]
    ).astype("float32")
    statistics_from(pixels_a)
    stored = batch_norm_layers(irv2_probe.backbone)
    paths_b = write_images(
        tmp_path / "blurred",
        [
            np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(3)))
            for pixels in load_pixels(paths_a)
        ],
    )

    on_a, on_b = irv2_probe.run(paths_a), irv2_probe.run(paths_b)
    profile_a = shift_profile(stored, on_a.bn_means, on_a.bn_variances, True)
    profile_b = shift_profile(stored, on_b.bn_means, on_b.bn_variances, True)

    assert len(profile_a) == 204
    assert profile_a["shift"].max() < 1e-3
    threshold = feature_shift_params()["plan"]["shift_threshold"]
    assert (block_shift(profile_b)["shift"] > threshold).any()
    assert profile_b["shift"].mean() > 1000 * max(profile_a["shift"].mean(), 1e-9)

    settings = copy.deepcopy(feature_shift_params()["plan"])
    units = unit_order(profile_a)
    deepest_a = units.index(plan_for(profile_a, settings)[-1]["unfreeze_from"])
    deepest_b = units.index(plan_for(profile_b, settings)[-1]["unfreeze_from"])
    assert deepest_b < deepest_a
