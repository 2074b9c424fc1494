"""Inference nodes on their own: flip TTA's columns, a missing or empty folder.

Flip TTA runs the finetune tests' small classifier (``mini_irv2`` at 75 px) over a few
demo images; its columns must be the mean of the model's probabilities for the images
and for their mirror images, next to the plain columns, never instead of them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from kedro.io import DatasetError

from irv2_pipeline.datasets import ImageFolder, ImageFolderDataset
from irv2_pipeline.pipelines.inference.nodes import (
    InferenceError,
    predict_new_images,
    prediction_table,
    scan_new_images,
)
from irv2_pipeline.pipelines.inference.ood import fit_mahalanobis
from tests.pipelines.export.conftest import demo_files, project_pixels
from tests.pipelines.finetune.conftest import (
    CLASSES,
    DEMO_IMAGES,
    IMAGE_SIZE,
    mini_classifier,
)

INFERENCE = {
    "batch_size": 4,
    "workers": 1,
    "top_k": 2,
    "test_time_augmentation": False,
}


def test_missing_folder_says_what_to_put_where(tmp_path):
    dataset = ImageFolderDataset(path=str(tmp_path / "new_images"), labelled=False)
    with pytest.raises(DatasetError, match="images to predict") as raised:
        dataset.load()
    assert "no label folders" in str(raised.value)
    assert str(tmp_path / "new_images") in str(raised.value)


def test_empty_folder_is_an_error_that_says_what_to_put_where(tmp_path):
    (tmp_path / "new_images" / "empty_subfolder").mkdir(parents=True)
    with pytest.raises(InferenceError, match="is empty. Put the images there"):
        scan_new_images(ImageFolder(tmp_path / "new_images"), {}, INFERENCE)


@pytest.fixture(scope="module")
def predicted():
    """A small classifier's outputs for 6 demo images, plain and with flip TTA."""
    model = mini_classifier(seed=3).model
    files = demo_files(per_class=2)
    paths = [file.relative_to(DEMO_IMAGES).as_posix() for file in files]
    image_list = pd.DataFrame({"path": paths})
    arguments = {
        "finetuned_model": model,
        "class_names": CLASSES,
        "new_image_list": image_list,
        "new_images": ImageFolder(DEMO_IMAGES),
        "model": {"image_size": IMAGE_SIZE},
        "images": {},
    }
    plain = predict_new_images(**arguments, inference=INFERENCE)
    tta = predict_new_images(
        **arguments, inference={**INFERENCE, "test_time_augmentation": True}
    )
    pixels = project_pixels(files).astype("float32")
    mirrored = model.predict(pixels[:, :, ::-1], verbose=0)
    return image_list, plain, tta, np.asarray(mirrored, dtype=np.float64)


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror(predicted):
    _, plain, tta, mirrored = predicted
    assert "tta_probabilities" not in plain
    np.testing.assert_allclose(tta["probabilities"], plain["probabilities"])
    expected = (plain["probabilities"] + mirrored / mirrored.sum(1, keepdims=True)) / 2
    np.testing.assert_allclose(tta["tta_probabilities"], expected, atol=1e-6)
    # The small model is not mirror-symmetric: TTA changes the numbers.
    assert np.abs(tta["tta_probabilities"] - plain["probabilities"]).max() > 1e-4


def test_tta_columns_sit_next_to_the_plain_ones(predicted):
    image_list, plain, tta, _ = predicted
    detector = {
        "scorer": fit_mahalanobis(
            tta["features"], np.asarray(CLASSES * 2, dtype=object)
        ),
        "threshold": 1.0,
    }
    without = prediction_table(image_list, plain, detector, CLASSES, INFERENCE)
    table = prediction_table(image_list, tta, detector, CLASSES, INFERENCE)
    tta_columns = [
        "tta_predicted",
        "tta_confidence",
        *[f"tta_prob_{name}" for name in CLASSES],
    ]
    assert not set(tta_columns) & set(without.columns)
    assert [c for c in table.columns if c.startswith("tta_")] == tta_columns
    pd.testing.assert_frame_equal(table[without.columns], without)
    probs = table[[f"tta_prob_{name}" for name in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs, tta["tta_probabilities"])
    assert table["tta_predicted"].to_list() == [CLASSES[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(table["tta_confidence"], probs.max(1))
