"""The recorded operations are the applied ones: checked against Keras's own layers."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest

from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.images import OpenPolicy, load_image, resize
from irv2_pipeline.pipelines.augmentation.nodes import (
    plan_augmentation,
    write_augmented_images,
)
from irv2_pipeline.pipelines.augmentation.ops import Geometry, augment

from .conftest import asymmetric_image, base_parameters, manifest_of, write_png

SIZE = 40


def render_plan(plan: pd.DataFrame, raw_root, model: dict, params: dict) -> dict:
    """Renders every planned copy in this process: ``{path: decoded pixels}``."""
    jobs, _ = write_augmented_images(plan, ImageFolder(raw_root), {}, model, params)
    pixels = {}
    for job in jobs.jobs:
        for rel, content in job.render(list(job.outputs)).items():
            pixels[rel] = load_image(content, OpenPolicy()).pixels
    return pixels


@pytest.fixture
def flip_case(tmp_path):
    """An image root with one asymmetric colour image, in train."""
    raw = tmp_path / "raw"
    write_png(raw / "shapes" / "halves.png", asymmetric_image())
    write_png(raw / "other" / "halves.png", asymmetric_image()[::-1])
    manifest = manifest_of(
        raw, {"shapes/halves.png": "train", "other/halves.png": "val"}
    )
    return raw, manifest


def test_a_recorded_horizontal_flip_is_visible_in_the_pixels(flip_case):
    raw, manifest = flip_case
    params = base_parameters()
    params.update(copies=12, preset="flips", format="png")
    params["presets"]["flips"] = [{"op": "flip_horizontal", "probability": 0.5}]
    model = {"image_size": SIZE, "seed": 3}

    plan = plan_augmentation(manifest, model, params)
    written = render_plan(plan, raw, model, params)

    source = resize(asymmetric_image(), SIZE)
    flipped = [
        json.loads(ops) == [{"op": "flip_horizontal", "params": {}}]
        for ops in plan["ops"]
    ]
    assert 0 < sum(flipped) < len(plan)  # both outcomes occur
    for path, was_flipped in zip(plan["path"], flipped, strict=True):
        expected = source[:, ::-1] if was_flipped else source
        np.testing.assert_array_equal(written[path], expected, err_msg=path)


# Each operation's recorded value, and the public Keras layer that applies exactly
# that value when its random range is that single value.
LAYER_WITH_VALUE = [
    (
        "rotation",
        {"degrees": 23.5},
        lambda: keras.layers.RandomRotation((23.5 / 360,) * 2),
    ),
    (
        "rotation",
        {"degrees": -8.25},
        lambda: keras.layers.RandomRotation((-8.25 / 360,) * 2),
    ),
    ("zoom", {"factor": -0.25}, lambda: keras.layers.RandomZoom((-0.25, -0.25))),
    ("zoom", {"factor": 0.15}, lambda: keras.layers.RandomZoom((0.15, 0.15))),
    (
        "translation",
        {"x": 0.125, "y": -0.2},
        lambda: keras.layers.RandomTranslation((-0.2, -0.2), (0.125, 0.125)),
    ),
    (
        "brightness",
        {"delta": -0.15},
        lambda: keras.layers.RandomBrightness((-0.15, -0.15)),
    ),
    # RandomContrast draws from [1 - lower, 1 + upper].
    ("contrast", {"factor": 1.4}, lambda: keras.layers.RandomContrast((-0.4, 0.4))),
    # RandomSaturation's factor f multiplies saturation by f / (1 - f).
    (
        "saturation",
        {"factor": 1.5},
        lambda: keras.layers.RandomSaturation((0.6, 0.6), value_range=(0, 1)),
    ),
    (
        "color_degeneration",
        {"amount": 0.7},
        lambda: keras.layers.RandomColorDegeneration((0.7, 0.7)),
    ),
    # RandomSharpness's factor is half the sharpening factor.
    ("sharpness", {"factor": 1.8}, lambda: keras.layers.RandomSharpness((0.9, 0.9))),
    ("posterization", {"bits": 3}, lambda: keras.layers.RandomPosterization((3, 3))),
    ("auto_contrast", {}, keras.layers.AutoContrast),
    ("equalization", {}, keras.layers.Equalization),
]


@pytest.mark.parametrize(
    ("op", "params", "layer"),
    LAYER_WITH_VALUE,
    ids=[f"{op}-{'-'.join(map(str, p.values()))}" for op, p, _ in LAYER_WITH_VALUE],
)
def test_recorded_values_give_what_keras_layers_give_for_them(op, params, layer):
    pixels = resize(asymmetric_image(), SIZE)
    ours = augment(pixels, [{"op": op, "params": params}], Geometry())

    theirs = keras.ops.convert_to_numpy(
        layer()(pixels[None].astype("float32"), training=True)
    )[0]
    theirs = np.clip(np.rint(theirs), 0, 255)
    # Compiled and eager float arithmetic may round a pixel to the other side.
    difference = np.abs(ours.astype(int) - theirs.astype(int))
    assert difference.max() <= 1
    assert (difference > 0).mean() < 0.02
    assert not np.array_equal(ours, pixels)


def test_hue_and_solarization_act_as_recorded():
    red = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    red[..., 0] = 200
    # A third of a turn of the colour wheel takes red to green.
    green = augment(red, [{"op": "hue", "params": {"delta": 1 / 3}}], Geometry())
    np.testing.assert_allclose(green[0, 0], [0, 200, 0], atol=2)
    # Pixel values at or above the threshold are inverted: 200 becomes 55.
    solarized = augment(
        red, [{"op": "solarization", "params": {"threshold": 128}}], Geometry()
    )
    np.testing.assert_array_equal(solarized[0, 0], [55, 0, 0])


def test_recorded_directions_mean_what_the_parameters_say():
    square = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    square[18:22, 18:22] = 255
    moved = augment(
        square,
        [{"op": "translation", "params": {"x": 0.25, "y": -0.25}}],
        Geometry("constant"),
    )
    rows, columns = np.nonzero(moved[..., 0] > 128)
    # x positive moves right, y negative moves up, by that fraction of the side.
    assert (columns.mean(), rows.mean()) == pytest.approx((29.5, 9.5), abs=0.5)

    left_bar = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    left_bar[:, :4] = 255
    turned = augment(
        left_bar, [{"op": "rotation", "params": {"degrees": 90}}], Geometry("constant")
    )
    rows, _ = np.nonzero(turned[..., 0] > 128)
    assert rows.min() >= SIZE - 5  # counter-clockwise: the left edge goes down


def bar_centre(row: np.ndarray) -> float:
    """The brightness-weighted column of a row."""
    return float(np.average(np.arange(row.size), weights=row.astype(float) + 1e-9))


def edge_step(image: np.ndarray) -> int:
    """The rise across the middle of an image that is dark left, bright right."""
    middle = image.shape[1] // 2
    return int(image[middle, middle, 0]) - int(image[middle, middle - 1, 0])


def test_shear_moves_rows_in_proportion_to_their_height():
    bar = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    bar[:, 10:14] = 255  # a vertical white bar
    out = augment(
        bar, [{"op": "shear", "params": {"x": 0.25, "y": 0.0}}], Geometry("constant")
    )
    shift = bar_centre(out[-1, :, 0]) - bar_centre(out[0, :, 0])
    assert abs(shift) == pytest.approx(0.25 * (SIZE - 1), abs=1.5)


def test_noise_and_blur_follow_their_recorded_values():
    flat = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
    noisy = augment(
        flat,
        [{"op": "gaussian_noise", "params": {"stddev": 8.0, "seed": 11}}],
        Geometry(),
    )
    again = augment(
        flat,
        [{"op": "gaussian_noise", "params": {"stddev": 8.0, "seed": 11}}],
        Geometry(),
    )
    other = augment(
        flat,
        [{"op": "gaussian_noise", "params": {"stddev": 8.0, "seed": 12}}],
        Geometry(),
    )
    np.testing.assert_array_equal(noisy, again)
    assert not np.array_equal(noisy, other)
    assert np.std(noisy.astype(float)) == pytest.approx(8.0, rel=0.1)

    edge = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    edge[:, SIZE // 2 :] = 255
    soft = augment(
        edge,
        [{"op": "gaussian_blur", "params": {"sigma": 0.5, "kernel_size": 5}}],
        Geometry(),
    )
    softer = augment(
        edge,
        [{"op": "gaussian_blur", "params": {"sigma": 2.0, "kernel_size": 5}}],
        Geometry(),
    )
    assert 255 > edge_step(soft) > edge_step(softer) > 0


def test_the_manifest_is_a_complete_recipe_for_every_randaugment_copy(
    tmp_path, raw_root, demo_manifest
):
    params = base_parameters()
    params.update(preset="randaugment", copies=3, format="png")
    model = {"image_size": SIZE, "seed": 5}
    plan = plan_augmentation(demo_manifest, model, params)
    written = render_plan(plan, raw_root, model, params)

    for row in plan.itertuples():
        source = resize(
            load_image(raw_root / row.source_path, OpenPolicy()).pixels, SIZE
        )
        replayed = augment(source, json.loads(row.ops), Geometry())
        np.testing.assert_array_equal(written[row.path], replayed, err_msg=row.ops)
