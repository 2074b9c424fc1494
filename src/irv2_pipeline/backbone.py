"""InceptionResNetV2: construction, weights, its block map and freezing.

Keras names only some of IRv2's layers (``mixed_5b``, ``block35_1_mixed``,
``block35_1_ac``, ...); the convolutions inside a block get automatic names. The block
map recovers, for every layer, the *unit* it belongs to (``stem``, ``mixed_5b``,
``block35_1`` ... ``block35_10``, ``mixed_6a``, ``block17_1`` ... ``block17_20``,
``mixed_7a``, ``block8_1`` ... ``block8_10``, ``conv_7b``) and the unit's *group*
(``stem``, ``block35``, ``mixed_6a``, ``block17``, ``mixed_7a``, ``block8``,
``conv_7b``). Stage boundaries (``unfreeze_from``) are unit names.

Keras is imported by the functions that build or inspect a model, not here: the
group names and BatchNorm policies are read by modules that every ``kedro`` command
loads, and importing Keras (with TensorFlow) costs seconds.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

GROUPS = ("stem", "block35", "mixed_6a", "block17", "mixed_7a", "block8", "conv_7b")
MIN_IMAGE_SIZE = 75
PREPROCESS_LAYER = "irv2_preprocess"
NOTOP_WEIGHTS_FILE = "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
# The image size Keras's ImageNet weights were trained at.
IMAGENET_IMAGE_SIZE = 299
# A weights file may have a card beside it, its name plus this (JSON), that says
# what it was trained on: ``image_size`` and ``preprocessing`` (irv2_pipeline.make_source
# writes one).
CARD_SUFFIX = ".json"

# A named layer that ends (or is inside) a unit, and the unit it names.
_UNIT_LAYER = re.compile(
    r"^(?P<unit>block(?:35|17|8)_\d+)_(?:mixed|conv|ac)$"
    r"|^(?P<mixed>mixed_5b|mixed_6a|mixed_7a)$"
    r"|^(?P<top>conv_7b)(?:_bn|_ac)?$"
)


class WeightsError(RuntimeError):
    """The backbone's weights cannot be had; the message says what to do."""


def load_irv2(weights: str | None, image_size: int) -> keras.Model:
    """Builds IRv2 without its classifier, taking inputs already preprocessed.

    Args:
        weights: ``"imagenet"``, ``None`` (random init, not transfer learning) or the
            path of a local weights file for IRv2 without top (air-gapped machines).
        image_size: Square input size in pixels, at least 75.

    Returns:
        The Keras model ``inception_resnet_v2``.

    Raises:
        WeightsError: ImageNet weights cannot be downloaded, or a local file is not
            IRv2 weights; the message names the file and the way out.
        ValueError: An image size below 75 px.
    """
    import keras  # noqa: PLC0415 - see the module docstring

    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"model.image_size = {image_size}: InceptionResNetV2 needs at least "
            f"{MIN_IMAGE_SIZE} px"
        )
    shape = (image_size, image_size, 3)
    if weights is None:
        logger.warning(
            "model.weights is null: the backbone starts from random weights. Results "
            "are NOT transfer learning and the ImageNet shift figures are meaningless."
        )
        return keras.applications.InceptionResNetV2(
            include_top=False, weights=None, input_shape=shape
        )
    if weights == "imagenet":
        try:
            return keras.applications.InceptionResNetV2(
                include_top=False, weights="imagenet", input_shape=shape
            )
        except Exception as exc:
            raise WeightsError(
                f"The ImageNet weights of InceptionResNetV2 could not be fetched "
                f"({type(exc).__name__}: {exc}). Without internet, copy "
                f"{NOTOP_WEIGHTS_FILE} (from the Keras applications release on "
                "GitHub) to this machine and set `model.weights` to its path in "
                "conf/local/parameters.yml, or set `model.weights: null` for random "
                "weights (not transfer learning)."
            ) from exc
    return _load_local_weights(Path(weights), shape)


