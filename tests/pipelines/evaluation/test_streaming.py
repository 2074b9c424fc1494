"""predict_test_split streams the test split: it never holds every test image at once.

Many more test images than tf.data's look-ahead, and a counter on every decode: the
node must decode each image once, in step with the model's batches. Loading the
split into memory first (a list of batches, one giant batch) decodes every image
before the first prediction, and fails here.
"""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest
from PIL import Image

from irv2_pipeline import inputs, predict
from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.pipelines.evaluation.nodes import predict_test_split
from tests.streaming import (
    CountingModel,
    DecodeCounter,
    images_to_stream,
    lead_limit,
)

from .conftest import CLASSES, COLOURS, pipeline_parameters, textured

BATCH_SIZE = 4


def write_test_split(root, count: int) -> tuple[ImageFolder, pd.DataFrame]:
    """``count`` test images spread over the colour classes, and their manifest."""
    rows = []
    for index in range(count):
        label = CLASSES[index % len(CLASSES)]
        path = f"{label}/{label}_{index:04d}.png"
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(textured(COLOURS[label], seed=index)).save(root / path)
        rows.append(
            {
                "path": path,
                "label": label,
                "split": "test",
                "sha256": hashlib.sha256((root / path).read_bytes()).hexdigest(),
            }
        )
    return ImageFolder(root), pd.DataFrame(rows)


@pytest.mark.parametrize("test_time_augmentation", [False, True])
def test_test_images_are_decoded_once_and_in_step_with_the_model(
    tmp_path, monkeypatch, colour_model, test_time_augmentation
):
    params = pipeline_parameters()
    count = images_to_stream(BATCH_SIZE)
    folder, manifest = write_test_split(tmp_path / "images", count)
    decoded = DecodeCounter(inputs.load_resized)
    monkeypatch.setattr(inputs, "load_resized", decoded)
    model = CountingModel(colour_model, decoded)
    # The node predicts through predict.py's two-output view of the model: note the
    # decoded count there, at every batch handed to the model.
    real_predict = predict.predict_padded

    def counted(view, batch, batch_size):
        model.decoded_at_batch.append(decoded.count)
        return real_predict(view, batch, batch_size)

    monkeypatch.setattr(predict, "predict_padded", counted)

    predictions = predict_test_split(
        finetuned_model=model,
        class_names=CLASSES,
        image_manifest=manifest,
        raw_images=folder,
        model=params["params:model"],
        images=params["params:images"],
        evaluation={
            **params["params:evaluation"],
            "batch_size": BATCH_SIZE,
            "test_time_augmentation": test_time_augmentation,
        },
    )

    assert predictions["path"].tolist() == manifest["path"].tolist()
    # Each image decoded once, flipped copies included: no second pass over the files.
    assert decoded.count == count
    batches = -(-count // BATCH_SIZE) * (2 if test_time_augmentation else 1)
    assert len(model.decoded_at_batch) == batches
    if test_time_augmentation:
        # Each batch goes through plain, then flipped: the lead counts the plain ones.
        model.decoded_at_batch = model.decoded_at_batch[0::2]
    assert model.largest_lead(BATCH_SIZE, count) <= lead_limit(BATCH_SIZE)
