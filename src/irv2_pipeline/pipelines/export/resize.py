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
double (their sum sequentially, as Pillow's loop), the pass sums exactly in float64
(22-bit integers times 8-bit pixels stay far below 2**53), over each output pixel's
window only, as Pillow does. The output equals Pillow 13's bit for bit;
``tests/pipelines/export/test_resize.py`` holds it to Pillow over a grid of shapes.
"""

from __future__ import annotations

import tensorflow as tf

# Pillow's fixed-point coefficients of 8-bit resampling: 32 - 8 - 2 bits.
PRECISION_BITS = 22


def pillow_coefficients(
    in_size: tf.Tensor, out_size: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Pillow's bilinear fixed-point coefficients, one window per output pixel.

    Args:
        in_size: The input side (scalar int tensor).
        out_size: The output side.

    Returns:
        ``first`` ``(out,)`` int32, the first input pixel of each window, and
        ``coefficients`` ``(out, taps)`` float64, the integer coefficient of input
        pixel ``first + tap`` (0 past the window's end).
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
    return tf.cast(first, tf.int32), tf.floor(0.5 + weights * float(2**PRECISION_BITS))


def _pass(pixels: tf.Tensor, size: int, axis: int) -> tf.Tensor:
    """One pass of batched uint8 pixels over ``axis`` (1: height, 2: width).

    Tap by tap, each output line adds its coefficient times the input line at
    ``first + tap``: the work is the window's, not the whole side's, and every sum
    is an exact integer in float64, whatever the order. The resampled axis is moved
    first, so that each tap gathers whole contiguous lines.
    """
    order = [axis, *(other for other in range(4) if other != axis)]
    lines = tf.transpose(pixels, order)
    length = tf.shape(lines)[0]
    first, coefficients = pillow_coefficients(length, size)
    shape = tf.concat([[size], tf.shape(lines)[1:]], axis=0)

    def add_tap(tap: tf.Tensor, total: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # Past a window's end the coefficient is 0: any valid line will do there.
        picked = tf.gather(lines, tf.minimum(first + tap, length - 1))
        weights = tf.reshape(coefficients[:, tap], [size, 1, 1, 1])
        return tap + 1, total + tf.cast(picked, tf.float64) * weights

    _, summed = tf.while_loop(
        lambda tap, _: tap < tf.shape(coefficients)[1],
        add_tap,
        (tf.constant(0), tf.zeros(shape, tf.float64)),
    )
    shifted = tf.floor((summed + 2.0 ** (PRECISION_BITS - 1)) / 2.0**PRECISION_BITS)
    resized = tf.cast(tf.clip_by_value(shifted, 0.0, 255.0), tf.uint8)
    return tf.transpose(resized, tf.math.invert_permutation(order))


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
