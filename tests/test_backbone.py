"""Tests of backbone.py: weights, the block map and freezing."""

from __future__ import annotations

import re

import keras
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
