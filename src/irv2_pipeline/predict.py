"""Running the saved classifier over batches of images: evaluation and inference alike.

A saved model is checked against the parameters before it runs (its input size and
number of outputs), every batch is padded to one size so the prediction graph is
traced once (tracing IRv2 costs tens of seconds on a CPU; the model is in inference
mode, so padding changes no other row), and its outputs are checked to be softmax
probabilities. Flip test-time augmentation (an option of both pipelines) is the mean
of the probabilities of the images and of their mirror images. NumPy only at import:
the model comes in already loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from irv2_pipeline.hints import KerasModel

# Softmax rows in float32 sum to 1 within far less than this.
PROBABILITY_SUM_TOLERANCE = 1e-3


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
