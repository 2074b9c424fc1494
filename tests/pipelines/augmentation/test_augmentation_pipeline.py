"""The pipeline run in-process on demo photos: train only, reruns, presets."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kedro.io import DatasetError

from irv2_pipeline.images import OpenPolicy, load_image, resize
from irv2_pipeline.pipelines.augmentation import create_pipeline
from irv2_pipeline.pipelines.augmentation.ops import Geometry, augment
from irv2_pipeline.pipelines.augmentation.render import SourceUnreadable

from .conftest import DEMO_IMAGES, IMAGE_SIZE, manifest_of


def image_files(folder: Path) -> dict[str, Path]:
    """The image files of a generated folder, by relative path (index excluded)."""
    return {
        p.relative_to(folder).as_posix(): p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def file_states(folder: Path) -> dict[str, tuple[int, int]]:
    """Inode and modification time of every image: a rewritten file changes both."""
    return {
        rel: (path.stat().st_ino, path.stat().st_mtime_ns)
        for rel, path in image_files(folder).items()
    }


def test_pipeline_wiring():
    pipeline = create_pipeline()
    assert [node.name for node in pipeline.nodes] == [
        "plan_augmentation",
        "write_resized_images",
        "write_augmented_images",
        "preview_augmentation",
    ]
    assert pipeline.inputs() == {
        "image_manifest",
        "raw_images",
        "params:model",
        "params:images",
        "params:augmentation",
    }
    assert {
        "augmented_images",
        "augmented_manifest",
        "augmentation_preview",
        "resized_images",
        "resized_manifest",
    } <= pipeline.all_outputs()


def test_only_train_images_are_read_and_augmented(
    run_augmentation, raw_root, demo_manifest, model_params, augmentation_params
):
    # Validation and test files are deleted: opening any of them would fail the
    # copies' nodes (resized images, written of every split, are another node's).
    held_out = demo_manifest[demo_manifest["split"] != "train"]
    for path in held_out["path"]:
        (raw_root / path).unlink()

    manifest, folder = run_augmentation(
        demo_manifest,
        raw_root,
        model_params,
        augmentation_params,
        only=("plan_augmentation", "write_augmented_images", "preview_augmentation"),
    )

    train = set(demo_manifest.loc[demo_manifest["split"] == "train", "path"])
    assert set(manifest["source_path"]) == train
    assert set(image_files(folder)) == set(manifest["path"])
    assert len(manifest) == 2 * len(train)
    for rel, path in image_files(folder).items():
        image = load_image(path, OpenPolicy())
        assert image.pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3), rel
        assert image.format == "JPEG" and rel.endswith(".jpg")  # conf/base
    assert (folder.parent / "preview.png").stat().st_size > 0


def test_a_rerun_from_scratch_gives_byte_identical_files(
    run_augmentation, raw_root, demo_manifest, model_params, augmentation_params
):
    manifest, folder = run_augmentation(
        demo_manifest, raw_root, model_params, augmentation_params
    )
    first = {rel: path.read_bytes() for rel, path in image_files(folder).items()}
    shutil.rmtree(folder)

    again, folder = run_augmentation(
        demo_manifest, raw_root, model_params, augmentation_params
    )
    second = {rel: path.read_bytes() for rel, path in image_files(folder).items()}

    pd.testing.assert_frame_equal(manifest, again)
    assert len(first) == 2 * 9
    assert first == second


def test_a_rerun_writes_only_new_copies_and_removes_those_of_images_gone_from_train(
    run_augmentation, raw_root, demo_manifest, model_params, augmentation_params
):
    _, folder = run_augmentation(
        demo_manifest, raw_root, model_params, augmentation_params
    )
    before = file_states(folder)

    new_image = "bag/bag_new.png"
    shutil.copy2(DEMO_IMAGES / "bag" / "bag_050.png", raw_root / new_image)
    leaving = "sneaker/sneaker_000.png"
    splits = dict(zip(demo_manifest["path"], demo_manifest["split"], strict=True))
    splits.update({new_image: "train", leaving: "val"})
    manifest, folder = run_augmentation(
        manifest_of(raw_root, splits), raw_root, model_params, augmentation_params
    )
    after = file_states(folder)

    new_copies = set(manifest.loc[manifest["source_path"] == new_image, "path"])
    left = {rel for rel in before if "sneaker_000__" in rel}
    assert len(new_copies) == 2 and len(left) == 2
    assert set(after) == (set(before) - left) | new_copies
    kept = set(before) - left
    assert {rel: after[rel] for rel in kept} == {rel: before[rel] for rel in kept}


def test_a_policy_change_rewrites_every_copy(
    run_augmentation, raw_root, demo_manifest, model_params, augmentation_params
):
    first, folder = run_augmentation(
        demo_manifest, raw_root, model_params, augmentation_params
    )
    before = file_states(folder)

    changed = copy.deepcopy(augmentation_params)
    changed["presets"]["standard"][1]["degrees"] = [-30, 30]
    second, folder = run_augmentation(demo_manifest, raw_root, model_params, changed)
    after = file_states(folder)

    assert set(after) == set(before)
    assert all(after[rel][0] != before[rel][0] for rel in before)
    assert first["policy"].nunique() == second["policy"].nunique() == 1
    assert first["policy"][0] != second["policy"][0]


def test_png_copies_hold_exactly_the_pixels_of_their_recorded_operations(
    run_augmentation, raw_root, demo_manifest, model_params, augmentation_params
):
    _, folder = run_augmentation(
        demo_manifest, raw_root, model_params, augmentation_params
    )
    as_png = dict(augmentation_params, format="png")
    manifest, folder = run_augmentation(demo_manifest, raw_root, model_params, as_png)

    files = image_files(folder)
    assert set(files) == set(manifest["path"])  # the JPEG copies are gone
    for row in manifest.itertuples():
        written = load_image(files[row.path], OpenPolicy())
        source = load_image(raw_root / row.source_path, OpenPolicy()).pixels
        expected = augment(resize(source, IMAGE_SIZE), json.loads(row.ops), Geometry())
        assert written.format == "PNG"
        np.testing.assert_array_equal(written.pixels, expected, err_msg=row.path)


def test_the_none_preset_runs_and_leaves_no_copies(
    run_augmentation, raw_root, demo_manifest, model_params, augmentation_params
):
    _, folder = run_augmentation(
        demo_manifest, raw_root, model_params, augmentation_params
    )
    assert image_files(folder)

    manifest, folder = run_augmentation(
        demo_manifest, raw_root, model_params, dict(augmentation_params, preset="none")
    )

    assert manifest.empty
    assert image_files(folder) == {}
    assert (folder.parent / "preview.png").stat().st_size > 0


def test_a_training_image_gone_since_ingestion_stops_the_run_by_name(
    run_augmentation, raw_root, demo_manifest, model_params, augmentation_params
):
    (raw_root / "trouser" / "trouser_001.png").write_bytes(b"not an image any more")
    with pytest.raises(DatasetError) as error:
        run_augmentation(demo_manifest, raw_root, model_params, augmentation_params)
    cause = error.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, SourceUnreadable)
    assert "Image trouser/trouser_001.png" in str(error.value)
    assert "run `kedro run --pipeline ingestion` again" in str(error.value)
