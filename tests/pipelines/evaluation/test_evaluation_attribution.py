"""Where the model looks: occlusion masks, flips and their null of random squares,
Grad-CAM through a nested backbone."""

from __future__ import annotations

import math

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from irv2_pipeline.backbone import (
    INPUT_SCALINGS,
    load_irv2,
    preprocessed_zero,
    preprocessing_layer,
)
from irv2_pipeline.classifier import (
    HeadSpec,
    build_classifier,
    pooled_features_layer,
    split_saved,
)
from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.pipelines.evaluation.attribution import (
    OcclusionSpec,
    border_p_value,
    flip_table,
    grad_cam,
    occlude,
    occlusion_masks,
    random_squares,
)
from irv2_pipeline.pipelines.evaluation.nodes import occlude_test_split, plot_grad_cam
from irv2_pipeline.predict import pooled_layer_name, two_output_model

from .conftest import CLASSES, IMAGE_SIZE, colour_classifier


@pytest.mark.parametrize(("size", "fraction"), [(75, 0.1), (299, 0.14), (32, 0.14)])
def test_the_centre_square_masks_as_much_as_the_border_band(size, fraction):
    border, centre = occlusion_masks(size, fraction)
    band = round(fraction * size)
    assert border[:band].all() and border[:, -band:].all()
    assert not border[band:-band, band:-band].any()
    assert not (border & centre).any()
    # Equal areas, within one row of the square.
    side = int(np.sqrt(centre.sum()))
    assert abs(int(border.sum()) - int(centre.sum())) <= side
    rows = np.flatnonzero(centre.any(axis=1))
    assert abs(rows[0] - (size - 1 - rows[-1])) <= 1


OCCLUSION = {"border_fraction": 0.1, "fill": "mean", "random_patches": 16, "seed": 0}


def test_bad_occlusion_parameters_are_refused_by_name():
    with pytest.raises(ValueError, match="border_fraction = 0.2"):
        OcclusionSpec.from_params({**OCCLUSION, "border_fraction": 0.2})
    with pytest.raises(ValueError, match="fill = 'black'"):
        OcclusionSpec.from_params({**OCCLUSION, "fill": "black"})
    with pytest.raises(ValueError, match="random_patches = 0"):
        OcclusionSpec.from_params({**OCCLUSION, "random_patches": 0})


def test_random_squares_hide_the_centre_squares_pixels_at_distinct_seeded_places():
    border, centre = occlusion_masks(75, 0.1)
    squares = random_squares(75, int(border.sum()), 16, seed=3)
    assert squares.shape == (16, 75, 75)
    side = int(np.sqrt(centre.sum()))
    for square in squares:
        # One solid square of the centre square's size, inside the image.
        assert square.sum() == centre.sum()
        rows, columns = np.flatnonzero(square.any(1)), np.flatnonzero(square.any(0))
        assert len(rows) == len(columns) == side
        assert square[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1].all()
    assert len({square.tobytes() for square in squares}) == 16
    np.testing.assert_array_equal(squares, random_squares(75, int(border.sum()), 16, 3))
    assert not np.array_equal(squares, random_squares(75, int(border.sum()), 16, 4))
    # Places spread over the image: not all in one corner.
    tops = [np.flatnonzero(square.any(1))[0] for square in squares]
    assert min(tops) < (75 - side) / 2 < max(tops)


def test_random_squares_refuse_more_places_than_the_image_has():
    # A 19 px square in a 20 px image has 2 x 2 places.
    assert random_squares(20, 19**2, 4, seed=0).sum() == 4 * 19**2
    with pytest.raises(ValueError, match="4 places for a 19 px square.*= 5"):
        random_squares(20, 19**2, 5, seed=0)


def test_the_border_p_value_counts_random_places_doing_at_least_as_much():
    rates = np.array([0.1, 0.5, 0.6, 0.2])
    # Two of four do as much or more (a tie counts), the border counted in.
    assert border_p_value(0.5, rates) == 3 / 5
    assert border_p_value(0.7, rates) == 1 / 5
    assert border_p_value(0.0, rates) == 1.0
    assert np.isnan(border_p_value(float("nan"), rates))


