"""The learning-rate range test: its suggestion trains, and the trainee is untouched."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from irv2_pipeline.backbone import batchnorm_layers, set_trainable_from
from irv2_pipeline.classifier import training_model
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import image_dataset
from irv2_pipeline.pipelines.finetune.lr_find import (
    TABLE_COLUMNS,
    RangeTest,
    clip_to_rules,
    lr_finder_figure,
    lr_finder_table,
    range_test,
    smooth,
    suggest_over_seeds,
    valley,
)
from irv2_pipeline.pipelines.finetune.optimizer import (
    layerwise_multipliers,
    make_optimizer,
    warmup_cosine,
)

from .conftest import CLASSES, IMAGE_SIZE, demo_examples, mini_classifier

FEATURES = 8


def blobs(examples: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping Gaussian classes: learnable, but not in one step."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, examples)
    x = 0.5 * np.where(labels[:, None] == 0, 1.0, -1.0) + rng.normal(
        size=(examples, FEATURES)
    )
    return x.astype("float32"), np.eye(2, dtype="float32")[labels]


def blob_batches(seed: int | None = None) -> tf.data.Dataset:
    x, y = blobs()
    pairs = tf.data.Dataset.from_tensor_slices((x, y))
    if seed is not None:
        pairs = pairs.shuffle(len(x), seed=seed)
    return pairs.batch(32)


def dense_model(seed: int = 0) -> keras.Model:
    """A small network with every kind of state: BatchNorm statistics, dropout seeds."""
    inputs = keras.Input((FEATURES,))
    x = keras.layers.Dense(
        16, kernel_initializer=keras.initializers.GlorotUniform(seed)
    )(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Dropout(0.2, seed=seed)(x)
    outputs = keras.layers.Dense(
        2, activation="softmax", kernel_initializer=keras.initializers.GlorotUniform(1)
    )(x)
    return keras.Model(inputs, outputs)


def compiled(model: keras.Model, learning_rate) -> keras.Model:
    """Compiled as the project compiles a stage (layer-wise AdamW, built up front)."""
    optimizer = make_optimizer("adamw", learning_rate, 1e-4, {})
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    optimizer.build(model.trainable_variables)
    return model


def state_of(model: keras.Model) -> list[np.ndarray]:
    """Every variable of the model and of its optimizer, step count included."""
    variables = [*model.variables, *model.optimizer.variables]
    return [np.array(v.numpy(), copy=True) for v in variables]


def assert_same(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.fixture(scope="module")
def blob_sweep() -> RangeTest:
    return range_test(
        compiled(dense_model(), 1e-3), blob_batches(), min_lr=1e-6, max_lr=10.0
    )


def test_the_suggestion_trains_better_than_rates_far_from_it(blob_sweep):
    assert blob_sweep.suggestion is not None, blob_sweep.reason
    x, y = blobs()
    final_loss = {}
    for factor in (1.0, 100.0, 1e-3):
        model = compiled(dense_model(), blob_sweep.suggestion * factor)
        model.fit(blob_batches(), epochs=3, shuffle=False, verbose=0)
        final_loss[factor] = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert final_loss[1.0] < final_loss[100.0], final_loss
    assert final_loss[1.0] < final_loss[1e-3], final_loss


def test_a_sweep_records_an_exponential_schedule_and_fastai_smoothing(blob_sweep):
    rates = blob_sweep.learning_rates
    assert rates[0] == pytest.approx(1e-6)
    np.testing.assert_allclose(np.diff(np.log(rates)), np.log(rates[1] / rates[0]))
    np.testing.assert_allclose(blob_sweep.smoothed, smooth(blob_sweep.losses))
    assert blob_sweep.smoothed[0] == pytest.approx(blob_sweep.losses[0])


def test_training_after_a_sweep_is_training_without_one():
    """Weights, BN statistics, dropout seeds, the optimizer's moments and step
    count, the schedule's position: a sweep changes none of them."""

    def trainee() -> keras.Model:
        model = compiled(dense_model(), warmup_cosine(3e-3, 3, 1, 16, 0.1))
        # Mid-stage, as after a resumed epoch: the optimizer has moments and steps.
        model.fit(blob_batches(), epochs=1, shuffle=False, verbose=0)
        return model

    swept, untouched = trainee(), trainee()
    before = state_of(swept)
    sweep = range_test(swept, blob_batches(), steps=40, min_lr=1e-4, max_lr=10.0)
    assert len(sweep.losses) > 10
    assert_same(before, state_of(swept))
    histories = [
        model.fit(blob_batches(), epochs=2, shuffle=False, verbose=0).history
        for model in (swept, untouched)
    ]
    assert histories[0] == histories[1]
    assert_same(state_of(untouched), state_of(swept))


