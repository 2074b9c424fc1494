"""Where the model looks: Grad-CAM heatmaps and an occlusion test of the border.

Grad-CAM (Selvaraju et al. 2017) weighs a backbone layer's maps by the gradient of a
class's pre-softmax score with respect to them, averaged over the map, and keeps the
positive part: where the evidence for that class lies. The saved classifier nests IRv2
as one layer, so the backbone and the head are run as separate parts
(``classifier.split_saved``) under one ``tf.GradientTape``; a model from the
classifier's input to a layer inside the backbone would be "Graph disconnected".
The gradient is TensorFlow's (Keras 3 has no backend-neutral one): Grad-CAM needs the
TensorFlow backend, which is this project's default.

The occlusion test masks, on every test image, a band along the border and, instead,
a centre square of the same area, and counts per class the predictions that change.
A model that reads the object changes its mind when the centre goes; one that keys on
something in the border (a watermark, a frame, a corner mark) when the border goes.
Masked pixels take the mean colour of the pixels left visible by default: the pixel the
model's preprocessing maps to zero (IRv2's mid-grey 127.5, the ImageNet mean colour for
the caffe modes) on a dark or light background draws a new frame around the whole
image, an edge the model never saw, and that artefact alone can change predictions.
Both fills are offered (``fill: mean | zero``).

One centre square is one place; the border is measured against many. The same square
(the band's pixel count, within one row) is also masked at ``random_patches`` seeded
random places
(:func:`random_squares`), and the share of those places that change at least as many of
a class's predictions as the border is the border's p-value (:func:`border_p_value`):
the chance that a mask of that size, placed at random, does as much on these images.
"Same size" is the same pixel count in one compact piece, the centre square's shape: a
random band would have to run across the whole image to keep the border's thin shape,
and would then cross the object on every draw and reach any edge. At the default
width a square of the band's area is 36 % of the image (61 % of its side) and covers
part of its middle wherever it lies: the random places measure how much hiding that
much of these images changes, wherever it is hidden, which is what the border must
exceed to be special.

Keras and TensorFlow are imported by the function that needs them: the masks and the
flip table serve the diagnosis, which every ``kedro`` command loads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from irv2_pipeline.hints import KerasModel
from irv2_pipeline.parameters import MAX_BORDER_FRACTION
from irv2_pipeline.parameters import OCCLUSION_FILLS as FILLS

logger = logging.getLogger(__name__)

FLIP_COLUMNS = (
    "class",
    "n",
    "border_flips",
    "centre_flips",
    "border_flip_rate",
    "centre_flip_rate",
    "border_only_flips",
    "centre_only_flips",
    "border_px",
    "centre_px",
    "random_patches",
    "random_flip_rate_min",
    "random_flip_rate_median",
    "random_flip_rate_max",
    "border_p_value",
)


@dataclass(frozen=True)
class OcclusionSpec:
    """The occlusion test, as declared in ``evaluation.attribution.occlusion``.

    Attributes:
        border_fraction: Width of the masked border band, as a fraction of the
            image's side; the centre square masked instead has the band's area.
        fill: ``mean`` (each image's mean colour) or ``zero`` (IRv2's zero after
            preprocessing, mid-grey); see the module docstring.
        random_patches: Random places the centre square is also masked at, the
            border's null distribution (:func:`random_squares`).
        seed: Of the random places.
    """

    border_fraction: float = 0.1
    fill: str = "mean"
    random_patches: int = 16
    seed: int = 42

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> OcclusionSpec:
        """Builds the spec from ``evaluation.attribution.occlusion``, clear errors."""
        spec = cls(
            border_fraction=float(params["border_fraction"]),
            fill=str(params["fill"]),
            random_patches=int(params["random_patches"]),
            seed=int(params["seed"]),
        )
        if not 0 < spec.border_fraction <= MAX_BORDER_FRACTION:
            raise ValueError(
                "evaluation.attribution.occlusion.border_fraction = "
                f"{spec.border_fraction} must lie in (0, {MAX_BORDER_FRACTION}]: "
                "wider, the centre square of the same area overlaps the band"
            )
        if spec.fill not in FILLS:
            raise ValueError(
                f"evaluation.attribution.occlusion.fill = {spec.fill!r}; use one of "
                f"{', '.join(FILLS)}"
            )
        if spec.random_patches < 1:
            raise ValueError(
                "evaluation.attribution.occlusion.random_patches = "
                f"{spec.random_patches}: the border needs at least one random place "
                "to be compared with"
            )
        return spec


def occlusion_masks(size: int, border_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The border band and a centre square of the same area, for square images.

    Args:
        size: The image side in pixels.
        border_fraction: The band's width as a fraction of ``size`` (at least 1 px).

    Returns:
        Boolean ``(size, size)`` masks, ``True`` where pixels are masked: the border
        band, then the centre square (its area within one row of the band's).

    Raises:
        ValueError: The centre square would overlap the band at this size.
    """
    band = max(1, round(border_fraction * size))
    border = np.ones((size, size), dtype=bool)
    border[band:-band, band:-band] = False
    side = round(math.sqrt(border.sum()))
    start = (size - side) // 2
    centre = np.zeros((size, size), dtype=bool)
    centre[start : start + side, start : start + side] = True
    if (border & centre).any():
        raise ValueError(
            f"A {band} px border band of a {size} px image is too wide: a centre "
            "square of its area would overlap it (lower border_fraction)"
        )
    return border, centre


