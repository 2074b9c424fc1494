"""Export parity: the SavedModel's and the LiteRT file's probabilities against Keras.

On a copy of the project (``tests/conftest.py``'s ``copy_project``):

1. ``kedro run --env smoke`` (the demo model: IRv2, random weights, 75 px), then
   ``kedro run --env smoke --pipeline export``.
2. Two sets of inputs: the test split's files as they are (28x28 greyscale PNGs), and
   each test image as a photo a camera writes (``tests/pipelines/export/photos.py``:
   non-square colour JPEG or PNG, stored turned, with EXIF orientation 1-8, up- and
   downscaled to 75 px).
3. Reference: the Keras model (``finetuned_model.keras``) on the pixels training
   sees, ``images.load_image`` then ``images.resize``; for the test files also
   evaluation's ``test_predictions.csv``.
4. The SavedModel in a process with TensorFlow alone (no ``irv2_pipeline``):
   ``serving_default`` on the encoded bytes (decoding, orientation, resize in the
   graph), ``serve_pixels`` on the upright pixels before the resize (resize in the
   graph). The LiteRT file on the resized pixels (it takes the model's side).

Usage::

    python bench/export_parity.py

It prints a table of the largest absolute probability differences and, as its last
line, one JSON object with the figures and the core count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scale import run_kedro  # noqa: E402

from tests.conftest import copy_project  # noqa: E402
from tests.pipelines.export.photos import oriented_photos  # noqa: E402

# Serves the SavedModel with TensorFlow alone; argv: folder, request.npz, out.json.
SERVE_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
folder, request, out = sys.argv[1:4]
loaded = tf.saved_model.load(folder)
files = np.load(request, allow_pickle=False)
paths = [str(p) for p in files["paths"]]
data = tf.constant([open(p, "rb").read() for p in paths])
by_bytes = loaded.signatures["serving_default"](image_bytes=data)["probabilities"]
by_pixels = [
    loaded.signatures["serve_pixels"](pixels=tf.constant(files[f"pixels_{i}"][None]))[
        "probabilities"
    ].numpy()[0].tolist()
    for i in range(len(paths))
]
json.dump({
    "bytes": by_bytes.numpy().tolist(),
    "pixels": by_pixels,
    "project_modules": sorted(m for m in sys.modules if m.startswith("irv2_pipeline")),
}, open(out, "w"))
"""


def served(saved_model: Path, files: list[Path], upright: list, work: Path) -> dict:
    """The SavedModel's probabilities, from a process that cannot import the project."""
    request, out = work / "request.npz", work / "served.json"
    np.savez(
        request,
        paths=np.array([str(f) for f in files]),
        **{f"pixels_{i}": pixels for i, pixels in enumerate(upright)},
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, str(saved_model), str(request), str(out)],
        cwd=work,
        env=env,
        check=True,
    )
    result = json.loads(out.read_text())
    if result["project_modules"]:
        raise RuntimeError(f"the server imported {result['project_modules']}")
    return result


def parity(project: Path, files: list[Path], work: Path) -> dict:
    """Largest absolute differences of each export from Keras on ``files``."""
    import tensorflow as tf  # noqa: PLC0415 - TensorFlow only where it is needed

    from irv2_pipeline.datasets.atomic_model import (  # noqa: PLC0415
        AtomicTensorFlowModelDataset,
    )
    from irv2_pipeline.images import OpenPolicy, load_image, resize  # noqa: PLC0415

    # As the catalog loads it: the dataset registers the model's preprocessing layer.
    model = AtomicTensorFlowModelDataset(
        filepath=str(project / "data/06_models/finetuned_model.keras")
    ).load()
    size = int(model.input_shape[1])
    upright = [load_image(file, OpenPolicy()).pixels for file in files]
    pixels = np.stack([resize(image, size) for image in upright])
    expected = np.asarray(model.predict(pixels.astype("float32"), verbose=0))
    export = project / "data/06_models/export"
    result = served(export / "saved_model", files, upright, work)
    interpreter = tf.lite.Interpreter(model_path=str(export / "model.tflite"))
    runner = interpreter.get_signature_runner("serve_fixed_size_pixels")
    litert = np.concatenate(
        [runner(pixels=image[None])["probabilities"] for image in pixels]
    )
    outputs = {
        "saved_model_bytes": np.asarray(result["bytes"]),
        "saved_model_pixels": np.asarray(result["pixels"]),
        "litert": litert,
    }
    figures = {
        "images": len(files),
        "shapes": sorted({f"{image.shape[0]}x{image.shape[1]}" for image in upright}),
    }
    for name, probs in outputs.items():
        figures[f"{name}_max_abs_diff"] = float(np.abs(probs - expected).max())
        figures[f"{name}_same_class"] = float(
            (probs.argmax(1) == expected.argmax(1)).mean()
        )
    return {"figures": figures, "keras": expected}


def main() -> None:
    """Smoke run, export, then parity on the test files and on them as photos."""
    with tempfile.TemporaryDirectory(prefix="bench_export_parity_") as tmp:
        workdir = Path(tmp)
        project = copy_project(workdir / "project")
        logs = workdir / "logs"
        logs.mkdir()
        print("kedro run --env smoke, then --pipeline export ...", flush=True)
        run_kedro(["run", "--env", "smoke"], project, logs / "smoke.log")
        run_kedro(
            ["run", "--env", "smoke", "--pipeline", "export"],
            project,
            logs / "export.log",
        )
        manifest = pd.read_csv(project / "data/02_intermediate/image_manifest.csv")
        test = manifest[manifest["split"] == "test"]
        raw = project / "data/01_raw/images"
        test_files = [raw / path for path in test["path"]]
        photos_folder = workdir / "photos"
        photos_folder.mkdir()
        photos = oriented_photos(photos_folder, test_files)
        as_is = parity(project, test_files, workdir)
        as_photos = parity(project, photos, workdir)
        stored = pd.read_csv(project / "data/07_model_output/test_predictions.csv")
        classes = json.loads((project / "data/06_models/class_names.json").read_text())
        evaluation = stored[[f"prob_{name}" for name in classes]].to_numpy()
        keras_vs_evaluation = float(np.abs(as_is["keras"] - evaluation).max())

    rows = {"test split files": as_is["figures"], "as photos": as_photos["figures"]}
    print(f"\n{'inputs':<18} {'n':>4} {'bytes':>10} {'pixels':>10} {'LiteRT':>10}")
    for name, row in rows.items():
        print(
            f"{name:<18} {row['images']:>4} "
            f"{row['saved_model_bytes_max_abs_diff']:>10.3g} "
            f"{row['saved_model_pixels_max_abs_diff']:>10.3g} "
            f"{row['litert_max_abs_diff']:>10.3g}"
        )
    print(
        "(largest absolute probability difference from the Keras model on images.py "
        f"pixels; Keras here vs evaluation's test_predictions: {keras_vs_evaluation:.3g})"
    )
    print(
        json.dumps(
            {
                "benchmark": "export_parity",
                "command": "python bench/export_parity.py",
                "test_split": as_is["figures"],
                "photos": as_photos["figures"],
                "keras_vs_test_predictions_max_abs_diff": keras_vs_evaluation,
                "cores": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
