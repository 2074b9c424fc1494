"""Layer-wise learning rates really scale each block's updates; the schedule's shape."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from irv2_pipeline.backbone import group_of, unit_map
from irv2_pipeline.pipelines.finetune.optimizer import (
    LayerwiseAdamW,
    LayerwiseSGD,
    layerwise_multipliers,
    warmup_cosine,
)

from .conftest import mini_irv2


def one_step(optimizer, variables, gradients) -> list[np.ndarray]:
    """The change one ``apply`` makes to each variable."""
    before = [v.numpy().copy() for v in variables]
    optimizer.apply(gradients, variables)
    return [v.numpy() - b for v, b in zip(variables, before, strict=True)]


def test_multipliers_fall_by_the_decay_per_block_group_from_the_head():
    backbone = mini_irv2()
    factors = layerwise_multipliers(backbone, 0.5)
    units = unit_map(backbone)
    expected_distance = {
        "conv_7b": 1,
        "block8": 2,
        "mixed_7a": 3,
        "block17": 4,
        "mixed_6a": 5,
        "block35": 6,
        "stem": 7,
    }
    for layer in backbone.layers:
        for variable in layer.weights:
            distance = expected_distance[group_of(units[layer.name])]
            assert factors[variable.path] == 0.5**distance, variable.path
    assert set(layerwise_multipliers(backbone, 1.0).values()) == {1.0}
    with pytest.raises(ValueError, match="layerwise_lr_decay"):
        layerwise_multipliers(backbone, 1.5)


@pytest.mark.parametrize("optimizer_class", [LayerwiseAdamW, LayerwiseSGD])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_each_blocks_update_is_its_factor_times_the_undecayed_update(
    optimizer_class, weight_decay
):
    backbone = mini_irv2()
    variables = backbone.trainable_variables
    rng = np.random.default_rng(0)
    gradients = [rng.normal(size=v.shape).astype("float32") for v in variables]
    start = [v.numpy().copy() for v in variables]
    factors = layerwise_multipliers(backbone, 0.6)
    updates = {}
    for name, multipliers in (("flat", {}), ("decayed", factors)):
        for variable, value in zip(variables, start, strict=True):
            variable.assign(value)
        optimizer = optimizer_class(
            learning_rate=1e-2,
            lr_multipliers=multipliers,
            decoupled_weight_decay=weight_decay,
        )
        optimizer.build(variables)
        updates[name] = [one_step(optimizer, variables, gradients) for _ in range(3)]
    # Weight decay pulls each block's weights apart after the first step; without
    # it every step scales exactly (Adam's and momentum's state scale along).
    steps = 3 if weight_decay == 0 else 1
    for index, variable in enumerate(variables):
        for step in range(steps):
            flat, decayed = updates["flat"][step], updates["decayed"][step]
            assert np.abs(flat[index]).max() > 0, variable.path
            # Updates are differences of float32 weights near 1: a few ulps of 1e-7.
            np.testing.assert_allclose(
                decayed[index],
                factors[variable.path] * flat[index],
                rtol=1e-3,
                atol=1e-6,
                err_msg=variable.path,
            )
            assert np.abs(decayed[index]).max() > 100e-6
    assert len({factors[v.path] for v in variables}) == 7


def test_without_layer_factors_it_is_keras_adamw_on_kernels():
    layer = keras.layers.Dense(4, use_bias=False)
    layer.build((None, 3))
    kernel = layer.kernel
    start = kernel.numpy().copy()
    gradient = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")
    steps = {}
    for name, optimizer in (
        ("ours", LayerwiseAdamW(learning_rate=1e-2, decoupled_weight_decay=0.05)),
        ("keras", keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.05)),
    ):
        kernel.assign(start)
        optimizer.build([kernel])
        for _ in range(4):
            optimizer.apply([gradient], [kernel])
        steps[name] = kernel.numpy().copy()
    np.testing.assert_allclose(steps["ours"], steps["keras"], rtol=1e-6)
    assert np.abs(steps["ours"] - start).max() > 1e-3


def test_biases_and_batchnorm_scales_are_not_decayed():
    bias = keras.Variable(np.ones(3, "float32"), name="bias")
    kernel = keras.Variable(np.ones((2, 3), "float32"), name="kernel")
    optimizer = LayerwiseSGD(learning_rate=0.1, decoupled_weight_decay=0.5)
    optimizer.build([bias, kernel])
    optimizer.apply(
        [np.zeros(3, "float32"), np.zeros((2, 3), "float32")], [bias, kernel]
    )
    np.testing.assert_array_equal(bias.numpy(), 1.0)
    np.testing.assert_allclose(kernel.numpy(), 1.0 - 0.1 * 0.5)


def test_warmup_rises_linearly_then_cosine_decays_to_the_final_fraction():
    schedule = warmup_cosine(
        1e-3, epochs=5, warmup_epochs=1, steps_per_epoch=10, final_fraction=0.1
    )
    rate = [float(schedule(step)) for step in range(51)]
    np.testing.assert_allclose(rate[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(rate[5], 0.5e-3, rtol=1e-5)
    np.testing.assert_allclose(rate[10], 1e-3, rtol=1e-5)
    np.testing.assert_allclose(rate[30], 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-4)
    np.testing.assert_allclose(rate[50], 1e-4, rtol=1e-4)
    assert all(a >= b for a, b in zip(rate[10:], rate[11:], strict=False))
    without = warmup_cosine(1e-3, 2, 0, 10, 0.0)
    np.testing.assert_allclose(float(without(0)), 1e-3, rtol=1e-6)