def weights_card(weights: str | None) -> dict:
    """What is known of the weights' training: ``{}`` for random weights, ImageNet's
    own image size, or the card beside a local file (``{}`` when it has none)."""
    if weights is None:
        return {}
    if weights == "imagenet":
        return {"image_size": IMAGENET_IMAGE_SIZE, "preprocessing": "minus_one_to_one"}
    card = Path(f"{weights}{CARD_SUFFIX}")
    if not card.is_file():
        return {}
    try:
        return json.loads(card.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(
            f"{card} (the card of {weights}) is not JSON: {exc}"
        ) from exc


def _load_local_weights(path: Path, shape: tuple[int, int, int]) -> keras.Model:
    import keras  # noqa: PLC0415 - see the module docstring

    if not path.is_file():
        raise WeightsError(
            f"model.weights = {str(path)!r} is neither 'imagenet', null, nor an "
            "existing file."
        )
    model = keras.applications.InceptionResNetV2(
        include_top=False, weights=None, input_shape=shape
    )
    expected = f"Expected a file like {NOTOP_WEIGHTS_FILE}."
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.load_weights(path)
    except Exception as exc:
        raise WeightsError(
            f"{path} is not a weights file for InceptionResNetV2 without top "
            f"({type(exc).__name__}: {str(exc)[:300]}). {expected}"
        ) from exc
    # Keras only warns when parts of a file do not match; a half-loaded backbone is
    # worse than none.
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message).lower()]
    if skipped:
        raise WeightsError(
            f"{path} does not fully match InceptionResNetV2 without top: "
            f"{skipped[0][:300]}. {expected}"
        )
    return model


# The per-channel means that Keras's "caffe" preprocessing subtracts, in BGR order.
IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class InputScaling:
    """One way to map ``[0, 255]`` RGB before IRv2: ``(x - subtract) * scale + offset``,
    on the channels reversed to BGR first when ``bgr``.

    Attributes:
        bgr: Reverse the channels (RGB to BGR) first.
        subtract: Per-channel values subtracted, in the order after ``bgr``.
        scale: Factor applied after the subtraction.
        offset: Added last.
        description: What it computes, for people (the export's model card).
    """

    bgr: bool
    subtract: tuple[float, float, float]
    scale: float
    offset: float
    description: str


# How the model maps its [0, 255] RGB input before IRv2 (``finetune.input_scaling``):
#   minus_one_to_one:   IRv2's own (Keras's ImageNet weights were trained on it);
#   zero_to_one:        the textbook mistake, kept to measure what it costs (the
#                       counterfactuals pipeline);
#   caffe:              Keras's caffe mode (ResNet50, VGG): BGR, ImageNet means off;
#   caffe_then_div_255: caffe, then divided by 255: what Keras's ImageDataGenerator
#                       computes with rescale=1/255 and imagenet_utils.preprocess_input
#                       as its preprocessing_function (it runs that function first),
#                       the recipe RadImageNet's weights were trained with.
INPUT_SCALINGS = {
    "minus_one_to_one": InputScaling(
        False, (0.0, 0.0, 0.0), 1.0 / 127.5, -1.0, "[-1, 1] (x / 127.5 - 1, IRv2's)"
    ),
    "zero_to_one": InputScaling(False, (0.0, 0.0, 0.0), 1.0 / 255.0, 0.0, "x / 255"),
    "caffe": InputScaling(
        True,
        IMAGENET_BGR_MEANS,
        1.0,
        0.0,
        f"BGR minus the ImageNet means {list(IMAGENET_BGR_MEANS)} (Keras's caffe mode)",
    ),
    "caffe_then_div_255": InputScaling(
        True,
        IMAGENET_BGR_MEANS,
        1.0 / 255.0,
        0.0,
        f"(BGR minus the ImageNet means {list(IMAGENET_BGR_MEANS)}) / 255",
    ),
}


