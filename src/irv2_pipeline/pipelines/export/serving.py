"""The SavedModel's serving functions: decoding, resizing and the model, in one graph.

Importing this module imports TensorFlow; the export nodes import it when they run.
The graph takes what a program outside this project has (encoded JPEG/PNG bytes, or
uint8 RGB pixels of any size) and gives the fine-tuned model's probabilities. It
turns encoded images upright by their EXIF orientation (``orientation.py``) and
resizes as ``images.resize`` does (Pillow's antialiased bilinear, ``resize.py``),
as training opened its images, and feeds the model float ``[0, 255]``: the
preprocessing (``finetune.input_scaling`` and the grayscale rule) is the model's first
layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from .orientation import apply_orientation, exif_orientation
from .resize import resize_like_pillow

# Endpoint names: the SavedModel's signatures and what the model card lists.
BYTES_ENDPOINT = "serve_image_bytes"  # also `serving_default`: registered first
PIXELS_ENDPOINT = "serve_pixels"
FIXED_ENDPOINT = "serve_fixed_size_pixels"  # what the LiteRT file is converted from


def decode(data: tf.Tensor) -> tf.Tensor:
    """Decodes one encoded image (JPEG, PNG, BMP, GIF's first frame) to upright RGB.

    JPEG uses libjpeg's accurate integer DCT, which Pillow uses (TensorFlow's default
    is the fast one). Greyscale becomes RGB; an alpha channel is dropped. The EXIF
    orientation of a JPEG or PNG is applied (``orientation.py``).
    """
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    image.set_shape((None, None, 3))
    return apply_orientation(image, exif_orientation(data))


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
