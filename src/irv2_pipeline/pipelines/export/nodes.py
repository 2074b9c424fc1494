"""Nodes of the `export` pipeline: the fine-tuned model for programs without this project.

The SavedModel's graph (decoding, resizing, the model) is built in ``serving.py``,
which imports TensorFlow; the nodes import it when they run, because every ``kedro``
command loads this module through the pipeline registry.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import irv2_pipeline
from irv2_pipeline.backbone import GRAYSCALE_RULES, INPUT_SCALINGS
from irv2_pipeline.hints import KerasModel
from irv2_pipeline.keys import weights_digest
from irv2_pipeline.sources import planned_source

# Parameters that say where files go, not how the model trains: not in the hash.
_LOCATION_PARAMETERS = ("checkpoint_dir", "tensorboard_dir")
# Pillow: training resized with it, and the graph reproduces its version's resize.
_PACKAGES = ("tensorflow", "keras", "kedro", "pillow")


def model_input_size(model: KerasModel, class_names: list[str], image_size: int) -> int:
    """The side of the model's square input, checked against the run's parameters.

    Args:
        model: The fine-tuned classifier.
        class_names: Its output order.
        image_size: ``model.image_size`` of this run's configuration.

    Returns:
        The input side in pixels.

    Raises:
        ValueError: If the model's input is not ``image_size`` square RGB (the model
            was trained in another configuration environment) or its outputs are
            not one per class.
    """
    _, height, width, channels = model.input_shape
    if (height, width, channels) != (image_size, image_size, 3):
        raise ValueError(
            f"The model takes {height}x{width}x{channels} images but model.image_size "
            f"is {image_size}: export with the --env the model was trained with."
        )
    outputs = model.output_shape[-1]
    if outputs != len(class_names):
        raise ValueError(
            f"The model has {outputs} outputs but class_names lists "
            f"{len(class_names)} classes: rerun the finetune pipeline."
        )
    return image_size


def build_saved_model(
    finetuned_model: KerasModel, class_names: list[str], model: dict[str, Any]
) -> Any:
    """The SavedModel to write: bytes or pixels in, probabilities in class order out.

    Args:
        finetuned_model: Takes float ``[0, 255]`` RGB, gives softmax probabilities.
        class_names: The model's output order.
        model: The shared ``model`` parameters (``image_size``).

    Returns:
        A ``keras.export.ExportArchive``, written by ``SavedModelDataset``. Its
        signatures are described in ``serving.serving_archive``.
    """
    from . import serving  # noqa: PLC0415 - see the module docstring

    size = model_input_size(finetuned_model, class_names, int(model["image_size"]))
    return serving.serving_archive(finetuned_model, class_names, size)


def convert_to_litert(export_saved_model: Path, export: dict[str, Any]) -> bytes:
    """Converts the SavedModel's fixed-size pixel signature to a LiteRT file.

    Args:
        export_saved_model: The SavedModel folder written by :func:`build_saved_model`.
        export: The ``export`` parameters (``litert_quantize``).

    Returns:
        The ``.tflite`` flatbuffer: uint8 RGB of the model's side in, probabilities
        out.
    """
    from . import serving  # noqa: PLC0415 - see the module docstring

    return serving.litert_flatbuffer(
        str(export_saved_model), optimize=bool(export.get("litert_quantize", False))
    )


def preprocessing_text(input_scaling: str, grayscale: str) -> str:
    """The model card's account of the model's first layer.

    Args:
        input_scaling: A key of ``backbone.INPUT_SCALINGS``.
        grayscale: A key of ``backbone.GRAYSCALE_RULES``; only a rule other than
            ``replicate`` is told, since that one changes nothing.

    Returns:
        What the layer computes from float ``[0, 255]`` RGB.
    """
    scaling = INPUT_SCALINGS[input_scaling].description
    if grayscale == "replicate":
        return (
            f"float [0, 255] RGB into the model, whose first layer maps it to {scaling}"
        )
    return (
        "float [0, 255] RGB into the model, whose first layer makes it grey "
        f"(grayscale: {grayscale}: {GRAYSCALE_RULES[grayscale]}), then maps it to "
        f"{scaling}"
    )


def labels_text(class_names: list[str]) -> str:
    """``labels.txt``: one class a line, in the model's output order.

    Args:
        class_names: The model's output order.

    Returns:
        The file's text, ending with a newline.
    """
    return "".join(f"{name}\n" for name in class_names)


def parameters_digest(parameters: dict[str, Any]) -> str:
    """The SHA-256 of parameters as canonical JSON (sorted keys)."""
    text = json.dumps(parameters, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def package_versions() -> dict[str, str | None]:
    """Versions of TensorFlow, Keras, Kedro, Pillow, this project (None: not installed)."""
    versions: dict[str, str | None] = {}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    versions["irv2_pipeline"] = irv2_pipeline.__version__
    return versions


def model_card(  # noqa: PLR0913 - one input per fact on the card
    *,
    finetuned_model: KerasModel,
    class_names: list[str],
    evaluation_metrics: dict[str, Any],
    finetune_plan: dict[str, Any],
    model: dict[str, Any],
    images: dict[str, Any],
    finetune: dict[str, Any],
    export: dict[str, Any],
) -> dict[str, Any]:
    """``model_card.json``: what a program needs to feed the export, and how good it is.

    Args:
        finetuned_model: The fine-tuned classifier.
        class_names: Its output order.
        evaluation_metrics: The test metrics and their 95% intervals.
        finetune_plan: The plan the model was trained on (its ``source``: the
            pretrained weights it started from, whose terms it keeps).
        model: The shared ``model`` parameters.
        images: The shared ``images`` parameters.
        finetune: The ``finetune`` parameters.
        export: The ``export`` parameters.

    Returns:
        The card: input, resize and preprocessing, the source it was fine-tuned
        from, classes and their hash, the export's signatures and files, hashes of
        the weights and of the training parameters, the test metrics as
        ``evaluation_metrics`` has them, versions.

    Raises:
        ValueError: If the metrics were computed for other classes.
    """
    # Imported here, not at the top: see the module docstring.
    from irv2_pipeline.classifier import (  # noqa: PLC0415
        saved_grayscale,
        saved_input_scaling,
    )

    size = model_input_size(finetuned_model, class_names, int(model["image_size"]))
    evaluated = evaluation_metrics.get("classes")
    if evaluated is not None and list(evaluated) != list(class_names):
        raise ValueError(
            f"evaluation_metrics are for the classes {evaluated}, the model's are "
            f"{class_names}: rerun the evaluation pipeline."
        )
    training = {
        "finetune": {
            k: v for k, v in finetune.items() if k not in _LOCATION_PARAMETERS
        },
        "model": model,
        "source": planned_source(finetune_plan).as_dict(),
        "images": images,
    }
    labels = labels_text(class_names)
    return {
        "input": {
            "size": [size, size],
            "channels": "RGB",
            "resize": (
                f"to {size}x{size} (the aspect ratio is not kept, nothing is "
                "cropped), as Pillow 13's Image.resize with Resampling.BILINEAR and "
                "no reducing_gap: two separable passes of a triangle filter whose "
                "support is widened by the downscale factor (antialiasing), with "
                "Pillow's 22-bit fixed-point coefficients; each pass rounds half "
                "up and clips to uint8; the width pass first unless the height "
                "shrinks by more than twice as many pixels as the width; a side "
                f"already {size} px is not resampled. The bytes and pixels "
                "signatures do this in the graph, equal to Pillow bit for bit; "
                "callers of the LiteRT file or serve_fixed_size_pixels resize "
                "themselves"
            ),
            "preprocessing": preprocessing_text(
                saved_input_scaling(finetuned_model), saved_grayscale(finetuned_model)
            ),
            "decoding": (
                "JPEG (accurate integer DCT), PNG, BMP, GIF (first frame); grey "
                "becomes RGB, alpha is dropped; the EXIF orientation of a JPEG "
                "(APP1 Exif) or PNG (eXIf) is applied as Pillow's exif_transpose; "
                "an orientation given only in XMP or in a PNG 'Raw profile type "
                "exif' text chunk is not (images.py applies those too): turn such "
                "images upright and use serve_pixels"
            ),
        },
        "signatures": {
            "serve_image_bytes": "string[batch] encoded images -> probabilities, "
            "class_name (also serving_default)",
            "serve_pixels": "uint8[batch, height, width, 3], any size -> "
            "probabilities, class_name",
            "serve_fixed_size_pixels": f"uint8[batch, {size}, {size}, 3] -> "
            "probabilities (the LiteRT file's signature)",
        },
        "files": {
            "saved_model": "saved_model/",
            "litert": "model.tflite",
            "labels": "labels.txt",
        },
        # Pretrained weights keep their own terms: the card says which ones.
        "source": planned_source(finetune_plan).as_dict(),
        "litert_quantized": bool(export.get("litert_quantize", False)),
        "classes": list(class_names),
        "classes_sha256": hashlib.sha256(labels.encode()).hexdigest(),
        "classes_sha256_of": "labels.txt (one class a line, UTF-8)",
        "weights_sha256": weights_digest(finetuned_model),
        "training_parameters_sha256": parameters_digest(training),
        "training_parameters_hashed": (
            "finetune (less checkpoint_dir, tensorboard_dir), model, the plan's "
            "source, images of the export run's configuration: equal to training's "
            "if unchanged since"
        ),
        "test_metrics": evaluation_metrics,
        "versions": package_versions(),
    }