def test_the_sweep_stops_once_the_loss_diverges():
    sweep = range_test(
        compiled(dense_model(), 1e-3), blob_batches(), min_lr=1e-3, max_lr=1e5, steps=80
    )
    assert len(sweep.losses) < 80
    assert "stopped at step" in sweep.reason
    last = sweep.smoothed[-1]
    assert not np.isfinite(last) or last > 4.0 * sweep.smoothed[:-1].min()


@pytest.mark.parametrize("kind", ["dataset", "arrays"])
def test_a_short_last_batch_is_left_out_of_the_sweep(kind):
    # 100 examples in batches of 32: the last holds 4, weighted 0, so that a step on
    # it would record a loss of exactly 0.
    x, y = blobs(100)
    weights = np.where(np.arange(len(x)) < 96, 1.0, 0.0).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(32)
    if kind == "arrays":
        batches = list(batches.as_numpy_iterator())
    sweep = range_test(
        compiled(dense_model(), 1e-3), batches, min_lr=1e-5, max_lr=1e-2, steps=12
    )
    assert len(sweep.losses) == 12
    assert (sweep.losses > 0).all(), sweep.losses


def test_a_flat_curve_gives_no_suggestion_and_says_why():
    # ReLU on zero logits: every gradient is zero, the loss stays at log(2).
    inputs = keras.Input((FEATURES,))
    logits = keras.layers.Dense(
        2, activation="relu", kernel_initializer="zeros", bias_initializer="zeros"
    )(inputs)
    model = keras.Model(inputs, logits)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    x, y = blobs(64)
    # A plain list of two batches, cycled over the 30 steps.
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 64, 32)]
    sweep = range_test(model, batches, steps=30)
    assert len(sweep.losses) == 30
    np.testing.assert_allclose(sweep.losses, np.log(2.0), rtol=1e-6)
    assert sweep.suggestion is None
    assert sweep.reason.startswith("flat curve")


def test_a_sweep_of_mini_irv2_with_bn_in_training_mode_restores_its_statistics():
    classifier = mini_classifier()
    set_trainable_from(classifier.backbone, "mixed_6a")
    trainee = training_model(classifier, "train")
    optimizer = make_optimizer(
        "adamw",
        warmup_cosine(1e-3, 2, 1, 2, 0.0),
        1e-4,
        layerwise_multipliers(classifier.backbone, 0.5),
    )
    trainee.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy())
    optimizer.build(trainee.trainable_variables)
    examples, _ = demo_examples(train_per_class=4, val_per_class=1)
    batches = image_dataset(
        examples.paths,
        examples.labels,
        image_size=IMAGE_SIZE,
        batch_size=6,
        policy=OpenPolicy(),
    ).map(lambda x, y: (x, tf.one_hot(y, len(CLASSES))))
    before = state_of(trainee)
    sweep = range_test(trainee, batches, steps=6, min_lr=1e-4, max_lr=1e-1)
    assert len(sweep.losses) == 6
    assert_same(before, state_of(trainee))
    # The graph swept does move the statistics: what was restored had changed.
    last_bn = batchnorm_layers(classifier.backbone)[-1]
    mean = last_bn.moving_mean.numpy().copy()
    trainee.train_on_batch(*next(iter(batches)))
    assert not np.array_equal(mean, last_bn.moving_mean.numpy())


def sigmoid_curve(steps: int = 100, plateau_noise: float = 0.0) -> np.ndarray:
    """A typical sweep: flat, an S-shaped fall centred on 1e-2, then a blow-up."""
    log_rates = np.linspace(-7, 0, steps)
    fall = 1.0 / (1.0 + np.exp(-(log_rates + 2.0) * 3.0))
    blow_up = np.where(log_rates > -0.5, np.exp(4 * (log_rates + 0.5)) - 1, 0.0)
    noise = np.random.default_rng(0).normal(scale=plateau_noise, size=steps)
    return 2.0 - 1.5 * fall + blow_up + noise * (fall < 0.05)


def test_the_valley_rule_picks_the_steepest_part_despite_a_noisy_plateau():
    rates = np.geomspace(1e-7, 1.0, 100)
    for noise in (0.0, 0.05):
        losses = sigmoid_curve(plateau_noise=noise)
        suggestion, reason = valley(rates, losses, 100)
        # The fall's steepest point is 1e-2; within a factor of ~3 either side.
        assert 3e-3 < suggestion < 3e-2, (noise, suggestion, reason)