def random_squares(size: int, area: int, count: int, seed: int) -> np.ndarray:
    """``count`` squares of ``area`` pixels at distinct random places in the image.

    The side is the centre square's (:func:`occlusion_masks`), so each square hides as
    many pixels; every top-left corner that keeps the square inside the image is
    equally likely, and no place is drawn twice.

    Args:
        size: The image side in pixels.
        area: The pixel count to match (the border band's).
        count: How many squares.
        seed: Of the places.

    Returns:
        Boolean ``(count, size, size)`` masks, ``True`` where pixels are masked.

    Raises:
        ValueError: The image has fewer places for such a square than ``count``.
    """
    side = round(math.sqrt(area))
    span = size - side + 1
    if span < 1 or span**2 < count:
        raise ValueError(
            f"A {size} px image has {max(span, 0) ** 2} places for a {side} px square, "
            f"fewer than evaluation.attribution.occlusion.random_patches = {count}"
        )
    places = np.random.default_rng(seed).choice(span**2, size=count, replace=False)
    squares = np.zeros((count, size, size), dtype=bool)
    for square, place in zip(squares, places, strict=True):
        top, left = divmod(int(place), span)
        square[top : top + side, left : left + side] = True
    return squares


def border_p_value(border_rate: float, random_rates: np.ndarray) -> float:
    """The share of random places that change at least as much as the border.

    The empirical p-value ``(1 + #{random >= border}) / (1 + K)`` of ``K`` random
    places (North, Curtis and Sham 2002): the border counted as one draw of
    the null, so it is never 0, and at least ``1 / (1 + K)``. A tie counts against
    the border.

    Args:
        border_rate: The share of a class's predictions the border mask changes.
        random_rates: The share each random square changes, on the same images.

    Returns:
        The p-value in ``(0, 1]``; NaN when ``border_rate`` is (a class without test
        images).
    """
    if math.isnan(border_rate):
        return math.nan
    rates = np.asarray(random_rates, dtype=np.float64)
    return float((1 + np.count_nonzero(rates >= border_rate)) / (1 + rates.size))


def occlude(
    batch: np.ndarray,
    mask: np.ndarray,
    fill: str,
    zero: Sequence[float],
) -> np.ndarray:
    """``batch`` (``(n, h, w, 3)``, ``[0, 255]``) with ``mask``'s pixels filled.

    ``mean`` fills with the mean colour of the pixels the mask leaves visible, so the
    fill carries nothing of what it hides (a mark's colour would tint a whole-image
    mean). ``zero`` fills with ``zero``: the RGB pixel the model's preprocessing maps
    to 0 (``backbone.preprocessed_zero``).
    """
    if fill == "mean":
        value = batch[:, ~mask].mean(axis=1)[:, None, None, :]
    else:
        value = np.asarray(zero, dtype=np.float64)[None, None, None, :]
    return np.where(mask[None, :, :, None], value, batch).astype(batch.dtype)


