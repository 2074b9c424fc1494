"""Each textbook recipe, as conf/base writes it, builds the model the issue describes.

Read from what ``finetune``'s training node builds (real IRv2, random weights, 75 px),
not from the configuration: the node runs as the pipeline runs it, with the epochs
replaced by a probe that records the graph the stage would train, its optimizer and
settings, and trains nothing (a traced IRv2 training step costs minutes here).
"""

from __future__ import annotations

import shutil

import keras
import numpy as np
import pandas as pd
import pytest

from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.pipelines.counterfactuals.nodes import configure_variant
from irv2_pipeline.pipelines.finetune import nodes, training
from tests.conftest import planned_source, project_parameters
from tests.pipelines.finetune.conftest import (
    CLASSES,
    DEMO_IMAGES,
    IMAGE_SIZE,
    demo_manifest,
    resized_demo,
)

pytestmark = pytest.mark.slow

# Our stages (the smoke plan): the budget the one-stage recipes train for.
OUR_PLAN = {
    "stages": [
        {
            "name": "head",
            "unfreeze_from": None,
            "epochs": 1,
            "learning_rate": 1e-3,
            "bn_policy": "adapt",
        },
        {
            "name": "top",
            "unfreeze_from": "block8_1",
            "epochs": 1,
            "learning_rate": 1e-4,
            "bn_policy": "adapt",
        },
    ],
    "source": planned_source(),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Variant name to what its training node built and would train."""
    params = project_parameters("smoke")
    tmp = tmp_path_factory.mktemp("recipes")
    manifest = demo_manifest(train_per_class=2, val_per_class=1)
    copies = copy_rows(manifest, tmp / "augmented")
    results = {}
    for name in ("all_frozen", "no_augmentation_wrong_scaling", "high_rate_thin_head"):
        finetune, plan, variant_copies, rules = configure_variant(
            variant=params["counterfactuals"]["variants"][name],
            finetune={
                **params["finetune"],
                "checkpoint_dir": str(tmp / "checkpoints"),
                "tensorboard_dir": None,
            },
            finetune_plan=OUR_PLAN,
            augmented_manifest=copies,
            plan_rules=params["feature_shift"]["plan_rules"],
            variant_name=name,
        )
        probe = {}

        def record(run, index, stage, graph, state, *, best, callbacks, probe=probe):
            probe.update(
                stage=stage, trainee=graph.trainee, run=run, cached=graph.cached
            )
            # As if the stage had trained, so the run ends as runs end.
            state.epochs_done, state.best_epoch = stage.epochs, stage.epochs
            state.best_val_loss, state.best_val_accuracy = 1.0, 0.0
            return best

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(training._Run, "_train_epochs", record)
            model, _, records, _, _ = nodes.train_classifier(
                image_manifest=manifest,
                augmented_manifest=variant_copies,
                finetune_plan=plan,
                resized_manifest=resized_demo()[0],
                resized_images=ImageFolder(resized_demo()[1]),
                augmented_images=ImageFolder(tmp / "augmented"),
                model={"weights": None, "image_size": IMAGE_SIZE, "seed": 7},
                images={},
                finetune=finetune,
                plan_rules=rules,
            )
        results[name] = {"model": model, "records": records, **probe}
    return results


def copy_rows(manifest: pd.DataFrame, folder) -> pd.DataFrame:
    """One 'augmented copy' per training image (a plain copy of its file)."""
    rows = []
    for path in manifest.loc[manifest["split"] == "train", "path"]:
        copy = path.replace(".png", "__c1.png")
        (folder / copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEMO_IMAGES / path, folder / copy)
        rows.append({"path": copy, "source_path": path, "label": path.split("/")[0]})
    return pd.DataFrame(rows)


def trainable_backbone_layers(model: keras.Model) -> list[int]:
    """Positions of the trainable layers in Keras's IRv2 layer list (the list
    ``base_model.layers[500:]`` indexes)."""
    backbone = model.get_layer("inception_resnet_v2")
    return [i for i, layer in enumerate(backbone.layers) if layer.trainable]


def from_layer_500(model: keras.Model) -> list[int]:
    return list(range(500, len(model.get_layer("inception_resnet_v2").layers)))


def scaling(model: keras.Model) -> tuple[float, float]:
    """The model's preprocessing as ``pixel * scale + offset``, read from what it
    makes of grey pixels 0 and 1 (the same in every channel, as a rescaling is)."""
    grey = np.array([[[[0.0] * 3, [1.0] * 3]]], dtype="float32")
    out = keras.ops.convert_to_numpy(model.get_layer("irv2_preprocess")(grey))[0, 0]
    assert np.allclose(out, out[:, :1]), "a preprocessing other than a rescaling"
    return float(out[1, 0] - out[0, 0]), float(out[0, 0])


def head_layout(model: keras.Model) -> list[tuple]:
    """The head's layers after the pooled features: kind, units, activation."""
    layout = []
    for layer in model.get_layer("head").layers[1:]:
        if isinstance(layer, keras.layers.Dense):
            layout.append(("dense", layer.units, layer.get_config()["activation"]))
        else:
            layout.append((type(layer).__name__, layer.get_config().get("activation")))
    return layout