def check_input_scaling(input_scaling: str) -> str:
    """Returns ``input_scaling`` if it is one of :data:`INPUT_SCALINGS`, else raises."""
    if input_scaling not in INPUT_SCALINGS:
        raise ValueError(
            f"finetune.input_scaling = {input_scaling!r}; use one of "
            f"{', '.join(INPUT_SCALINGS)}"
        )
    return input_scaling


# The weights of ITU-R BT.601 luminance, in RGB order (Pillow's ``convert("L")``).
BT601_LUMINANCE = (0.299, 0.587, 0.114)

# What the model's first layer does with colour, before the input scaling (each
# source of weights says which):
#   replicate: the pixels as opened; images.py makes RGB of a grey file, so it
#              already has R = G = B;
#   luminance: every image, colour ones too, becomes its luminance in all three
#              channels: for weights trained on grey images only (RadImageNet-style
#              medical sources), which never saw colour.
GRAYSCALE_RULES = {
    "replicate": "the pixels as opened (a grey file has R = G = B)",
    "luminance": (
        "every image, colour ones too, becomes its ITU-R BT.601 luminance "
        f"{BT601_LUMINANCE[0]} R + {BT601_LUMINANCE[1]} G + {BT601_LUMINANCE[2]} B "
        "in all three channels"
    ),
}


def check_grayscale(rule: str) -> str:
    """Returns ``rule`` if it is one of :data:`GRAYSCALE_RULES`, else raises.

    Raises:
        ValueError: An unknown rule; the message names it and the valid ones.
    """
    if rule not in GRAYSCALE_RULES:
        raise ValueError(
            f"grayscale = {rule!r}; use one of {', '.join(GRAYSCALE_RULES)}"
        )
    return rule


def preprocessed_zero(
    input_scaling: str, grayscale: str = "replicate"
) -> tuple[float, float, float]:
    """The ``[0, 255]`` RGB pixel that ``input_scaling`` maps to 0 in every channel
    (IRv2's mid-grey 127.5; the ImageNet mean colour for the caffe modes).

    Under ``grayscale: luminance`` every pixel becomes a grey, and no grey maps to 0
    in every channel of the caffe modes: the grey whose channels come out nearest 0
    on average (the mean of the per-channel zeros) stands for it.
    """
    steps = INPUT_SCALINGS[check_input_scaling(input_scaling)]
    zero = [value - steps.offset / steps.scale for value in steps.subtract]
    if check_grayscale(grayscale) == "luminance":
        grey = sum(zero) / 3
        return grey, grey, grey
    red, green, blue = zero[::-1] if steps.bgr else zero
    return red, green, blue


def model_input_scaling(finetune: Mapping[str, Any], weights: str | None) -> str:
    """The preprocessing a model on ``weights`` is built with, checked against them.

    ``finetune.input_scaling``, which must equal the preprocessing the weights' card
    names (:func:`weights_card`): features of weights fed other pixels than they were
    trained on are off from the first layer, and nothing downstream says why.
    ``finetune.input_scaling_override: true`` trains with it all the same, on purpose
    (the counterfactual variants that measure a wrong scaling).

    Args:
        finetune: The ``finetune`` parameters.
        weights: ``model.weights``.

    Returns:
        A key of :data:`INPUT_SCALINGS`.

    Raises:
        ValueError: An unknown name, or one other than the card's without the
            override; the message names both and the fix.
        WeightsError: The card is not JSON or names an unknown preprocessing.
    """
    input_scaling = check_input_scaling(
        str(finetune.get("input_scaling", "minus_one_to_one"))
    )
    trained_with = weights_card(weights).get("preprocessing")
    if trained_with is not None and trained_with not in INPUT_SCALINGS:
        raise WeightsError(
            f"{weights}{CARD_SUFFIX} names the preprocessing {trained_with!r}; a card "
            f"names one of {', '.join(INPUT_SCALINGS)}"
        )
    if (
        trained_with is None
        or trained_with == input_scaling
        or finetune.get("input_scaling_override", False)
    ):
        return input_scaling
    source = "ImageNet" if weights == "imagenet" else f"{weights}{CARD_SUFFIX}"
    raise ValueError(
        f"finetune.input_scaling = {input_scaling!r}, but model.weights ({weights}) "
        f"were trained with {trained_with!r} (says {source}). Set "
        f"finetune.input_scaling: {trained_with} (conf/local/parameters.yml), or "
        "finetune.input_scaling_override: true to train with "
        f"{input_scaling!r} on purpose."
    )


