"""Planted cause: three classes of 12 images among classes of 150.

Real images from scikit-learn's bundled handwritten digits (``load_digits``: 8x8
greyscale, ~180 per digit), written as 28 px PNGs (the demo's size) into a project
copy: digits 3-9 with 150 images each, ``zero``, ``one`` and ``two`` with 12. An
earlier ingestion stopped on such a set ("class 'zero' has 12 usable images and none
in val"). ``kedro run --env smoke`` must now go through, give every class at least one
image in each split, and ``class_imbalance`` must name the three small classes.

The run is the whole smoke DAG with training cut to what the finding needs
(``run_cut_to_the_finding``): a linear head fitted to convergence on the pooled
features of 751 training images of imbalanced classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from .conftest import run_cut_to_the_finding

pytestmark = pytest.mark.slow

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SMALL_CLASSES = ("zero", "one", "two")
SMALL, LARGE = 12, 150
SIDE = 28


def write_digits(images: Path) -> dict[str, int]:
    """Writes the planted set (module docstring) as PNGs; returns images per class."""
    digits = load_digits()
    counts = {}
    for digit, name in enumerate(NAMES):
        count = SMALL if name in SMALL_CLASSES else LARGE
        folder = images / name
        folder.mkdir(parents=True)
        for index in np.flatnonzero(digits.target == digit)[:count]:
            pixels = (digits.images[index] * (255 / 16)).round().astype(np.uint8)
            image = Image.fromarray(pixels).resize((SIDE, SIDE), Image.BILINEAR)
            image.save(folder / f"digit_{index:04d}.png")
        counts[name] = count
    return counts


@pytest.fixture(scope="module")
def planted_run(project_copy_factory) -> Path:
    """``kedro run --env smoke`` on the planted digits (module docstring)."""
    project = project_copy_factory("class_imbalance_planted")
    images = project / "data/01_raw/images"
    for folder in images.iterdir():
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    assert sum(write_digits(images).values()) == 7 * LARGE + 3 * SMALL
    run_cut_to_the_finding(project, reads_occlusion=False)
    return project


def test_every_class_has_an_image_in_every_split(planted_run):
    manifest = pd.read_csv(planted_run / "data/02_intermediate/image_manifest.csv")
    counts = pd.crosstab(manifest["label"], manifest["split"])
    print(f"images per class and split:\n{counts.to_string()}")  # noqa: T201
    assert sorted(counts.index) == sorted(NAMES)
    assert sorted(counts.columns) == ["test", "train", "val"]
    assert (counts > 0).all(axis=None), counts
    assert (counts.loc[list(SMALL_CLASSES)].sum(axis=1) == SMALL).all(), counts


def test_class_imbalance_names_the_three_small_classes(planted_run):
    findings = json.loads(
        (planted_run / "data/08_reporting/diagnosis.json").read_text()
    )
    imbalance = [f for f in findings if f["rule"] == "class_imbalance"]
    assert len(imbalance) == 1, findings
    finding = imbalance[0]
    print(json.dumps(finding, indent=1))  # noqa: T201 - the figures it rests on
    assert "the training set is imbalanced" in finding["cause"]
    assert "finetune.class_weights" in finding["parameters"]
    rare = next(line for line in finding["evidence"] if line.startswith("classes with"))
    named = {name for name in NAMES if f"{name!r} (" in rare}
    assert named == set(SMALL_CLASSES), rare
    for name in SMALL_CLASSES:
        assert repr(name) in finding["suggestion"], finding
