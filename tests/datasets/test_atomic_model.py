"""Tests of the model file dataset: atomic saves and Keras safe mode on load."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from irv2_pipeline.datasets.atomic_model import AtomicTensorFlowModelDataset


def _dense_model(inputs) -> keras.Model:
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))


def test_a_model_with_a_lambda_layer_is_refused_not_executed(tmp_path):
    inputs = keras.Input((3,))
    hidden = keras.layers.Lambda(lambda x: x * 2.0)(inputs)
    path = tmp_path / "model.keras"
    keras.Model(inputs, keras.layers.Dense(2)(hidden)).save(path)
    with pytest.raises(Exception, match="(?i)lambda|safe_mode"):
        AtomicTensorFlowModelDataset(filepath=str(path)).load()


def test_save_then_load_gives_identical_predictions(tmp_path):
    model = _dense_model(keras.Input((3,)))
    dataset = AtomicTensorFlowModelDataset(filepath=str(tmp_path / "m.keras"))
    dataset.save(model)
    batch = np.arange(12, dtype="float32").reshape(4, 3)
    reloaded = dataset.load()
    np.testing.assert_array_equal(
        model.predict(batch, verbose=0), reloaded.predict(batch, verbose=0)
    )
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]
