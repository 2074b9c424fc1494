"""One streaming pass of images through IRv2 that measures what the BN layers see.

The probe is one Keras model with two outputs per image: the per-channel mean and
variance, over the image's pixels, of the input of every ``BatchNormalization`` layer
(computed inside the graph, so feature maps never leave it), and the globally pooled
features at a few depths. Batches are combined in float64 on the host; the pass keeps
a few numbers per channel, never a feature map.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from irv2_pipeline import backbone as irv2
from irv2_pipeline.progress import ProgressLog

MOMENTS_OUTPUT = "bn_input_moments"
FEATURES_OUTPUT = "pooled_features"
# Levels (of 255) by which the channels of a grey image may differ.
GRAYSCALE_TOLERANCE = 3


class ImageChannelMoments(keras.layers.Layer):
    """Per image, the mean and variance of each channel over its pixels.

    Output: ``(batch, 2 * channels)``, the means then the variances. Two passes (mean,
    then squared deviations from it) keep the variance exact in float32 even where a
    channel's mean is large against its spread.
    """

    def call(self, inputs):
        means = ops.mean(inputs, axis=(1, 2), keepdims=True)
        variances = ops.mean(ops.square(inputs - means), axis=(1, 2))
        return ops.concatenate([ops.squeeze(means, axis=(1, 2)), variances], axis=-1)


@dataclass(frozen=True)
class BatchNormLayer:
    """A BatchNormalization layer of IRv2 and the statistics it stores."""

    name: str
    unit: str
    depth: int  # position among the BN layers, input to output
    channels: int
    epsilon: float
    moving_mean: np.ndarray
    moving_variance: np.ndarray


@dataclass(frozen=True)
class ProbeLayout:
    """Where each BN layer's and each depth's numbers sit in the probe's outputs."""

    batch_norms: tuple[BatchNormLayer, ...]
    depths: tuple[str, ...]
    depth_layers: tuple[str, ...]  # the Keras layer whose output is pooled per depth
    depth_channels: tuple[int, ...]


@dataclass(frozen=True)
class SplitPass:
    """What one pass over a set of images measured.

    Attributes:
        n_images: Images seen.
        bn_means: Per BN layer (by name), the per-channel mean of its input.
        bn_variances: Per BN layer, the per-channel variance of its input.
        features: Per depth, the pooled features, one row per image in input order.
        grayscale_images: Images whose three channels are equal (:func:`is_grayscale`).
        bn_resampled_means: Per BN layer, ``(resamples, channels)``: the means of
            the Poisson bootstrap's resamples of the images (empty without them).
        bn_resampled_variances: The same for the variances.
    """

    n_images: int
    bn_means: dict[str, np.ndarray]
    bn_variances: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    grayscale_images: int = 0
    bn_resampled_means: dict[str, np.ndarray] = field(default_factory=dict)
    bn_resampled_variances: dict[str, np.ndarray] = field(default_factory=dict)


def batch_norm_layers(backbone: keras.Model) -> list[BatchNormLayer]:
    """Every BatchNormalization layer of the backbone, input to output."""
    units = irv2.unit_map(backbone)
    return [
        BatchNormLayer(
            name=layer.name,
            unit=units[layer.name],
            depth=depth,
            channels=int(layer.input.shape[-1]),
            epsilon=float(layer.epsilon),
            moving_mean=np.asarray(layer.moving_mean.numpy(), np.float64),
            moving_variance=np.asarray(layer.moving_variance.numpy(), np.float64),
        )
        for depth, layer in enumerate(irv2.batchnorm_layers(backbone))
    ]


def unit_output_layer(backbone: keras.Model, unit: str) -> str:
    """The last layer of an IRv2 unit, whose output is the unit's output.

    Raises:
        ValueError: ``unit`` is not an IRv2 unit; the message names the parameter.
    """
    units = irv2.unit_map(backbone)
    layers = [layer.name for layer in backbone.layers if units[layer.name] == unit]
    if not layers:
        raise ValueError(
            f"feature_shift.depths: {unit!r} is not an IRv2 block; use one of "
            f"{', '.join(irv2.unit_order(backbone))}"
        )
    return layers[-1]


