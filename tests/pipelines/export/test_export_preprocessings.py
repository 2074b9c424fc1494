"""The SavedModel gives the Keras model's probabilities for every preprocessing.

``test_export.py`` serves two preprocessings through every signature, LiteRT and a
process without this project; here every ``backbone.INPUT_SCALINGS`` entry, and the
``luminance`` grayscale rule, goes through the export nodes and the catalog's
datasets, and the SavedModel is read back in this process, on colour pixels (on grey
ones, ``luminance`` would change nothing). One backbone serves every case, so the
models differ in their preprocessing only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from irv2_pipeline.backbone import INPUT_SCALINGS
from irv2_pipeline.classifier import HeadSpec, build_classifier
from irv2_pipeline.datasets.atomic_model import AtomicTensorFlowModelDataset
from irv2_pipeline.datasets.exported_model import SavedModelDataset
from irv2_pipeline.pipelines.export.nodes import build_saved_model, model_card
from tests.pipelines.finetune.conftest import (
    CLASSES,
    IMAGE_SIZE,
    load_parameters,
    mini_irv2,
)

from .conftest import METRICS, PLAN
from .test_export import TOLERANCE, report

CASES = [(scaling, "replicate") for scaling in INPUT_SCALINGS] + [
    ("minus_one_to_one", "luminance"),
    ("caffe_then_div_255", "luminance"),
]


def _case_id(case: tuple[str, str]) -> str:
    return "-".join(case)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    rng = np.random.default_rng(11)
    return rng.integers(0, 256, (4, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def results(pixels, tmp_path_factory) -> dict[tuple[str, str], dict[str, Any]]:
    """Per case: the saved model as the catalog loads it, its Keras probabilities and
    those of the SavedModel's two pixel signatures."""
    params = load_parameters("parameters", "smoke")
    backbone = mini_irv2(seed=1)
    by_case = {}
    for input_scaling, grayscale in CASES:
        root = tmp_path_factory.mktemp(f"{input_scaling}-{grayscale}")
        classifier = build_classifier(
            backbone,
            CLASSES,
            HeadSpec(dropout=0.0),
            seed=1,
            input_scaling=input_scaling,
            grayscale=grayscale,
        )
        model_file = AtomicTensorFlowModelDataset(filepath=str(root / "model.keras"))
        model_file.save(classifier.model)
        model = model_file.load()
        saved_model = SavedModelDataset(path=str(root / "saved_model"))
        saved_model.save(build_saved_model(model, CLASSES, params["model"]))
        signatures = tf.saved_model.load(str(saved_model.load())).signatures
        served = {
            name: signatures[name](pixels=tf.constant(pixels))["probabilities"].numpy()
            for name in ("serve_pixels", "serve_fixed_size_pixels")
        }
        by_case[input_scaling, grayscale] = {
            "model": model,
            "keras": np.asarray(model.predict(pixels.astype("float32"), verbose=0)),
            **served,
        }
    return by_case


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_the_saved_model_equals_keras(results, case):
    for signature in ("serve_pixels", "serve_fixed_size_pixels"):
        difference = np.abs(results[case][signature] - results[case]["keras"]).max()
        report(f"SavedModel {_case_id(case)} {signature}", difference)
        assert difference <= TOLERANCE


def test_another_preprocessing_would_exceed_the_tolerance(results):
    """The parity above would fail for a SavedModel that preprocessed otherwise."""
    for case in CASES:
        for other in CASES:
            if other != case:
                served = results[other]["serve_fixed_size_pixels"]
                assert np.abs(served - results[case]["keras"]).max() > 100 * TOLERANCE


def test_the_model_card_names_the_grayscale_rule_only_when_it_changes_pixels(results):
    params = load_parameters("parameters", "smoke")

    def preprocessing(case: tuple[str, str]) -> str:
        card = model_card(
            finetuned_model=results[case]["model"],
            class_names=CLASSES,
            evaluation_metrics=METRICS,
            finetune_plan=PLAN,
            model=params["model"],
            images=params["images"],
            finetune=params["finetune"],
            export=params["export"],
        )
        return card["input"]["preprocessing"]

    grey = preprocessing(("caffe_then_div_255", "luminance"))
    assert "grayscale: luminance" in grey
    assert "0.299 R + 0.587 G + 0.114 B" in grey
    assert "ImageNet means" in grey
    colour = preprocessing(("caffe_then_div_255", "replicate"))
    assert "grayscale" not in colour
    assert "ImageNet means" in colour