def preprocessing_layer(
    input_scaling: str = "minus_one_to_one",
    grayscale: str = "replicate",
) -> keras.layers.Layer:
    """The model's preprocessing of ``[0, 255]`` RGB, as a layer.

    It sits inside every model this project saves, so nobody can feed it ``1/255``
    images again. It computes in float32 whatever the dtype policy: under
    ``mixed_bfloat16`` the pixels would be rounded to 8 significant bits first, and
    neighbouring values (254 and 255) would come out equal.

    Args:
        input_scaling: A key of :data:`INPUT_SCALINGS`: ``minus_one_to_one`` is
            IRv2's own; the others serve weights trained otherwise, and the
            counterfactual runs.
        grayscale: A key of :data:`GRAYSCALE_RULES`, applied before the scaling:
            ``replicate`` feeds the pixels as they are, ``luminance`` the
            luminance of every image in all three channels.
    """
    from irv2_pipeline.preprocessing import Preprocess  # noqa: PLC0415 - Keras

    return Preprocess(input_scaling, grayscale, name=PREPROCESS_LAYER)


def unit_map(backbone: keras.Model) -> dict[str, str]:
    """Maps every layer name of IRv2 to the unit it belongs to.

    A layer belongs to the unit of the next named layer in topological order, except
    the residual scale layer, which closes the unit before it. The stem ends at its
    second max-pooling layer.
    """
    import keras  # noqa: PLC0415 - see the module docstring

    units: dict[str, str] = {}
    pending: list[str] = []
    current = None
    pools = 0
    for layer in backbone.layers:
        match = _UNIT_LAYER.match(layer.name)
        if match:
            current = match.group("unit") or match.group("mixed") or match.group("top")
            units.update(dict.fromkeys(pending, current))
            units[layer.name] = current
            pending = []
        elif type(layer).__name__ == "CustomScaleLayer" and current is not None:
            units[layer.name] = current
        else:
            pending.append(layer.name)
            if isinstance(layer, keras.layers.MaxPooling2D) and current is None:
                pools += 1
                if pools == 2:
                    units.update(dict.fromkeys(pending, "stem"))
                    pending = []
                    current = "stem"
    if pending:
        raise ValueError(f"Layers after the last IRv2 unit: {pending[:5]}")
    return units


def unit_order(backbone: keras.Model) -> list[str]:
    """The units of IRv2 from input to output."""
    return list(dict.fromkeys(unit_map(backbone).values()))


def group_of(unit: str) -> str:
    """The block group of a unit: ``block35_3`` is in ``block35``, ``mixed_5b`` in stem."""
    if unit in ("stem", "mixed_5b"):
        return "stem"
    return unit.rsplit("_", 1)[0] if unit.startswith("block") else unit


