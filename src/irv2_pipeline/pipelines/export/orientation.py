"""EXIF orientation as TensorFlow ops: images upright, as ``images.load_image`` opens them.

Training opens every image with ``ImageOps.exif_transpose``: a photo whose camera
was held sideways stores its pixels sideways and says so in the EXIF Orientation
tag (0x0112). TensorFlow's decoders ignore the tag, so the exported graph reads it
itself with byte ops and turns the decoded pixels as Pillow does.

Where the tag is read, as Pillow reads it:

- JPEG: the first APP1 segment that starts with ``Exif\\0\\0``, found by walking
  the marker segments from the start of the file up to the first scan;
- PNG: the ``eXIf`` chunk, found by walking the chunks up to ``IEND``.

Inside, a TIFF header (``II`` little- or ``MM`` big-endian) points at the first
image file directory, whose Orientation entry (BYTE, SHORT or LONG) holds 1-8.
Pillow's own fallbacks are not read: an orientation written only in XMP
(``tiff:Orientation``) or in a PNG text chunk ``Raw profile type exif``. A missing,
unknown or malformed tag leaves the image as decoded (where images.py would reject
a malformed EXIF block as a corrupt file, the graph decodes the image unturned).
"""

from __future__ import annotations

import tensorflow as tf

ORIENTATION_TAG = 0x0112
# Read past the end of the data gives zeros: no read needs a bounds check of its own.
_PADDING = 16
_JPEG_EXIF = b"Exif\x00\x00"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG markers without a length: TEM, RST0-7, SOI.
_STANDALONE_MARKERS = (0x01, *range(0xD0, 0xD9))
_START_OF_SCAN, _END_OF_IMAGE, _APP1 = 0xDA, 0xD9, 0xE1
# Bytes of a value of each TIFF field type 0-4; the tag may be BYTE (1), SHORT (3)
# or LONG (4), 0 marks the others.
_TYPE_SIZES = (0, 1, 0, 2, 4)
# Where a block starts when it is not found yet, and when the search stopped.
_NOT_FOUND, _STOPPED = -1, -2


def _not_found(count: int) -> list[tf.Tensor]:
    return [tf.constant(_NOT_FOUND, tf.int64) for _ in range(count)]


class _Bytes:
    """The file's bytes as integers, with unsigned reads in either byte order."""

    def __init__(self, data: tf.Tensor):
        raw = tf.io.decode_raw(data, tf.uint8)
        self.size = tf.shape(raw, out_type=tf.int64)[0]
        self.values = tf.concat(
            [tf.cast(raw, tf.int64), tf.zeros((_PADDING,), tf.int64)], axis=0
        )

    def uint(self, position: tf.Tensor, width: int, little: tf.Tensor) -> tf.Tensor:
        """The unsigned ``width``-byte integer at ``position`` (0 past the end)."""
        index = position + tf.range(width, dtype=tf.int64)
        inside = tf.logical_and(index >= 0, index < self.size)
        index = tf.clip_by_value(index, 0, self.size + _PADDING - 1)
        values = tf.where(inside, tf.gather(self.values, index), 0)
        powers = 256 ** tf.range(width, dtype=tf.int64)
        weights = tf.where(little, powers, tf.reverse(powers, [0]))
        return tf.reduce_sum(values * weights)

    def byte(self, position: tf.Tensor) -> tf.Tensor:
        return self.uint(position, 1, tf.constant(False))

    def equals(self, position: tf.Tensor, expected: bytes) -> tf.Tensor:
        """Whether the bytes at ``position`` are ``expected``."""
        index = position + tf.range(len(expected), dtype=tf.int64)
        index = tf.clip_by_value(index, 0, self.size + _PADDING - 1)
        found = tf.gather(self.values, index)
        return tf.logical_and(
            position + len(expected) <= self.size,
            tf.reduce_all(tf.equal(found, list(expected))),
        )


def _jpeg_exif(data: _Bytes) -> tuple[tf.Tensor, tf.Tensor]:
    """Start and end of the TIFF block of the first Exif APP1 segment, or -1."""
    big_endian = tf.constant(False)

    def searching(position, start, end):
        return tf.logical_and(tf.equal(start, _NOT_FOUND), position + 4 <= data.size)

    def step(position, start, end):
        lead, marker = data.byte(position), data.byte(position + 1)
        length = data.uint(position + 2, 2, big_endian)
        is_marker = tf.equal(lead, 0xFF)
        no_length = tf.reduce_any(tf.equal(marker, [0x00, *_STANDALONE_MARKERS]))
        last = tf.logical_or(
            tf.equal(marker, _START_OF_SCAN), tf.equal(marker, _END_OF_IMAGE)
        )
        is_exif = tf.logical_and(
            tf.equal(marker, _APP1), data.equals(position + 4, _JPEG_EXIF)
        )
        step_over = tf.where(
            tf.logical_or(tf.logical_not(is_marker), tf.equal(marker, 0xFF)),
            tf.constant(1, tf.int64),  # junk or a fill byte, skipped as Pillow does
            tf.where(no_length, tf.constant(2, tf.int64), 2 + length),
        )
        segment_end = tf.minimum(position + 2 + length, data.size)
        start = tf.where(
            tf.logical_and(is_marker, is_exif),
            position + 4 + len(_JPEG_EXIF),
            tf.where(
                tf.logical_and(is_marker, last), tf.constant(_STOPPED, tf.int64), start
            ),
        )
        return position + step_over, start, tf.where(is_exif, segment_end, end)

    _, start, end = tf.while_loop(
        searching, step, (tf.constant(2, tf.int64), *_not_found(2))
    )
    return tf.maximum(start, _NOT_FOUND), end


