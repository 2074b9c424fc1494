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


def _predictions(model: keras.Model) -> np.ndarray:
    return model.predict(np.arange(12, dtype="float32").reshape(4, 3), verbose=0)


def test_the_saved_model_serves_the_runs_next_reads_as_its_file_would(tmp_path):
    model = _dense_model(keras.Input((3,)))
    path = str(tmp_path / "m.keras")
    dataset = AtomicTensorFlowModelDataset(filepath=path)
    dataset.save(model)
    # Not built again from the file: the same object, the file's predictions.
    assert dataset.load() is model
    from_file = AtomicTensorFlowModelDataset(filepath=path).load()
    assert from_file is not model
    np.testing.assert_array_equal(_predictions(model), _predictions(from_file))
    # Another process writes the file: the next read is the new file's model.
    other = _dense_model(keras.Input((3,)))
    other.save(path)
    np.testing.assert_array_equal(_predictions(dataset.load()), _predictions(other))


def test_only_the_latest_saved_model_is_kept_in_memory(tmp_path):
    first, second = (
        AtomicTensorFlowModelDataset(filepath=str(tmp_path / f"{name}.keras"))
        for name in ("first", "second")
    )
    models = [_dense_model(keras.Input((3,))) for _ in range(2)]
    first.save(models[0])
    second.save(models[1])
    assert second.load() is models[1]
    reloaded = first.load()
    assert reloaded is not models[0]
    np.testing.assert_array_equal(_predictions(reloaded), _predictions(models[0]))
    # Released (no node needs it any more): read from the file again.
    second.release()
    assert second.load() is not models[1]


def test_a_model_of_a_distribution_strategy_is_read_from_its_file(tmp_path):
    import tensorflow as tf  # noqa: PLC0415

    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        model = _dense_model(keras.Input((3,)))
    dataset = AtomicTensorFlowModelDataset(filepath=str(tmp_path / "m.keras"))
    dataset.save(model)
    loaded = dataset.load()
    assert loaded is not model
    np.testing.assert_array_equal(_predictions(loaded), _predictions(model))