def corner_or_centre_reader(batch: np.ndarray, reads: tuple[int, int]) -> np.ndarray:
    """A fake classifier: class 1 where the pixel at ``reads`` is bright, else 0."""
    return (batch[:, reads[0], reads[1], 0] > 200).astype(int)


def test_the_random_squares_null_singles_out_a_corner_mark_not_an_object():
    size, images = 40, 10
    rng = np.random.default_rng(0)
    batch = rng.uniform(0, 60, size=(images, size, size, 3))
    batch[:, 1:3, 1:3] = 255  # a bright mark in the corner, inside the 4 px band
    batch[:, 18:22, 18:22] = 255  # ... and a bright object in the middle
    labels = ["marked"] * images
    masks = occlusion_masks(size, 0.1)
    squares = random_squares(size, int(masks[0].sum()), 12, seed=1)

    def table(reads: tuple[int, int]) -> pd.Series:
        def predict(mask: np.ndarray) -> np.ndarray:
            return corner_or_centre_reader(occlude(batch, mask, "mean", ()), reads)

        flips = flip_table(
            labels,
            corner_or_centre_reader(batch, reads),
            ["marked", "plain"],
            border_predicted=predict(masks[0]),
            centre_predicted=predict(masks[1]),
            random_predicted=np.stack([predict(square) for square in squares]),
            masks=masks,
        )
        return flips.set_index("class").loc["marked"]

    corner = table((1, 1))
    assert corner["border_flip_rate"] == 1 and corner["centre_flip_rate"] == 0
    # Only the squares over the mark flip it: the border beats all the others.
    covering = int(squares[:, 1, 1].sum())
    assert covering < 12 / 2
    assert corner["border_p_value"] == (1 + covering) / 13
    assert corner["random_flip_rate_min"] == 0 and corner["random_patches"] == 12
    assert corner["random_flip_rate_median"] == 0
    # A model reading the middle: every square of the band's area hides it.
    centre = table((20, 20))
    assert centre["border_flip_rate"] == 0 and centre["random_flip_rate_min"] == 1
    assert centre["border_p_value"] == 1


def test_fills_are_the_images_mean_or_the_preprocessings_zero():
    rng = np.random.default_rng(0)
    batch = rng.uniform(0, 255, size=(2, 20, 20, 3)).astype(np.float32)
    border, centre = occlusion_masks(20, 0.1)
    by_mean = occlude(batch, border, "mean", preprocessed_zero("minus_one_to_one"))
    # The mean of what stays visible: nothing of the hidden pixels leaks into it.
    visible_mean = batch[:, ~border].mean(axis=1)
    np.testing.assert_allclose(by_mean[:, 0, 0], visible_mean, rtol=1e-5)
    np.testing.assert_array_equal(by_mean[:, ~border], batch[:, ~border])
    assert preprocessed_zero("minus_one_to_one") == (127.5, 127.5, 127.5)
    assert preprocessed_zero("caffe") == (123.68, 116.779, 103.939)
    for input_scaling in INPUT_SCALINGS:
        by_zero = occlude(batch, centre, "zero", preprocessed_zero(input_scaling))
        # The model's own preprocessing maps the fill to exactly 0.
        scaled = keras.ops.convert_to_numpy(preprocessing_layer(input_scaling)(by_zero))
        assert (scaled[:, centre] == 0).all(), input_scaling
        np.testing.assert_array_equal(by_zero[:, ~centre], batch[:, ~centre])


