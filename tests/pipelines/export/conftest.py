"""Fixtures of the export tests: a small classifier, saved and exported once per
preprocessing.

Exporting the real IRv2 to a SavedModel and LiteRT takes minutes on two CPU cores;
the graph around the model is the same for any model, so the tests export the
finetune tests' ``mini_irv2`` classifier at 75 px. Two of the four preprocessings
hold every operation the four use (a scale and an offset; a channel flip and a
subtraction besides), so the export is not made four times.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from irv2_pipeline.datasets import AtomicJSONDataset, AtomicTextDataset
from irv2_pipeline.datasets.atomic_model import AtomicTensorFlowModelDataset
from irv2_pipeline.datasets.exported_model import BytesFileDataset, SavedModelDataset
from irv2_pipeline.images import OpenPolicy, load_image, resize
from irv2_pipeline.pipelines.export.nodes import (
    build_saved_model,
    convert_to_litert,
    labels_text,
    model_card,
)
from tests.conftest import planned_source
from tests.pipelines.finetune.conftest import (
    CLASSES,
    DEMO_IMAGES,
    IMAGE_SIZE,
    load_parameters,
    mini_classifier,
)

METRICS = {
    "accuracy": 0.9,
    "balanced_accuracy": 0.88,
    "macro_f1": 0.87,
    "ece": 0.05,
    "ece_p_value": 0.5,
    "accuracy_ci95": [0.8, 0.97],
    "macro_f1_ci95": [0.76, 0.95],
    "n_test": 30,
    "classes": CLASSES,
}
# The plan the exported models were trained on: random weights, IRv2's scaling.
PLAN = {"stages": [], "source": planned_source()}


@dataclass(frozen=True)
class Export:
    """The exported files, and the model they came from as the catalog loads it."""

    input_scaling: str
    root: Path
    model: Any
    saved_model: Path
    litert: Path
    labels: Path
    card: Path


def demo_files(per_class: int = 3) -> list[Path]:
    """The first demo images of each class (28x28 greyscale PNGs)."""
    return [
        file
        for folder in sorted(DEMO_IMAGES.iterdir())
        for file in sorted(folder.glob("*.png"))[:per_class]
    ]


def project_pixels(files: list[Path]) -> np.ndarray:
    """The files as the project feeds them: ``images.load_image`` + ``images.resize``."""
    return np.stack(
        [resize(load_image(file, OpenPolicy()).pixels, IMAGE_SIZE) for file in files]
    )


@pytest.fixture(scope="module", params=["minus_one_to_one", "caffe_then_div_255"])
def exported(request, tmp_path_factory) -> Export:
    """A saved mini classifier exported by the pipeline's nodes and datasets."""
    root = tmp_path_factory.mktemp("export")
    model_file = AtomicTensorFlowModelDataset(filepath=str(root / "model.keras"))
    model_file.save(mini_classifier(seed=1, input_scaling=request.param).model)
    model = model_file.load()
    params = load_parameters("parameters", "smoke")
    assert params["model"]["image_size"] == IMAGE_SIZE

    saved_model = SavedModelDataset(path=str(root / "export" / "saved_model"))
    saved_model.save(build_saved_model(model, CLASSES, params["model"]))
    litert = BytesFileDataset(filepath=str(root / "export" / "model.tflite"))
    litert.save(convert_to_litert(saved_model.load(), params["export"]))
    labels = AtomicTextDataset(filepath=str(root / "export" / "labels.txt"))
    labels.save(labels_text(CLASSES))
    card = AtomicJSONDataset(filepath=str(root / "export" / "model_card.json"))
    card.save(
        model_card(
            finetuned_model=model,
            class_names=CLASSES,
            evaluation_metrics=METRICS,
            finetune_plan=PLAN,
            model=params["model"],
            images=params["images"],
            finetune=params["finetune"],
            export=params["export"],
        )
    )
    return Export(
        input_scaling=request.param,
        root=root / "export",
        model=model,
        saved_model=saved_model.load(),
        litert=root / "export" / "model.tflite",
        labels=root / "export" / "labels.txt",
        card=root / "export" / "model_card.json",
    )
