"""The moments collected inside the graph equal NumPy's over the same feature maps,
of the pixels the model's preprocessing makes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from irv2_pipeline.backbone import CARD_SUFFIX, preprocessing_layer, unit_order
from irv2_pipeline.images import OpenPolicy, load_image, resize
from irv2_pipeline.pipelines.feature_shift.moments import (
    build_probe,
    is_grayscale,
    run_pass,
    unit_output_layer,
)
from irv2_pipeline.pipelines.feature_shift.nodes import measure_backbone
from tests.pipelines.finetune.conftest import mini_irv2

from .conftest import IMAGE_SIZE, UNITS


def test_in_graph_moments_match_numpy_moments_of_the_feature_maps(
    irv2_probe, demo_paths
):
    # 11 images: batches of 8 and 3, so the padded last batch is exercised.
    paths = (
        demo_paths["bag"][:4] + demo_paths["sneaker"][:4] + demo_paths["trouser"][:3]
    )
    measured = irv2_probe.run(paths)
    assert measured.n_images == 11
    # The demo's photos are grey (the padding of the last batch is not counted).
    assert measured.grayscale_images == 11

    pixels = np.stack(
        [resize(load_image(path, OpenPolicy()).pixels, IMAGE_SIZE) for path in paths]
    ).astype("float32")
    backbone = irv2_probe.backbone
    by_name = {layer.name: layer for layer in backbone.layers}
    names = [bn.name for bn in irv2_probe.layout.batch_norms]
    maps_model = keras.Model(
        backbone.input,
        [by_name[name].input for name in names]
        + [by_name[name].output for name in irv2_probe.layout.depth_layers],
    )
    maps = [
        keras.ops.convert_to_numpy(tensor)
        for tensor in maps_model(preprocessing_layer()(pixels))
    ]

    assert len(names) == 204
    for name, feature_map in zip(names, maps, strict=False):
        values = feature_map.astype(np.float64)
        np.testing.assert_allclose(
            measured.bn_means[name],
            values.mean(axis=(0, 1, 2)),
            rtol=1e-4,
            atol=1e-5 * (np.abs(values).max() + 1e-12),
            err_msg=name,
        )
        np.testing.assert_allclose(
            measured.bn_variances[name],
            values.var(axis=(0, 1, 2)),
            rtol=1e-3,
            atol=1e-6 * (values**2).max(),
            err_msg=name,
        )
    for depth, feature_map in zip(
        irv2_probe.layout.depths, maps[len(names) :], strict=True
    ):
        np.testing.assert_allclose(
            measured.features[depth],
            feature_map.mean(axis=(1, 2)),
            rtol=1e-4,
            atol=1e-5,
        )


def test_layers_and_units_follow_the_network_order(irv2_probe):
    layout = irv2_probe.layout
    assert [bn.depth for bn in layout.batch_norms] == list(range(204))
    units = list(dict.fromkeys(bn.unit for bn in layout.batch_norms))
    assert units == unit_order(irv2_probe.backbone) == UNITS
    assert layout.depth_layers == ("mixed_5b", "mixed_6a", "mixed_7a", "conv_7b_ac")
    # IRv2's BN layers have no scale: the moving statistics are all there is.
    assert all(
        not layer.scale
        for layer in irv2_probe.backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def test_an_unknown_depth_names_the_parameter(irv2_probe):
    with pytest.raises(ValueError, match=r"feature_shift\.depths: 'block99'"):
        unit_output_layer(irv2_probe.backbone, "block99")


def test_grey_images_are_told_from_colour_ones_even_after_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.integers(0, 256, (32, 32, 1), dtype=np.uint8), 3, axis=-1)
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=75)
    jpeg = np.asarray(Image.open(tmp_path / "grey.jpg").convert("RGB"))
    tinted = grey.copy()
    tinted[..., 0] = np.clip(tinted[..., 0].astype(int) + 12, 0, 255)
    colour = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    batch = np.stack([grey, jpeg, tinted, colour])
    assert is_grayscale(batch).tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    "preprocessing",
    [("caffe_then_div_255", "replicate"), ("minus_one_to_one", "luminance")],
)
def test_the_probe_measures_the_pixels_the_models_preprocessing_makes(preprocessing):
    backbone = mini_irv2(seed=4)
    probe, layout = build_probe(backbone, ["conv_7b"], *preprocessing)
    pixels = np.random.default_rng(5).integers(0, 256, (6, 75, 75, 3))
    measured = run_pass(
        probe,
        layout,
        [pixels.astype("float32")],
        batch_size=6,
        n_images=6,
        what="test",
        logger=logging.getLogger(__name__),
    )
    first = layout.batch_norms[0].name
    conv = keras.Model(backbone.input, backbone.get_layer(first).input)

    def first_bn_means(input_scaling: str, grayscale: str) -> np.ndarray:
        layer = preprocessing_layer(input_scaling, grayscale)
        scaled = layer(pixels.astype("float32"))
        return conv.predict(scaled, verbose=0).astype(np.float64).mean(axis=(0, 1, 2))

    expected = first_bn_means(*preprocessing)
    np.testing.assert_allclose(measured.bn_means[first], expected, rtol=1e-4, atol=1e-7)
    # Colour pixels: IRv2's own preprocessing of them, as they are, measures otherwise.
    default = first_bn_means("minus_one_to_one", "replicate")
    assert not np.allclose(default, expected, rtol=1e-2)


def test_measuring_stops_on_a_preprocessing_the_weights_were_not_trained_with(
    tmp_path,
):
    weights = tmp_path / "source.h5"
    Path(f"{weights}{CARD_SUFFIX}").write_text(json.dumps({"preprocessing": "caffe"}))
    with pytest.raises(ValueError, match="Set finetune.input_scaling: caffe"):
        measure_backbone(
            feature_shift_sample=pd.DataFrame(),
            raw_images=None,
            model={"weights": str(weights), "image_size": 75, "seed": 0},
            images={},
            feature_shift={"depths": ["conv_7b"]},
            finetune={"input_scaling": "minus_one_to_one"},
        )