def set_trainable_from(backbone: keras.Model, unfreeze_from: str | int | None) -> int:
    """Freezes the backbone below ``unfreeze_from`` and unfreezes it from there on.

    Args:
        backbone: IRv2 from :func:`load_irv2`.
        unfreeze_from: A unit name (``block8_1``, ``mixed_7a``, ...), a layer index
            (``500``: ``backbone.layers[500:]`` train, the textbook recipes' way,
            which may cut a block in two), or ``None`` to freeze the whole backbone
            (head-only training).

    Returns:
        The number of trainable weights' scalars in the backbone.

    Raises:
        ValueError: ``unfreeze_from`` is not a unit of IRv2 (the message lists them)
            or not an index of its layers.
    """
    if isinstance(unfreeze_from, int) and not isinstance(unfreeze_from, bool):
        return _set_trainable_from_index(backbone, unfreeze_from)
    units = unit_map(backbone)
    order = unit_order(backbone)
    if unfreeze_from is not None and unfreeze_from not in order:
        raise ValueError(
            f"unfreeze_from = {unfreeze_from!r} is not an IRv2 block; use one of "
            f"{', '.join(order)} (or null for the head only)"
        )
    first = len(order) if unfreeze_from is None else order.index(unfreeze_from)
    position = {unit: index for index, unit in enumerate(order)}
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = position[units[layer.name]] >= first
    # From the shapes: reading the values would copy every weight to the host.
    return sum(math.prod(w.shape) for w in backbone.trainable_weights)


def _set_trainable_from_index(backbone: keras.Model, index: int) -> int:
    if not 0 <= index < len(backbone.layers):
        raise ValueError(
            f"unfreeze_from = {index} is not an index of IRv2's "
            f"{len(backbone.layers)} layers"
        )
    backbone.trainable = True
    for position, layer in enumerate(backbone.layers):
        layer.trainable = position >= index
    return sum(int(w.numpy().size) for w in backbone.trainable_weights)


def split_at(
    backbone: keras.Model, unit: str
) -> tuple[keras.Model, keras.Model] | None:
    """The backbone as two models on its own layers: below ``unit`` and from it on.

    ``top(trunk(x))`` is ``backbone(x)``. The cut is the one tensor that the layers
    of ``unit`` and after read from the layers before it (for IRv2, the previous
    unit's output).

    Args:
        backbone: IRv2 from :func:`load_irv2`.
        unit: A unit name (``block8_1``, ``mixed_7a``, ...).

    Returns:
        ``(trunk, top)``; ``None`` for the first unit (there is nothing below it)
        or where more than one tensor crosses the cut.
    """
    import keras  # noqa: PLC0415 - see the module docstring

    units = unit_map(backbone)
    order = unit_order(backbone)
    first = order.index(unit)
    if first == 0:
        return None
    later = [
        layer for layer in backbone.layers if order.index(units[layer.name]) >= first
    ]
    made_later = {id(layer.output) for layer in later}
    crossing = {
        id(tensor): tensor
        for layer in later
        for tensor in keras.tree.flatten(layer.input)
        if id(tensor) not in made_later
    }
    if len(crossing) != 1:
        return None
    (cut,) = crossing.values()
    return (
        keras.Model(backbone.input, cut, name=f"irv2_below_{unit}"),
        keras.Model(cut, backbone.output, name=f"irv2_from_{unit}"),
    )


# How BatchNorm layers behave while a stage trains:
#   frozen: inference mode everywhere, the stored (ImageNet) statistics are used and
#           never updated, even in unfrozen blocks; gamma and beta of unfrozen blocks
#           still learn (the Keras transfer-learning guide's rule).
#   adapt:  the moving statistics of every BN layer are re-estimated on the training
#           images before the stage (AdaBN), then kept frozen as above.
#   train:  BN layers of unfrozen blocks normalize with batch statistics and update
#           their moving statistics; those of frozen blocks stay in inference mode.
BN_POLICIES = ("frozen", "adapt", "train")


def check_bn_policy(bn_policy: str) -> str:
    """Returns ``bn_policy`` if it is one of :data:`BN_POLICIES`, else raises."""
    if bn_policy not in BN_POLICIES:
        raise ValueError(
            f"bn_policy = {bn_policy!r}; use one of {', '.join(BN_POLICIES)}"
        )
    return bn_policy


