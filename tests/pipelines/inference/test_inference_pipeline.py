"""`kedro run --env smoke --pipeline inference` on a folder of new images.

After the shared smoke run: copies of test images must be predicted exactly as the
evaluation predicted them, an image of a class never seen and a blank image must score
as less familiar than every copy, and a corrupt file must be rejected with a reason
while the run goes on.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.slow

SIZE = 28  # the demo images' size


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

    result = run_kedro(
        ["run", "--env", "smoke", "--pipeline", "inference"], cwd=project, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert folder_digest(new) == before, "the new-image folder was changed"
    return project, copies


def test_copies_are_predicted_as_in_evaluation(inference_run):
    project, copies = inference_run
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
    project, copies = inference_run
    predictions = pd.read_csv(project / "data/07_model_output/predictions.csv")
    scores = predictions.set_index("path")["ood_score"]
    worst_copy = scores.loc[list(copies)].max()
    assert scores["unseen.png"] > worst_copy
    assert scores["blank.png"] > worst_copy


def test_corrupt_file_is_rejected_and_reported(inference_run):
    project, copies = inference_run
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
