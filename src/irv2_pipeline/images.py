"""The one safe way to open an image.

Every pipeline opens images through :func:`load_image` and walks image folders through
:func:`walk_image_tree`. Both decide by content, never by file name, and turn every
problem into an :class:`ImageRejected` with a reason a person understands, so that a
bad file becomes a row in a report instead of a crashed run.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import (
    ExifTags,
    Image,
    ImageFile,
    ImageOps,
    ImageStat,
    UnidentifiedImageError,
)

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")

# Names that file managers and operating systems leave behind in image folders.
SYSTEM_FILE_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"})

# What Pillow's decoders raise on damaged files; anything else is a bug of ours and
# must surface.
DECODER_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
)

# A truncated file is an error, never a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# A JPEG much larger than its use needs is decoded at 1/2, 1/4 or 1/8 scale (libjpeg
# scales in the inverse DCT, still reading every byte of the file, so damage is
# still caught), to a shorter side of at least DRAFT_MARGIN times the side its use
# needs; the usual antialiased resize does the rest. A 12-megapixel photo for 299 px
# decodes at 1/4 scale and resizes in a fifth of the CPU time (36 ms, not 193 ms),
# to pixels within a few levels of a full decode's (docs/pipelines/ingestion.md).
DRAFT_MARGIN = 2
# The side the fingerprint needs: pHash reads a 32 x 32 reduction, the mean colour
# and pixel spread are statistics of the whole image; 4 x 64 keeps them all.
FINGERPRINT_SIDE = 256
# The EXIF orientations that turn an image by 90 or 270 degrees.
_TURNED = frozenset({5, 6, 7, 8})


class ImageRejected(Exception):
    """An image that cannot be used, with the reason in plain words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class OpenPolicy:
    """How strict :func:`load_image` is.

    Attributes:
        max_pixels: Images with more pixels are rejected as decompression bombs.
        min_size: Images whose shorter side is below this many pixels are rejected.
        background: RGB colour that transparent pixels are composited onto.
    """

    max_pixels: int = 50_000_000
    min_size: int = 8
    background: tuple[int, int, int] = (255, 255, 255)

    @classmethod
    def from_params(cls, params: dict) -> OpenPolicy:
        """Builds a policy from the ``images`` parameter block."""
        return cls(
            max_pixels=int(params.get("max_pixels", cls.max_pixels)),
            min_size=int(params.get("min_size", cls.min_size)),
            background=tuple(params.get("background", cls.background)),
        )


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image as 8-bit RGB, upright, with what it was before.

    ``pixels`` may be smaller than the file's image when :func:`load_image` was
    allowed a reduced-scale decode; ``width`` and ``height`` are the file's, upright.
    """

    pixels: np.ndarray  # (height, width, 3) uint8
    format: str
    mode: str
    width: int
    height: int


def load_image(
    source: str | os.PathLike | bytes, policy: OpenPolicy, *, min_side: int = 0
) -> LoadedImage:
    """Opens, fully decodes and normalizes one image.

    The format is decided from the content against :data:`ALLOWED_FORMATS`. EXIF
    orientation is applied, every mode becomes 8-bit RGB, animated images give their
    first frame.

    Args:
        source: A file path or the file's bytes.
        policy: Size limits and the background for transparency.
        min_side: The shorter side the caller needs; a JPEG at least twice as large
            may be decoded at a reduced scale down to this side (still reading the
            whole file). 0: full size.

    Returns:
        The upright RGB pixels and the original format, mode and size.

    Raises:
        ImageRejected: For anything that is not a usable image, with the reason.
    """
    data = source if isinstance(source, bytes) else _read_bytes(Path(source))
    rgb, fmt, mode, (width, height) = _decode(data, policy, min_side)
    return LoadedImage(
        pixels=np.asarray(rgb), format=fmt, mode=mode, width=width, height=height
    )


def load_resized(
    source: str | os.PathLike | bytes, policy: OpenPolicy, size: int
) -> np.ndarray:
    """The pixels the model sees: :func:`load_image`, then :func:`resize` to ``size``.

    The one way every pipeline turns a user's image into model input, so that every
    pipeline feeds the model the same pixels. Large JPEGs are decoded at a reduced
    scale whose shorter side stays at least ``DRAFT_MARGIN * size``.
    """
    return resize(load_image(source, policy, min_side=DRAFT_MARGIN * size).pixels, size)


def fingerprint(path: str | os.PathLike, policy: OpenPolicy) -> dict[str, Any] | str:
    """Fully decodes one file and says what identifies it, or why it is rejected.

    Made for worker processes: it returns the reason instead of raising, and this
    module is cheap to import.

    Args:
        path: The file.
        policy: As for :func:`load_image`.

    Returns:
        ``sha256`` (of the file's bytes), ``phash`` (64-bit perceptual hash of the
        upright pixels, in hex), ``width``, ``height`` (the file's, upright),
        ``format``, ``mode``,
        ``mean_colour`` (the mean RGB as ``#rrggbb``), ``pixel_std`` (the largest
        of the R, G and B standard deviations, 0-255), ``brightness`` and
        ``contrast`` (the mean and the standard deviation of the grey image's
        levels, 0-255); or the rejection reason.
        Large JPEGs are decoded at a reduced scale (``FINGERPRINT_SIDE``): the hash
        and statistics are then those of the reduced image.
    """
    try:
        data = _read_bytes(Path(path))
        rgb, fmt, mode, (width, height) = _decode(data, policy, FINGERPRINT_SIDE)
    except ImageRejected as rejection:
        return rejection.reason
    grey = rgb.convert("L")
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "phash": _phash(grey),
        "width": width,
        "height": height,
        "format": fmt,
        "mode": mode,
        **_pixel_statistics(rgb, grey),
    }


def _decode(
    data: bytes, policy: OpenPolicy, min_side: int
) -> tuple[Image.Image, str, str, tuple[int, int]]:
    """Does the work of :func:`load_image`.

    The image is not closed: it reads from memory, and an RGB image is handed on
    as it is, without a copy.

    Returns:
        Upright 8-bit RGB (reduced when ``min_side`` allows), the format, the
        original mode and the file's upright ``(width, height)``.
    """
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    fmt = "image"
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = policy.max_pixels
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            fmt = image.format
            _check_pixel_count(image.size, policy)
            width, height = image.size
            if image.getexif().get(ExifTags.Base.Orientation) in _TURNED:
                width, height = height, width
            image.seek(0)
            if fmt == "JPEG" and min_side and min(width, height) >= 2 * min_side:
                image.draft(image.mode, (min_side, min_side))
            image.load()
            mode = image.mode
            # In place: no copy of the pixels when there is nothing to turn.
            ImageOps.exif_transpose(image, in_place=True)
            rgb = _to_rgb(image, policy.background)
    except UnidentifiedImageError:
        raise ImageRejected(_describe_unknown_content(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(
            f"decompression bomb: more than {policy.max_pixels:,} pixels "
            "(images.max_pixels)"
        ) from None
    except MemoryError:
        raise ImageRejected("too large to decode in memory") from None
    except DECODER_ERRORS as exc:
        raise ImageRejected(f"corrupt or truncated {fmt} file: {exc}") from exc
    if min(width, height) < policy.min_size:
        raise ImageRejected(
            f"too small: {width}x{height} px, the minimum side is "
            f"{policy.min_size} px (images.min_size)"
        )
    return rgb, fmt, mode, (width, height)


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resizes RGB pixels to a ``size`` x ``size`` square (bilinear, antialiased)."""
    if pixels.shape[0] == size and pixels.shape[1] == size:
        return pixels
    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def is_hidden_or_system(name: str) -> bool:
    """Tells whether a file name is a hidden or operating-system file."""
    return name.startswith(".") or name.lower() in SYSTEM_FILE_NAMES


@dataclass(frozen=True)
class TreeEntry:
    """One file found under an image root: usable, or rejected with a reason."""

    path: str  # posix, relative to the root
    reason: str | None = None


def walk_image_tree(root: str | os.PathLike) -> Iterator[TreeEntry]:
    """Walks ``root/<label>/**`` in a stable order, without leaving the root.

    Symbolic links are followed only when they stay inside the root and do not lead
    back into a folder already being walked; other links, hidden files and system
    files come out as rejected entries.

    Args:
        root: The image root.

    Yields:
        One entry per file (or link) found, sorted by path within each folder.
    """
    root = Path(root)
    real_root = root.resolve()
    yield from _walk(root, real_root, "", frozenset({real_root}))


def _walk(
    folder: Path, real_root: Path, prefix: str, ancestors: frozenset[Path]
) -> Iterator[TreeEntry]:
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        rel = f"{prefix}{entry.name}"
        if is_hidden_or_system(entry.name):
            yield TreeEntry(rel, "hidden or system file, not an image")
            continue
        target = Path(entry.path)
        if entry.is_symlink():
            reason = _symlink_problem(target, real_root, ancestors)
            if reason:
                yield TreeEntry(rel, reason)
                continue
        if entry.is_dir():
            real = target.resolve()
            yield from _walk(target, real_root, f"{rel}/", ancestors | {real})
        elif entry.is_file():
            yield TreeEntry(rel)
        else:
            yield TreeEntry(rel, "not a regular file")


def _symlink_problem(link: Path, real_root: Path, ancestors: frozenset[Path]) -> str:
    try:
        real = link.resolve(strict=True)
    except FileNotFoundError:
        return "broken symbolic link, not followed"
    except (RuntimeError, OSError):
        return "symbolic link loop, not followed"
    if not real.is_relative_to(real_root):
        return f"symbolic link to {real}, outside the image root, not followed"
    if real in ancestors:
        return "symbolic link loop (points back to a parent folder), not followed"
    return ""


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageRejected(f"cannot be read: {exc.strerror or exc}") from None


def _phash(grey: Image.Image) -> str:
    """The 64-bit perceptual hash (``imagehash.phash``) of a grey image, as hex.

    ``phash`` shrinks its input to 32x32 with a Lanczos filter, whose cost grows with
    the input size. Shrinking it first with ``reducing_gap=2`` (a box reduction down to
    twice the size, then Lanczos) halves the cost and keeps the hash as robust to
    re-encoding, resizing and cropping; it can differ from the unreduced one by a bit
    or two, the same for every image.
    """
    small = grey.resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return str(imagehash.phash(small))


def _pixel_statistics(image: Image.Image, grey: Image.Image) -> dict[str, Any]:
    """The mean colour, the pixel variation, brightness and contrast of an image.

    From Pillow's histograms, exact over every pixel and without a float copy of them:
    pHash ignores colour and the mean, so these tell a flat red image from a black one.
    Brightness and contrast are those of ``grey``, the image's luma (ITU-R 601, as
    Pillow converts to ``L``), which the evaluation compares between the splits.
    """
    stat = ImageStat.Stat(image)
    luma = ImageStat.Stat(grey)
    red, green, blue = (min(255, round(value)) for value in stat.mean)
    return {
        "mean_colour": f"#{red:02x}{green:02x}{blue:02x}",
        "pixel_std": round(max(stat.stddev), 3),
        "brightness": round(luma.mean[0], 3),
        "contrast": round(luma.stddev[0], 3),
    }


def _check_pixel_count(size: tuple[int, int], policy: OpenPolicy) -> None:
    width, height = size
    if width * height > policy.max_pixels:
        raise ImageRejected(
            f"decompression bomb: {width}x{height} = {width * height:,} pixels, "
            f"more than images.max_pixels = {policy.max_pixels:,}"
        )


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB with the colours the file means."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: scale to 8 bits; Pillow's own convert("L") clips instead.
        values = np.asarray(image, dtype=np.float64)
        top = (
            65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        )
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255)
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in image.info)
        or (mode in ("L", "RGB") and "transparency" in image.info)
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    # CMYK (Adobe-inverted JPEGs are already un-inverted by Pillow's decoder), 1, L,
    # P, YCbCr, LAB, HSV: Pillow's own conversion is correct. RGB needs no copy.
    return image if mode == "RGB" else image.convert("RGB")


def _describe_unknown_content(data: bytes) -> str:
    head = data[:512]
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page, not an image"
    if text.startswith((b"<svg", b"<?xml")):
        return "an XML/SVG document, not a raster image in an allowed format"
    try:
        with Image.open(io.BytesIO(data)) as other:
            return (
                f"{other.format} image: format not allowed "
                f"(allowed: {', '.join(ALLOWED_FORMATS)})"
            )
    except Exception:  # noqa: BLE001 - naming the format is best effort only
        pass
    if _looks_like_text(head):
        return "a text file, not an image"
    return f"unrecognised content, not one of {', '.join(ALLOWED_FORMATS)}"


def _looks_like_text(head: bytes) -> bool:
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(char.isprintable() or char.isspace() for char in decoded)
