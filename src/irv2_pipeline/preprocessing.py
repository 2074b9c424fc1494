"""The preprocessing layer every model of this project starts with.

One layer class serves every ``finetune.input_scaling`` (``backbone.INPUT_SCALINGS``)
and every grayscale rule (``backbone.GRAYSCALE_RULES``): the classifier, the training
graphs, the cached head features, AdaBN and the feature_shift probe all build it
through ``backbone.preprocessing_layer``. It is registered with Keras, so a saved
``.keras`` model holding it loads again (in safe mode too) once this module is
imported.
"""

from __future__ import annotations

import keras

from irv2_pipeline.backbone import (
    BT601_LUMINANCE,
    INPUT_SCALINGS,
    check_grayscale,
    check_input_scaling,
)


@keras.saving.register_keras_serializable(package="irv2_pipeline")
class Preprocess(keras.layers.Layer):
    """``[0, 255]`` RGB to what IRv2's weights expect, in float32.

    Args:
        input_scaling: A key of ``backbone.INPUT_SCALINGS``.
        grayscale: A key of ``backbone.GRAYSCALE_RULES``, applied before the
            scaling. Models saved before the rule existed have none in their config
            and load as ``replicate``, which is what they computed.
        **kwargs: Layer arguments (``name``); ``dtype`` is float32 unless given.
    """

    def __init__(
        self,
        input_scaling: str = "minus_one_to_one",
        grayscale: str = "replicate",
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.input_scaling = check_input_scaling(input_scaling)
        self.grayscale = check_grayscale(grayscale)

    def call(self, inputs):
        steps = INPUT_SCALINGS[self.input_scaling]
        dtype = self.compute_dtype
        pixels = keras.ops.cast(inputs, dtype)
        if self.grayscale == "luminance":
            # A weighted sum, not a matmul: GPUs may run float32 matmuls in TF32,
            # which keeps 10 bits of the mantissa.
            red, green, blue = (
                pixels[..., channel : channel + 1] for channel in range(3)
            )
            weight_r, weight_g, weight_b = (
                keras.ops.cast(weight, dtype) for weight in BT601_LUMINANCE
            )
            luminance = red * weight_r + green * weight_g + blue * weight_b
            pixels = keras.ops.concatenate([luminance] * 3, axis=-1)
        if steps.bgr:
            pixels = keras.ops.flip(pixels, axis=-1)
        if any(steps.subtract):
            pixels = pixels - keras.ops.convert_to_tensor(steps.subtract, dtype)
        # Multiply, then add, in that order: as keras.layers.Rescaling does, so that
        # minus_one_to_one gives the very numbers the models saved before had.
        scale = keras.ops.cast(steps.scale, dtype)
        return pixels * scale + keras.ops.cast(steps.offset, dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "input_scaling": self.input_scaling,
            "grayscale": self.grayscale,
        }
