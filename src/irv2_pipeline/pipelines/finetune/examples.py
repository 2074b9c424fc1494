"""The images a run trains and validates on: absolute paths and class indices.

Training takes the original training images plus their augmented copies; validation
takes the ``val`` split. Originals are read from ``resized_images`` (each accepted
image at the model's size, written by the augmentation pipeline), so every file
training reads is one TensorFlow decodes in the graph. Augmented copies are checked
against the manifest: a copy of a validation or test image would leak those images
into training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from irv2_pipeline.datasets import ImageFolder

AUGMENTED_COLUMNS = ("path", "source_path", "label")
RESIZED_COLUMNS = ("path", "file", "sha256", "image_size")
RERUN_AUGMENTATION = "Rerun `kedro run --pipeline augmentation`."


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
        """For each path, whether this project wrote it: all of them, so
        ``inputs.image_dataset`` decodes every one with TensorFlow."""
        return (True,) * len(self)

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


@dataclass(frozen=True)
class ResizedImages:
    """Where training reads each accepted image: its file in ``resized_images``.

    Attributes:
        folder: The resized folder.
        files: Each ``image_manifest`` path to its file, relative to ``folder``.
    """

    folder: ImageFolder
    files: Mapping[str, str]

    @classmethod
    def checked(
        cls,
        resized_manifest: pd.DataFrame,
        resized_images: ImageFolder,
        image_manifest: pd.DataFrame,
        image_size: int,
    ) -> ResizedImages:
        """The resized images, once checked to be those of this manifest and size.

        Raises:
            ExamplesError: A manifest image without a resized file, one resized from
                other bytes (the raw file changed since), or another image size.
        """
        missing = [c for c in RESIZED_COLUMNS if c not in resized_manifest.columns]
        if missing:
            raise ExamplesError(
                f"resized_manifest lacks the columns {missing}. {RERUN_AUGMENTATION}"
            )
        sizes = set(resized_manifest["image_size"].astype(int))
        if sizes - {image_size}:
            raise ExamplesError(
                f"resized_images were written at {sorted(sizes)} px but "
                f"model.image_size is {image_size}. {RERUN_AUGMENTATION}"
            )
        made_from = dict(
            zip(resized_manifest["path"], resized_manifest["sha256"], strict=True)
        )
        stale = [
            path
            for path, sha256 in zip(
                image_manifest["path"], image_manifest["sha256"], strict=True
            )
            if made_from.get(path) != sha256
        ]
        if stale:
            raise ExamplesError(
                f"{len(stale)} images of image_manifest have no up-to-date resized "
                f"image (e.g. {stale[0]!r}): ingestion ran after augmentation. "
                f"{RERUN_AUGMENTATION}"
            )
        return cls(
            folder=resized_images,
            files=dict(
                zip(resized_manifest["path"], resized_manifest["file"], strict=True)
            ),
        )

    def path_of(self, path: str) -> str:
        """The absolute path of the resized file of an ``image_manifest`` path."""
        return str(self.folder.path_of(self.files[path]))


def resized_identity(resized_manifest: pd.DataFrame) -> pd.DataFrame:
    """What a checkpoint's key holds of ``resized_manifest``, whatever its row order.

    Each image's file and the source bytes and size it was resized from: a resized
    set written again under other names, or from other sources, gives another key.

    Args:
        resized_manifest: ``path``, ``file``, ``sha256``, ``image_size`` per image.

    Returns:
        Those columns, one row per image, sorted by ``path``.
    """
    return resized_manifest[list(RESIZED_COLUMNS)].sort_values(
        "path", ignore_index=True
    )


def split_examples(
    image_manifest: pd.DataFrame,
    resized: ResizedImages,
    classes: Sequence[str],
    split: str,
) -> Examples:
    """The original images of one split, in manifest order, as their resized files.

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
        paths=tuple(resized.path_of(path) for path in rows["path"]),
        labels=rows["label"].map(index).to_numpy(dtype=np.int32),
    )


def training_examples(
    image_manifest: pd.DataFrame,
    augmented_manifest: pd.DataFrame,
    resized: ResizedImages,
    augmented_images: ImageFolder,
    classes: Sequence[str],
) -> Examples:
    """The training split's originals, followed by their augmented copies.

    Args:
        image_manifest: Accepted images with their split.
        augmented_manifest: One row per augmented copy (empty: originals only).
        resized: The resized files of ``image_manifest``'s images.
        augmented_images: The folder ``augmented_manifest`` paths are relative to.
        classes: Class names in index order.

    Raises:
        ExamplesError: A copy whose source is not a training image, or whose label
            differs from its source's.
    """
    originals = split_examples(image_manifest, resized, classes, "train")
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
