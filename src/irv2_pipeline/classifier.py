"""The fine-tuned classifier: ``[0, 255]`` RGB -> IRv2's preprocessing -> IRv2 -> head.

One set of layers serves three views:

- ``model``: pixels to class probabilities, the model that is saved. It takes plain
  RGB in ``[0, 255]``; the preprocessing (IRv2's ``[-1, 1]`` unless
  ``finetune.input_scaling`` says otherwise, after the source's grayscale rule) is
  its first layer.
- ``features``: pixels to the pooled backbone features (what the cached head stage
  computes once).
- ``head``: pooled features to probabilities.

They share their layers, so a head trained on cached features *is* the head of
``model``: nothing has to be copied back. :func:`training_model` gives the graph a
stage trains, which differs from ``model`` only in how BatchNorm is called, or in
starting where the stage's frozen layers end (their outputs computed once by
:func:`trunk_model`).
:func:`split_saved` takes a saved ``model`` apart again at the backbone, for methods
that need the backbone's maps (Grad-CAM).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras

from irv2_pipeline.backbone import (
    INPUT_SCALINGS,
    PREPROCESS_LAYER,
    check_bn_policy,
    preprocessing_layer,
)

POOLINGS = ("avg", "avg_max")
# Names build_classifier gives the layers after the backbone.
HEAD_MODEL = "head"
LOGITS_LAYER = "logits"
POOLING_LAYERS = ("avg_pool", "max_pool", "avg_max_pool")


@dataclass(frozen=True)
class HeadSpec:
    """The classification head, as declared in ``finetune.head``.

    Attributes:
        pooling: ``avg`` (global average pooling) or ``avg_max`` (average and max
            pooling, concatenated).
        dropout: Dropout rate before each dense layer (0 for none).
        dense_units: Sizes of the hidden dense layers, in order (empty for none).
        dense_activation: Activation of the hidden dense layers.
        l2: L2 penalty on every dense kernel of the head (0 for none).
    """

    pooling: str = "avg"
    dropout: float = 0.2
    dense_units: tuple[int, ...] = ()
    dense_activation: str = "relu"
    l2: float = 0.0

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> HeadSpec:
        """Builds the spec from ``finetune.head``, with clear errors."""
        unknown = sorted(set(params) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"finetune.head: unknown keys {unknown}; known: "
                f"{', '.join(cls.__dataclass_fields__)}"
            )
        spec = cls(
            pooling=str(params.get("pooling", cls.pooling)),
            dropout=float(params.get("dropout", cls.dropout)),
            dense_units=tuple(int(u) for u in params.get("dense_units") or ()),
            dense_activation=str(params.get("dense_activation", cls.dense_activation)),
            l2=float(params.get("l2", cls.l2)),
        )
        if spec.pooling not in POOLINGS:
            raise ValueError(
                f"finetune.head.pooling = {spec.pooling!r}; use one of "
                f"{', '.join(POOLINGS)}"
            )
        if not 0.0 <= spec.dropout < 1.0:
            raise ValueError(
                f"finetune.head.dropout = {spec.dropout} must be in [0, 1)"
            )
        if spec.l2 < 0 or any(units < 1 for units in spec.dense_units):
            raise ValueError(
                "finetune.head: l2 must be >= 0 and dense_units positive, got "
                f"l2={spec.l2}, dense_units={list(spec.dense_units)}"
            )
        return spec


@dataclass(frozen=True)
class Classifier:
    """Three views on one set of layers (see the module docstring)."""

    model: keras.Model
    features: keras.Model
    head: keras.Model
    backbone: keras.Model
    pooling: tuple[keras.layers.Layer, ...]
    input_scaling: str = "minus_one_to_one"
    grayscale: str = "replicate"


def build_classifier(
    backbone: keras.Model,
    class_names: Sequence[str],
    head: HeadSpec,
    seed: int,
    input_scaling: str = "minus_one_to_one",
    *,
    grayscale: str = "replicate",
) -> Classifier:
    """Assembles the classifier around an IRv2 backbone.

    Args:
        backbone: IRv2 from ``backbone.load_irv2`` (its input size is the model's).
        class_names: The classes, in output order (``inputs.class_names``).
        head: The head's layout.
        seed: Seed of the head's initial weights and dropout masks.
        input_scaling: How pixels are scaled before IRv2
            (``backbone.INPUT_SCALINGS``; ``backbone.model_input_scaling`` picks it).
        grayscale: How images are made grey before the scaling
            (``backbone.GRAYSCALE_RULES``; the source's rule).

    Returns:
        The classifier; its softmax output is float32 under mixed precision too.
    """
    if len(class_names) < 2:
        raise ValueError(f"A classifier needs at least two classes, got {class_names}")
    size = backbone.input_shape[1]
    pixels = keras.Input((size, size, 3), name="pixels")
    pooling = _pooling_layers(head.pooling)
    preprocess = preprocessing_layer(input_scaling, grayscale)
    features = _pool(pooling, backbone(preprocess(pixels)))
    head_model = _head(int(features.shape[-1]), len(class_names), head, seed)
    return Classifier(
        model=keras.Model(pixels, head_model(features), name="irv2_classifier"),
        features=keras.Model(pixels, features, name="irv2_features"),
        head=head_model,
        backbone=backbone,
        pooling=pooling,
        input_scaling=input_scaling,
        grayscale=grayscale,
    )


@dataclass(frozen=True)
class SavedParts:
    """A saved classifier taken apart at its backbone (:func:`split_saved`).

    Attributes:
        preprocess: ``[0, 255]`` RGB to what the backbone expects.
        backbone: The nested IRv2 model (its own graph: sub-models of it are safe).
        logits: The backbone's output maps to the head's pre-softmax scores.
    """

    preprocess: keras.layers.Layer
    backbone: keras.Model
    logits: keras.Model


def split_saved(model: keras.Model) -> SavedParts:
    """Takes a saved classifier (``classifier.model``) apart at the backbone.

    A model from the classifier's input to a layer *inside* the nested backbone fails
    with "Graph disconnected": the inner layer's tensors belong to the backbone's own
    graph, not the classifier's. So the parts are rebuilt on the saved layers instead:
    sub-models of the backbone live in its graph, and the part after it is the
    saved pooling and head layers called on a new input of the backbone's map shape.

    Args:
        model: The classifier as ``finetune`` saved it (``finetuned_model``).

    Returns:
        The preprocessing layer, the backbone and the maps-to-logits model.

    Raises:
        ValueError: The model is not one :func:`build_classifier` made.
    """
    names = {layer.name for layer in model.layers}
    nested = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.Model) and layer.name != HEAD_MODEL
    ]
    pooling = tuple(name for name in POOLING_LAYERS if name in names)
    if (
        len(nested) != 1
        or pooling not in (POOLING_LAYERS[:1], POOLING_LAYERS)
        or not {PREPROCESS_LAYER, HEAD_MODEL} <= names
    ):
        raise ValueError(
            f"{model.name} is not the classifier finetune builds (preprocessing, a "
            f"nested backbone, {' or '.join(POOLINGS)} pooling, a head model); it has "
            f"the layers {sorted(names)}"
        )
    backbone = nested[0]
    head = model.get_layer(HEAD_MODEL)
    head_logits = keras.Model(
        head.inputs, head.get_layer(LOGITS_LAYER).output, name="head_logits"
    )
    maps = keras.Input(backbone.output_shape[1:], name="backbone_maps")
    pooled = _pool(tuple(model.get_layer(name) for name in pooling), maps)
    return SavedParts(
        preprocess=model.get_layer(PREPROCESS_LAYER),
        backbone=backbone,
        logits=keras.Model(maps, head_logits(pooled), name="maps_to_logits"),
    )


def saved_input_scaling(model: keras.Model) -> str:
    """The ``finetune.input_scaling`` a saved classifier was built with."""
    layer = model.get_layer(PREPROCESS_LAYER)
    if hasattr(layer, "input_scaling"):
        return layer.input_scaling
    # Models saved before the preprocessing had a layer of its own hold a Rescaling,
    # known by its scale and offset.
    return next(
        name
        for name, scaling in INPUT_SCALINGS.items()
        if not scaling.bgr
        and math.isclose(scaling.scale, layer.scale)
        and scaling.offset == layer.offset
    )


def saved_grayscale(model: keras.Model) -> str:
    """The grayscale rule (``backbone.GRAYSCALE_RULES``) of a saved classifier."""
    # Models saved before the rule existed (a Rescaling layer, or a Preprocess
    # without it) fed the pixels as they were.
    return getattr(model.get_layer(PREPROCESS_LAYER), "grayscale", "replicate")


class InferenceMode(keras.layers.Layer):
    """Calls a model with ``training=False`` whatever the outer call says.

    Keras 3 functional models pass the outer ``training`` flag on to nested models,
    overriding a ``training=False`` written in the graph: ``backbone(x,
    training=False)`` inside a functional model is *not* enough to keep BatchNorm in
    inference mode during ``fit``. This layer is. It only appears in training graphs;
    saved models call the backbone directly (in inference, training is False anyway).
    """

    def __init__(self, model: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def call(self, inputs):
        return self.model(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.model.compute_output_shape(input_shape)


def pooled_features_layer(model: keras.Model) -> str | None:
    """The name of the layer whose output the head reads (the pooled features).

    ``avg_max_pool`` when the model pools both ways, else ``avg_pool``; ``None``
    when the model has neither (``build_classifier`` did not make it).
    """
    names = {layer.name for layer in model.layers}
    average, _, concatenate = POOLING_LAYERS
    return next((name for name in (concatenate, average) if name in names), None)


def training_model(
    classifier: Classifier, bn_policy: str, top: keras.Model | None = None
) -> keras.Model:
    """The graph a stage trains: ``classifier.model``'s layers, BN as the policy says.

    ``train`` trains ``classifier.model``'s own graph (BN layers of unfrozen blocks use
    batch statistics). ``frozen`` and ``adapt`` call the backbone through
    :class:`InferenceMode`, so BN uses its stored statistics even where the
    backbone's weights train. Either way it is a new model object on the shared
    layers: compiling it leaves ``classifier.model`` uncompiled, so the saved model
    holds no optimizer (whose custom class safe mode would refuse to load).

    Args:
        classifier: The model.
        bn_policy: The stage's (``backbone.BN_POLICIES``).
        top: The backbone from the stage's first unfrozen unit on (the second part
            of ``backbone.split_at``): the graph then takes that unit's input (the
            frozen layers' outputs, cached) instead of pixels.
    """
    policy = check_bn_policy(bn_policy)
    if top is None and policy == "train":
        return keras.Model(
            classifier.model.inputs,
            classifier.model.outputs,
            name="irv2_classifier_bn_train",
        )
    if top is None:
        inputs, x = _scaled_pixels(classifier)
        network = classifier.backbone
    else:
        inputs = keras.Input(
            top.input_shape[1:], dtype=top.inputs[0].dtype, name="trunk_outputs"
        )
        x, network = inputs, top
    maps = (
        network(x)
        if policy == "train"
        else InferenceMode(network, name="backbone_inference_mode")(x)
    )
    outputs = classifier.head(_pool(classifier.pooling, maps))
    # One name for either input: the epochs logged are the same model's.
    return keras.Model(inputs, outputs, name=f"irv2_classifier_bn_{policy}")


def trunk_model(classifier: Classifier, trunk: keras.Model) -> keras.Model:
    """Pixels to the outputs of ``trunk`` (the first part of ``backbone.split_at``),
    through the classifier's preprocessing: what a stage that trains from there on
    computes once."""
    pixels, scaled = _scaled_pixels(classifier)
    return keras.Model(pixels, trunk(scaled), name=f"{trunk.name}_on_pixels")


def features_and_trunks(
    classifier: Classifier, trunks: Sequence[keras.Model]
) -> keras.Model:
    """Pixels to the pooled features and to the outputs of each of ``trunks``
    (first parts of ``backbone.split_at``), through the classifier's preprocessing and
    one pass of the backbone: what a head stage computes once, with what the later
    stages' frozen layers would."""
    backbone = classifier.backbone
    network = keras.Model(
        backbone.input,
        [backbone.output, *(trunk.output for trunk in trunks)],
        name="irv2_with_trunk_outputs",
    )
    pixels, scaled = _scaled_pixels(classifier)
    maps, *trunk_outputs = network(scaled)
    return keras.Model(
        pixels,
        [_pool(classifier.pooling, maps), *trunk_outputs],
        name="irv2_features_and_trunks",
    )


