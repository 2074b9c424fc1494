"""The SavedModel's serving functions: decoding, resizing and the model, in one graph.

Importing this module imports TensorFlow; the export nodes import it when they run.
The graph takes what a program outside this project has (encoded JPEG/PNG bytes, or
uint8 RGB pixels of any size) and gives the fine-tuned model's probabilities. It
resizes as ``images.resize`` does (Pillow's antialiased bilinear, which resizes the
width, rounds to uint8, then the height and rounds again), and feeds the model float
``[0, 255]``: IRv2's ``[-1, 1]`` preprocessing is the model's first layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

# Endpoint names: the SavedModel's signatures and what the model card lists.
BYTES_ENDPOINT = "serve_image_bytes"  # also `serving_default`: registered first
PIXELS_ENDPOINT = "serve_pixels"
FIXED_ENDPOINT = "serve_fixed_size_pixels"  # what the LiteRT file is converted from


# Pillow's fixed-point resampling of 8-bit images: coefficients of 22 bits.
_PRECISION_BITS = 22


def _pillow_coefficients(in_size: tf.Tensor, out_size: int) -> tf.Tensor:
    """Pillow's bilinear coefficients (``precompute_coeffs``), as an out x in matrix.

    Each output pixel's window, the triangle filter widened by the downscale factor
    (the antialiasing), the normalisation and the rounding to fixed point are
    Pillow's, computed in float64 as Pillow computes them in double.
    """
    in_size = tf.cast(in_size, tf.float64)
    scale = in_size / out_size
    filter_scale = tf.maximum(scale, 1.0)
    support = filter_scale  # the bilinear filter's support is 1
    centers = (tf.range(out_size, dtype=tf.float64)[:, None] + 0.5) * scale
    # C's (int) cast truncates toward zero.
    first = tf.maximum(tf.floor(centers - support + 0.5), 0.0)
    last = tf.minimum(tf.floor(centers + support + 0.5), in_size)
    x = tf.range(in_size, dtype=tf.float64)[None, :]
    inside = tf.logical_and(x >= first, x < last)
    weights = tf.maximum(1.0 - tf.abs((x - centers + 0.5) / filter_scale), 0.0)
    weights = tf.where(inside, weights, 0.0)
    weights /= tf.reduce_sum(weights, axis=1, keepdims=True)
    return tf.floor(0.5 + weights * 2.0**_PRECISION_BITS)


def _resampled(pixels: tf.Tensor, coefficients: tf.Tensor, axis: str) -> tf.Tensor:
    """One pass over ``axis`` (``h`` or ``w``) of batched uint8 pixels, as Pillow.

    The sums are exact in float64 (22-bit coefficients times 8-bit pixels) and are
    rounded half up and clipped to uint8, as Pillow's ``clip8`` does.
    """
    values = tf.cast(pixels, tf.float64)
    if axis == "w":
        summed = tf.einsum("ow,bhwc->bhoc", coefficients, values)
    else:
        summed = tf.einsum("oh,bhwc->bowc", coefficients, values)
    half = 2.0 ** (_PRECISION_BITS - 1)
    rounded = tf.floor((summed + half) / 2.0**_PRECISION_BITS)
    return tf.cast(tf.clip_by_value(rounded, 0.0, 255.0), tf.uint8)


def resize_like_pillow(pixels: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes a batch of uint8 RGB images to ``size`` x ``size`` as ``images.resize``.

    That is Pillow's ``BILINEAR``: the width first, rounded to uint8, then the
    height, with Pillow's coefficients and rounding (see the module docstring for
    the shapes where Pillow goes height first and pixels may differ by one).

    Args:
        pixels: ``(batch, height, width, 3)`` uint8.
        size: The model's input side.

    Returns:
        uint8 pixels of side ``size``; unchanged when they already have it.
    """
    shape = tf.shape(pixels)
    height, width = shape[1], shape[2]

    def resized() -> tf.Tensor:
        wide = tf.cond(
            tf.equal(width, size),
            lambda: pixels,
            lambda: _resampled(pixels, _pillow_coefficients(width, size), "w"),
        )
        return tf.cond(
            tf.equal(height, size),
            lambda: wide,
            lambda: _resampled(wide, _pillow_coefficients(height, size), "h"),
        )

    same = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
    return tf.cond(same, lambda: pixels, resized)


def decode(data: tf.Tensor) -> tf.Tensor:
    """Decodes one encoded image (JPEG, PNG, BMP, GIF's first frame) to uint8 RGB.

    JPEG uses libjpeg's accurate integer DCT, which Pillow uses (TensorFlow's default
    is the fast one). Greyscale becomes RGB; an alpha channel is dropped.
    """
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    image.set_shape((None, None, 3))
    return image


def serving_archive(
    model: keras.Model, class_names: Sequence[str], size: int
) -> keras.export.ExportArchive:
    """An export archive of ``model`` with the three serving endpoints.

    Args:
        model: Takes float ``[0, 255]`` RGB of side ``size``, gives probabilities.
        class_names: The model's output order.
        size: The model's input side.

    Returns:
        The archive; ``write_out(path)`` writes the SavedModel. Its endpoints:
        ``serve_image_bytes`` (also ``serving_default``) takes a batch of encoded
        images, ``serve_pixels`` a batch of uint8 RGB images of one shape (any
        side), ``serve_fixed_size_pixels`` uint8 RGB of side ``size``. The first two
        give ``probabilities`` and ``class_name`` (of the largest), the third only
        ``probabilities``.
    """
    names = tf.constant(list(class_names))

    def probabilities(pixels: tf.Tensor) -> tf.Tensor:
        return tf.cast(model(tf.cast(pixels, tf.float32), training=False), tf.float32)

    def named(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        probs = probabilities(pixels)
        return {
            "probabilities": probs,
            "class_name": tf.gather(names, tf.argmax(probs, axis=-1)),
        }

    def from_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels = tf.map_fn(
            lambda data: resize_like_pillow(decode(data)[None], size)[0],
            image_bytes,
            fn_output_signature=tf.TensorSpec((size, size, 3), tf.uint8),
        )
        return named(pixels)

    def from_pixels(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        resized = resize_like_pillow(pixels, size)
        resized.set_shape((None, size, size, 3))
        return named(resized)

    def from_fixed_size(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": probabilities(pixels)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        BYTES_ENDPOINT,
        from_bytes,
        input_signature=[tf.TensorSpec((None,), tf.string, name="image_bytes")],
    )
    archive.add_endpoint(
        PIXELS_ENDPOINT,
        from_pixels,
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8, name="pixels")],
    )
    archive.add_endpoint(
        FIXED_ENDPOINT,
        from_fixed_size,
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8, name="pixels")],
    )
    return archive


def litert_flatbuffer(saved_model: str, *, optimize: bool = False) -> bytes:
    """Converts the SavedModel's fixed-size endpoint to a LiteRT (TFLite) model.

    Args:
        saved_model: The SavedModel folder written from :func:`serving_archive`.
        optimize: Dynamic-range quantization of the weights (smaller, not equal).

    Returns:
        The ``.tflite`` flatbuffer.
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model, signature_keys=[FIXED_ENDPOINT]
    )
    if optimize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()
