"""Every model finetune builds or saves preprocesses with ``finetune.input_scaling``
and the grayscale rule.

The saved classifier, the graphs the stages train, AdaBN and the run's start all use
the one preprocessing layer; a preprocessing other than the weights' card stops the
run before anything is read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from irv2_pipeline.backbone import (
    CARD_SUFFIX,
    PREPROCESS_LAYER,
    adapt_batchnorm,
    batchnorm_layers,
    preprocessing_layer,
)
from irv2_pipeline.classifier import (
    HeadSpec,
    build_classifier,
    saved_grayscale,
    saved_input_scaling,
    training_model,
)
from irv2_pipeline.datasets.atomic_model import AtomicTensorFlowModelDataset
from irv2_pipeline.pipelines.finetune.nodes import train_classifier
from irv2_pipeline.sources import SourceError
from tests.conftest import planned_source

from .conftest import (
    CLASSES,
    IMAGE_SIZE,
    load_parameters,
    mini_classifier,
    mini_irv2,
)

RADIMAGENET = "caffe_then_div_255"


def _pixels(count: int = 4) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")


def test_a_saved_caffe_then_div_255_classifier_reloads_and_predicts_the_same(
    tmp_path,
):
    classifier = mini_classifier(seed=2, input_scaling=RADIMAGENET)
    model_file = AtomicTensorFlowModelDataset(filepath=str(tmp_path / "model.keras"))
    model_file.save(classifier.model)
    loaded = model_file.load()

    pixels = _pixels()
    expected = classifier.model.predict(pixels, verbose=0)
    assert loaded.get_layer(PREPROCESS_LAYER).input_scaling == RADIMAGENET
    np.testing.assert_array_equal(loaded.predict(pixels, verbose=0), expected)
    # The same weights behind IRv2's own preprocessing predict otherwise: a reload
    # that lost the preprocessing would not pass the check above.
    default = mini_classifier(seed=2).model.predict(pixels, verbose=0)
    assert np.abs(default - expected).max() > 1e-3


def _luminance_classifier(seed: int = 2):
    return build_classifier(
        mini_irv2(seed=seed),
        CLASSES,
        HeadSpec(dropout=0.0),
        seed=seed,
        input_scaling=RADIMAGENET,
        grayscale="luminance",
    )


def test_a_saved_luminance_classifier_reloads_and_predicts_the_same(tmp_path):
    classifier = _luminance_classifier()
    assert classifier.grayscale == "luminance"
    model_file = AtomicTensorFlowModelDataset(filepath=str(tmp_path / "model.keras"))
    model_file.save(classifier.model)
    loaded = model_file.load()

    pixels = _pixels()
    expected = classifier.model.predict(pixels, verbose=0)
    assert (saved_input_scaling(loaded), saved_grayscale(loaded)) == (
        RADIMAGENET,
        "luminance",
    )
    np.testing.assert_array_equal(loaded.predict(pixels, verbose=0), expected)
    # The same weights fed the colour pixels as they are predict otherwise.
    colour = mini_classifier(seed=2, input_scaling=RADIMAGENET)
    assert saved_grayscale(colour.model) == "replicate"
    assert np.abs(colour.model.predict(pixels, verbose=0) - expected).max() > 1e-3


# Loads a model file as a fresh `kedro run` does: through the catalog's dataset only.
LOAD_SCRIPT = """
import sys
from irv2_pipeline.datasets.atomic_model import AtomicTensorFlowModelDataset
model = AtomicTensorFlowModelDataset(filepath=sys.argv[1]).load()
print(model.get_layer("irv2_preprocess").input_scaling)
"""


def test_a_fresh_process_loads_the_saved_preprocessing_through_the_catalog(tmp_path):
    path = tmp_path / "model.keras"
    AtomicTensorFlowModelDataset(filepath=str(path)).save(
        mini_classifier(input_scaling=RADIMAGENET).model
    )
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == RADIMAGENET


def test_a_model_saved_with_a_rescaling_layer_is_known_by_its_scale():
    pixels = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    for scale, offset, expected in (
        (1 / 127.5, -1.0, "minus_one_to_one"),
        (1 / 255, 0.0, "zero_to_one"),
    ):
        layer = keras.layers.Rescaling(scale, offset=offset, name=PREPROCESS_LAYER)
        old = keras.Model(pixels, layer(pixels))
        assert saved_input_scaling(old) == expected
        assert saved_grayscale(old) == "replicate"


@pytest.mark.parametrize("bn_policy", ["frozen", "train"])
@pytest.mark.parametrize("grayscale", ["replicate", "luminance"])
def test_the_graph_a_stage_trains_preprocesses_as_the_saved_model(bn_policy, grayscale):
    classifier = build_classifier(
        mini_irv2(seed=2),
        CLASSES,
        HeadSpec(dropout=0.0),
        seed=2,
        input_scaling="caffe",
        grayscale=grayscale,
    )
    pixels = _pixels()
    trained = training_model(classifier, bn_policy).predict(pixels, verbose=0)
    np.testing.assert_allclose(
        trained, classifier.model.predict(pixels, verbose=0), atol=1e-6
    )


@pytest.mark.parametrize("grayscale", ["replicate", "luminance"])
def test_adabn_estimates_the_statistics_of_the_preprocessing_it_is_given(grayscale):
    backbone = mini_irv2(seed=1)
    first_bn = batchnorm_layers(backbone)[0]
    pixels = _pixels(6)
    assert adapt_batchnorm(backbone, [pixels], "caffe", grayscale) == 6
    conv = keras.Model(backbone.input, first_bn.input)

    def means(input_scaling: str, rule: str) -> np.ndarray:
        scaled = preprocessing_layer(input_scaling, rule)(pixels)
        return conv.predict(scaled, verbose=0).astype(np.float64).mean(axis=(0, 1, 2))

    expected = means("caffe", grayscale)
    np.testing.assert_allclose(first_bn.moving_mean.numpy(), expected, rtol=1e-4)
    assert not np.allclose(means("minus_one_to_one", "replicate"), expected, rtol=1e-2)
    other = "replicate" if grayscale == "luminance" else "luminance"
    assert not np.allclose(means("caffe", other), expected, rtol=1e-2)


def test_training_stops_before_reading_anything_on_another_preprocessing(tmp_path):
    weights = tmp_path / "RadImageNet-IRV2_notop.h5"
    Path(f"{weights}{CARD_SUFFIX}").write_text(
        json.dumps({"preprocessing": RADIMAGENET})
    )
    params = load_parameters("parameters", "smoke")
    nothing = pd.DataFrame()
    # A plan made before the card said how the weights were trained.
    stale = planned_source(str(weights), "minus_one_to_one")
    with pytest.raises(SourceError) as error:
        train_classifier(
            image_manifest=nothing,
            augmented_manifest=nothing,
            finetune_plan={"stages": [], "source": stale},
            resized_manifest=nothing,
            resized_images=None,
            augmented_images=None,
            model=params["model"],
            images=params["images"],
            finetune=params["finetune"],
            plan_rules=params["feature_shift"]["plan_rules"],
        )
    assert "preprocessing = 'minus_one_to_one'" in str(error.value)
    assert f"trained with {RADIMAGENET!r}" in str(error.value)
    assert "kedro run --pipeline feature_shift" in str(error.value)
