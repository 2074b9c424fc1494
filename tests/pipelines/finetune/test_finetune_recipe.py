"""The recipe: a converged linear head, stages kept only when they help, rates found."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from irv2_pipeline.backbone import preprocessing_layer
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import image_dataset
from irv2_pipeline.pipelines.finetune.lr_find import RangeTestSettings
from irv2_pipeline.pipelines.finetune.optimizer import make_optimizer
from irv2_pipeline.pipelines.finetune.runtime import dtype_policy
from irv2_pipeline.probe import fit_probe

from .conftest import (
    IMAGE_SIZE,
    demo_examples,
    load_parameters,
    mini_classifier,
    stage,
    train,
)

PLAN_RULES = {"max_backbone_learning_rate": 1e-4, "max_head_learning_rate": 1e-2}


def images(examples):
    return image_dataset(
        examples.paths, None, image_size=IMAGE_SIZE, batch_size=8, policy=OpenPolicy()
    )


def pooled(classifier, examples) -> np.ndarray:
    return classifier.features.predict(images(examples), verbose=0)


@pytest.fixture(scope="module")
def examples():
    return demo_examples(train_per_class=10, val_per_class=6)


def test_the_head_stage_reaches_the_probe_of_its_own_features(tmp_path, examples):
    classifier = mini_classifier()
    state = train(
        classifier, [stage("head", None, bn_policy="adapt")], examples, tmp_path
    )
    train_examples, val_examples = examples
    probe = fit_probe(
        pooled(classifier, train_examples),
        train_examples.labels,
        3,
        c=1.0,
        max_iter=2000,
        seed=0,
    )
    probe_accuracy = probe.accuracy(
        pooled(classifier, val_examples), val_examples.labels
    )
    (row,) = state.history
    one_image = 1 / len(val_examples)
    assert row["val_accuracy"] >= probe_accuracy - max(one_image, 0.01)
    record = state.stage_records[0]
    assert record["solver"] == "lbfgs" and record["head_c"] in (0.01, 0.1, 1.0, 10.0)
    # The model's own predictions are the probe's: the head is in the saved graph.
    predicted = classifier.model.predict(images(val_examples), verbose=0)
    model_accuracy = np.mean(np.argmax(predicted, axis=1) == val_examples.labels)
    assert model_accuracy == pytest.approx(row["val_accuracy"])


def test_a_stage_that_makes_validation_worse_is_not_kept(tmp_path, examples):
    head_only = mini_classifier()
    train(head_only, [stage("head", None)], examples, tmp_path / "head")
    classifier = mini_classifier()
    state = train(
        classifier,
        # A rate far too high for the backbone: it wrecks the features.
        [stage("head", None), stage("top", "block8_1", learning_rate=0.5)],
        examples,
        tmp_path / "both",
    )
    head, top = state.stage_records
    assert top["best_val_loss"] > head["best_val_loss"]
    assert (head["selected"], top["selected"]) == (True, False)
    assert "not kept" in top["selection"]
    for kept, expected in zip(
        classifier.model.get_weights(), head_only.model.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(kept, expected)


def test_a_stage_that_helps_is_kept(tmp_path, examples):
    state = train(
        mini_classifier(),
        [
            stage("head", None, learning_rate=1e-3),
            stage("more_head", None, epochs=3, learning_rate=1e-2),
        ],
        examples,
        tmp_path,
        head_solver="minibatch",
    )
    first, second = state.stage_records
    assert second["best_val_loss"] < first["best_val_loss"]
    assert (first["selected"], second["selected"]) == (False, True)


def test_the_range_test_sets_the_stage_rate_within_the_rules_and_resumes_it(
    tmp_path, examples
):
    finder = RangeTestSettings(seeds=(0, 1), steps=12, min_lr=1e-6, max_lr=1.0)
    stages = [stage("head", None), stage("top", "block8_1", learning_rate=3e-5)]
    state = train(
        mini_classifier(),
        stages,
        examples,
        tmp_path,
        lr_find=finder,
        plan_rules=PLAN_RULES,
    )
    head, top = state.stage_records
    # The L-BFGS head has no rate to find.
    assert head["lr_note"] == "" and "0" not in state.found_rates
    found = state.found_rates["1"]
    assert found["seeds"] == [0, 1] and len(found["curve"]["losses"]) <= 12
    if found["suggestion"] is None:
        assert top["learning_rate"] == 3e-5
    else:
        assert top["learning_rate"] == min(found["suggestion"], 1e-4)
    assert top["planned_learning_rate"] == 3e-5
    # A rerun of the finished run neither sweeps nor trains again.
    again = train(
        mini_classifier(),
        stages,
        examples,
        tmp_path,
        lr_find=finder,
        plan_rules=PLAN_RULES,
    )
    assert again.found_rates == json.loads(json.dumps(state.found_rates))


def test_the_range_test_scales_every_backbone_stage_keeping_the_planned_ratios(
    tmp_path, examples
):
    finder = RangeTestSettings(seeds=(0,), steps=12, min_lr=1e-6, max_lr=1.0)
    planned = {"head": 1e-3, "top": 4e-5, "deeper": 2e-5}
    state = train(
        mini_classifier(),
        [
            stage("head", None, learning_rate=planned["head"]),
            stage("top", "block8_1", epochs=1, learning_rate=planned["top"]),
            stage("deeper", "block17_1", epochs=1, learning_rate=planned["deeper"]),
        ],
        examples,
        tmp_path,
        lr_find=finder,
        plan_rules=PLAN_RULES,
    )
    records = {record["stage"]: record for record in state.stage_records}
    for name in ("top", "deeper"):
        assert records[name]["planned_learning_rate"] == planned[name]
    # One sweep, for the first backbone stage; the next keeps the plan's ratio.
    assert "curve" in state.found_rates["1"]
    assert "curve" not in state.found_rates["2"]
    assert records["deeper"]["learning_rate"] / records["top"]["learning_rate"] == (
        pytest.approx(planned["deeper"] / planned["top"])
    )
    assert "the range test of stage 'top'" in records["deeper"]["lr_note"]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_probes_loss_is_the_compiled_loss_of_the_stages(smoothing):
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(40, 5)), np.repeat(np.arange(4), 10)
    probe = fit_probe(features, labels, 4, c=1.0, max_iter=500, seed=0)
    logits = features @ probe.kernel + probe.bias
    keras_loss = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=smoothing
    )(np.eye(4)[labels], logits)
    assert probe.log_loss(features, labels, smoothing) == pytest.approx(
        float(keras_loss), rel=1e-5
    )


def test_default_weight_decay_shrinks_weights_measurably():
    finetune = load_parameters("parameters_finetune")["finetune"]
    plan = load_parameters("parameters_feature_shift")["feature_shift"]["plan"]
    for weight_decay in (finetune["weight_decay"], plan["backbone"]["weight_decay"]):
        # A kernel (biases and BN parameters are not decayed), with no gradient.
        weight = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
        optimizer = make_optimizer("adamw", 1e-4, weight_decay, {})
        optimizer.build([weight])
        for _ in range(1000):
            optimizer.apply([np.zeros((2, 2), "float32")], [weight])
        # 1000 steps at 1e-4 (a short stage): decoupled decay must be felt, not 1e-6.
        assert 1 - float(weight.numpy()[0, 0]) > 1e-3


def test_preprocessing_keeps_neighbouring_pixels_apart_in_bfloat16():
    pixels = np.array([[253.0, 254.0, 255.0]], "float32")
    with dtype_policy("mixed_bfloat16"):
        scaled = keras.ops.convert_to_numpy(preprocessing_layer()(pixels))
    np.testing.assert_allclose(scaled, pixels / 127.5 - 1, rtol=1e-6)
    assert len(set(scaled[0].tolist())) == 3