def test_flip_table_counts_each_mask_per_true_class():
    masks = occlusion_masks(20, 0.1)
    table = flip_table(
        ["a", "a", "a", "b", "b"],
        np.array([0, 0, 1, 1, 1]),
        ["a", "b", "c"],
        border_predicted=np.array([1, 0, 0, 1, 1]),
        centre_predicted=np.array([1, 1, 1, 1, 0]),
        random_predicted=np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 1, 1, 1]]),
        masks=masks,
    ).set_index("class")
    assert table.loc["a", ["n", "border_flips", "centre_flips"]].tolist() == [3, 2, 2]
    assert table.loc["a", ["border_only_flips", "centre_only_flips"]].tolist() == [1, 1]
    assert table.loc["b", ["border_flips", "centre_flips"]].tolist() == [0, 1]
    assert table.loc["b", "centre_flip_rate"] == 0.5
    assert table.loc["c", "n"] == 0 and np.isnan(table.loc["c", "border_flip_rate"])
    assert table["border_px"].iloc[0] == masks[0].sum()
    # Class a's three images: the random squares change 0, 2 and 1 of them; the
    # border 2, which one of the three places matches.
    assert table.loc["a", "random_patches"] == 3
    a = table.loc["a"]
    assert [a["random_flip_rate_min"], a["random_flip_rate_max"]] == [0, 2 / 3]
    assert a["random_flip_rate_median"] == 1 / 3
    assert a["border_p_value"] == 2 / 4
    assert np.isnan(table.loc["c", ["random_flip_rate_median", "border_p_value"]]).all()


def framed(frame: tuple[int, int, int], seed: int) -> np.ndarray:
    """A dark image whose only colour is a 3 px frame: the colour model reads it."""
    # Grey noise: the same in every channel, so the interior has no colour.
    noise = np.random.default_rng(seed).integers(0, 20, size=(IMAGE_SIZE, IMAGE_SIZE))
    pixels = np.repeat(noise[..., None], 3, axis=2)
    pixels[:3], pixels[-3:], pixels[:, :3], pixels[:, -3:] = (frame,) * 4
    return pixels.astype(np.uint8)


def test_occlusion_flips_what_a_frame_decides_and_not_the_centre(
    tmp_path, model_params, image_params, evaluation_params
):
    # The colour model sees the mean colour; on these images only the frame has one.
    folder = ImageFolder(tmp_path)
    rows = []
    for index, (label, colour) in enumerate(
        (("red", (220, 40, 40)), ("green", (40, 200, 40)), ("blue", (40, 40, 220)))
    ):
        (tmp_path / label).mkdir()
        for copy in range(2):
            path = f"{label}/{label}_{copy}.png"
            Image.fromarray(framed(colour, 10 * index + copy)).save(tmp_path / path)
            rows.append({"path": path, "label": label, "predicted": label})
    predictions = pd.DataFrame(rows).assign(confidence=0.9)
    for name in CLASSES:
        predictions[f"prob_{name}"] = (predictions["label"] == name).astype(float)
    occlusion = {**OCCLUSION, "fill": "zero"}
    evaluation = {**evaluation_params, "attribution": {"occlusion": occlusion}}
    model = colour_classifier()
    # The view test_predictions and the embeddings are predicted through: no other
    # graph of the model is traced.
    view = two_output_model(model, pooled_layer_name(model))
    calls = []
    predict_on_batch = view.predict_on_batch
    view.predict_on_batch = lambda rows: (
        calls.append(len(rows)) or predict_on_batch(rows)
    )
    table = occlude_test_split(
        finetuned_model=model,
        test_predictions=predictions,
        raw_images=folder,
        model={**model_params, "image_size": IMAGE_SIZE},
        images=image_params,
        evaluation=evaluation,
    )
    assert table["n"].tolist() == [2, 2, 2]
    # The 6 images under 18 masks in full batches of 4 (one padded call per mask
    # and test batch would be 36).
    batch = evaluation["batch_size"]
    assert calls == [batch] * math.ceil(6 * 18 / batch)
    # Grey over the frame leaves no colour (the first class, blue, wins the tie):
    # the red and green images flip; grey over the centre leaves the frame's colour.
    assert table.set_index("class")["border_flips"].to_dict() == {
        "blue": 0,
        "green": 2,
        "red": 2,
    }
    assert (table["centre_flips"] == 0).all()
    # A square of the band's area, anywhere, leaves most of the frame's colour: no
    # random place changes a prediction, and the border beats all 16.
    assert (table["random_flip_rate_max"] == 0).all()
    assert table.set_index("class")["border_p_value"].to_dict() == {
        "blue": 1.0,
        "green": 1 / 17,
        "red": 1 / 17,
    }