def _scaled_pixels(classifier: Classifier):
    """A new pixel input of the classifier's size and its preprocessed tensor (a new
    preprocessing layer: it holds no weights)."""
    size = classifier.backbone.input_shape[1]
    pixels = keras.Input((size, size, 3), name="pixels")
    return pixels, preprocessing_layer(classifier.input_scaling, classifier.grayscale)(
        pixels
    )


def _pooling_layers(pooling: str) -> tuple[keras.layers.Layer, ...]:
    average, maximum, concatenate = POOLING_LAYERS
    if pooling == "avg":
        return (keras.layers.GlobalAveragePooling2D(name=average),)
    return (
        keras.layers.GlobalAveragePooling2D(name=average),
        keras.layers.GlobalMaxPooling2D(name=maximum),
        keras.layers.Concatenate(name=concatenate),
    )


def _pool(pooling: tuple[keras.layers.Layer, ...], maps):
    if len(pooling) == 1:
        return pooling[0](maps)
    average, maximum, concatenate = pooling
    return concatenate([average(maps), maximum(maps)])


def _head(feature_size: int, classes: int, spec: HeadSpec, seed: int) -> keras.Model:
    regularizer = keras.regularizers.L2(spec.l2) if spec.l2 > 0 else None
    features = keras.Input((feature_size,), name="pooled_features")
    x = features
    for index, units in enumerate((*spec.dense_units, classes)):
        if spec.dropout > 0:
            x = keras.layers.Dropout(
                spec.dropout, seed=seed + index, name=f"head_dropout_{index + 1}"
            )(x)
        last = index == len(spec.dense_units)
        x = keras.layers.Dense(
            units,
            activation=None if last else spec.dense_activation,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + index),
            kernel_regularizer=regularizer,
            name=LOGITS_LAYER if last else f"head_dense_{index + 1}",
        )(x)
    # float32 whatever the global policy: softmax in float16 loses small probabilities.
    probabilities = keras.layers.Activation(
        "softmax", dtype="float32", name="probabilities"
    )(x)
    return keras.Model(features, probabilities, name=HEAD_MODEL)
