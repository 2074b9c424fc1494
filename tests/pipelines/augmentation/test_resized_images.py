"""Resized originals: every accepted image at the model's size, read by TensorFlow.

Training reads them instead of the raw files; these tests hold them to the pixels
``images.load_resized`` gives (what every other pipeline feeds the model), on images
of every kind a user has, and to the incremental, atomic rules of generated folders.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.images import OpenPolicy, load_resized
from irv2_pipeline.inputs import image_dataset
from irv2_pipeline.pipelines.finetune.examples import ResizedImages, split_examples

from .conftest import IMAGE_SIZE, manifest_of, write_png
from .test_augmentation_pipeline import file_states, image_files

RESIZED_NODE = ("write_resized_images",)


def save(path: Path, image: Image.Image, fmt: str, **save_args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **save_args)


@pytest.fixture
def odd_root(tmp_path, raw_root) -> Path:
    """The demo root plus the images users have: large, turned, CMYK, transparent."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    big = Image.fromarray(coarse).resize((1600, 1200), Image.Resampling.BICUBIC)
    # Larger than 4x the model size: decoded at reduced scale.
    save(raw_root / "bag/large.jpg", big, "JPEG", quality=90)
    turned_exif = big.getexif()
    turned_exif[0x0112] = 6
    save(raw_root / "bag/large_turned.jpg", big, "JPEG", exif=turned_exif.tobytes())
    save(raw_root / "sneaker/cmyk.jpg", big.resize((90, 60)).convert("CMYK"), "JPEG")
    rgba = np.dstack([np.asarray(big.resize((50, 40))), np.full((40, 50), 90, "uint8")])
    save(raw_root / "trouser/alpha.png", Image.fromarray(rgba), "PNG")
    grey16 = (rng.integers(0, 65536, (30, 40))).astype(np.uint16)
    save(raw_root / "trouser/grey16.png", Image.fromarray(grey16), "PNG")
    return raw_root


def odd_manifest(root: Path) -> pd.DataFrame:
    paths = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
    )
    splits = ("train", "val", "test")
    return manifest_of(root, {p: splits[i % 3] for i, p in enumerate(paths)})


def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    """Every file's SHA-256 and modification time."""
    return {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in root.rglob("*")
        if p.is_file()
    }


def test_training_reads_exactly_the_pixels_load_resized_gives(
    tmp_path, odd_root, run_augmentation, model_params, augmentation_params
):
    manifest = odd_manifest(odd_root)
    raw_before = tree_state(odd_root)
    run_augmentation(
        manifest, odd_root, model_params, augmentation_params, only=RESIZED_NODE
    )
    assert tree_state(odd_root) == raw_before  # nothing in the raw root touched

    resized_manifest = pd.read_csv(tmp_path / "resized_manifest.csv")
    assert list(resized_manifest["path"]) == sorted(manifest["path"])
    assert set(resized_manifest["image_size"]) == {IMAGE_SIZE}
    resized = ResizedImages.checked(
        resized_manifest, ImageFolder(tmp_path / "resized"), manifest, IMAGE_SIZE
    )
    classes = sorted(manifest["label"].unique())
    examples = [split_examples(manifest, resized, classes, s) for s in ("train", "val")]
    for split, split_set in zip(("train", "val"), examples, strict=True):
        assert all(split_set.generated)
        # Finetune's input: TensorFlow decodes the resized files in the graph.
        in_graph = np.concatenate(
            list(
                image_dataset(
                    split_set.paths,
                    None,
                    image_size=IMAGE_SIZE,
                    batch_size=4,
                    policy=OpenPolicy(),
                    generated=split_set.generated,
                ).as_numpy_iterator()
            )
        )
        paths = manifest.loc[manifest["split"] == split, "path"]
        expected = np.stack(
            [load_resized(odd_root / p, OpenPolicy(), IMAGE_SIZE) for p in paths]
        )
        np.testing.assert_array_equal(in_graph, expected.astype(np.float32))
    # The large photos were in the test: at reduced scale, turned upright.
    large = load_resized(odd_root / "bag/large_turned.jpg", OpenPolicy(), IMAGE_SIZE)
    assert large.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


def test_a_rerun_rewrites_only_changed_images_and_removes_those_gone(
    tmp_path, raw_root, demo_manifest, run_augmentation, model_params
):
    augmentation = {"preset": "none", "copies": 0, "workers": 1}
    folder = tmp_path / "resized"
    run_augmentation(demo_manifest, raw_root, model_params, augmentation, RESIZED_NODE)
    first = file_states(folder)
    resized = pd.read_csv(tmp_path / "resized_manifest.csv").set_index("path")["file"]
    assert set(first) == set(resized)

    run_augmentation(demo_manifest, raw_root, model_params, augmentation, RESIZED_NODE)
    assert file_states(folder) == first

    changed, gone = demo_manifest["path"].iloc[0], demo_manifest["path"].iloc[1]
    changed_file, gone_file = resized[changed], resized[gone]
    write_png(raw_root / changed, np.full((28, 28, 3), 77, dtype=np.uint8))
    manifest = manifest_of(
        raw_root, dict(zip(demo_manifest["path"], demo_manifest["split"], strict=True))
    )
    manifest = manifest[manifest["path"] != gone]
    run_augmentation(manifest, raw_root, model_params, augmentation, RESIZED_NODE)
    after = file_states(folder)
    assert set(after) == set(first) - {gone_file}
    assert after[changed_file] != first[changed_file]
    assert {k: v for k, v in after.items() if k != changed_file} == {
        k: v for k, v in first.items() if k not in (changed_file, gone_file)
    }
    pixels = np.asarray(Image.open(io.BytesIO((folder / changed_file).read_bytes())))
    assert (pixels == 77).all()

    # Another model size rewrites every file.
    resized_at_64 = {**model_params, "image_size": 64}
    run_augmentation(manifest, raw_root, resized_at_64, augmentation, RESIZED_NODE)
    final = file_states(folder)
    assert set(final) == set(after)
    assert all(final[k] != after[k] for k in final)
    assert all(
        Image.open(path).size == (64, 64) for path in image_files(folder).values()
    )
