"""The augmentation operations: how each one's values are drawn, and how Keras applies them.

The values of every operation are drawn first, from a numpy ``Generator`` seeded per
copy, and recorded; then each operation goes through the Keras 3 preprocessing layer
of its name with exactly those values. Keras layers draw their own random values in
``get_random_transformation``; here the transformation is built from the drawn values
instead and handed to the layer's ``transform_images``, so the recorded values are the
applied ones and a rerun gives the same pixels.

Keras is imported lazily: drawing happens in the Kedro process, pixels in workers.
Every operation but Gaussian noise runs the layer's ``transform_images`` as a compiled
TensorFlow graph (see :func:`augment`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Drawn floating-point values are rounded so the recorded ops stay readable; the
# rounded value is the one applied.
DECIMALS = 4
FILL_MODES = ("reflect", "wrap", "constant", "nearest")
INTERPOLATIONS = ("bilinear", "nearest")
MAX_SEED = 2**31 - 1  # Keras's stateless random ops take int32 seeds.


class PolicyError(ValueError):
    """An augmentation policy that cannot be used; the message names the parameter."""


@dataclass(frozen=True)
class Range:
    """A policy key ``key: [low, high]`` from which ``params`` are drawn uniformly.

    Attributes:
        key: The key in the policy, for example ``degrees``.
        params: The recorded values drawn from this range, each drawn on its own.
        bounds: The values Keras accepts.
        integer: Draw whole numbers (both ends included).
    """

    key: str
    params: tuple[str, ...]
    bounds: tuple[float, float]
    integer: bool = False


@dataclass(frozen=True)
class OpType:
    """One kind of operation: its ranges and the ``keras.layers`` class applying it."""

    name: str
    layer: str
    ranges: tuple[Range, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)


OP_TYPES = {
    op.name: op
    for op in (
        OpType("flip_horizontal", "RandomFlip"),
        OpType("flip_vertical", "RandomFlip"),
        # Degrees, counter-clockwise positive (as RandomRotation).
        OpType(
            "rotation", "RandomRotation", (Range("degrees", ("degrees",), (-180, 180)),)
        ),
        # RandomZoom's factor: negative zooms in (a crop), positive zooms out.
        OpType("zoom", "RandomZoom", (Range("factor", ("factor",), (-0.9, 1.0)),)),
        # Fractions of the width (x, positive: right) and height (y, positive: down).
        OpType(
            "translation",
            "RandomTranslation",
            (Range("fraction", ("x", "y"), (-1, 1)),),
        ),
        OpType("shear", "RandomShear", (Range("factor", ("x", "y"), (-1, 1)),)),
        # Added to every channel, as a fraction of the 0-255 range.
        OpType(
            "brightness", "RandomBrightness", (Range("delta", ("delta",), (-1, 1)),)
        ),
        # Multiplies the distance of each pixel from the image mean (1: unchanged).
        OpType("contrast", "RandomContrast", (Range("factor", ("factor",), (0, 2)),)),
        # Multiplies the HSV saturation (1: unchanged, 0: grey).
        OpType(
            "saturation", "RandomSaturation", (Range("factor", ("factor",), (0, 5)),)
        ),
        # Turns of the colour wheel added to the HSV hue.
        OpType("hue", "RandomHue", (Range("delta", ("delta",), (-0.5, 0.5)),)),
        # Blend towards greyscale (0: unchanged, 1: grey).
        OpType(
            "color_degeneration",
            "RandomColorDegeneration",
            (Range("amount", ("amount",), (0, 1)),),
        ),
        # 1: unchanged, above 1 sharper, below 1 smoother.
        OpType("sharpness", "RandomSharpness", (Range("factor", ("factor",), (0, 2)),)),
        OpType(
            "posterization",
            "RandomPosterization",
            (Range("bits", ("bits",), (1, 8), integer=True),),
        ),
        # Pixel values at or above the threshold (0-256) are inverted; 256: none.
        OpType(
            "solarization",
            "Solarization",
            (Range("threshold", ("threshold",), (0, 256)),),
        ),
        OpType("auto_contrast", "AutoContrast"),
        OpType("equalization", "Equalization"),
        OpType(
            "gaussian_blur",
            "RandomGaussianBlur",
            (Range("sigma", ("sigma",), (0.01, 10)),),
            {"kernel_size": 5},
        ),
        # Standard deviation in pixel units (0-255); the noise itself comes from a
        # drawn seed, recorded with it.
        OpType(
            "gaussian_noise", "GaussianNoise", (Range("stddev", ("stddev",), (0, 64)),)
        ),
    )
}

# RandAugment (Cubuk et al., 2019) over the operations of keras.layers.RandAugment.
# Each value is drawn with a strength uniform in [0, magnitude], scaled by its value at
# magnitude 1 here, with a random sign where the operation goes both ways.
RANDAUGMENT_STRENGTHS: dict[str, dict[str, tuple[float, float, bool]]] = {
    # param: (value at strength 0, change at strength 1, both signs)
    "shear": {"x": (0.0, 0.3, True), "y": (0.0, 0.3, True)},
    "translation": {"x": (0.0, 0.3, True), "y": (0.0, 0.3, True)},
    "rotation": {"degrees": (0.0, 30.0, True)},
    "brightness": {"delta": (0.0, 0.3, True)},
    "color_degeneration": {"amount": (0.0, 0.9, False)},
    "contrast": {"factor": (1.0, 0.9, True)},
    "sharpness": {"factor": (1.0, 0.9, True)},
    "posterization": {"bits": (8.0, -4.0, False)},
    "solarization": {"threshold": (256.0, -256.0, False)},
    "auto_contrast": {},
    "equalization": {},
}
RANDAUGMENT_SETTINGS = {"num_ops": 2, "magnitude": 0.5}


@dataclass(frozen=True)
class OpConfig:
    """One validated entry of a policy."""

    name: str
    probability: float
    ranges: dict[str, tuple[float, float]]
    settings: dict[str, Any]


def parse_ops(entries: Any, where: str) -> tuple[OpConfig, ...]:
    """Validates a policy's list of operations.

    Args:
        entries: The list from the parameters: ``{op, probability, <range>: [lo, hi],
            <setting>: value}`` per entry.
        where: The parameter's name, for error messages.

    Returns:
        The operations, in the order they are applied.

    Raises:
        PolicyError: An unknown operation, key, probability or range; the message
            names the entry.
    """
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise PolicyError(f"{where} must be a list of operations, got {entries!r}")
    return tuple(_parse_op(entry, f"{where}[{i}]") for i, entry in enumerate(entries))


def _parse_op(entry: Any, where: str) -> OpConfig:
    known = [f"{op.name} ({op.layer})" for op in OP_TYPES.values()]
    known.append("randaugment (the operations of RandAugment)")
    if not isinstance(entry, dict) or entry.get("op") not in {*OP_TYPES, "randaugment"}:
        name = entry.get("op") if isinstance(entry, dict) else entry
        raise PolicyError(
            f"{where}: unknown operation {name!r}; use one of {', '.join(known)}"
        )
    name = entry["op"]
    probability = entry.get("probability", 1.0)
    if not isinstance(probability, int | float) or not 0 <= probability <= 1:
        raise PolicyError(f"{where}.probability = {probability!r}: use 0 to 1")
    if name == "randaugment":
        ranges, settings = {}, _parse_randaugment(entry, where)
    else:
        op_type = OP_TYPES[name]
        ranges = {r.key: _parse_range(entry, r, where) for r in op_type.ranges}
        settings = {
            key: entry.get(key, default) for key, default in op_type.settings.items()
        }
        if name == "gaussian_blur":
            _check_kernel_size(settings["kernel_size"], where)
    unknown = set(entry) - {"op", "probability", *ranges, *settings}
    if unknown:
        raise PolicyError(
            f"{where} ({name}): unknown keys {sorted(unknown)}; it takes "
            f"{sorted(['probability', *ranges, *settings])}"
        )
    return OpConfig(name, float(probability), ranges, settings)


def _parse_range(entry: dict, spec: Range, where: str) -> tuple[float, float]:
    value = entry.get(spec.key)
    low_bound, high_bound = spec.bounds
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) for v in value)
        or not low_bound <= value[0] <= value[1] <= high_bound
    ):
        raise PolicyError(
            f"{where}.{spec.key} = {value!r}: give [low, high] with "
            f"{low_bound} <= low <= high <= {high_bound}"
        )
    return float(value[0]), float(value[1])


def _parse_randaugment(entry: dict, where: str) -> dict[str, Any]:
    settings = {
        key: entry.get(key, value) for key, value in RANDAUGMENT_SETTINGS.items()
    }
    if not isinstance(settings["num_ops"], int) or settings["num_ops"] < 1:
        raise PolicyError(f"{where}.num_ops = {settings['num_ops']!r}: use 1 or more")
    magnitude = settings["magnitude"]
    if not isinstance(magnitude, int | float) or not 0 <= magnitude <= 1:
        raise PolicyError(f"{where}.magnitude = {magnitude!r}: use 0 to 1")
    return settings


def _check_kernel_size(size: Any, where: str) -> None:
    if not isinstance(size, int) or size < 3 or size % 2 == 0:
        raise PolicyError(f"{where}.kernel_size = {size!r}: use an odd number >= 3")


def draw_ops(ops: tuple[OpConfig, ...], rng: np.random.Generator) -> list[dict]:
    """Draws which operations a copy gets and their values.

    Every entry draws its coin even when its probability is 0 or 1, so one entry's
    probability does not change the draws of the others.

    Args:
        ops: The policy.
        rng: The copy's own generator.

    Returns:
        The operations to apply, in order: ``[{"op": name, "params": {...}}, ...]``.
    """
    drawn = []
    for op in ops:
        applied = rng.random() < op.probability
        if not applied:
            continue
        if op.name == "randaugment":
            drawn.extend(_draw_randaugment(op.settings, rng))
        else:
            drawn.append({"op": op.name, "params": _draw_params(op, rng)})
    return drawn


def _draw_params(op: OpConfig, rng: np.random.Generator) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for spec in OP_TYPES[op.name].ranges:
        low, high = op.ranges[spec.key]
        for param in spec.params:
            if spec.integer:
                params[param] = int(rng.integers(math.ceil(low), math.floor(high) + 1))
            else:
                params[param] = round(float(rng.uniform(low, high)), DECIMALS)
    params.update(op.settings)
    if op.name == "gaussian_noise":
        params["seed"] = int(rng.integers(0, MAX_SEED))
    return params


def _draw_randaugment(settings: dict, rng: np.random.Generator) -> list[dict]:
    names = list(RANDAUGMENT_STRENGTHS)
    drawn = []
    for _ in range(settings["num_ops"]):
        name = names[int(rng.integers(len(names)))]
        params: dict[str, Any] = {}
        for param, (start, change, both_signs) in RANDAUGMENT_STRENGTHS[name].items():
            strength = rng.uniform(0.0, settings["magnitude"])
            sign = -1.0 if both_signs and rng.random() < 0.5 else 1.0
            value = start + sign * strength * change
            spec = next(r for r in OP_TYPES[name].ranges if param in r.params)
            params[param] = (
                round(value) if spec.integer else round(float(value), DECIMALS)
            )
        drawn.append({"op": name, "params": params})
    return drawn


@dataclass(frozen=True)
class Geometry:
    """How geometric operations fill and sample (Keras's own options)."""

    fill_mode: str = "reflect"
    interpolation: str = "bilinear"


def augment(pixels: np.ndarray, ops: list[dict], geometry: Geometry) -> np.ndarray:
    """Applies recorded operations to one image, through Keras preprocessing layers.

    Each layer's ``transform_images`` runs as a TensorFlow graph, compiled once per
    layer and process (as inside a ``tf.data`` pipeline): eager dispatch would cost
    more than the pixels themselves at small image sizes.

    Args:
        pixels: ``(height, width, 3)`` uint8 RGB.
        ops: Operations as drawn by :func:`draw_ops` (or read back from a manifest).
        geometry: Fill mode and interpolation of the geometric operations.

    Returns:
        The augmented image, ``(height, width, 3)`` uint8 (rounded, clipped).
    """
    images = pixels[None].astype(np.float32)
    for op in ops:
        name, params = op["op"], op["params"]
        if name == "gaussian_noise":
            images = _gaussian_noise(images, params)
            continue
        layer, transformation = _TRANSFORMATIONS[name](params, images.shape, geometry)
        images = _compiled(*layer)(images, transformation)
    return np.clip(np.rint(np.asarray(images)[0]), 0, 255).astype(np.uint8)


# A Keras layer class and its constructor arguments (hashable, to cache it).
LayerSpec = tuple[str, tuple[tuple[str, Any], ...]]


def _spec(class_name: str, **config: Any) -> LayerSpec:
    return class_name, tuple(sorted(config.items()))


@functools.cache
def _compiled(class_name: str, config: tuple[tuple[str, Any], ...]) -> Callable:
    """The layer's ``transform_images`` as a graph, one per layer spec and process."""
    import keras  # noqa: PLC0415 - heavy; only renderers need it
    import tensorflow as tf  # noqa: PLC0415

    layer = getattr(keras.layers, class_name)(**dict(config))
    # The graph is TensorFlow's whatever the Keras backend, as in a tf.data pipeline.
    layer.backend.set_backend("tensorflow")
    return tf.function(layer.transform_images, reduce_retracing=True)


def _per_image(shape: tuple[int, ...], value: float, dims: tuple[int, ...] = ()):
    return np.full((shape[0], *dims), value, dtype=np.float32)


def _geometric(class_name: str, geometry: Geometry, **config: Any) -> LayerSpec:
    return _spec(
        class_name,
        fill_mode=geometry.fill_mode,
        interpolation=geometry.interpolation,
        **config,
    )


def _flip(mode: str) -> Callable:
    def transformation(params: dict, shape: tuple, geometry: Geometry):
        flips = np.ones((shape[0], 1, 1, 1), dtype=bool)
        return _spec("RandomFlip", mode=mode), {"flips": flips}

    return transformation


def _rotation(params: dict, shape: tuple, geometry: Geometry):
    # RandomRotation's matrix for this angle about the image centre: what its
    # get_random_transformation builds from a drawn angle (the helper is private).
    height, width = shape[1:3]
    angle = math.radians(params["degrees"])
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = 0.5 * (width - 1), 0.5 * (height - 1)
    matrix = [
        cos,
        -sin,
        cx - cx * cos + cy * sin,
        sin,
        cos,
        cy - cx * sin - cy * cos,
        0.0,
        0.0,
    ]
    rows = np.tile(np.array([matrix], dtype=np.float32), (shape[0], 1))
    return _geometric("RandomRotation", geometry, factor=0.0), {"rotation_matrix": rows}


def _zoom(params: dict, shape: tuple, geometry: Geometry):
    zoom = _per_image(shape, 1.0 + params["factor"], (1,))
    layer = _geometric("RandomZoom", geometry, height_factor=0.0)
    return layer, {"height_zoom": zoom, "width_zoom": zoom}


def _translation(params: dict, shape: tuple, geometry: Geometry):
    height, width = shape[1:3]
    pixels = np.array([[params["x"] * width, params["y"] * height]], dtype=np.float32)
    layer = _geometric(
        "RandomTranslation", geometry, height_factor=0.0, width_factor=0.0
    )
    return layer, {"translations": np.repeat(pixels, shape[0], axis=0)}


def _shear(params: dict, shape: tuple, geometry: Geometry):
    factors = np.array([[params["x"], params["y"]]], dtype=np.float32)
    return _geometric("RandomShear", geometry), {
        "shear_factor": np.repeat(factors, shape[0], axis=0)
    }


def _brightness(params: dict, shape: tuple, geometry: Geometry):
    delta = _per_image(shape, params["delta"] * 255.0, (1, 1, 1))
    layer = _spec("RandomBrightness", factor=0.0, value_range=(0, 255))
    return layer, {"rgb_delta": delta}


def _contrast(params: dict, shape: tuple, geometry: Geometry):
    factor = _per_image(shape, params["factor"], (1, 1, 1))
    layer = _spec("RandomContrast", factor=0.0, value_range=(0, 255))
    return layer, {"contrast_factor": factor}


def _saturation(params: dict, shape: tuple, geometry: Geometry):
    # The layer clips the HSV saturation to its value range, and saturation is in
    # [0, 1] whatever the pixel scale: (0, 1) keeps it a valid saturation (with
    # (0, 255), strong factors give negative pixels).
    layer = _spec("RandomSaturation", factor=0.5, value_range=(0, 1))
    return layer, {"factor": _per_image(shape, params["factor"])}


def _hue(params: dict, shape: tuple, geometry: Geometry):
    layer = _spec("RandomHue", factor=0.0, value_range=(0, 255))
    return layer, {"factor": _per_image(shape, params["delta"])}


def _color_degeneration(params: dict, shape: tuple, geometry: Geometry):
    layer = _spec("RandomColorDegeneration", factor=0.0, value_range=(0, 255))
    return layer, {"factor": _per_image(shape, params["amount"], (1, 1, 1))}


def _sharpness(params: dict, shape: tuple, geometry: Geometry):
    # The layer's own factor is half the sharpening factor (0.5: unchanged).
    layer = _spec("RandomSharpness", factor=0.0, value_range=(0, 255))
    return layer, {"factor": _per_image(shape, params["factor"] / 2.0)}


def _posterization(params: dict, shape: tuple, geometry: Geometry):
    layer = _spec("RandomPosterization", factor=8, value_range=(0, 255))
    shift = np.full((shape[0],), 8 - params["bits"], dtype=np.uint8)
    return layer, {"shift_factor": shift}


def _solarization(params: dict, shape: tuple, geometry: Geometry):
    layer = _spec("Solarization", value_range=(0, 255))
    return layer, {
        "additions": _per_image(shape, 0.0, (1, 1, 1)),
        "thresholds": _per_image(shape, params["threshold"], (1, 1, 1)),
    }


def _auto_contrast(params: dict, shape: tuple, geometry: Geometry):
    return _spec("AutoContrast", value_range=(0, 255)), None


def _equalization(params: dict, shape: tuple, geometry: Geometry):
    return _spec("Equalization", value_range=(0, 255)), None


def _gaussian_blur(params: dict, shape: tuple, geometry: Geometry):
    layer = _spec(
        "RandomGaussianBlur",
        factor=1.0,
        kernel_size=params["kernel_size"],
        value_range=(0, 255),
    )
    return layer, {
        "should_apply_blur": np.ones((shape[0],), dtype=bool),
        "blur_factor": np.full((2,), params["sigma"], dtype=np.float32),
    }


def _gaussian_noise(images, params: dict) -> np.ndarray:
    # What keras.layers.GaussianNoise adds, with the recorded seed (the layer itself
    # takes a standard deviation below 1 only, and a stateful seed).
    import keras  # noqa: PLC0415 - heavy; only renderers need it

    noise = keras.random.normal(
        tuple(images.shape), stddev=params["stddev"], seed=params["seed"]
    )
    noisy = np.asarray(images) + keras.ops.convert_to_numpy(noise)
    return np.clip(noisy, 0.0, 255.0).astype(np.float32)


_TRANSFORMATIONS: dict[str, Callable[[dict, tuple, Geometry], tuple]] = {
    "flip_horizontal": _flip("horizontal"),
    "flip_vertical": _flip("vertical"),
    "rotation": _rotation,
    "zoom": _zoom,
    "translation": _translation,
    "shear": _shear,
    "brightness": _brightness,
    "contrast": _contrast,
    "saturation": _saturation,
    "hue": _hue,
    "color_degeneration": _color_degeneration,
    "sharpness": _sharpness,
    "posterization": _posterization,
    "solarization": _solarization,
    "auto_contrast": _auto_contrast,
    "equalization": _equalization,
    "gaussian_blur": _gaussian_blur,
}
