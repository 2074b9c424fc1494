"""The real InceptionResNetV2 (random weights, 75 px) through the training node.

One head-only stage keeps it to about a minute: tracing a training step through
IRv2's blocks costs minutes on two cores, and ``tests/test_end_to_end.py`` runs the
smoke DAG's backbone stage anyway. What only the real network can show is checked
here: the plan's unit names resolve, the head trained on cached IRv2 features is the
saved model's head, and the saved model reloads in safe mode with identical outputs.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.datasets.atomic_model import AtomicTensorFlowModelDataset
from irv2_pipeline.pipelines.finetune import nodes
from irv2_pipeline.pipelines.finetune.examples import split_examples
from tests.conftest import planned_source

from .conftest import CLASSES, IMAGE_SIZE, demo_manifest, demo_resized, resized_demo
from .test_finetune_cached_head import pixels

HEAD_STAGE = {
    "name": "head",
    "unfreeze_from": None,
    "epochs": 1,
    "learning_rate": 1e-3,
    "bn_policy": "frozen",
}


@pytest.mark.slow
def test_irv2_head_on_cached_features_is_the_saved_models_head(
    tmp_path, finetune_params, plan_rules
):
    manifest = demo_manifest(train_per_class=2, val_per_class=1)
    model, history, records, classes, _ = nodes.train_classifier(
        image_manifest=manifest,
        augmented_manifest=manifest.iloc[0:0],
        finetune_plan={
            "stages": [HEAD_STAGE],
            "rationale": [],
            "source": planned_source(),
        },
        resized_manifest=resized_demo()[0],
        resized_images=ImageFolder(resized_demo()[1]),
        augmented_images=ImageFolder(tmp_path / "none"),
        model={"weights": None, "image_size": IMAGE_SIZE, "seed": 7},
        images={},
        finetune={**finetune_params, "stages": None},
        plan_rules=plan_rules,
    )
    assert classes == CLASSES
    assert list(history["stage"]) == ["head"]
    assert list(records["cached_features"]) == [True]
    head = model.get_layer("head")
    assert records["trainable_params"].iloc[0] == sum(
        w.numpy().size for w in head.trainable_weights
    )
    assert [layer.name for layer in model.layers[:3]] == [
        "pixels",
        "irv2_preprocess",
        "inception_resnet_v2",
    ]
    resized = demo_resized(manifest)
    images = pixels(
        split_examples(manifest, resized, CLASSES, "train")
        + split_examples(manifest, resized, CLASSES, "val")
    )
    # Eager calls: tracing IRv2's predict functions would double the test's time.
    outputs = keras.ops.convert_to_numpy(model(images))
    features = keras.Model(model.input, model.get_layer("avg_pool").output)(images)
    np.testing.assert_array_equal(outputs, keras.ops.convert_to_numpy(head(features)))

    dataset = AtomicTensorFlowModelDataset(filepath=str(tmp_path / "model.keras"))
    dataset.save(model)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(dataset.load()(images)), outputs
    )
