"""The export: a SavedModel and a LiteRT file that give the Keras model's probabilities.

Parity is measured, for IRv2's own preprocessing and for ``caffe_then_div_255``, on
demo images (28x28 greyscale PNGs, so the bytes signature must make RGB of grey and
upscale to 75 px) and on non-square colour JPEGs and PNGs carrying each EXIF
orientation 1-8 (the bytes signature must turn them upright and resize them, up or
down, as ``images.py`` does). The SavedModel is loaded in a fresh
process with TensorFlow alone: no ``irv2_pipeline`` on the path, none imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from irv2_pipeline.pipelines.export.nodes import build_saved_model, model_card
from tests.pipelines.finetune.conftest import CLASSES, load_parameters

from .conftest import METRICS, PLAN, demo_files, project_pixels
from .photos import oriented_photos

# Measured: 0 for the SavedModel, about 1e-7 for LiteRT, for either preprocessing.
TOLERANCE = 1e-5

# Serves the SavedModel with TensorFlow alone; argv: folder, image files, pixels.npy.
SERVE_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
folder, files, pixels = sys.argv[1], sys.argv[2:-1], np.load(sys.argv[-1])
loaded = tf.saved_model.load(folder)
data = tf.constant([open(f, "rb").read() for f in files])
by_bytes = loaded.signatures["serving_default"](image_bytes=data)
by_pixels = loaded.signatures["serve_pixels"](pixels=tf.constant(pixels))
fixed = loaded.signatures["serve_fixed_size_pixels"](pixels=tf.constant(pixels))
print(json.dumps({
    "signatures": sorted(loaded.signatures),
    "bytes": by_bytes["probabilities"].numpy().tolist(),
    "bytes_class": [c.decode() for c in by_bytes["class_name"].numpy()],
    "pixels": by_pixels["probabilities"].numpy().tolist(),
    "fixed": fixed["probabilities"].numpy().tolist(),
    "project_modules": sorted(m for m in sys.modules if m.startswith("irv2_pipeline")),
}))
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[list, np.ndarray]:
    photos = oriented_photos(tmp_path_factory.mktemp("photos"), demo_files(6))
    files = demo_files() + photos
    return files, project_pixels(files)


@pytest.fixture(scope="module")
def keras_probabilities(exported, images) -> np.ndarray:
    return np.asarray(exported.model.predict(images[1].astype("float32"), verbose=0))


@pytest.fixture(scope="module")
def served(exported, images, tmp_path_factory) -> dict:
    """The SavedModel's outputs, from a process that cannot import this project."""
    files, pixels = images
    work = tmp_path_factory.mktemp("serve")
    np.save(work / "pixels.npy", pixels)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SERVE_SCRIPT,
            str(exported.saved_model),
            *map(str, files),
            str(work / "pixels.npy"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def report(name: str, difference: float) -> None:
    sys.stdout.write(f"parity {name}: max abs diff {difference:.3g}\n")  # pytest -s


def test_saved_model_loads_without_the_project(served):
    assert served["project_modules"] == []
    assert {"serving_default", "serve_image_bytes", "serve_pixels"} <= set(
        served["signatures"]
    )


def test_saved_model_pixels_equal_keras(served, keras_probabilities):
    for signature in ("pixels", "fixed"):
        difference = np.abs(np.asarray(served[signature]) - keras_probabilities).max()
        report(f"SavedModel {signature}", difference)
        assert difference <= TOLERANCE


def test_saved_model_bytes_equal_keras_on_project_resize(served, keras_probabilities):
    """Decoding, turning upright and resizing in the graph gives what images.py gives."""
    difference = np.abs(np.asarray(served["bytes"]) - keras_probabilities).max()
    report("SavedModel bytes", difference)
    assert difference <= TOLERANCE
    expected = [CLASSES[i] for i in keras_probabilities.argmax(axis=1)]
    assert served["bytes_class"] == expected


def test_litert_equals_keras(exported, images, keras_probabilities):
    interpreter = tf.lite.Interpreter(model_path=str(exported.litert))
    runner = interpreter.get_signature_runner("serve_fixed_size_pixels")
    probabilities = np.concatenate(
        [runner(pixels=image[None])["probabilities"] for image in images[1]]
    )
    difference = np.abs(probabilities - keras_probabilities).max()
    report("LiteRT", difference)
    assert difference <= TOLERANCE


def test_labels_are_the_class_order(exported):
    assert exported.labels.read_text().splitlines() == CLASSES


def test_model_card(exported):
    card = json.loads(exported.card.read_text())
    assert card["input"]["size"] == [75, 75]
    assert "BILINEAR" in card["input"]["resize"]
    assert "EXIF orientation" in card["input"]["decoding"]
    said = {"minus_one_to_one": "[-1, 1]", "caffe_then_div_255": "ImageNet means"}
    assert said[exported.input_scaling] in card["input"]["preprocessing"]
    assert card["classes"] == CLASSES
    assert len(card["classes_sha256"]) == len(card["weights_sha256"]) == 64
    assert len(card["training_parameters_sha256"]) == 64
    assert card["test_metrics"] == METRICS
    assert card["source"] == PLAN["source"]
    assert set(card["versions"]) == {
        "tensorflow",
        "keras",
        "kedro",
        "pillow",
        "irv2_pipeline",
    }
    assert all(card["versions"].values())


def test_model_card_refuses_metrics_of_other_classes(exported):
    params = load_parameters("parameters", "smoke")
    with pytest.raises(ValueError, match="evaluation pipeline"):
        model_card(
            finetuned_model=exported.model,
            class_names=CLASSES,
            evaluation_metrics={**METRICS, "classes": CLASSES[::-1]},
            finetune_plan=PLAN,
            model=params["model"],
            images=params["images"],
            finetune=params["finetune"],
            export=params["export"],
        )


def test_export_refuses_a_model_of_another_size(exported):
    with pytest.raises(ValueError, match="--env"):
        build_saved_model(exported.model, CLASSES, {"image_size": 299})
