"""Synthetic JPEG folders for the benchmarks: ``root/class_XX/img_NNNNNN.jpg``.

Every image is a seeded random texture (the seed is the image's index), so no two are
alike, none is a near duplicate of another, and a rerun writes the same files. Two
textures:

- ``photo``: a coarse colour field, finer luminance detail and light grain, roughly
  the bytes per pixel of a photograph (about 30 KB at 320 px);
- ``grain``: a smooth colour field with strong per-channel grain.

Used by ``bench/ingestion.py`` (``photo``), ``bench/augmentation.py`` (``grain``) and
``bench/scale.py`` (``photo``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10
JPEG_QUALITY = 90


def photo_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A coarse colour field plus luminance detail and grain, ``(size, size, 3)`` uint8."""

    def upscaled(shape: tuple[int, ...]) -> np.ndarray:
        small = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        big = small.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(big, dtype=np.int16)

    colour = upscaled((8, 8, 3))
    detail = (upscaled((size // 8, size // 8)) - 128) * 60 // 128
    grain = rng.integers(-6, 7, (size, size), dtype=np.int16)
    return np.clip(colour + (detail + grain)[..., None], 0, 255).astype(np.uint8)


def grain_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour field plus per-channel grain, ``(size, size, 3)`` uint8."""
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = np.asarray(
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC),
        dtype=np.int16,
    )
    grain = rng.integers(-24, 25, (size, size, 3), dtype=np.int16)
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


TEXTURES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "photo": photo_texture,
    "grain": grain_texture,
}


def write_texture(job: tuple[Path, int, int, str]) -> None:
    """Writes one texture as a JPEG (quality 90).

    Args:
        job: ``(path, seed, size, texture)``; ``texture`` is a key of ``TEXTURES``.
    """
    path, seed, size, texture = job
    pixels = TEXTURES[texture](np.random.default_rng(seed), size)
    Image.fromarray(pixels).save(path, "JPEG", quality=JPEG_QUALITY)


def generate(root: Path, count: int, size: int, texture: str = "photo") -> None:
    """Fills ``root/class_XX/`` with ``count`` distinct JPEGs, on all cores.

    Image ``i`` goes to class ``i % 10`` and is drawn from seed ``i``.

    Args:
        root: The image root; created if missing.
        count: Images to write.
        size: Side of the square images, in pixels.
        texture: ``photo`` or ``grain`` (see the module docstring).
    """
    if texture not in TEXTURES:
        raise ValueError(f"texture {texture!r}: use one of {', '.join(TEXTURES)}")
    jobs = []
    for index in range(count):
        folder = root / f"class_{index % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"img_{index:06d}.jpg", index, size, texture))
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_texture, jobs, chunksize=64))