def build_probe(
    backbone: keras.Model,
    depths: Sequence[str],
    input_scaling: str = "minus_one_to_one",
    grayscale: str = "replicate",
) -> tuple[keras.Model, ProbeLayout]:
    """Builds the probe: ``[0, 255]`` RGB in, BN input moments and pooled features out.

    Each output is one concatenated tensor: one output per BN layer would make the
    model several times slower to trace.

    Args:
        backbone: IRv2 from ``backbone.load_irv2``.
        depths: Unit names whose outputs are pooled, e.g. ``mixed_6a``, ``conv_7b``.
        input_scaling: The preprocessing of the model finetune builds on this
            backbone (``backbone.model_input_scaling``), so that the moments are
            those of the pixels that model feeds it.
        grayscale: That model's grayscale rule (``backbone.GRAYSCALE_RULES``),
            for the same reason.

    Returns:
        The probe and where each layer's numbers sit in its outputs.
    """
    batch_norms = batch_norm_layers(backbone)
    by_name = {layer.name: layer for layer in backbone.layers}
    moments = [
        ImageChannelMoments(name=f"moments_{bn.name}")(by_name[bn.name].input)
        for bn in batch_norms
    ]
    depth_layers = [unit_output_layer(backbone, depth) for depth in depths]
    pooled = [
        keras.layers.GlobalAveragePooling2D(name=f"pool_{depth}")(by_name[layer].output)
        for depth, layer in zip(depths, depth_layers, strict=True)
    ]
    measured = keras.Model(
        backbone.input,
        {
            MOMENTS_OUTPUT: keras.layers.Concatenate(name=MOMENTS_OUTPUT)(moments),
            FEATURES_OUTPUT: keras.layers.Concatenate(name=FEATURES_OUTPUT)(pooled)
            if len(pooled) > 1
            else pooled[0],
        },
        name="irv2_measured",
    )
    images = keras.Input(backbone.input.shape[1:], name="images")
    probe = keras.Model(
        images,
        measured(irv2.preprocessing_layer(input_scaling, grayscale)(images)),
        name="irv2_probe",
    )
    layout = ProbeLayout(
        batch_norms=tuple(batch_norms),
        depths=tuple(depths),
        depth_layers=tuple(depth_layers),
        depth_channels=tuple(
            int(by_name[name].output.shape[-1]) for name in depth_layers
        ),
    )
    return probe, layout


