"""The graph's resize gives the pixels ``images.resize`` (Pillow) gives, bit for bit.

A grid of shapes for the smoke (75 px) and the real (299 px) input side: tall, wide,
tiny, large, upscaled on one side and downscaled on the other, one pixel off the
side, and shapes where Pillow 13 resizes the height first (the height shrinks by
more than twice as many pixels as the width). Random pixels, so that a coefficient
or a rounding off by one shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from irv2_pipeline.images import resize
from irv2_pipeline.pipelines.export.resize import resize_like_pillow

SHAPES = {
    75: [
        (1, 1),
        (2, 9),
        (9, 2),
        (8, 8),
        (28, 28),
        (74, 75),
        (75, 76),
        (76, 76),
        (75, 300),
        (300, 75),
        (40, 400),  # wide: width shrinks, height grows
        (400, 40),  # tall: height shrinks, width grows
        (100, 80),  # height first: 25 > 2 * 5
        (151, 150),  # width first: 76 < 2 * 75
        (200, 150),  # width first: 125 < 2 * 75
        (299, 150),  # height first: 224 > 2 * 75
        (640, 333),  # height first
        (333, 640),
        (480, 640),
        (1000, 997),
        (1201, 53),
    ],
    299: [
        (28, 28),
        (16, 640),
        (640, 16),
        (298, 299),
        (300, 300),
        (450, 320),  # height first: 151 > 2 * 21
        (320, 450),
        (599, 598),
        (1024, 768),
        (768, 1024),
        (2000, 350),
    ],
}


def pillow_and_graph(size: int, shape: tuple[int, int], seed: int):
    pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 3), np.uint8)
    graph = resize_like_pillow(tf.constant(pixels[None]), size)[0].numpy()
    return resize(pixels, size), graph


@pytest.mark.parametrize(
    ("size", "shape"),
    [(size, shape) for size, shapes in SHAPES.items() for shape in shapes],
)
def test_graph_resize_equals_pillow(size, shape):
    expected, got = pillow_and_graph(size, shape, seed=sum(shape))
    assert got.shape == expected.shape == (size, size, 3)
    differing = int((got != expected).any(axis=-1).sum())
    assert differing == 0, f"{differing} of {size * size} pixels differ"


def test_batch_of_one_shape_is_resized_image_by_image():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 120, 90, 3), np.uint8)
    got = resize_like_pillow(tf.constant(batch), 75).numpy()
    for image, resized in zip(batch, got, strict=True):
        np.testing.assert_array_equal(resized, resize(image, 75))