def batchnorm_layers(backbone: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The BatchNorm layers of the backbone, input to output."""
    import keras  # noqa: PLC0415 - see the module docstring

    return [
        layer
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def adapt_batchnorm(
    backbone: keras.Model,
    batches: Iterable,
    input_scaling: str = "minus_one_to_one",
    grayscale: str = "replicate",
) -> int:
    """AdaBN: re-estimates every BatchNorm layer's moving statistics on images.

    The backbone runs in training mode over the batches; each BN layer's moving mean
    and variance become the mean and variance of its input over *all* the images,
    merged batch by batch (Chan et al.'s parallel update): the variance includes the
    spread of the batch means, which an average of per-batch variances leaves out
    (by a lot when batches are not shuffled and hold one class each). Trainable
    flags and momenta are restored afterwards; only the moving statistics change.

    Args:
        backbone: IRv2 from :func:`load_irv2`.
        batches: Batches of ``[0, 255]`` RGB images (arrays or tensors), or
            ``(images, labels)`` pairs; shuffled, so that each batch is a sample of
            all of them.
        input_scaling: How the model scales pixels (:data:`INPUT_SCALINGS`).
        grayscale: How the model makes them grey first (:data:`GRAYSCALE_RULES`).

    Returns:
        The number of images seen.

    Raises:
        ValueError: No images in ``batches``.
    """
    import keras  # noqa: PLC0415 - see the module docstring

    layers = batchnorm_layers(backbone)
    saved = [(layer.trainable, layer.momentum) for layer in layers]
    preprocess = preprocessing_layer(input_scaling, grayscale)
    moments = [_Moments() for _ in layers]
    try:
        for layer in layers:
            # A BN layer that is not trainable ignores training=True; momentum 0
            # makes its moving statistics this batch's own.
            layer.trainable = True
            layer.momentum = 0.0
        forward = _training_forward(backbone, preprocess)
        for batch in batches:
            images = batch[0] if isinstance(batch, tuple | list) else batch
            count = int(keras.ops.shape(images)[0])
            forward(images)
            for layer, merged in zip(layers, moments, strict=True):
                merged.add(
                    count,
                    keras.ops.convert_to_numpy(layer.moving_mean),
                    keras.ops.convert_to_numpy(layer.moving_variance),
                )
    finally:
        for layer, (trainable, momentum) in zip(layers, saved, strict=True):
            layer.trainable = trainable
            layer.momentum = momentum
    if not moments or moments[0].count == 0:
        raise ValueError("adapt_batchnorm got no images to estimate statistics on")
    for layer, merged in zip(layers, moments, strict=True):
        layer.moving_mean.assign(merged.mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(
            merged.variance().astype(layer.moving_variance.dtype)
        )
    return moments[0].count


def _training_forward(backbone: keras.Model, preprocess: keras.layers.Layer):
    """The backbone's pass in training mode on ``[0, 255]`` images, traced once on
    TensorFlow: run eagerly, op by op, IRv2 took 3x as long (bench/batchnorm_adapt.py)."""
    import keras  # noqa: PLC0415 - see the module docstring

    def forward(images):
        backbone(preprocess(images), training=True)

    if keras.backend.backend() != "tensorflow":
        return forward
    import tensorflow as tf  # noqa: PLC0415

    # Any batch size (the last batch is smaller) without tracing again.
    return tf.function(
        forward,
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)],
    )


class _Moments:
    """Count, mean and sum of squared deviations, merged batch by batch (Chan)."""

    def __init__(self):
        self.count = 0
        self.mean: np.ndarray = np.zeros(0)
        self.squares: np.ndarray = np.zeros(0)

    def add(self, count: int, mean: np.ndarray, variance: np.ndarray) -> None:
        mean = mean.astype(np.float64)
        squares = variance.astype(np.float64) * count
        if self.count == 0:
            self.count, self.mean, self.squares = count, mean, squares
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total
        self.squares = self.squares + squares + delta**2 * self.count * count / total
        self.count = total

    def variance(self) -> np.ndarray:
        return self.squares / self.count
