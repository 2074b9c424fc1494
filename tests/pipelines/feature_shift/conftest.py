"""Fixtures of the feature_shift tests: one small IRv2 probe, and demo images.

IRv2 at 75 px with random weights (seeded) is built and traced once per session; the
tests that change its BN statistics restore them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from irv2_pipeline.backbone import load_irv2
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import image_dataset
from irv2_pipeline.pipelines.feature_shift.moments import (
    ProbeLayout,
    SplitPass,
    build_probe,
    run_pass,
)
from tests.conftest import project_parameters

PROJECT_ROOT = Path(__file__).resolve().parents[3]
DEMO_IMAGES = PROJECT_ROOT / "data" / "01_raw" / "images"
IMAGE_SIZE = 75
BATCH_SIZE = 8
DEPTHS = ("mixed_5b", "mixed_6a", "mixed_7a", "conv_7b")
GROUPS = ("stem", "block35", "mixed_6a", "block17", "mixed_7a", "block8", "conv_7b")
# IRv2's units, input to output, as Keras names them (test_moments checks this list
# against backbone.unit_order).
UNITS = [
    "stem",
    "mixed_5b",
    *[f"block35_{i}" for i in range(1, 11)],
    "mixed_6a",
    *[f"block17_{i}" for i in range(1, 21)],
    "mixed_7a",
    *[f"block8_{i}" for i in range(1, 11)],
    "conv_7b",
]


def feature_shift_params(env: str = "base") -> dict:
    """The ``feature_shift`` parameters a run in ``env`` gets (merged over conf/base)."""
    return project_parameters(env)["feature_shift"]


@dataclass(frozen=True)
class ProbeKit:
    """A backbone, its probe and a way to run image files through it."""

    backbone: keras.Model
    probe: keras.Model
    layout: ProbeLayout

    def run(self, paths: list[Path]) -> SplitPass:
        """The probe's pass over image files, as the pipeline runs it."""
        batches = image_dataset(
            paths,
            None,
            image_size=IMAGE_SIZE,
            batch_size=BATCH_SIZE,
            policy=OpenPolicy(),
        )
        return run_pass(
            self.probe,
            self.layout,
            batches,
            batch_size=BATCH_SIZE,
            n_images=len(paths),
            what="test",
            logger=logging.getLogger(__name__),
        )


@pytest.fixture(scope="session")
def irv2_probe() -> ProbeKit:
    """IRv2 (75 px, random weights from seed 7) and its probe."""
    keras.utils.set_random_seed(7)
    backbone = load_irv2(None, IMAGE_SIZE)
    probe, layout = build_probe(backbone, DEPTHS)
    return ProbeKit(backbone, probe, layout)


@pytest.fixture(scope="session")
def demo_paths() -> dict[str, list[Path]]:
    """The bundled demo images by label, sorted."""
    return {
        folder.name: sorted(folder.glob("*.png"))
        for folder in sorted(DEMO_IMAGES.iterdir())
    }


def load_pixels(paths: list[Path]) -> list[np.ndarray]:
    """Demo images as RGB arrays."""
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def write_images(folder: Path, images: list[np.ndarray]) -> list[Path]:
    """Writes RGB arrays as PNG files and returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, pixels in enumerate(images):
        path = folder / f"image_{index:03d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths
