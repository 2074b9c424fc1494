"""Tests of preprocessing.py: the grayscale rule inside the preprocessing layer."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from irv2_pipeline.backbone import BT601_LUMINANCE, INPUT_SCALINGS
from irv2_pipeline.preprocessing import Preprocess


def _colour_pixels() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (2, 5, 4, 3)).astype("float32")


def _run(layer: Preprocess, pixels: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(layer(keras.ops.array(pixels, "float32")))


def _scaled(pixels: np.ndarray, input_scaling: str) -> np.ndarray:
    """What the input scaling computes, in float64."""
    steps = INPUT_SCALINGS[input_scaling]
    x = pixels.astype(np.float64)
    if steps.bgr:
        x = x[..., ::-1]
    return (x - np.asarray(steps.subtract)) * steps.scale + steps.offset


@pytest.mark.parametrize("input_scaling", sorted(INPUT_SCALINGS))
def test_luminance_feeds_the_bt601_luminance_in_every_channel(input_scaling):
    pixels = _colour_pixels()
    out = _run(Preprocess(input_scaling, "luminance"), pixels)
    luminance = pixels.astype(np.float64) @ np.asarray(BT601_LUMINANCE)
    expected = _scaled(np.repeat(luminance[..., None], 3, axis=-1), input_scaling)
    assert out.dtype == np.float32
    # A fraction of a grey level, in the scaling's units.
    tolerance = 1e-3 * INPUT_SCALINGS[input_scaling].scale
    np.testing.assert_allclose(out, expected, rtol=0, atol=tolerance)
    # The colour the image had is gone: far from what replicate feeds.
    colour = _scaled(pixels, input_scaling)
    assert np.abs(out - colour).max() > 10 * INPUT_SCALINGS[input_scaling].scale


@pytest.mark.parametrize("input_scaling", ["minus_one_to_one", "zero_to_one"])
def test_luminance_channels_are_equal_where_nothing_is_subtracted(input_scaling):
    out = _run(Preprocess(input_scaling, "luminance"), _colour_pixels())
    assert np.array_equal(out[..., 0], out[..., 1])
    assert np.array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("input_scaling", sorted(INPUT_SCALINGS))
def test_replicate_gives_the_numbers_of_the_scaling_alone_bit_for_bit(input_scaling):
    """The layer before the rule: flip, subtract, multiply, add, each in float32."""
    pixels = _colour_pixels()
    steps = INPUT_SCALINGS[input_scaling]
    x = pixels[..., ::-1] if steps.bgr else pixels
    if any(steps.subtract):
        x = x - np.asarray(steps.subtract, np.float32)
    before = x * np.float32(steps.scale) + np.float32(steps.offset)
    assert np.array_equal(_run(Preprocess(input_scaling, "replicate"), pixels), before)
    assert np.array_equal(_run(Preprocess(input_scaling), pixels), before)


def test_an_unknown_grayscale_rule_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match="grayscale = 'grey'") as error:
        Preprocess("caffe", "grey")
    assert "replicate, luminance" in str(error.value)


def test_the_config_round_trips_the_rule():
    layer = Preprocess("caffe_then_div_255", "luminance", name="irv2_preprocess")
    config = layer.get_config()
    assert config["grayscale"] == "luminance"
    restored = Preprocess.from_config(config)
    assert (restored.input_scaling, restored.grayscale) == (
        "caffe_then_div_255",
        "luminance",
    )
    pixels = _colour_pixels()
    assert np.array_equal(_run(restored, pixels), _run(layer, pixels))


def test_a_config_saved_before_the_rule_loads_as_replicate():
    config = Preprocess("caffe", name="irv2_preprocess").get_config()
    del config["grayscale"]
    serialized = keras.saving.serialize_keras_object(Preprocess("caffe"))
    serialized["config"] = config
    restored = keras.saving.deserialize_keras_object(serialized, safe_mode=True)
    assert isinstance(restored, Preprocess)
    assert (restored.input_scaling, restored.grayscale) == ("caffe", "replicate")