def _png_exif(data: _Bytes) -> tuple[tf.Tensor, tf.Tensor]:
    """Start and end of the ``eXIf`` chunk's data, or -1."""
    big_endian = tf.constant(False)

    def searching(position, start, end):
        return tf.logical_and(tf.equal(start, _NOT_FOUND), position + 8 <= data.size)

    def step(position, start, end):
        length = data.uint(position, 4, big_endian)
        is_exif = data.equals(position + 4, b"eXIf")
        is_end = data.equals(position + 4, b"IEND")
        start = tf.where(
            is_exif,
            position + 8,
            tf.where(is_end, tf.constant(_STOPPED, tf.int64), start),
        )
        end = tf.where(is_exif, tf.minimum(position + 8 + length, data.size), end)
        return position + 12 + length, start, end

    _, start, end = tf.while_loop(
        searching,
        step,
        (tf.constant(len(_PNG_SIGNATURE), tf.int64), *_not_found(2)),
    )
    return tf.maximum(start, _NOT_FOUND), end


def _tiff_orientation(data: _Bytes, start: tf.Tensor, end: tf.Tensor) -> tf.Tensor:
    """The Orientation value in the first directory of the TIFF block, or 1."""
    little = data.equals(start, b"II")
    valid = tf.logical_or(little, data.equals(start, b"MM"))
    directory = start + data.uint(start + 4, 4, little)
    entries = tf.minimum(data.uint(directory, 2, little), (end - directory - 2) // 12)

    def searching(index, value):
        return tf.logical_and(tf.equal(value, 0), index < entries)

    def step(index, value):
        entry = directory + 2 + 12 * index
        field_type = data.uint(entry + 2, 2, little)
        size = tf.gather(
            tf.constant(_TYPE_SIZES, tf.int64), tf.clip_by_value(field_type, 0, 4)
        )
        count = data.uint(entry + 4, 4, little)
        # Values of more than 4 bytes sit at an offset from the TIFF header.
        at = tf.where(
            count * size <= 4, entry + 8, start + data.uint(entry + 8, 4, little)
        )
        read = tf.where(
            tf.equal(size, 1),
            data.uint(at, 1, little),
            tf.where(
                tf.equal(size, 2), data.uint(at, 2, little), data.uint(at, 4, little)
            ),
        )
        found = tf.logical_and(
            tf.equal(data.uint(entry, 2, little), ORIENTATION_TAG),
            tf.logical_and(size > 0, tf.logical_and(count >= 1, at + size <= end)),
        )
        return index + 1, tf.where(found, read, value)

    _, value = tf.while_loop(
        searching, step, (tf.constant(0, tf.int64), tf.constant(0, tf.int64))
    )
    usable = tf.logical_and(valid, tf.logical_and(start >= 0, value >= 1))
    return tf.where(tf.logical_and(usable, value <= 8), value, 1)


def exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1-8) of one encoded JPEG or PNG, 1 when it has none.

    Args:
        data: A scalar string tensor: the file's bytes.

    Returns:
        A scalar int64 tensor.
    """
    raw = _Bytes(data)

    def from_block(find) -> tf.Tensor:
        start, end = find(raw)
        return tf.cond(
            start >= 0,
            lambda: _tiff_orientation(raw, start, end),
            lambda: tf.constant(1, tf.int64),
        )

    is_png = raw.equals(tf.constant(0, tf.int64), _PNG_SIGNATURE)
    return tf.case(
        [
            (tf.io.is_jpeg(data), lambda: from_block(_jpeg_exif)),
            (is_png, lambda: from_block(_png_exif)),
        ],
        default=lambda: tf.constant(1, tf.int64),
    )


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turns ``(height, width, channels)`` pixels upright as ``exif_transpose`` does.

    Args:
        image: The pixels as stored.
        orientation: The EXIF value; anything but 2-8 leaves the image as it is.

    Returns:
        The upright pixels (height and width swapped for 5-8).
    """
    swapped = tf.transpose(image, [1, 0, 2])
    turns = [
        lambda: image,  # 1 (and anything unknown)
        lambda: image[:, ::-1],  # 2: mirrored left-right
        lambda: image[::-1, ::-1],  # 3: turned 180 degrees
        lambda: image[::-1],  # 4: mirrored top-bottom
        lambda: swapped,  # 5: Pillow's TRANSPOSE
        lambda: swapped[:, ::-1],  # 6: Pillow's ROTATE_270 (90 clockwise)
        lambda: swapped[::-1, ::-1],  # 7: Pillow's TRANSVERSE
        lambda: swapped[::-1],  # 8: Pillow's ROTATE_90 (90 anticlockwise)
    ]
    branch = tf.where(
        tf.logical_and(orientation >= 1, orientation <= 8), orientation - 1, 0
    )
    turned = tf.switch_case(tf.cast(branch, tf.int32), turns)
    turned.set_shape((None, None, image.shape[-1]))
    return turned
