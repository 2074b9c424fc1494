"""Tests of backbone.py: weights, the block map, freezing and preprocessing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest

from irv2_pipeline import backbone


@pytest.fixture(scope="module")
def irv2() -> keras.Model:
    return backbone.load_irv2(None, 75)


def test_units_run_from_stem_to_conv_7b_in_order(irv2):
    expected = (
        ["stem", "mixed_5b"]
        + [f"block35_{i}" for i in range(1, 11)]
        + ["mixed_6a"]
        + [f"block17_{i}" for i in range(1, 21)]
        + ["mixed_7a"]
        + [f"block8_{i}" for i in range(1, 11)]
        + ["conv_7b"]
    )
    assert backbone.unit_order(irv2) == expected


def test_every_named_block_layer_sits_in_its_own_unit(irv2):
    units = backbone.unit_map(irv2)
    assert set(units) == {layer.name for layer in irv2.layers}
    for name, unit in units.items():
        match = re.match(r"^(block\d+_\d+)_", name)
        if match:
            assert unit == match.group(1), name
    # The residual scale layer of block8_10 belongs to block8_10, not to conv_7b.
    assert sorted(n for n, u in units.items() if u == "conv_7b") == [
        "conv_7b",
        "conv_7b_ac",
        "conv_7b_bn",
    ]


def test_groups_are_the_seven_irv2_blocks(irv2):
    groups = {backbone.group_of(unit) for unit in backbone.unit_order(irv2)}
    assert groups == set(backbone.GROUPS)
    assert backbone.group_of("mixed_5b") == "stem"
    assert backbone.group_of("block17_12") == "block17"


def test_set_trainable_from_unfreezes_exactly_that_unit_and_after(irv2):
    units = backbone.unit_map(irv2)
    order = backbone.unit_order(irv2)
    count = backbone.set_trainable_from(irv2, "block8_1")
    first = order.index("block8_1")
    for layer in irv2.layers:
        assert layer.trainable == (order.index(units[layer.name]) >= first), layer.name
    assert count == sum(int(w.numpy().size) for w in irv2.trainable_weights) > 0

    assert backbone.set_trainable_from(irv2, None) == 0
    assert irv2.trainable_weights == []
    deeper = backbone.set_trainable_from(irv2, "mixed_6a")
    assert deeper > count


def test_the_backbone_splits_before_every_unit_but_the_stem(irv2):
    order = backbone.unit_order(irv2)
    assert backbone.split_at(irv2, "stem") is None
    splits = {unit: backbone.split_at(irv2, unit) for unit in order[1:]}
    assert all(parts is not None for parts in splits.values())
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 75, 75, 3)).astype("float32")
    whole = irv2(pixels, training=False).numpy()
    units = backbone.unit_map(irv2)
    for unit in ("mixed_5b", "block17_20", "block8_1", "conv_7b"):
        trunk, top = splits[unit]
        # The two parts are the backbone's own layers, cut where `unit` begins.
        assert {layer.name for layer in top.layers[1:]} == {
            name
            for name, owner in units.items()
            if order.index(owner) >= order.index(unit)
        }
        assert all(any(w is v for v in irv2.weights) for w in top.weights)
        joined = top(trunk(pixels, training=False), training=False).numpy()
        np.testing.assert_array_equal(joined, whole)


def test_unknown_unfreeze_from_names_the_valid_blocks(irv2):
    with pytest.raises(ValueError, match="block8_99.*block8_1"):
        backbone.set_trainable_from(irv2, "block8_99")


def test_image_size_below_75_is_refused():
    with pytest.raises(ValueError, match="at least 75"):
        backbone.load_irv2(None, 64)


def test_local_weights_file_that_is_not_weights_is_named(tmp_path):
    bogus = tmp_path / "weights.h5"
    bogus.write_text("not an HDF5 file")
    with pytest.raises(backbone.WeightsError, match=re.escape(str(bogus))):
        backbone.load_irv2(str(bogus), 75)


def test_missing_weights_path_is_explained(tmp_path):
    with pytest.raises(backbone.WeightsError, match="neither 'imagenet', null"):
        backbone.load_irv2(str(tmp_path / "nowhere.h5"), 75)


def test_weights_of_another_architecture_are_refused(tmp_path):
    other = keras.Sequential([keras.Input((75, 75, 3)), keras.layers.Conv2D(4, 3)])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(backbone.WeightsError, match="not a weights file for Incep"):
        backbone.load_irv2(str(path), 75)


def test_preprocessing_maps_pixels_to_minus_one_one():
    layer = backbone.preprocessing_layer()
    out = keras.ops.convert_to_numpy(layer(keras.ops.array([[0.0, 127.5, 255.0]])))
    assert out.tolist() == [[-1.0, 0.0, 1.0]]


RED = [[[[255.0, 0.0, 0.0]]]]
# What each preprocessing makes of a pure red pixel, written out by hand.
RED_PREPROCESSED = {
    "minus_one_to_one": [1.0, -1.0, -1.0],
    "zero_to_one": [1.0, 0.0, 0.0],
    "caffe": [-103.939, -116.779, 255.0 - 123.68],
    "caffe_then_div_255": [-103.939 / 255, -116.779 / 255, (255.0 - 123.68) / 255],
}


def _preprocessed(input_scaling: str, pixels) -> np.ndarray:
    layer = backbone.preprocessing_layer(input_scaling)
    return keras.ops.convert_to_numpy(layer(keras.ops.array(pixels, "float32")))


@pytest.mark.parametrize("input_scaling", sorted(RED_PREPROCESSED))
def test_each_preprocessing_maps_a_red_pixel_as_written(input_scaling):
    out = _preprocessed(input_scaling, RED)
    assert out.dtype == np.float32
    np.testing.assert_allclose(
        out[0, 0, 0], RED_PREPROCESSED[input_scaling], rtol=1e-6, atol=1e-6
    )


def test_caffe_modes_are_keras_imagenet_utils_and_image_data_generator_order():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 4, 4, 3)).astype("float32")
    caffe = keras.applications.imagenet_utils.preprocess_input(
        pixels.copy(), mode="caffe"
    )
    np.testing.assert_allclose(_preprocessed("caffe", pixels), caffe, atol=1e-4)
    # ImageDataGenerator(rescale=1/255, preprocessing_function=preprocess_input):
    # its standardize() runs the function first, then multiplies by rescale.
    generated = caffe * np.float32(1 / 255)
    np.testing.assert_allclose(
        _preprocessed("caffe_then_div_255", pixels), generated, atol=1e-6
    )


def test_minus_one_to_one_gives_the_rescaling_layer_numbers_bit_for_bit():
    pixels = np.arange(256, dtype="float32").reshape(1, 1, -1, 1).repeat(3, axis=-1)
    rescaling = keras.layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32")
    before = keras.ops.convert_to_numpy(rescaling(pixels))
    assert np.array_equal(_preprocessed("minus_one_to_one", pixels), before)


def test_preprocessing_stays_float32_under_mixed_precision():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        out = _preprocessed("caffe_then_div_255", [[[[254.0, 254.0, 254.0]]]])
        top = _preprocessed("caffe_then_div_255", [[[[255.0, 255.0, 255.0]]]])
    finally:
        keras.config.set_dtype_policy(policy)
    assert out.dtype == np.float32
    assert (top - out > 0).all()


def test_an_unknown_preprocessing_lists_all_four():
    with pytest.raises(ValueError, match="input_scaling = 'caffee'") as error:
        backbone.preprocessing_layer("caffee")
    for name in RED_PREPROCESSED:
        assert name in str(error.value)


def test_an_unknown_grayscale_rule_lists_the_rules():
    with pytest.raises(ValueError, match="grayscale = 'gray'") as error:
        backbone.check_grayscale("gray")
    for rule in backbone.GRAYSCALE_RULES:
        assert rule in str(error.value)
    assert backbone.check_grayscale("luminance") == "luminance"


def test_the_preprocessing_layer_carries_both_choices():
    layer = backbone.preprocessing_layer("caffe", "luminance")
    assert (layer.name, layer.input_scaling, layer.grayscale) == (
        backbone.PREPROCESS_LAYER,
        "caffe",
        "luminance",
    )
    assert backbone.preprocessing_layer().grayscale == "replicate"


@pytest.fixture
def radimagenet_like(tmp_path) -> str:
    """A local weights path whose card says caffe_then_div_255 (no weights needed:
    the card is read before any model is built)."""
    weights = tmp_path / "RadImageNet-IRV2_notop.h5"
    Path(f"{weights}{backbone.CARD_SUFFIX}").write_text(
        json.dumps({"preprocessing": "caffe_then_div_255", "image_size": 224})
    )
    return str(weights)


def test_a_preprocessing_other_than_the_cards_stops_with_both_and_the_fix(
    radimagenet_like,
):
    with pytest.raises(ValueError) as error:
        backbone.model_input_scaling(
            {"input_scaling": "minus_one_to_one"}, radimagenet_like
        )
    message = str(error.value)
    assert "finetune.input_scaling = 'minus_one_to_one'" in message
    assert "trained with 'caffe_then_div_255'" in message
    assert "Set finetune.input_scaling: caffe_then_div_255" in message
    assert "input_scaling_override: true" in message


def test_the_cards_preprocessing_or_a_deliberate_override_is_used(radimagenet_like):
    assert (
        backbone.model_input_scaling(
            {"input_scaling": "caffe_then_div_255"}, radimagenet_like
        )
        == "caffe_then_div_255"
    )
    deliberate = {"input_scaling": "zero_to_one", "input_scaling_override": True}
    assert backbone.model_input_scaling(deliberate, radimagenet_like) == "zero_to_one"
    assert backbone.model_input_scaling(deliberate, "imagenet") == "zero_to_one"


def test_imagenet_weights_refuse_another_scaling_and_no_card_takes_any():
    with pytest.raises(ValueError, match="trained with 'minus_one_to_one'"):
        backbone.model_input_scaling({"input_scaling": "zero_to_one"}, "imagenet")
    assert backbone.model_input_scaling({"input_scaling": "caffe"}, None) == "caffe"


def test_a_card_naming_an_unknown_preprocessing_is_named(tmp_path):
    weights = tmp_path / "source.h5"
    Path(f"{weights}{backbone.CARD_SUFFIX}").write_text('{"preprocessing": "torch"}')
    with pytest.raises(backbone.WeightsError, match="names the preprocessing 'torch'"):
        backbone.model_input_scaling({"input_scaling": "caffe"}, str(weights))


def test_the_occlusion_grey_under_luminance_is_a_grey_near_zero_after_scaling():
    assert backbone.preprocessed_zero("minus_one_to_one", "luminance") == (127.5,) * 3
    red, green, blue = backbone.preprocessed_zero("caffe", "luminance")
    assert red == green == blue == pytest.approx(sum(backbone.IMAGENET_BGR_MEANS) / 3)
    # Colour pixels keep the exact per-channel zero.
    assert backbone.preprocessed_zero("caffe") == backbone.IMAGENET_BGR_MEANS[::-1]


def test_a_keras_model_file_of_irv2_without_top_loads_as_weights(tmp_path):
    source = backbone.load_irv2(None, 75)
    layer = source.get_layer("conv_7b_bn")
    layer.moving_mean.assign(np.linspace(-1.0, 1.0, layer.moving_mean.shape[0]))
    source.save(tmp_path / "irv2_notop.keras")
    loaded = backbone.load_irv2(str(tmp_path / "irv2_notop.keras"), 75)
    np.testing.assert_array_equal(
        loaded.get_layer("conv_7b_bn").moving_mean.numpy(),
        layer.moving_mean.numpy(),
    )
