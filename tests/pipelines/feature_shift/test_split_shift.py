"""Split shift: quiet for two random halves of one set, flagged for a darkened half."""

from __future__ import annotations

import numpy as np

from irv2_pipeline.pipelines.feature_shift.nodes import (
    BackboneMeasurements,
    SplitMeasurements,
    measure_split_shift,
)

from .conftest import feature_shift_params, load_pixels, write_images


def as_split(measured) -> SplitMeasurements:
    return SplitMeasurements(
        labels=np.zeros(measured.n_images, dtype=int),
        features=measured.features,
        bn_means=measured.bn_means,
        bn_variances=measured.bn_variances,
    )


def test_random_halves_agree_and_a_darkened_half_differs(
    irv2_probe, demo_paths, tmp_path
):
    paths = [path for label in sorted(demo_paths) for path in demo_paths[label][:16]]
    order = np.random.default_rng(5).permutation(len(paths))
    first = [paths[i] for i in order[: len(paths) // 2]]
    second = [paths[i] for i in order[len(paths) // 2 :]]
    darkened = write_images(
        tmp_path / "dark", [pixels * 0.4 for pixels in load_pixels(second)]
    )
    measurements = BackboneMeasurements(
        weights_pretrained=False,
        batch_norms=irv2_probe.layout.batch_norms,
        depths=irv2_probe.layout.depths,
        depth_layers=irv2_probe.layout.depth_layers,
        splits={
            "train": as_split(irv2_probe.run(first)),
            "val": as_split(irv2_probe.run(second)),
            "test": as_split(irv2_probe.run(darkened)),
        },
    )
    params = feature_shift_params()

    table = measure_split_shift(measurements, {"seed": 3}, params).set_index("compared")

    alpha = params["split_shift"]["alpha"]
    assert table.loc["val", "p_value"] > alpha
    assert not table.loc["val", "shifted"]
    assert table.loc["val", "verdict"].startswith("no evidence that val differs")
    assert table.loc["test", "p_value"] < alpha
    assert table.loc["test", "shifted"]
    assert table.loc["test", "verdict"].startswith("test differs from train, p = ")
    assert table.loc["test", "mmd2"] > table.loc["val", "mmd2"]
    assert table.loc["test", "frechet"] > table.loc["val", "frechet"]
    assert list(table["n_compared"]) == [24, 24]
