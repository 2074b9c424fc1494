"""Pillow's bilinear resize of 8-bit RGB as TensorFlow ops: the pixels ``images.resize`` gives.

Training resizes with Pillow (``Image.resize(..., BILINEAR)``, no ``reducing_gap``),
which is not TensorFlow's ``tf.image.resize``. Pillow (``libImaging/Resample.c``,
13.0) resizes in two separable passes, each a product with a coefficient matrix:

- coefficients (``precompute_coeffs``): for output pixel ``i`` of ``n`` from ``m``
  input pixels, ``scale = m / n``, ``filterscale = max(scale, 1)`` (the triangle
  filter is widened by the downscale factor: antialiasing), the window
  ``[int(center - filterscale + 0.5), int(center + filterscale + 0.5))`` clipped to
  the image around ``center = (i + 0.5) * scale``, weights
  ``max(0, 1 - |(x - center + 0.5) / filterscale|)`` summed left to right and
  divided by that sum, then rounded to fixed point, ``int(0.5 + w * 2**22)``;
- each pass adds ``2**21`` to the integer sum of pixels times coefficients, shifts
  right by 22 and clips to 0..255: the intermediate image is uint8;
- the width pass runs first, unless the height shrinks by more than twice as many
  pixels as the width does (``in_h - out_h > 0`` and
  ``in_h - out_h > 2 * (in_w - out_w)``), when the height pass runs first (Pillow
  13, python-pillow/Pillow#9549); a side already of the output size has no pass.

The graph computes the same numbers: the coefficients in float64 as Pillow does in
double (its sum sequentially, as Pillow's loop), the pass sums exactly in float64
(22-bit integers times 8-bit pixels stay far below 2**53). The output equals
Pillow 13's bit for bit; ``tests/pipelines/export/test_resize.py`` holds it to
Pillow over a grid of shapes.
"""

from __future__ import annotations

import tensorflow as tf

# Pillow's fixed-point coefficients of 8-bit resampling: 32 - 8 - 2 bits.
PRECISION_BITS = 22


def pillow_coefficients(in_size: tf.Tensor, out_size: int) -> tf.Tensor:
    """Pillow's bilinear fixed-point coefficients, as an ``out x in`` float64 matrix.

    Args:
        in_size: The input side (scalar int tensor).
        out_size: The output side.

    Returns:
        Entry ``(i, x)``: the integer coefficient of input pixel ``x`` in output
        pixel ``i`` (0 outside its window).
    """
    length = tf.cast(in_size, tf.float64)
    scale = length / out_size
    filter_scale = tf.maximum(scale, 1.0)
    support = filter_scale  # the bilinear filter's support is 1
    inverse_scale = 1.0 / filter_scale  # Pillow multiplies by the inverse
    taps = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    centers = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
    # C's (int) cast truncates toward zero: floor here, negatives clip to 0 anyway.
    first = tf.maximum(tf.floor(centers - support + 0.5), 0.0)
    count = tf.minimum(tf.floor(centers + support + 0.5), length) - first
    tap = tf.range(taps, dtype=tf.float64)[None, :]
    distance = tf.abs((first[:, None] + tap - centers[:, None] + 0.5) * inverse_scale)
    weights = tf.where(
        tf.logical_and(tap < count[:, None], distance < 1.0), 1.0 - distance, 0.0
    )
    # Summed tap by tap, in Pillow's order, so the sum rounds as Pillow's does.
    total = tf.foldl(
        lambda running, column: running + column,
        tf.transpose(weights),
        initializer=tf.zeros((out_size,), tf.float64),
    )
    weights = tf.where(total[:, None] != 0.0, weights / total[:, None], weights)
    fixed = tf.floor(0.5 + weights * float(2**PRECISION_BITS))
    # From one window per output pixel to the dense out x in matrix.
    offset = tf.range(in_size)[None, :] - tf.cast(first, tf.int32)[:, None]
    inside = tf.logical_and(offset >= 0, offset < taps)
    picked = tf.gather(fixed, tf.clip_by_value(offset, 0, taps - 1), batch_dims=1)
    return tf.where(inside, picked, 0.0)


def _pass(pixels: tf.Tensor, size: int, axis: int) -> tf.Tensor:
    """One pass of batched uint8 pixels over ``axis`` (1: height, 2: width)."""
    coefficients = pillow_coefficients(tf.shape(pixels)[axis], size)
    values = tf.cast(pixels, tf.float64)
    if axis == 2:
        summed = tf.einsum("ow,bhwc->bhoc", coefficients, values)
    else:
        summed = tf.einsum("oh,bhwc->bowc", coefficients, values)
    shifted = tf.floor((summed + 2.0 ** (PRECISION_BITS - 1)) / 2.0**PRECISION_BITS)
    return tf.cast(tf.clip_by_value(shifted, 0.0, 255.0), tf.uint8)


def _pass_if_needed(pixels: tf.Tensor, size: int, axis: int) -> tf.Tensor:
    return tf.cond(
        tf.equal(tf.shape(pixels)[axis], size),
        lambda: pixels,
        lambda: _pass(pixels, size, axis),
    )


def resize_like_pillow(pixels: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes a batch of uint8 RGB images to ``size`` x ``size`` as ``images.resize``.

    Args:
        pixels: ``(batch, height, width, 3)`` uint8, one shape for the batch.
        size: The model's input side.

    Returns:
        uint8 pixels of side ``size``, equal to Pillow 13's ``BILINEAR`` resize;
        unchanged when they already have that side.
    """
    shape = tf.shape(pixels)
    shrink_height, shrink_width = shape[1] - size, shape[2] - size
    height_first = tf.logical_and(shrink_height > 0, shrink_height > 2 * shrink_width)
    resized = tf.cond(
        height_first,
        lambda: _pass_if_needed(_pass_if_needed(pixels, size, 1), size, 2),
        lambda: _pass_if_needed(_pass_if_needed(pixels, size, 2), size, 1),
    )
    resized.set_shape((pixels.shape[0], size, size, pixels.shape[3]))
    return resized
