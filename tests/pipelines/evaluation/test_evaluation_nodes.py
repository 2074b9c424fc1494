"""The nodes on small real images and a tiny model whose predictions are known."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import PixelRangeError
from irv2_pipeline.pipelines.evaluation.nodes import (
    EvaluationError,
    plot_confidently_wrong,
    plot_confusion_matrix,
    plot_reliability,
    plot_validation_curves,
    predict_test_split,
    score_predictions,
)

from .conftest import CLASSES, MISLABELLED, colour_classifier


@pytest.fixture
def predict(colour_images, model_params, image_params, evaluation_params):
    """``predict(model, **overrides)``: the node on the colour images."""
    folder, manifest = colour_images

    def run(model, manifest=manifest, classes=CLASSES, **evaluation_overrides):
        return predict_test_split(
            finetuned_model=model,
            class_names=classes,
            image_manifest=manifest,
            raw_images=folder,
            model=model_params,
            images=image_params,
            evaluation={**evaluation_params, **evaluation_overrides},
        )

    return run


def test_predictions_cover_exactly_the_test_split_in_manifest_order(
    predict, colour_model, colour_images
):
    _, manifest = colour_images
    predictions = predict(colour_model)
    test = manifest[manifest["split"] == "test"]
    assert predictions["path"].tolist() == test["path"].tolist()
    assert predictions["label"].tolist() == test["label"].tolist()
    assert list(predictions.columns[:4]) == ["path", "label", "predicted", "confidence"]
    assert [c for c in predictions.columns if c.startswith("prob_")] == [
        f"prob_{name}" for name in CLASSES
    ]


def test_predictions_are_the_models_and_sum_to_one(predict, colour_model):
    predictions = predict(colour_model)
    probabilities = predictions[[f"prob_{name}" for name in CLASSES]].to_numpy()
    assert probabilities.sum(axis=1) == pytest.approx(np.ones(len(predictions)))
    expected = [
        "green" if path == MISLABELLED else label
        for path, label in zip(predictions["path"], predictions["label"], strict=True)
    ]
    assert predictions["predicted"].tolist() == expected
    assert (predictions["confidence"] > 0.8).all()


def test_test_time_augmentation_adds_columns_and_keeps_the_plain_ones(
    predict, colour_model
):
    plain = predict(colour_model)
    with_tta = predict(colour_model, test_time_augmentation=True)
    assert with_tta[plain.columns].equals(plain)
    # Mean colour does not change under a flip: the averaged figures are the same.
    assert with_tta["tta_confidence"].to_numpy() == pytest.approx(
        plain["confidence"].to_numpy()
    )
    assert with_tta["tta_predicted"].tolist() == plain["predicted"].tolist()


def test_a_model_for_other_classes_or_sizes_is_refused(predict):
    with pytest.raises(EvaluationError, match="4 outputs but image_manifest has 3"):
        predict(colour_classifier(classes=4))
    with pytest.raises(EvaluationError, match="takes 40x40 px images"):
        predict(colour_classifier(image_size=40))


def test_a_model_trained_on_other_class_names_is_refused(predict, colour_model):
    with pytest.raises(EvaluationError, match="trained on the classes"):
        predict(colour_model, classes=["blue", "green", "orange"])


def test_outputs_that_are_not_probabilities_are_refused(predict):
    with pytest.raises(EvaluationError, match="not softmax probabilities"):
        predict(colour_classifier(activation="linear"))


def test_no_test_split_is_a_clear_error(predict, colour_model, colour_images):
    _, manifest = colour_images
    no_test = manifest.assign(split=manifest["split"].replace("test", "train"))
    with pytest.raises(EvaluationError, match=r"ingestion\.split\.test"):
        predict(colour_model, manifest=no_test)


def test_black_images_trip_the_pixel_range_check(predict, colour_model, colour_images):
    folder, manifest = colour_images
    for path in manifest.loc[manifest["split"] == "test", "path"]:
        Image.new("RGB", (24, 24), (1, 1, 1)).save(folder.path_of(path))
    with pytest.raises(PixelRangeError, match="1/255"):
        predict(colour_model)


def test_scores_and_plots_from_the_predictions(
    predict, colour_model, evaluation_params, upstream
):
    predictions = predict(colour_model)
    metrics, report = score_predictions(predictions, evaluation_params)
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert metrics["n_test"] == 6
    assert report.set_index("class").loc["red", "recall"] == pytest.approx(0.5)

    figures = [
        plot_confusion_matrix(predictions),
        plot_reliability(predictions, evaluation_params),
        plot_validation_curves(upstream["training_history"]),
    ]
    assert all(isinstance(figure, Figure) for figure in figures)
    confusion = figures[0]
    counts_axis = confusion.axes[0]
    texts = [text.get_text() for text in counts_axis.texts]
    # Rows blue, green, red: the red test image taken for green is off the diagonal.
    assert texts == ["2", "0", "0", "0", "2", "0", "0", "1", "1"]


def test_confidently_wrong_grid_shows_the_mislabelled_image(
    predict, colour_model, colour_images, image_params, evaluation_params
):
    folder, _ = colour_images
    predictions = predict(colour_model)
    figure = plot_confidently_wrong(
        predictions, folder, image_params, evaluation_params
    )
    shown = [axis for axis in figure.axes if axis.images]
    assert len(shown) == 1
    assert shown[0].get_title().startswith("red → green")
    pixels = shown[0].images[0].get_array()
    expected = folder.load(MISLABELLED, OpenPolicy.from_params(image_params)).pixels
    assert np.array_equal(np.asarray(pixels), expected)


def test_confidently_wrong_grid_says_none_when_all_are_right(
    predict, colour_model, colour_images, image_params, evaluation_params
):
    folder, _ = colour_images
    predictions = predict(colour_model)
    right = predictions[predictions["label"] == predictions["predicted"]]
    figure = plot_confidently_wrong(right, folder, image_params, evaluation_params)
    assert not any(axis.images for axis in figure.axes)
    assert "No test image is misclassified" in figure.axes[0].texts[0].get_text()