def test_a_sweep_that_blows_up_at_once_gives_no_suggestion():
    rates = np.geomspace(1e-7, 1.0, 100)[:12]
    losses = np.r_[np.full(11, 1.0), np.nan]
    suggestion, reason = valley(rates, losses, 100)
    assert suggestion is None
    assert "too few" in reason


def curve(suggestion: float | None) -> RangeTest:
    rates = np.geomspace(1e-5, 1.0, 20)
    losses = np.linspace(2.0, 1.0, 20)
    reason = "flat curve" if suggestion is None else "valley"
    return RangeTest(rates, losses, smooth(losses), suggestion, reason)


def test_suggestions_over_seeds_are_summarized_on_a_log_scale():
    given = {0: 1e-3, 1: 4e-3, 2: 2e-3, 3: None}
    summary = suggest_over_seeds(lambda seed: curve(given[seed]), [0, 1, 2, 3])
    assert summary["suggestion"] == pytest.approx(2e-3)
    assert (summary["min"], summary["max"]) == (1e-3, 4e-3)
    expected_std = np.exp(np.std(np.log([1e-3, 2e-3, 4e-3])))
    assert summary["geometric_std"] == pytest.approx(expected_std)
    assert summary["suggestions"] == [1e-3, 4e-3, 2e-3, None]
    assert summary["curve"].suggestion == 2e-3
    assert summary["reason"].startswith("3 of 4 seeds")
    assert "flat curve" in summary["reason"]
    nothing = suggest_over_seeds(lambda seed: curve(None), [0, 1])
    assert nothing["suggestion"] is None and np.isnan(nothing["geometric_std"])
    assert "flat curve" in nothing["reason"]


def test_real_sweeps_over_seeds_agree_within_a_factor_of_a_few():
    def sweep(seed: int) -> RangeTest:
        model = compiled(dense_model(), 1e-3)
        return range_test(
            model, blob_batches(seed), min_lr=1e-6, max_lr=10.0, steps=60, seed=seed
        )

    summary = suggest_over_seeds(sweep, [1, 2])
    assert summary["suggestion"] is not None, summary["reason"]
    assert summary["max"] / summary["min"] < 10


def test_clip_to_rules_caps_head_and_backbone_rates_separately(plan_rules):
    head_cap = plan_rules["max_head_learning_rate"]
    backbone_cap = plan_rules["max_backbone_learning_rate"]
    rate, note = clip_to_rules(10 * head_cap, head_only=True, plan_rules=plan_rules)
    assert rate == head_cap and "clipped" in note and "max_head" in note
    rate, note = clip_to_rules(backbone_cap / 2, head_only=False, plan_rules=plan_rules)
    assert rate == backbone_cap / 2 and "within max_backbone" in note
    # A rate fine for the head is too high for backbone layers.
    rate, _ = clip_to_rules(head_cap, head_only=False, plan_rules=plan_rules)
    assert rate == backbone_cap
    with pytest.raises(ValueError, match="positive"):
        clip_to_rules(float("nan"), head_only=True, plan_rules=plan_rules)


def test_table_and_figure_show_one_stage_each(plan_rules):
    head = suggest_over_seeds(lambda seed: curve(1e-3 * (seed + 1)), [0, 1, 2])
    rate, note = clip_to_rules(
        head["suggestion"], head_only=True, plan_rules=plan_rules
    )
    head |= {"clipped_rate": rate, "clip_note": note}
    flat = suggest_over_seeds(lambda seed: curve(None), [0])
    table = lr_finder_table({"head": head, "top": flat})
    assert list(table.columns) == TABLE_COLUMNS
    assert table["stage"].tolist() == ["head", "top"]
    assert table.loc[0, "clipped_rate"] == pytest.approx(2e-3)
    assert "within max_head" in table.loc[0, "reason"]
    assert np.isnan(table.loc[1, "suggestion"])
    assert np.isnan(table.loc[1, "clipped_rate"])

    figure = lr_finder_figure({"head": head["curve"], "top": flat["curve"]})
    axes = figure.get_axes()
    assert len(axes) == 2
    assert all(axis.get_xscale() == "log" for axis in axes)
    assert "no suggestion" in axes[1].get_title()
    marked = [line.get_xdata()[0] for line in axes[0].get_lines()[2:]]
    assert marked == [pytest.approx(2e-3)]
