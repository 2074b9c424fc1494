"""The graph decodes encoded images upright, as ``images.load_image`` opens them.

JPEGs and PNGs written by Pillow with each EXIF orientation 1-8, in both byte orders,
with other tags before the orientation, after a JFIF segment (JPEG); the graph's
decoded pixels must equal ``load_image``'s (which applies ``exif_transpose``).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from irv2_pipeline.images import OpenPolicy, load_image
from irv2_pipeline.pipelines.export.orientation import exif_orientation
from irv2_pipeline.pipelines.export.serving import decode

HEIGHT, WIDTH = 37, 61  # not square: a turn of 90 degrees shows in the shape


def encoded(fmt: str, orientation: int | None, endian: str = "<") -> bytes:
    """A random image as ``fmt`` bytes, with the EXIF orientation (None: no EXIF)."""
    pixels = np.random.default_rng(7).integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8)
    options = {"quality": 95} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif.endian = endian
        exif[0x010F] = "A camera maker"  # tags before the orientation (0x0112)
        exif[0x0110] = "A model"
        exif[0x0112] = orientation
        exif[0x0131] = "Some software"
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def graph_decode():
    return tf.function(decode, input_signature=[tf.TensorSpec((), tf.string)])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoded_upright_as_images_py(graph_decode, fmt, endian, orientation):
    data = encoded(fmt, orientation, endian)
    assert int(exif_orientation(tf.constant(data))) == orientation
    expected = load_image(data, OpenPolicy()).pixels
    got = graph_decode(tf.constant(data)).numpy()
    turned = orientation >= 5
    assert expected.shape == ((WIDTH, HEIGHT, 3) if turned else (HEIGHT, WIDTH, 3))
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", [None, 0, 9, 300])
def test_no_or_unknown_orientation_leaves_the_image(graph_decode, fmt, orientation):
    data = encoded(fmt, orientation)
    expected = load_image(data, OpenPolicy()).pixels
    assert expected.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(graph_decode(tf.constant(data)).numpy(), expected)


def test_other_formats_and_junk_read_as_upright():
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3)).save(buffer, "BMP")
    for data in (buffer.getvalue(), b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"):
        assert int(exif_orientation(tf.constant(data))) == 1