def flip_table(
    labels: Sequence[str],
    predicted: np.ndarray,
    classes: Sequence[str],
    *,
    border_predicted: np.ndarray,
    centre_predicted: np.ndarray,
    random_predicted: np.ndarray,
    masks: tuple[np.ndarray, np.ndarray],
) -> pd.DataFrame:
    """Per true class: how many predictions the border, the centre and random squares
    change.

    Args:
        labels: The true class of each test image.
        predicted: The class index predicted on the whole image.
        classes: The class names, in output order.
        border_predicted: The class index predicted with the border band masked.
        centre_predicted: ... with the centre square masked.
        random_predicted: ``(K, n)``: ... with each of ``K`` random squares
            (:func:`random_squares`) masked.
        masks: The border and centre masks (for their areas).

    Returns:
        ``occlusion_flips``: one row per class (:data:`FLIP_COLUMNS`); the
        ``*_only_flips`` count images that one mask changes and the other does not
        (the pairs the diagnosis's noise check compares); the ``random_flip_rate_*``
        summarise the share each random square changes, and ``border_p_value``
        (:func:`border_p_value`) holds the border against them.
    """
    labels = np.asarray(labels)
    border = np.asarray(border_predicted) != np.asarray(predicted)
    centre = np.asarray(centre_predicted) != np.asarray(predicted)
    random = np.asarray(random_predicted) != np.asarray(predicted)[None, :]
    rows = []
    for name in classes:
        mine = labels == name
        n = int(mine.sum())
        border_rate = border[mine].mean() if n else math.nan
        # NaN for a class without test images, as its border rate.
        random_rates = (
            random[:, mine].mean(axis=1) if n else np.full(len(random), np.nan)
        )
        rows.append(
            {
                "class": name,
                "n": n,
                "border_flips": int(border[mine].sum()),
                "centre_flips": int(centre[mine].sum()),
                "border_flip_rate": border_rate,
                "centre_flip_rate": centre[mine].mean() if n else math.nan,
                "border_only_flips": int((border & ~centre)[mine].sum()),
                "centre_only_flips": int((centre & ~border)[mine].sum()),
                "border_px": int(masks[0].sum()),
                "centre_px": int(masks[1].sum()),
                "random_patches": len(random),
                "random_flip_rate_min": float(random_rates.min()),
                "random_flip_rate_median": float(np.median(random_rates)),
                "random_flip_rate_max": float(random_rates.max()),
                "border_p_value": border_p_value(border_rate, random_rates),
            }
        )
    return pd.DataFrame(rows, columns=list(FLIP_COLUMNS))


def grad_cam(
    model: KerasModel,
    layer: str,
    pixels: np.ndarray,
    targets: Sequence[int],
    batch_size: int,
) -> np.ndarray:
    """Grad-CAM heatmaps of a saved classifier, at the images' size.

    Args:
        model: The classifier ``finetune`` saved (``[0, 255]`` RGB in).
        layer: The backbone layer whose maps are weighed (``conv_7b_ac``: IRv2's
            last; 8x8 at 299 px but 1x1 at 75 px, where an earlier block such as
            ``block35_10_ac`` keeps a map).
        pixels: ``(n, size, size, 3)`` images in ``[0, 255]``.
        targets: The class index to explain for each image.
        batch_size: Images per forward and backward pass.

    Returns:
        ``(n, size, size)`` heatmaps in ``[0, 1]``, each scaled by its own maximum
        (all zero where no part of the map speaks for the class).

    Raises:
        ValueError: The model is not the classifier ``finetune`` builds, or
            ``layer`` is not a layer of its backbone.
    """
    import keras  # noqa: PLC0415 - see the module docstring
    import tensorflow as tf  # noqa: PLC0415 - see the module docstring

    from irv2_pipeline.classifier import split_saved  # noqa: PLC0415

    parts = split_saved(model)
    names = [item.name for item in parts.backbone.layers]
    if layer not in names:
        raise ValueError(
            f"evaluation.attribution.grad_cam.layer = {layer!r} is not a layer of the "
            f"backbone; use e.g. conv_7b_ac (its last) or a block's output "
            f"({', '.join(name for name in names if name.endswith('_ac'))[:200]}...)"
        )
    # Both outputs inside the backbone's own graph: no disconnection.
    maps_model = keras.Model(
        parts.backbone.inputs,
        [parts.backbone.get_layer(layer).output, parts.backbone.outputs[0]],
    )
    height, width = pixels.shape[1:3]
    if maps_model.output_shape[0][1:3] == (1, 1):
        logger.warning(
            "Grad-CAM layer %s is 1x1 at %d px: its heatmaps are uniform; choose an "
            "earlier layer (evaluation.attribution.grad_cam.layer)",
            layer,
            height,
        )
    heatmaps = []
    for start in range(0, len(pixels), batch_size):
        batch = tf.convert_to_tensor(pixels[start : start + batch_size], tf.float32)
        chosen = tf.constant(np.asarray(targets[start : start + batch_size]), tf.int32)
        with tf.GradientTape() as tape:
            # Watching the input records every op, frozen weights or not.
            tape.watch(batch)
            layer_maps, maps = maps_model(parts.preprocess(batch), training=False)
            logits = keras.ops.cast(parts.logits(maps, training=False), "float32")
            score = keras.ops.sum(tf.gather(logits, chosen, batch_dims=1))
        gradients = tape.gradient(score, layer_maps)
        weights = keras.ops.mean(gradients, axis=(1, 2), keepdims=True)
        cam = keras.ops.relu(
            keras.ops.sum(weights * keras.ops.cast(layer_maps, "float32"), axis=-1)
        )
        cam = keras.ops.image.resize(cam[..., None], (height, width))[..., 0]
        heatmaps.append(keras.ops.convert_to_numpy(cam).astype(np.float64))
    stacked = np.concatenate(heatmaps) if heatmaps else np.zeros((0, height, width))
    peaks = stacked.max(axis=(1, 2), keepdims=True)
    return np.divide(stacked, peaks, out=np.zeros_like(stacked), where=peaks > 0)