def test_grad_cam_finds_the_patch_that_decides_through_a_saved_nested_model(
    tmp_path,
):
    model = colour_classifier()
    keras.saving.save_model(model, tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    pixels = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    pixels[0, :8, :8, 0] = 255  # a red patch top left
    pixels[1, -10:, -10:, 2] = 255  # a blue patch bottom right
    targets = [CLASSES.index("red"), CLASSES.index("blue")]
    heatmaps = grad_cam(loaded, "conv_colour", pixels, targets, batch_size=2)
    assert heatmaps.shape == (2, IMAGE_SIZE, IMAGE_SIZE)
    assert heatmaps.min() >= 0 and np.isclose(heatmaps.max(), 1)
    for heatmap, patch in zip(
        heatmaps, (np.s_[:8, :8], np.s_[-10:, -10:]), strict=True
    ):
        inside = heatmap[patch].mean()
        outside = (heatmap.sum() - heatmap[patch].sum()) / (
            heatmap.size - heatmap[patch].size
        )
        assert inside > 2 * outside, (inside, outside)


def test_grad_cam_runs_through_irv2_nested_in_the_classifier():
    classifier = build_classifier(load_irv2(None, 75), CLASSES, HeadSpec(), seed=1)
    parts = split_saved(classifier.model)
    assert parts.backbone.name == "inception_resnet_v2"
    pixels = np.random.default_rng(0).uniform(0, 255, (1, 75, 75, 3))
    # The last layer (the backbone's output) and one inside the backbone.
    for layer in ("conv_7b_ac", "block35_10_ac"):
        heatmaps = grad_cam(classifier.model, layer, pixels, [2], batch_size=1)
        assert heatmaps.shape == (1, 75, 75) and np.isfinite(heatmaps).all()
    with pytest.raises(ValueError, match="grad_cam.layer = 'conv_8'"):
        grad_cam(classifier.model, "conv_8", pixels, [2], batch_size=1)


def test_a_model_not_built_as_the_classifier_is_refused():
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    plain = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))
    with pytest.raises(ValueError, match="not the classifier finetune builds"):
        split_saved(plain)


def test_the_pooled_features_are_the_head_input_of_either_pooling():
    both = build_classifier(
        load_irv2(None, 75), CLASSES, HeadSpec(pooling="avg_max"), seed=1
    )
    layer = both.model.get_layer(pooled_features_layer(both.model))
    assert layer.name == "avg_max_pool"
    assert layer.output.shape[-1] == both.head.input_shape[-1] == 2 * 1536
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    plain = keras.Model(inputs, keras.layers.GlobalMaxPooling2D()(inputs))
    assert pooled_features_layer(plain) is None


def test_the_grad_cam_plot_shows_the_mistakes_then_correct_images_per_class(
    colour_images, colour_model, model_params, image_params, evaluation_params
):
    folder, manifest = colour_images
    test = manifest[manifest["split"] == "test"]
    # The mislabelled red_4 (green pixels) is predicted green: the one mistake.
    predicted = np.where(test["path"] == "red/red_4.png", "green", test["label"])
    predictions = pd.DataFrame(
        {"path": test["path"], "label": test["label"], "predicted": predicted}
    ).assign(confidence=np.linspace(0.9, 0.6, len(test)))
    for name in CLASSES:
        predictions[f"prob_{name}"] = (predictions["predicted"] == name).astype(float)
    figure = plot_grad_cam(
        finetuned_model=colour_model,
        test_predictions=predictions,
        raw_images=folder,
        model=model_params,
        images=image_params,
        evaluation={
            **evaluation_params,
            "attribution": {
                "grad_cam": {
                    "layer": "conv_colour",
                    "max_wrong": 4,
                    "correct_per_class": 1,
                    "columns": 4,
                }
            },
        },
    )
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert titles[0].startswith("red → green")
    assert [title.split(" ")[0] for title in titles[1:]] == ["blue", "green", "red"]
    # Every shown image has its heatmap drawn over it.
    assert all(len(axis.images) == 2 for axis in figure.axes if axis.get_title())
