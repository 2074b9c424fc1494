"""The images a run trains and validates on: absolute paths and class indices.

Training takes the original training images plus their augmented copies; validation
takes the ``val`` split. Augmented copies are checked against the manifest: a copy of
a validation or test image would leak those images into training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from irv2_pipeline.datasets import ImageFolder

AUGMENTED_COLUMNS = ("path", "source_path", "label")


class ExamplesError(ValueError):
    """Manifests that cannot be trained on; the message names the problem."""


@dataclass(frozen=True)
class Examples:
    """Images and their class indices, in a fixed order.

    Attributes:
        paths: Absolute image paths.
        labels: Class index of each image (``int32``).
        augmented: How many of them are augmented copies: the last ones.
    """

    paths: tuple[str, ...]
    labels: np.ndarray
    augmented: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def generated(self) -> tuple[bool, ...]:
        """For each path, whether it is an augmented copy (they come last)."""
        return (False,) * (len(self) - self.augmented) + (True,) * self.augmented

    def class_counts(self, classes: int) -> np.ndarray:
        """Images per class index."""
        return np.bincount(self.labels, minlength=classes)

    def originals(self) -> Examples:
        """The images that are not augmented copies."""
        kept = len(self) - self.augmented
        return Examples(paths=self.paths[:kept], labels=self.labels[:kept])

    def __add__(self, other: Examples) -> Examples:
        """Both sets of original images, one after the other."""
        if self.augmented or other.augmented:
            raise ValueError("Only original images are added up")
        return Examples(
            paths=self.paths + other.paths,
            labels=np.concatenate([self.labels, other.labels]),
        )


def split_examples(
    image_manifest: pd.DataFrame,
    raw_images: ImageFolder,
    classes: Sequence[str],
    split: str,
) -> Examples:
    """The original images of one split, in manifest order.

    Raises:
        ExamplesError: The split has no images.
    """
    rows = image_manifest[image_manifest["split"] == split]
    if rows.empty:
        raise ExamplesError(
            f"image_manifest has no {split!r} images: finetune needs a training and a "
            "validation split (ingestion.split)."
        )
    index = {name: i for i, name in enumerate(classes)}
    return Examples(
        paths=tuple(str(raw_images.path_of(path)) for path in rows["path"]),
        labels=rows["label"].map(index).to_numpy(dtype=np.int32),
    )


def training_examples(
    image_manifest: pd.DataFrame,
    augmented_manifest: pd.DataFrame,
    raw_images: ImageFolder,
    augmented_images: ImageFolder,
    classes: Sequence[str],
) -> Examples:
    """The training split's originals, followed by their augmented copies.

    Args:
        image_manifest: Accepted images with their split.
        augmented_manifest: One row per augmented copy (empty: originals only).
        raw_images: The folder ``image_manifest`` paths are relative to.
        augmented_images: The folder ``augmented_manifest`` paths are relative to.
        classes: Class names in index order.

    Raises:
        ExamplesError: A copy whose source is not a training image, or whose label
            differs from its source's.
    """
    originals = split_examples(image_manifest, raw_images, classes, "train")
    if augmented_manifest.empty:
        return originals
    missing = [c for c in AUGMENTED_COLUMNS if c not in augmented_manifest.columns]
    if missing:
        raise ExamplesError(
            f"augmented_manifest lacks the columns {missing}; rerun `kedro run "
            "--pipeline augmentation`."
        )
    train = image_manifest[image_manifest["split"] == "train"]
    source_label = dict(zip(train["path"], train["label"], strict=True))
    known = augmented_manifest["source_path"].map(source_label)
    strays = augmented_manifest.loc[known.isna(), "source_path"]
    if len(strays):
        raise ExamplesError(
            f"{len(strays)} augmented copies come from images that are not in the "
            f"training split (e.g. {strays.iloc[0]!r}): training on them would leak "
            "validation or test images. Rerun `kedro run --pipeline augmentation`."
        )
    mislabelled = augmented_manifest.loc[known != augmented_manifest["label"], "path"]
    if len(mislabelled):
        raise ExamplesError(
            f"{len(mislabelled)} augmented copies carry another label than their "
            f"source image (e.g. {mislabelled.iloc[0]!r}). Rerun `kedro run "
            "--pipeline augmentation`."
        )
    index = {name: i for i, name in enumerate(classes)}
    copies = augmented_manifest["path"].map(lambda p: str(augmented_images.path_of(p)))
    return Examples(
        paths=originals.paths + tuple(copies),
        labels=np.concatenate(
            [
                originals.labels,
                augmented_manifest["label"].map(index).to_numpy(dtype=np.int32),
            ]
        ),
        augmented=len(copies),
    )