def optimizer_of(trainee: keras.Model) -> tuple[type, float, bool]:
    optimizer = trainee.optimizer
    scheduled = isinstance(
        optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule
    )
    # A float32 variable: 1e-3 reads back as 0.0010000000474974513.
    rate = float(np.float32(keras.ops.convert_to_numpy(optimizer.learning_rate)))
    return type(optimizer), rate, scheduled


def pooled_by_average(model: keras.Model) -> bool:
    names = [layer.name for layer in model.layers]
    return "avg_pool" in names and "max_pool" not in names


def test_recipe_1_freezes_the_whole_backbone_under_a_1024_unit_head(built):
    run = built["all_frozen"]
    model = run["model"]
    assert trainable_backbone_layers(model) == []
    assert scaling(model) == pytest.approx((1 / 127.5, -1.0))
    assert pooled_by_average(model)
    assert head_layout(model) == [
        ("dense", 1024, "relu"),
        ("dense", len(CLASSES), "linear"),
        ("Activation", "softmax"),
    ]
    assert optimizer_of(run["trainee"]) == (
        keras.optimizers.Adam,
        float(np.float32(1e-3)),
        False,
    )
    assert run["trainee"].optimizer.weight_decay is None
    # Keras's fit: no early stopping, the model is the last epoch's.
    assert run["run"].settings.patience is None
    assert run["run"].settings.restore_best_weights is False
    # Frozen backbone: its head trains on features computed once.
    assert run["cached"] and run["records"]["cached_features"].tolist() == [True]
    assert run["records"]["augmented_images"].tolist() == [6]


def test_recipe_2_scales_by_1_255_trains_layers_500_on_with_batch_statistics(built):
    run = built["no_augmentation_wrong_scaling"]
    model = run["model"]
    assert trainable_backbone_layers(model) == from_layer_500(model)
    assert scaling(model) == pytest.approx((1 / 255, 0.0))
    assert head_layout(model) == [
        ("dense", 1024, "relu"),
        ("dense", len(CLASSES), "linear"),
        ("Activation", "softmax"),
    ]
    assert optimizer_of(run["trainee"]) == (
        keras.optimizers.Adam,
        float(np.float32(1e-4)),
        False,
    )
    assert run["run"].settings.patience is None
    assert run["run"].settings.restore_best_weights is False
    assert run["records"]["augmented_images"].tolist() == [0]
    assert_batchnorm_in_training_mode(run["trainee"], model)


def test_recipe_3_trains_layers_500_on_at_1e_2_under_a_thin_head(built):
    run = built["high_rate_thin_head"]
    model = run["model"]
    assert trainable_backbone_layers(model) == from_layer_500(model)
    assert scaling(model) == pytest.approx((1 / 127.5, -1.0))
    assert head_layout(model) == [
        ("dense", len(CLASSES), "linear"),
        ("Activation", "softmax"),
    ]
    assert optimizer_of(run["trainee"]) == (
        keras.optimizers.Adam,
        float(np.float32(1e-2)),
        False,
    )
    assert run["run"].settings.patience == 5
    assert run["run"].settings.min_delta == 0.0
    # EarlyStopping's default: the model is the epoch it stopped at, not the best.
    assert run["run"].settings.restore_best_weights is False
    assert run["records"]["augmented_images"].tolist() == [6]
    assert_batchnorm_in_training_mode(run["trainee"], model)


def assert_batchnorm_in_training_mode(trainee, model):
    """A training call moves the statistics of BN layers in layers[500:] only."""
    layers = model.get_layer("inception_resnet_v2").layers
    first_trained = layers[500]
    frozen = [
        layer
        for layer in layers[:500]
        if isinstance(layer, keras.layers.BatchNormalization)
    ][-1]
    # Keras's index 500 falls between a convolution and its BatchNorm.
    assert isinstance(first_trained, keras.layers.BatchNormalization)
    before = [np.array(layer.moving_mean) for layer in (first_trained, frozen)]
    images = np.random.default_rng(0).uniform(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3))
    trainee(images.astype("float32"), training=True)
    after = [np.array(layer.moving_mean) for layer in (first_trained, frozen)]
    assert not np.allclose(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
