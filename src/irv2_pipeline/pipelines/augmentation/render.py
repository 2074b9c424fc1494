"""Rendering the copies of one source image (runs in worker processes).

Kept apart from ``nodes.py`` so that a worker imports only what it renders with.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from irv2_pipeline.images import ImageRejected, OpenPolicy, load_resized

from .ops import Geometry, augment


class SourceUnreadable(RuntimeError):
    """A training image that cannot be opened any more."""


@dataclass(frozen=True)
class Encoding:
    """How copies are stored: ``png`` (lossless) or ``jpeg`` with a quality."""

    format: str = "jpeg"
    jpeg_quality: int = 95

    @property
    def extension(self) -> str:
        return "jpg" if self.format == "jpeg" else "png"

    def encode(self, pixels) -> bytes:
        """Encodes uint8 RGB pixels; the same pixels always give the same bytes."""
        buffer = io.BytesIO()
        image = Image.fromarray(pixels)
        if self.format == "jpeg":
            image.save(buffer, format="JPEG", quality=self.jpeg_quality)
        else:
            image.save(buffer, format="PNG")
        return buffer.getvalue()


@dataclass(frozen=True)
class SourceCopies:
    """The copies of one training image: a job for ``GeneratedImageFolderDataset``.

    Attributes:
        source: Absolute path of the source image.
        source_path: Its manifest path, for error messages.
        outputs: Relative output path of each copy, to the copy's key.
        ops: Relative output path of each copy, to its drawn operations (the
            manifest's JSON list of ``{op, params}``).
        image_size: Side of the square copies, in pixels.
        open_policy: How the source is opened (``images.OpenPolicy``).
        geometry: Fill mode and interpolation of geometric operations.
        encoding: File format of the copies.
    """

    source: str
    source_path: str
    outputs: Mapping[str, str]
    ops: Mapping[str, str]
    image_size: int
    open_policy: OpenPolicy
    geometry: Geometry
    encoding: Encoding

    def render(self, wanted: Sequence[str]) -> dict[str, bytes]:
        """Opens and resizes the source once, then augments and encodes each copy."""
        pixels = _model_pixels(
            self.source, self.source_path, self.open_policy, self.image_size
        )
        return {
            rel: self.encoding.encode(
                augment(pixels, json.loads(self.ops[rel]), self.geometry)
            )
            for rel in wanted
        }


# Resized images are PNG: lossless, so TensorFlow's decoder gives back exactly the
# pixels ``images.load_resized`` made (see docs/pipelines/augmentation.md, "Training input").
RESIZED_ENCODING = Encoding("png")


@dataclass(frozen=True)
class ResizedImage:
    """One accepted image at the model's size: a job for ``GeneratedImageFolderDataset``.

    Attributes:
        source: Absolute path of the image.
        source_path: Its manifest path, for error messages.
        outputs: The one relative output path, to its key.
        image_size: Side of the square output, in pixels.
        open_policy: How the source is opened (``images.OpenPolicy``).
    """

    source: str
    source_path: str
    outputs: Mapping[str, str]
    image_size: int
    open_policy: OpenPolicy

    def render(self, wanted: Sequence[str]) -> dict[str, bytes]:
        """``images.load_resized``'s pixels, as PNG."""
        pixels = _model_pixels(
            self.source, self.source_path, self.open_policy, self.image_size
        )
        return dict.fromkeys(wanted, RESIZED_ENCODING.encode(pixels))


def _model_pixels(
    source: str, source_path: str, policy: OpenPolicy, image_size: int
) -> np.ndarray:
    try:
        return load_resized(source, policy, image_size)
    except ImageRejected as rejection:
        raise SourceUnreadable(
            f"Image {source_path} ({source}) cannot be opened: {rejection.reason}. "
            "The raw images changed since ingestion; run "
            "`kedro run --pipeline ingestion` again."
        ) from None


def single_threaded_worker() -> None:
    """Gives each worker process one TensorFlow thread: the workers are the parallelism.

    Runs before the worker's first job, while TensorFlow's threads can still be set.
    """
    import tensorflow as tf  # noqa: PLC0415 - the renderers' graphs run on it

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
