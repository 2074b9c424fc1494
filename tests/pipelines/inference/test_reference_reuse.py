"""The reference features are embedded once and reused while their inputs are the same.

``embed_reference_images`` on the finetune tests' small classifier (``mini_irv2`` at
75 px) and a few demo images, through the catalog's dataset as a run uses it: the
stored file is reused, without a forward pass and without a rewrite, while the model,
the manifest's rows and the image settings are those it was computed from; any of
them changed, the images are embedded again and the log says which. The slow check of
the same through ``kedro run`` is in ``test_inference_pipeline.py``.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from irv2_pipeline import reference_features as reference
from irv2_pipeline.datasets import FeatureCacheDataset, ImageFolder
from irv2_pipeline.datasets.atomic_model import AtomicTensorFlowModelDataset
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.keys import model_key
from irv2_pipeline.pipelines.inference.nodes import reference_sample
from irv2_pipeline.predict import probabilities_and_features
from irv2_pipeline.reference_features import embed_reference_images
from tests.pipelines.finetune.conftest import (
    CLASSES,
    DEMO_IMAGES,
    IMAGE_SIZE,
    demo_manifest,
    mini_classifier,
)

EVALUATION = {"batch_size": 4}


def manifest() -> pd.DataFrame:
    """3 training and 2 validation demo images per class, one group each."""
    rows = demo_manifest(3, 2)
    return rows.assign(group=[f"g{i}" for i in range(len(rows))])


def arguments(model, image_manifest=None, **changes) -> dict:
    return {
        "finetuned_model": model,
        "class_names": CLASSES,
        "image_manifest": manifest() if image_manifest is None else image_manifest,
        "raw_images": ImageFolder(DEMO_IMAGES),
        "model": {"image_size": IMAGE_SIZE},
        "images": {},
        "evaluation": EVALUATION,
        **changes,
    }


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The small classifier as a run reads it: saved, then loaded from its file."""
    path = tmp_path_factory.mktemp("model") / "model.keras"
    AtomicTensorFlowModelDataset(filepath=str(path)).save(mini_classifier(seed=3).model)
    return path


@pytest.fixture(scope="module")
def model(saved_model):
    return AtomicTensorFlowModelDataset(filepath=str(saved_model)).load()


@pytest.fixture
def stored(tmp_path, model):
    """A first run's file: the node with nothing stored, saved by the dataset."""
    dataset = FeatureCacheDataset(filepath=str(tmp_path / "reference_features.npz"))
    dataset.save(
        embed_reference_images(**arguments(model), stored_reference_features=None)
    )
    return dataset


def test_every_training_and_validation_image_is_embedded_in_manifest_order(model):
    rows = manifest()
    result = embed_reference_images(**arguments(model), stored_reference_features=None)
    for split in ("train", "val"):
        chosen = rows[rows["split"] == split]
        assert result[f"{split}_paths"].tolist() == chosen["path"].tolist()
        assert result[f"{split}_labels"].tolist() == chosen["label"].tolist()
        assert result[f"{split}_groups"].tolist() == chosen["group"].tolist()
        alone = probabilities_and_features(
            model,
            CLASSES,
            [DEMO_IMAGES / path for path in chosen["path"]],
            image_size=IMAGE_SIZE,
            policy=OpenPolicy(),
            batch_size=EVALUATION["batch_size"],
        ).features
        assert result[split].dtype == np.float32
        np.testing.assert_array_equal(result[split], alone.astype(np.float32))


def test_current_stored_features_are_reused_without_a_pass_or_a_rewrite(
    saved_model, stored, monkeypatch, caplog
):
    def no_pass(*args, **kwargs):
        raise AssertionError("the images were embedded again")

    monkeypatch.setattr(reference, "probabilities_and_features", no_pass)
    path = stored._filepath
    before = path.stat().st_mtime_ns
    caplog.set_level(logging.INFO)
    # Another load of the same file, another batch size: the same features.
    again = AtomicTensorFlowModelDataset(filepath=str(saved_model)).load()
    result = embed_reference_images(
        **arguments(again, evaluation={"batch_size": 2}),
        stored_reference_features=stored.load(),
    )
    assert "Reference features reused (9 training, 6 validation images" in caplog.text
    stored.save(result)
    assert path.stat().st_mtime_ns == before
    np.testing.assert_array_equal(result["train"], stored.load()["train"])


def test_a_changed_manifest_embeds_again_and_says_so(model, stored, caplog):
    rows = manifest()
    fewer = rows.drop(index=rows.index[rows["split"] == "train"][0])
    caplog.set_level(logging.INFO)
    result = embed_reference_images(
        **arguments(model, fewer), stored_reference_features=stored.load()
    )
    assert "Reference features computed (8 training, 6 validation images)" in (
        caplog.text
    )
    assert "image_manifest's training or validation images changed" in caplog.text
    assert "finetuned_model changed" not in caplog.text
    assert result["key"] != stored.load()["key"]
    # The same model: the images still there have the features they had.
    np.testing.assert_array_equal(result["train"], stored.load()["train"][1:])


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 4},  # other weights
        {"seed": 3, "input_scaling": "caffe_then_div_255"},  # other preprocessing
    ],
)
def test_a_changed_model_embeds_again_and_says_so(stored, tmp_path, caplog, change):
    path = tmp_path / "other.keras"
    AtomicTensorFlowModelDataset(filepath=str(path)).save(
        mini_classifier(**change).model
    )
    other = AtomicTensorFlowModelDataset(filepath=str(path)).load()
    caplog.set_level(logging.INFO)
    result = embed_reference_images(
        **arguments(other), stored_reference_features=stored.load()
    )
    assert "finetuned_model changed (other weights or another architecture)" in (
        caplog.text
    )
    assert "image_manifest's" not in caplog.text
    assert result["key"] != stored.load()["key"]
    assert not np.array_equal(result["train"], stored.load()["train"])


def test_changed_image_settings_embed_again(model, stored, caplog):
    caplog.set_level(logging.INFO)
    embed_reference_images(
        **arguments(model, images={"background": [0, 0, 0]}),
        stored_reference_features=stored.load(),
    )
    assert "the images parameters (how images are opened) changed" in caplog.text


def test_a_run_loads_the_model_file_once_and_a_new_file_again(saved_model, tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(saved_model.read_bytes())
    dataset = AtomicTensorFlowModelDataset(filepath=str(path))
    first = dataset.load()
    # Every node of a run gets the same object (and its traced prediction graph).
    assert dataset.load() is first
    # Two loads of one file's content have one key.
    other = AtomicTensorFlowModelDataset(filepath=str(saved_model)).load()
    assert other is not first and model_key(other) == model_key(first)
    dataset.save(mini_classifier(seed=4).model)
    assert dataset.load() is not first
    dataset.release()


def test_the_sample_is_the_one_drawn_before_the_features_were_stored(model):
    rows = manifest()
    features = embed_reference_images(
        **arguments(model), stored_reference_features=None
    )
    sample = reference_sample(features, {"seed": 7}, {"max_reference_images": 4})
    train = rows[rows["split"] == "train"]
    drawn = train.sample(4, random_state=7).sort_index()
    position = {path: i for i, path in enumerate(train["path"])}
    np.testing.assert_array_equal(
        sample["train"], features["train"][[position[p] for p in drawn["path"]]]
    )
    assert sample["train_labels"].tolist() == drawn["label"].tolist()
    assert len(sample["val"]) == 4
    whole = reference_sample(features, {"seed": 7}, {"max_reference_images": None})
    np.testing.assert_array_equal(whole["val"], features["val"])
