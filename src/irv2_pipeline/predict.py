"""Running the saved classifier over batches of images: evaluation and inference alike.

A saved model is checked against the parameters before it runs (its input size and
number of outputs), every batch is padded to one size so the prediction graph is
traced once (tracing IRv2 costs tens of seconds on a CPU; the model is in inference
mode, so padding changes no other row), and its outputs are checked to be softmax
probabilities. Flip test-time augmentation (an option of both pipelines) is the mean
of the probabilities of the images and of their mirror images. The two-output view of
a model (probabilities and pooled features) is built and traced once per process and
model, not once per call (:func:`two_output_model`), and every prediction made here
goes through it. Many arrays smaller than a batch (the occlusion test's masked
copies) run in full batches (:func:`in_full_batches`). NumPy only at import: the
model comes in already loaded, and Keras is imported by the one function that builds
a model.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from irv2_pipeline.hints import KerasModel
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import check_pixel_range, image_dataset
from irv2_pipeline.progress import ProgressLog

logger = logging.getLogger(__name__)

# Softmax rows in float32 sum to 1 within far less than this.
PROBABILITY_SUM_TOLERANCE = 1e-3

# Model -> {pooled layer name: its two-output view}. Weak keys: a view holds the
# model's layers, not the model, so an entry goes when its model does and the cache
# never outgrows the models still in use.
_TWO_OUTPUT_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ModelOutputs(NamedTuple):
    """What one streamed pass of the classifier gives, one row per image."""

    probabilities: np.ndarray
    features: np.ndarray
    # The flip TTA probabilities, when asked for; else None.
    tta_probabilities: np.ndarray | None = None


def check_model_shape(
    model: KerasModel,
    image_size: int,
    classes: Sequence[str],
    error: type[Exception] = ValueError,
) -> None:
    """Stops when the model's input size or outputs do not match the parameters.

    Args:
        model: The saved classifier (``finetuned_model``).
        image_size: ``model.image_size``.
        classes: The classes the data has, in output order.
        error: The exception the calling pipeline raises.
    """
    height, width = model.input_shape[1:3]
    if (height, width) != (image_size, image_size):
        raise error(
            f"finetuned_model takes {height}x{width} px images but model.image_size "
            f"is {image_size}: rerun `kedro run --pipeline finetune` with the same "
            "parameters, or set model.image_size back."
        )
    outputs = model.output_shape[-1]
    if outputs != len(classes):
        raise error(
            f"finetuned_model has {outputs} outputs but image_manifest has "
            f"{len(classes)} classes {list(classes)}: the model was trained on other "
            "data; rerun `kedro run --pipeline finetune`."
        )


def predict_padded(model: KerasModel, batch: np.ndarray, batch_size: int) -> list:
    """The model's outputs for one batch, padded to ``batch_size`` and cut back.

    Args:
        model: A Keras model (one output, or several).
        batch: At most ``batch_size`` images.
        batch_size: The size every call is padded to.

    Returns:
        One float64 array per model output, a row per image of ``batch``.
    """
    rows = len(batch)
    padding = np.repeat(batch[-1:], batch_size - rows, axis=0)
    outputs = model.predict_on_batch(np.concatenate([batch, padding]))
    if not isinstance(outputs, list | tuple):
        outputs = [outputs]
    return [np.asarray(output, dtype=np.float64)[:rows] for output in outputs]


def padded_probabilities(
    model: KerasModel,
    batch: np.ndarray,
    batch_size: int,
    error: type[Exception] = ValueError,
) -> np.ndarray:
    """The model's class probabilities for one batch, checked, in float64.

    Through the model's two-output view (:func:`two_output_model`), whose graph
    :func:`probabilities_and_features` traces: one traced graph for every prediction
    of a run, where the model's own would be a second (seconds for IRv2 on a CPU).

    Args:
        model: The saved classifier (``finetuned_model``).
        batch: At most ``batch_size`` images.
        batch_size: The size every call is padded to.
        error: The exception the calling pipeline raises.

    Returns:
        ``(len(batch), classes)`` probabilities.
    """
    both = two_output_model(model, pooled_layer_name(model, error))
    probabilities, _ = predict_padded(both, batch, batch_size)
    return softmax_rows(probabilities, error)


def in_full_batches(
    predict: Callable[[np.ndarray], np.ndarray],
    arrays: Iterable[np.ndarray],
    batch_size: int,
) -> Iterator[np.ndarray]:
    """``predict``'s rows for each of ``arrays``, in order, run ``batch_size`` rows a
    call whatever the arrays' sizes.

    Many arrays smaller than a batch (a test split's images under each of many masks)
    then cost the forward passes of their rows, not one padded call each; only the
    last call can hold fewer rows. An array's rows are given back as soon as they are
    predicted, and at most a batch of rows waits: ``arrays`` may be a generator.

    Args:
        predict: At most ``batch_size`` rows in, one output row per row out (such as
            :func:`padded_probabilities`).
        arrays: Arrays of rows (images), each of any length.
        batch_size: Rows per call.

    Yields:
        One array of output rows per array of ``arrays``.
    """
    queued: np.ndarray | None = None  # rows not predicted yet, in order
    predicted: list[np.ndarray] = []  # output rows not given back yet, in order
    sizes: list[int] = []  # the lengths of the arrays not given back yet

    def given_back() -> Iterator[np.ndarray]:
        rows = np.concatenate(predicted)
        start = 0
        while sizes and start + sizes[0] <= len(rows):
            yield rows[start : start + sizes[0]]
            start += sizes.pop(0)
        predicted[:] = [rows[start:]]

    for array in arrays:
        if not len(array):
            raise ValueError("in_full_batches got an empty array")
        sizes.append(len(array))
        queued = array if queued is None else np.concatenate([queued, array])
        while len(queued) >= batch_size:
            predicted.append(np.asarray(predict(queued[:batch_size])))
            queued = queued[batch_size:]
        if predicted:
            yield from given_back()
    if queued is not None and len(queued):
        predicted.append(np.asarray(predict(queued)))
    if predicted:
        yield from given_back()


def mirrored(batch: np.ndarray) -> np.ndarray:
    """The batch mirrored left-right, the second view of flip test-time augmentation.

    Args:
        batch: ``(batch, height, width, channels)`` images.

    Returns:
        The images flipped along the width (axis 2).
    """
    return np.flip(batch, axis=2)


def flip_averaged(
    probabilities: np.ndarray, mirrored_probabilities: np.ndarray
) -> np.ndarray:
    """Flip TTA's probabilities: the mean of the plain and the mirrored predictions.

    Args:
        probabilities: ``(n, classes)`` of the images as they are.
        mirrored_probabilities: ``(n, classes)`` of the same images mirrored.

    Returns:
        ``(n, classes)`` rows that still sum to 1.
    """
    return (probabilities + mirrored_probabilities) / 2


def softmax_rows(
    outputs: np.ndarray, error: type[Exception] = ValueError
) -> np.ndarray:
    """Checks that rows are probabilities; renormalises away float32 rounding.

    Args:
        outputs: One row of class probabilities per image.
        error: The exception the calling pipeline raises.

    Returns:
        The rows, each summing to 1 (for log loss).
    """
    sums = outputs.sum(axis=1)
    if (outputs < 0).any() or np.abs(sums - 1.0).max() > PROBABILITY_SUM_TOLERANCE:
        raise error(
            "finetuned_model's outputs are not softmax probabilities (row sums "
            f"{sums.min():.4g}..{sums.max():.4g}, minimum {outputs.min():.4g}); the "
            "pipeline needs a softmax output layer."
        )
    return outputs / sums[:, None]


def probabilities_and_features(  # noqa: PLR0913 - the model, its input, and how
    model: KerasModel,
    class_names: Sequence[str],
    paths: Sequence[Any],
    *,
    image_size: int,
    policy: OpenPolicy,
    batch_size: int,
    error: type[Exception] = ValueError,
    what: str = "images predicted",
    flip_tta: bool = False,
) -> ModelOutputs:
    """Probabilities and pooled features of the images at ``paths``, one streamed pass.

    A short last batch is padded to the batch size (one traced graph,
    :func:`predict_padded`).

    Args:
        model: The saved classifier (``finetuned_model``), built by ``finetune``.
        class_names: The model's output order.
        paths: Image files, in the order of the rows returned.
        image_size: ``model.image_size``.
        policy: How images are opened.
        batch_size: Images per forward pass.
        error: The exception the calling pipeline raises.
        what: What the progress log counts.
        flip_tta: Also predict the mirrored images (flip test-time augmentation).

    Returns:
        Probabilities ``(images, classes)``, pooled features ``(images, dims)`` of
        the images as they are and, with ``flip_tta``, the flip-averaged
        probabilities.
    """
    check_model_shape(model, image_size, list(class_names), error)
    both = two_output_model(model, pooled_layer_name(model, error))
    if not paths:
        empty = np.empty((0, len(class_names)))
        return ModelOutputs(
            empty,
            np.empty((0, int(both.outputs[1].shape[-1]))),
            empty.copy() if flip_tta else None,
        )
    dataset = image_dataset(
        paths, None, image_size=image_size, batch_size=batch_size, policy=policy
    )
    probabilities, features, tta = [], [], []
    progress = ProgressLog(what, len(paths), logger)
    for index, batch in enumerate(dataset.as_numpy_iterator()):
        if index == 0:
            check_pixel_range(batch)
        probs, pooled_batch = predict_padded(both, batch, batch_size)
        probs = softmax_rows(probs, error)
        probabilities.append(probs)
        features.append(pooled_batch)
        if flip_tta:
            # Through the same two-output model: one traced graph, not two.
            flipped, _ = predict_padded(both, mirrored(batch), batch_size)
            tta.append(flip_averaged(probs, softmax_rows(flipped, error)))
        progress.advance(len(batch))
    return ModelOutputs(
        np.concatenate(probabilities),
        np.concatenate(features),
        np.concatenate(tta) if flip_tta else None,
    )


def two_output_model(model: KerasModel, layer_name: str) -> KerasModel:
    """The model with a second output, layer ``layer_name``'s, built once per model.

    The view shares the model's layers and weights, and it keeps its traced
    prediction graph between calls: building it and tracing IRv2 again would cost
    seconds on every call.

    Args:
        model: A Keras functional model.
        layer_name: The layer whose output is the second output.

    Returns:
        ``keras.Model(model.input, [model.output, <layer_name's output>])``, the same
        object for the same model and layer name.
    """
    import keras  # noqa: PLC0415 - see the module docstring

    views = _TWO_OUTPUT_MODELS.setdefault(model, {})
    if layer_name not in views:
        pooled = model.get_layer(layer_name).output
        views[layer_name] = keras.Model(model.input, [model.output, pooled])
    return views[layer_name]


def pooled_layer_name(model: KerasModel, error: type[Exception] = ValueError) -> str:
    """The name of the classifier's pooled-feature layer (``avg_pool``, ...).

    Raises:
        error: The model has none (it was not built by ``finetune``).
    """
    # classifier imports Keras: loaded here, not when the pipelines are registered.
    from irv2_pipeline.classifier import pooled_features_layer  # noqa: PLC0415

    name = pooled_features_layer(model)
    if name is None:
        raise error(
            "finetuned_model has no pooled-feature layer (avg_pool or avg_max_pool): "
            "it was not built by `finetune`; rerun `kedro run --pipeline finetune`."
        )
    return name
