"""Photos as cameras write them: non-square, colour, turned, with an EXIF orientation.

The export tests and ``bench/export_parity.py`` feed them to the exported graph, which
must turn them upright and resize them as ``images.py`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# (height, width) of the oriented photos: non-square, up- and downscaled, some that
# Pillow resizes height first (the height shrinks by over twice the width's pixels).
PHOTO_SHAPES = ((100, 80), (40, 130), (300, 90), (76, 75), (61, 37), (150, 151))
# How a camera stores an upright picture for each EXIF orientation: the inverse of
# the turn exif_transpose applies (5 and 7 are their own inverse; 6 and 8 swap).
STORED_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def oriented_photos(folder: Path, sources: Sequence[Path]) -> list[Path]:
    """Each source image as a non-square colour JPEG or PNG with an EXIF orientation.

    Args:
        folder: Where the photos are written.
        sources: The images to make them of; 16 or more give every orientation 1-8
            in both formats.

    Returns:
        One file per source: orientations 1-8 in turn, 8 JPEGs then 8 PNGs, the
        shapes of :data:`PHOTO_SHAPES` in turn; the pixels stored turned as a camera
        stores them, so that opened upright each shows its source again.
    """
    files = []
    for index, source in enumerate(sources):
        orientation = index % 8 + 1
        fmt = ("JPEG", "PNG")[index // 8 % 2]
        height, width = PHOTO_SHAPES[index % len(PHOTO_SHAPES)]
        grey = Image.open(source).convert("RGB")
        upright = grey.resize((width, height), Image.Resampling.BICUBIC)
        tinted = Image.fromarray(
            (np.asarray(upright) * np.array([1.0, 0.9, 0.7])).astype(np.uint8)
        )
        turn = STORED_AS.get(orientation)
        stored = tinted if turn is None else tinted.transpose(turn)
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = folder / f"photo_{index}_orientation_{orientation}.{fmt.lower()}"
        stored.save(path, fmt, exif=exif.tobytes())
        files.append(path)
    return files
