"""predict.py's two-output view: built once per model, same results, no leak."""

from __future__ import annotations

import gc
import weakref

import keras
import numpy as np
import pytest
from PIL import Image

from irv2_pipeline import predict
from irv2_pipeline.images import OpenPolicy, load_resized

IMAGE_SIZE = 16
CLASSES = ["a", "b", "c"]
BATCH_SIZE = 4


def small_classifier(seed: int) -> keras.Model:
    """A convolution, ``avg_pool`` (the pooled features) and a softmax head."""
    keras.utils.set_random_seed(seed)
    pixels = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(pixels)
    features = keras.layers.Conv2D(5, 3, activation="relu")(scaled)
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    return keras.Model(pixels, keras.layers.Dense(len(CLASSES), "softmax")(pooled))


@pytest.fixture
def image_paths(tmp_path) -> list[str]:
    """Six random RGB images: one full batch and a short last one."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(6):
        path = tmp_path / f"{index}.png"
        pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def predicted(model, paths, **options) -> predict.ModelOutputs:
    return predict.probabilities_and_features(
        model,
        CLASSES,
        paths,
        image_size=IMAGE_SIZE,
        policy=OpenPolicy(),
        batch_size=BATCH_SIZE,
        **options,
    )


def test_calls_on_one_model_predict_through_one_view_with_the_same_results(
    image_paths, monkeypatch
):
    model = small_classifier(seed=1)
    views = []
    real_predict = predict.predict_padded

    def noted(view, batch, batch_size):
        views.append(view)
        return real_predict(view, batch, batch_size)

    monkeypatch.setattr(predict, "predict_padded", noted)
    first = predicted(model, image_paths, flip_tta=True)
    second = predicted(model, image_paths, flip_tta=True)

    # Every batch of both calls, mirrored ones included, went through one object.
    assert len(views) == 8
    assert all(view is views[0] for view in views)
    for before, after in zip(first, second, strict=True):
        np.testing.assert_array_equal(after, before)
    # The same figures as a view built afresh on the same images.
    fresh = keras.Model(model.input, [model.output, model.get_layer("avg_pool").output])
    pixels = np.stack(
        [load_resized(p, OpenPolicy(), IMAGE_SIZE) for p in image_paths]
    ).astype(np.float32)
    probabilities, features = fresh.predict_on_batch(pixels)
    np.testing.assert_allclose(first.probabilities, probabilities, atol=1e-6)
    np.testing.assert_allclose(first.features, features, atol=1e-6)


def test_each_model_has_its_own_view_and_the_view_keeps_no_model_alive(
    image_paths,
):
    model, other = small_classifier(seed=1), small_classifier(seed=2)
    view = predict.two_output_model(model, "avg_pool")
    assert predict.two_output_model(model, "avg_pool") is view
    assert predict.two_output_model(other, "avg_pool") is not view
    assert not np.array_equal(
        predicted(model, image_paths).probabilities,
        predicted(other, image_paths).probabilities,
    )

    gone = weakref.ref(model)
    del model, view
    gc.collect()
    assert gone() is None


def test_arrays_of_any_size_are_predicted_in_full_batches_and_given_back_in_order():
    calls = []

    def doubled(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return rows * 2.0

    arrays = [np.arange(n, dtype=float)[:, None] + 100 * n for n in (5, 3, 7, 1, 9)]
    given = list(predict.in_full_batches(doubled, iter(arrays), batch_size=4))
    assert calls == [4, 4, 4, 4, 4, 4, 1]
    assert len(given) == len(arrays)
    for array, rows in zip(arrays, given, strict=True):
        np.testing.assert_array_equal(rows, array * 2.0)


def test_an_array_is_given_back_once_predicted_with_at_most_a_batch_waiting():
    made = []

    def arrays():
        for n in range(6):
            made.append(n)
            yield np.full((3, 1), float(n))

    given = predict.in_full_batches(lambda rows: rows, arrays(), batch_size=4)
    # The first array's rows come back with the second call's batch at the latest.
    np.testing.assert_array_equal(next(given), np.zeros((3, 1)))
    assert made == [0, 1]
    assert len(list(given)) == 5


def test_an_empty_array_is_refused():
    with pytest.raises(ValueError, match="empty array"):
        list(predict.in_full_batches(lambda rows: rows, [np.zeros((0, 1))], 4))
