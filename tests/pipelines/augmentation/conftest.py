"""Fixtures of the augmentation tests: a small image root, its manifest, a runner.

The images are demo Fashion-MNIST photos (28x28 greyscale) copied from
``data/01_raw/images``, plus, where a test needs to see a flip, a colour image whose
left and right halves differ.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.matplotlib import MatplotlibDataset
from kedro_datasets.pandas import CSVDataset
from PIL import Image

from irv2_pipeline.datasets import GeneratedImageFolderDataset, ImageFolderDataset
from irv2_pipeline.pipelines.augmentation import create_pipeline

PROJECT_ROOT = Path(__file__).resolve().parents[3]
DEMO_IMAGES = PROJECT_ROOT / "data" / "01_raw" / "images"
IMAGE_SIZE = 75
# Per class: the first three images train, then one val, one test.
SPLITS = ("train", "train", "train", "val", "test")


def base_parameters() -> dict:
    """``conf/base``'s augmentation parameters, as written there."""
    text = (PROJECT_ROOT / "conf/base/parameters_augmentation.yml").read_text()
    return yaml.safe_load(text)["augmentation"]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_of(root: Path, splits: dict[str, str]) -> pd.DataFrame:
    """An image manifest for ``root`` with the given split of every path."""
    rows = [
        {
            "path": path,
            "label": path.split("/", 1)[0],
            "split": split,
            "sha256": sha256_of(root / path),
        }
        for path, split in sorted(splits.items())
    ]
    return pd.DataFrame(rows)


def asymmetric_image(size: int = 32) -> np.ndarray:
    """A colour image whose left half is a red ramp and right half a blue one."""
    ramp = np.linspace(40, 250, size // 2).astype(np.uint8)
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, : size // 2, 0] = ramp
    pixels[:, size // 2 :, 2] = ramp[::-1]
    pixels[: size // 4, :, 1] = 180
    return pixels


@pytest.fixture
def raw_root(tmp_path) -> Path:
    """Five demo photos of each of the three classes, in a fresh image root."""
    root = tmp_path / "raw"
    for label in ("bag", "sneaker", "trouser"):
        (root / label).mkdir(parents=True)
        for name in sorted(p.name for p in (DEMO_IMAGES / label).iterdir())[:5]:
            shutil.copy2(DEMO_IMAGES / label / name, root / label / name)
    return root


@pytest.fixture
def demo_manifest(raw_root) -> pd.DataFrame:
    """The manifest of ``raw_root``: per class three train, one val, one test image."""
    splits = {}
    for label in ("bag", "sneaker", "trouser"):
        names = sorted(p.name for p in (raw_root / label).iterdir())
        splits.update(
            {
                f"{label}/{name}": split
                for name, split in zip(names, SPLITS, strict=True)
            }
        )
    return manifest_of(raw_root, splits)


@pytest.fixture
def model_params() -> dict:
    return {"weights": None, "image_size": IMAGE_SIZE, "seed": 7}


@pytest.fixture
def augmentation_params() -> dict:
    """``conf/base``'s standard preset, two copies, rendered in this process."""
    params = base_parameters()
    params.update(copies=2, workers=1)
    params["preview"] = {"images": 3, "copies": 2}
    return params


@pytest.fixture
def run_augmentation(tmp_path) -> Callable[..., tuple[pd.DataFrame, Path]]:
    """``run(manifest, raw_root, model, augmentation)`` runs the pipeline in-process.

    The pipeline's nodes (or ``only`` those named) run with Kedro's own runner on a
    catalog like the project's: the raw root, the augmented and resized folders
    ``tmp_path/augmented`` and ``tmp_path/resized``, the manifests and the preview as
    files. Returns the augmented manifest (as read back from its CSV file; ``None``
    when its node did not run) and folder.
    """
    output = tmp_path / "augmented"

    def run(
        manifest: pd.DataFrame,
        raw: Path,
        model: dict,
        augmentation: dict,
        only: tuple[str, ...] = (),
    ) -> tuple[pd.DataFrame | None, Path]:
        catalog = DataCatalog(
            datasets={
                "image_manifest": MemoryDataset(manifest),
                "raw_images": ImageFolderDataset(path=str(raw)),
                "augmented_images": GeneratedImageFolderDataset(path=str(output)),
                "augmented_manifest": CSVDataset(
                    filepath=str(tmp_path / "augmented_manifest.csv")
                ),
                "augmentation_preview": MatplotlibDataset(
                    filepath=str(tmp_path / "preview.png")
                ),
                "resized_images": GeneratedImageFolderDataset(
                    path=str(tmp_path / "resized")
                ),
                "resized_manifest": CSVDataset(
                    filepath=str(tmp_path / "resized_manifest.csv")
                ),
                "params:model": MemoryDataset(model),
                "params:images": MemoryDataset({}),
                "params:augmentation": MemoryDataset(augmentation),
            }
        )
        pipeline = create_pipeline()
        SequentialRunner().run(
            pipeline.only_nodes(*only) if only else pipeline, catalog
        )
        written = catalog.exists("augmented_manifest")
        return catalog.load("augmented_manifest") if written else None, output

    return run


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