class RunningMoments:
    """Per-channel mean and variance of many images, merged batch by batch.

    Every image of a layer has the same number of pixels, so the pooled variance is
    the mean within-image variance plus the variance of the image means; batches are
    merged with Chan et al.'s parallel update, all in float64. With ``resamples``,
    the same moments of as many Poisson bootstrap resamples of the images are kept
    beside them (``weights`` of :meth:`add`), for the shift's interval.
    """

    def __init__(self, channels: int, resamples: int = 0):
        self.count = 0
        self.mean = np.zeros(channels)
        self._sum_squares = np.zeros(channels)  # sum of squared deviations, per pixel
        # Per resample: its weight in images, and weighted sums of the image means
        # and of their second moments about zero.
        self._weights = np.zeros(resamples)
        self._weighted_means = np.zeros((resamples, channels))
        self._weighted_squares = np.zeros((resamples, channels))

    def add(
        self,
        image_means: np.ndarray,
        image_variances: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> None:
        """Adds a batch: ``(images, channels)`` per-image means and variances.

        ``weights``, ``(resamples, images)`` float64: how often each resample draws
        each image (Poisson(1) counts, the same for every layer), when there are
        resamples.
        """
        image_means = np.asarray(image_means, np.float64)
        if len(self._weights):
            self._weights += weights.sum(axis=1)
            self._weighted_means += weights @ image_means
            self._weighted_squares += weights @ (
                np.asarray(image_variances, np.float64) + image_means**2
            )
        batch = len(image_means)
        batch_mean = image_means.mean(axis=0)
        batch_squares = batch * (
            np.asarray(image_variances, np.float64).mean(axis=0)
            + image_means.var(axis=0)
        )
        total = self.count + batch
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (batch / total)
        self._sum_squares += batch_squares + delta**2 * (self.count * batch / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        """The population variance (as BatchNormalization computes it)."""
        return self._sum_squares / max(self.count, 1)

    @property
    def resampled_means(self) -> np.ndarray:
        """``(resamples, channels)``: each resample's mean (NaN if it drew nothing)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self._weighted_means / self._weights[:, None]

    @property
    def resampled_variances(self) -> np.ndarray:
        """``(resamples, channels)``: each resample's population variance."""
        with np.errstate(invalid="ignore", divide="ignore"):
            second = self._weighted_squares / self._weights[:, None]
        return np.maximum(second - self.resampled_means**2, 0.0)


def run_pass(
    probe: keras.Model,
    layout: ProbeLayout,
    batches: tf.data.Dataset | Iterable[np.ndarray],
    *,
    batch_size: int,
    n_images: int,
    what: str,
    logger: logging.Logger,
    resamples: int = 0,
    seed: int = 0,
) -> SplitPass:
    """Streams batches through the probe and accumulates what it measures.

    A short last batch is padded with black images to ``batch_size`` and the padding
    dropped from the outputs, so the probe is traced for one batch shape only. With
    ``resamples``, the BN moments are also accumulated for that many Poisson
    bootstrap resamples of the images (each image drawn Poisson(1) times per
    resample, with ``seed``), in the same single pass.

    Args:
        probe: From :func:`build_probe`.
        layout: Its layout.
        batches: Batches of ``[0, 255]`` RGB images, e.g. ``inputs.image_dataset``.
        batch_size: The batch size of ``batches``.
        n_images: How many images ``batches`` holds (for progress lines).
        what: What the images are, for progress lines.
        logger: Where progress lines go.
        resamples: Bootstrap resamples of the BN moments (0: none).
        seed: Of the resamples' draws.

    Returns:
        The BN input moments over all images and the pooled features of each image.
    """
    running = [RunningMoments(bn.channels, resamples) for bn in layout.batch_norms]
    draws = np.random.default_rng(seed)
    features: list[np.ndarray] = []
    progress = ProgressLog(f"{what} images through IRv2", n_images, logger)
    seen = grayscale = 0
    if isinstance(batches, tf.data.Dataset):
        batches = batches.as_numpy_iterator()
    for batch in batches:
        real = len(batch)
        outputs = probe.predict_on_batch(_padded(batch, batch_size))
        moments = np.asarray(outputs[MOMENTS_OUTPUT])[:real]
        # Drawn once a batch, for every layer alike: it is the images that are drawn.
        weights = (
            draws.poisson(1.0, (resamples, real)).astype(np.float64)
            if resamples
            else None
        )
        offset = 0
        for bn, accumulator in zip(layout.batch_norms, running, strict=True):
            width = bn.channels
            accumulator.add(
                moments[:, offset : offset + width],
                moments[:, offset + width : offset + 2 * width],
                weights,
            )
            offset += 2 * width
        features.append(np.asarray(outputs[FEATURES_OUTPUT])[:real])
        seen += real
        grayscale += int(is_grayscale(batch).sum())
        progress.advance(real)
    pooled = (
        np.concatenate(features)
        if features
        else np.zeros((0, sum(layout.depth_channels)), np.float32)
    )
    bounds = np.cumsum((0, *layout.depth_channels))
    return SplitPass(
        n_images=seen,
        grayscale_images=grayscale,
        bn_means={
            bn.name: acc.mean
            for bn, acc in zip(layout.batch_norms, running, strict=True)
        },
        bn_variances={
            bn.name: acc.variance
            for bn, acc in zip(layout.batch_norms, running, strict=True)
        },
        features={
            depth: pooled[:, bounds[i] : bounds[i + 1]]
            for i, depth in enumerate(layout.depths)
        },
        bn_resampled_means={
            bn.name: acc.resampled_means
            for bn, acc in zip(layout.batch_norms, running, strict=True)
            if resamples
        },
        bn_resampled_variances={
            bn.name: acc.resampled_variances
            for bn, acc in zip(layout.batch_norms, running, strict=True)
            if resamples
        },
    )


def is_grayscale(batch: np.ndarray) -> np.ndarray:
    """Per image of a ``(n, h, w, 3)`` batch, whether its channels are equal.

    Equal within :data:`GRAYSCALE_TOLERANCE` of 255: a grey JPEG saved as RGB, or
    resized, keeps channels a level or two apart.
    """
    pixels = np.asarray(batch, np.float32)
    spread = pixels.max(axis=-1) - pixels.min(axis=-1)
    return spread.reshape(len(pixels), -1).max(axis=1) <= GRAYSCALE_TOLERANCE


def _padded(batch: np.ndarray, batch_size: int) -> np.ndarray:
    """The batch, with black images appended up to ``batch_size``."""
    missing = batch_size - len(batch)
    if missing <= 0:
        return batch
    return np.concatenate([batch, np.zeros((missing, *batch.shape[1:]), batch.dtype)])
