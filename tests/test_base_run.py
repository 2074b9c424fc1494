"""The real job as configured: `kedro run` with conf/base, every path but the download.

conf/base is what a user with a GPU runs: 299 px, its batch sizes, ``mixed_precision:
auto`` and ``jit_compile: auto`` (resolved here to what a CPU gets: float32, no XLA),
ImageNet weights. The weights come from a local file this test writes, random values
in the layout of Keras's own ``..._notop.h5`` (``model.weights`` takes a path for
air-gapped machines), so loading them runs as it would with the real file.

It costs minutes at 299 px on 2 cores, so the images are few (``IMAGES_PER_CLASS``)
and ``OVERRIDES`` lowers only what would take too long: the epochs of the plan's
stages, its backbone stages to one, and the learning-rate range test to one seed of
a few steps.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import pandas as pd
import pytest

from irv2_pipeline.backbone import NOTOP_WEIGHTS_FILE
from tests.test_end_to_end import OUTPUTS

IMAGES_PER_CLASS = 6
OVERRIDES = {
    # conf/base: 5 head epochs (the L-BFGS head solves in one pass whatever they
    # are), 10 backbone epochs with 1 of warm-up.
    "feature_shift.plan.head.epochs": 1,
    "feature_shift.plan.backbone.epochs": 2,
    "feature_shift.plan.backbone.warmup_epochs": 1,
    # conf/base steps down [block8_1, block17_1, block35_1]: on these images the plan
    # trains from block8_1 and then mixed_7a, the same code twice.
    "feature_shift.plan.unfreeze_steps": "[block8_1]",
    # conf/base: seeds [0, 1, 2] of 100 steps: 300 training steps at 299 px.
    "finetune.lr_find.seeds": "[0]",
    "finetune.lr_find.steps": 4,
}


def write_notop_weights(path: Path) -> Path:
    """Random IRv2-without-top weights in the legacy HDF5 layout of Keras's file."""
    import keras  # noqa: PLC0415 - only this test needs it here
    from keras.src.legacy.saving import legacy_h5_format  # noqa: PLC0415

    # The weights' shapes do not depend on the input size: build it small.
    model = keras.applications.InceptionResNetV2(
        include_top=False, weights=None, input_shape=(75, 75, 3)
    )
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)
    return path


@pytest.mark.slow
@pytest.mark.base_run
def test_conf_base_runs_the_whole_dag_on_cpu(project_copy, run_kedro):
    images = project_copy / "data/01_raw/images"
    for folder in images.iterdir():
        for extra in sorted(folder.iterdir())[IMAGES_PER_CLASS:]:
            extra.unlink()
    weights = write_notop_weights(project_copy / "data/06_models" / NOTOP_WEIGHTS_FILE)
    params = {"model.weights": str(weights), **OVERRIDES}
    result = run_kedro(
        ["run", "--params", ",".join(f"{k}={v}" for k, v in params.items())],
        cwd=project_copy,
        timeout=2400,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-8000:]
    for relative in OUTPUTS:
        assert (project_copy / relative).is_file(), relative
    assert "random weights" not in log.lower(), "the weights file was loaded"
    assert "Dtype policy: float32" in log, "mixed_precision: auto on a CPU"
    history = pd.read_csv(project_copy / "data/07_model_output/training_history.csv")
    assert history["loss"].notna().all()
    metrics = json.loads(
        (project_copy / "data/08_reporting/evaluation_metrics.json").read_text()
    )
    assert metrics["n_test"] > 0
    with zipfile.ZipFile(project_copy / "data/06_models/finetuned_model.keras") as z:
        config = json.loads(z.read("config.json"))
    assert config["config"]["layers"][0]["config"]["batch_shape"] == [None, 299, 299, 3]
