"""The resized originals a benchmark's training input reads, as the pipeline writes them.

``finetune`` reads each accepted image from ``resized_images`` (the augmentation
pipeline's ``write_resized_images``): benchmarks of training build them the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from irv2_pipeline.datasets import GeneratedImageFolderDataset, ImageFolder
from irv2_pipeline.pipelines.augmentation.nodes import write_resized_images
from irv2_pipeline.pipelines.finetune.examples import ResizedImages


def with_sha256(manifest: pd.DataFrame, root: Path) -> pd.DataFrame:
    """The manifest with the ``sha256`` column ingestion would give it."""
    return manifest.assign(
        sha256=[
            hashlib.sha256((root / p).read_bytes()).hexdigest() for p in manifest.path
        ]
    )


def resize_originals(
    manifest: pd.DataFrame, root: Path, folder: Path, image_size: int, workers=1
) -> ResizedImages:
    """Writes every manifest image at ``image_size`` into ``folder`` (incrementally).

    Args:
        manifest: ``path`` (relative to ``root``) and ``sha256`` columns.
        root: The image root.
        folder: The resized folder (new, or one this function wrote).
        image_size: The model's input side.
        workers: Rendering processes (``augmentation.workers``).
    """
    jobs, resized_manifest = write_resized_images(
        manifest,
        ImageFolder(root),
        {},
        {"image_size": image_size},
        {"preset": "none", "copies": 0, "workers": workers},
    )
    GeneratedImageFolderDataset(path=str(folder)).save(jobs)
    return ResizedImages.checked(
        resized_manifest, ImageFolder(folder), manifest, image_size
    )
