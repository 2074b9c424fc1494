"""`kedro run --env smoke --pipeline inference` on a folder of new images.

After the shared smoke run: copies of test images must be predicted exactly as the
evaluation predicted them, an image of a class never seen and a blank image must score
as less familiar than every copy, and a corrupt file must be rejected with a reason
while the run goes on. The reference features the smoke run's evaluation stored are
reused, the file left as it was; without the file, inference embeds the images itself,
stores the same features and gives the same predictions and flags.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.slow

SIZE = 28  # the demo images' size
REFERENCE = "data/07_model_output/reference_features.npz"


class InferenceRun(NamedTuple):
    project: Path
    # New image path -> the test image it is a copy of.
    copies: dict[str, str]
    log: str
    # The stored reference features' modification time before the run.
    reference_mtime_ns: int


def unseen_pattern() -> Image.Image:
    """A checkerboard with a circle: no garment of the demo looks like it."""
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    for y in range(0, SIZE, 4):
        for x in range((y // 4) % 2 * 4, SIZE, 8):
            draw.rectangle((x, y, x + 3, y + 3), fill=255)
    draw.ellipse((6, 6, 21, 21), outline=128, width=2)
    return image


@pytest.fixture(scope="module")
def inference_run(smoke_run, tmp_path_factory, run_kedro, folder_digest):
    finished, _, _ = smoke_run
    project = tmp_path_factory.mktemp("inference") / "project"
    shutil.copytree(finished, project, symlinks=True)
    manifest = pd.read_csv(project / "data/02_intermediate/image_manifest.csv")
    tests = manifest[manifest["split"] == "test"]["path"].head(3).to_list()
    new = project / "data/01_raw/new_images"
    copies = {}
    for index, path in enumerate(tests):
        # Nested folders, any names: the folder is unlabelled.
        target = new / "batch" / f"sub{index}" / f"copy_{index}.png"
        target.parent.mkdir(parents=True)
        shutil.copyfile(project / "data/01_raw/images" / path, target)
        copies[f"batch/sub{index}/copy_{index}.png"] = path
    unseen_pattern().save(new / "unseen.png")
    Image.new("L", (SIZE, SIZE), 128).save(new / "blank.png")
    whole = (project / "data/01_raw/images" / tests[0]).read_bytes()
    (new / "batch" / "corrupt.png").write_bytes(whole[: len(whole) // 2])
    before = folder_digest(new)
    reference_mtime_ns = (project / REFERENCE).stat().st_mtime_ns

    result = run_kedro(
        ["run", "--env", "smoke", "--pipeline", "inference"], cwd=project, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert folder_digest(new) == before, "the new-image folder was changed"
    return InferenceRun(
        project, copies, result.stdout + result.stderr, reference_mtime_ns
    )


@pytest.fixture(scope="module")
def recomputed_run(inference_run, tmp_path_factory, run_kedro):
    """The same inference on a copy without the stored reference features."""
    project = tmp_path_factory.mktemp("recomputed") / "project"
    shutil.copytree(inference_run.project, project, symlinks=True)
    (project / REFERENCE).unlink()
    (project / "data/07_model_output/predictions.csv").unlink()
    result = run_kedro(
        ["run", "--env", "smoke", "--pipeline", "inference"], cwd=project, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return project, result.stdout + result.stderr


def test_copies_are_predicted_as_in_evaluation(inference_run):
    project, copies = inference_run.project, inference_run.copies
    predictions = pd.read_csv(project / "data/07_model_output/predictions.csv")
    expected = pd.read_csv(project / "data/07_model_output/test_predictions.csv")
    classes = json.loads((project / "data/06_models/class_names.json").read_text())
    got = predictions.set_index("path").loc[list(copies)]
    want = expected.set_index("path").loc[list(copies.values())]
    assert got["predicted"].to_list() == want["predicted"].to_list()
    np.testing.assert_allclose(
        got["confidence"].to_numpy(), want["confidence"].to_numpy(), atol=1e-5
    )
    columns = [f"prob_{name}" for name in classes]
    np.testing.assert_allclose(
        got[columns].to_numpy(), want[columns].to_numpy(), atol=1e-5
    )
    assert list(predictions.columns[:3]) == ["path", "predicted", "confidence"]
    assert {"top1_class", "top1_prob", "ood_score", "ood_flag"} <= set(predictions)
    assert (got["top1_class"] == got["predicted"]).all()


def test_unfamiliar_images_score_higher_than_every_copy(inference_run):
    project, copies = inference_run.project, inference_run.copies
    predictions = pd.read_csv(project / "data/07_model_output/predictions.csv")
    scores = predictions.set_index("path")["ood_score"]
    worst_copy = scores.loc[list(copies)].max()
    assert scores["unseen.png"] > worst_copy
    assert scores["blank.png"] > worst_copy


def test_corrupt_file_is_rejected_and_reported(inference_run):
    project, copies = inference_run.project, inference_run.copies
    rejected = pd.read_csv(project / "data/07_model_output/inference_rejected.csv")
    assert rejected["path"].to_list() == ["batch/corrupt.png"]
    assert rejected["reason"].str.len().gt(0).all()
    report = json.loads(
        (project / "data/08_reporting/inference_report.json").read_text()
    )
    assert report["n_predicted"] == len(copies) + 2
    assert report["n_rejected"] == 1
    assert 0 < report["ood"]["threshold"]
    assert report["ood"]["false_alarm_rate"] == 0.05
    assert "p = " in report["batch_shift"]["statement"]
    assert 0 < report["batch_shift"]["p_value"] <= 1


def test_inference_reuses_the_features_evaluation_stored(inference_run):
    assert "Reference features reused (" in inference_run.log
    assert "Reference features computed" not in inference_run.log
    stored = inference_run.project / REFERENCE
    assert stored.stat().st_mtime_ns == inference_run.reference_mtime_ns
    timings = pd.read_csv(inference_run.project / "data/08_reporting/node_timings.csv")
    assert "embed_reference_images" in set(timings["node"])


def test_without_the_stored_file_the_same_features_and_flags_are_computed(
    inference_run, recomputed_run
):
    project, log = recomputed_run
    assert "Reference features computed (" in log
    assert "none are stored (" in log
    reused = pd.read_csv(inference_run.project / "data/07_model_output/predictions.csv")
    fresh = pd.read_csv(project / "data/07_model_output/predictions.csv")
    pd.testing.assert_frame_equal(fresh, reused)
    report = json.loads(
        (project / "data/08_reporting/inference_report.json").read_text()
    )
    before = json.loads(
        (inference_run.project / "data/08_reporting/inference_report.json").read_text()
    )
    assert report["ood"] == before["ood"]
    # Inference stored what evaluation had: the next run reuses it.
    with (
        np.load(project / REFERENCE) as recomputed,
        np.load(inference_run.project / REFERENCE) as evaluated,
    ):
        assert str(recomputed["__key__"]) == str(evaluated["__key__"])
        for name in ("train", "val", "train_paths", "val_paths", "train_labels"):
            np.testing.assert_array_equal(recomputed[name], evaluated[name])
