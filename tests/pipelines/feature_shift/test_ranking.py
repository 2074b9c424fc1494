"""The ranking of candidate sources, on constructed measurements, and a source
that cannot be measured."""

from __future__ import annotations

import math

import keras
import pandas as pd
import pytest

from irv2_pipeline.backbone import WeightsError
from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.pipelines.feature_shift.nodes import measure_sources
from irv2_pipeline.pipelines.feature_shift.ranking import RANKING_COLUMNS, rank
from irv2_pipeline.sources import Source

from .conftest import DEPTHS, GROUPS


def profile(shift: float) -> pd.DataFrame:
    """A BN shift profile with one layer per block group, all at ``shift``."""
    return pd.DataFrame(
        {
            "layer": [f"{group}_bn" for group in GROUPS],
            "unit": list(GROUPS),
            "block": list(GROUPS),
            "depth": range(len(GROUPS)),
            "shift": shift,
            "shift_low": shift,
            "shift_high": shift,
            "mean_part": shift / 2,
            "variance_part": shift / 2,
            "grayscale_share": 0.0,
        }
    )


def transferability(top_logme: float, probe: float = 0.8) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": list(DEPTHS),
            "logme": [top_logme - 0.5, top_logme - 0.3, top_logme - 0.1, top_logme],
            "probe_val_accuracy": probe,
            "probe_skill": probe,
        }
    )


SOURCES = [
    Source("random", None, "minus_one_to_one", None),
    Source("far", "far.h5", "minus_one_to_one", 75),
    Source("near", "near.h5", "caffe_then_div_255", 256, "luminance"),
]
PROFILES = {"random": profile(0.0), "far": profile(2.0), "near": profile(0.1)}
# Random weights score highest here: they still rank last.
TABLES = {
    "random": transferability(1.0),
    "far": transferability(-0.4),
    "near": transferability(0.2),
}


def test_pretrained_sources_rank_by_logme_at_the_top_random_last():
    table, chosen, reason = rank(
        SOURCES, PROFILES, TABLES, forced=None, shift_threshold=1.0
    )
    assert list(table.columns) == RANKING_COLUMNS
    assert list(table["source"]) == ["near", "far", "random"]
    assert list(table["rank"]) == [1, 2, 3]
    assert list(table["chosen"]) == [True, False, False]
    assert chosen == SOURCES[2]
    near = table.iloc[0]
    assert (near["preprocessing"], near["grayscale"], near["image_size"]) == (
        "caffe_then_div_255",
        "luminance",
        256,
    )
    assert near["top_layer"] == "conv_7b"
    assert near["logme"] == pytest.approx(0.2)
    assert near["mean_bn_shift"] == pytest.approx(0.1)
    assert table.iloc[1]["shift_starts_at"] == "stem"
    assert table.iloc[2]["weights"] == "null"
    assert reason.startswith(
        "Source `near` ranks first of 3 by LogME at conv_7b: 0.200 vs -0.400 for `far`"
    )


def test_a_forced_source_is_chosen_whatever_its_rank():
    table, chosen, reason = rank(
        SOURCES, PROFILES, TABLES, forced=SOURCES[1], shift_threshold=1.0
    )
    assert list(table["source"]) == ["near", "far", "random"]
    assert list(table["chosen"]) == [False, True, False]
    assert chosen.name == "far"
    assert reason.startswith("Source `far` (ranked 2 of 3), forced by model.source")


def test_a_lone_source_is_said_to_be_the_only_one_and_a_missing_probe_sorts_last():
    _, _, reason = rank(
        SOURCES[1:2], PROFILES, TABLES, forced=None, shift_threshold=1.0
    )
    assert reason.startswith("Source `far`, the only candidate (LogME -0.400")
    tied = {"far": transferability(0.2, math.nan), "near": transferability(0.2)}
    table, _, _ = rank(SOURCES[1:], PROFILES, tied, forced=None, shift_threshold=1.0)
    assert list(table["source"]) == ["near", "far"]


def test_a_source_file_that_is_not_irv2_stops_the_measurement_naming_it(tmp_path):
    other = keras.Sequential([keras.Input((75, 75, 3)), keras.layers.Conv2D(4, 3)])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    model = {
        "image_size": 75,
        "seed": 0,
        "sources": [{"name": "other", "weights": str(path)}],
    }
    sample = pd.DataFrame(
        {"path": ["a.png"], "label": ["a"], "label_index": [0], "split": ["train"]}
    )
    with pytest.raises(WeightsError, match="Source `other`: .* not a weights file"):
        measure_sources(
            feature_shift_sample=sample,
            raw_images=ImageFolder(tmp_path),
            model=model,
            images={},
            feature_shift={"depths": ["conv_7b"], "batch_size": 1},
            finetune={},
        )
