"""Planning copies: which images, how many, which operations; parameter errors."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from irv2_pipeline.pipelines.augmentation.nodes import (
    MANIFEST_COLUMNS,
    AugmentationError,
    plan_augmentation,
)
from irv2_pipeline.pipelines.augmentation.ops import OP_TYPES, PolicyError

from .conftest import base_parameters


def imbalanced_manifest(train_counts: dict[str, int]) -> pd.DataFrame:
    """Train images per class as given, plus one val and one test image per class."""
    rows = []
    for label, count in train_counts.items():
        splits = ["train"] * count + ["val", "test"]
        rows += [
            {"path": f"{label}/{i:03d}.png", "label": label, "split": s, "sha256": "0"}
            for i, s in enumerate(splits)
        ]
    return pd.DataFrame(rows)


def test_plan_covers_train_images_only_with_the_manifest_columns(
    demo_manifest, model_params, augmentation_params
):
    plan = plan_augmentation(demo_manifest, model_params, augmentation_params)

    train = demo_manifest[demo_manifest["split"] == "train"]
    assert list(plan.columns) == MANIFEST_COLUMNS
    assert set(plan["source_path"]) == set(train["path"])
    assert len(plan) == 2 * len(train)
    assert plan["path"].is_unique
    copies = plan.groupby("source_path")["copy"].apply(sorted)
    assert all(numbers == [0, 1] for numbers in copies)
    assert (plan["path"].str.split("/").str[0] == plan["label"]).all()
    assert plan["path"].str.endswith(".jpg").all()  # conf/base: JPEG
    for ops in plan["ops"]:
        for op in json.loads(ops):
            assert op["op"] in OP_TYPES and isinstance(op["params"], dict)


def test_every_drawn_value_lies_in_its_configured_range(
    demo_manifest, model_params, augmentation_params
):
    augmentation_params["copies"] = 20
    plan = plan_augmentation(demo_manifest, model_params, augmentation_params)
    configured = {
        entry["op"]: entry for entry in augmentation_params["presets"]["standard"]
    }

    drawn = [op for ops in plan["ops"] for op in json.loads(ops)]
    assert {op["op"] for op in drawn} == set(configured)
    for op in drawn:
        for spec in OP_TYPES[op["op"]].ranges:
            low, high = configured[op["op"]][spec.key]
            for param in spec.params:
                assert low <= op["params"][param] <= high, op


def test_a_copy_keeps_its_operations_when_copies_or_other_images_change(
    demo_manifest, model_params, augmentation_params
):
    two = plan_augmentation(demo_manifest, model_params, augmentation_params)
    augmentation_params["copies"] = 3
    fewer_images = demo_manifest[demo_manifest["label"] != "bag"]
    three = plan_augmentation(fewer_images, model_params, augmentation_params)

    merged = two.merge(three, on="path", suffixes=("_two", "_three"))
    assert len(merged) == 2 * 6  # the sneaker and trouser copies 0 and 1
    assert (merged["ops_two"] == merged["ops_three"]).all()
    assert (merged["seed_two"] == merged["seed_three"]).all()


def test_another_seed_draws_other_operations(
    demo_manifest, model_params, augmentation_params
):
    first = plan_augmentation(demo_manifest, model_params, augmentation_params)
    model_params["seed"] += 1
    second = plan_augmentation(demo_manifest, model_params, augmentation_params)
    assert (first["ops"] != second["ops"]).sum() > len(first) // 2
    assert (first["policy"] != second["policy"]).all()


def test_balancing_brings_every_class_to_the_largest_count():
    manifest = imbalanced_manifest({"common": 6, "rare": 2, "middle": 4})
    params = base_parameters()
    params.update(copies=2, balance={"enabled": True, "max_copies_per_image": 20})

    plan = plan_augmentation(manifest, {"image_size": 75, "seed": 1}, params)

    originals = manifest[manifest["split"] == "train"]["label"].value_counts()
    copies = plan["label"].value_counts()
    totals = originals + copies
    assert totals.to_dict() == {"common": 18, "middle": 18, "rare": 18}
    assert copies["common"] == 6 * 2
    per_image = plan.groupby("source_path").size()
    middle = per_image[per_image.index.str.startswith("middle/")]
    assert sorted(middle) == [3, 3, 4, 4]  # 14 copies over 4 images, evenly


def test_balancing_respects_the_cap_and_says_so(caplog):
    manifest = imbalanced_manifest({"common": 10, "rare": 1})
    params = base_parameters()
    params.update(copies=1, balance={"enabled": True, "max_copies_per_image": 5})

    with caplog.at_level(logging.WARNING):
        plan = plan_augmentation(manifest, {"image_size": 75, "seed": 1}, params)

    assert plan["label"].value_counts().to_dict() == {"common": 10, "rare": 5}
    assert "class 'rare' reaches 6 training images of the 20 wanted" in caplog.text
    assert "max_copies_per_image" in caplog.text


def test_the_none_preset_plans_no_copies(demo_manifest, model_params):
    params = base_parameters()
    params["preset"] = "none"
    plan = plan_augmentation(demo_manifest, model_params, params)
    assert plan.empty and list(plan.columns) == MANIFEST_COLUMNS


def test_randaugment_records_concrete_keras_operations(demo_manifest, model_params):
    params = base_parameters()
    params.update(preset="randaugment", copies=10)
    plan = plan_augmentation(demo_manifest, model_params, params)

    drawn = [op["op"] for ops in plan["ops"] for op in json.loads(ops)]
    randaugment_ops = [name for name in drawn if name != "flip_horizontal"]
    assert len(randaugment_ops) == 2 * len(plan)  # num_ops per copy
    assert len(set(randaugment_ops)) >= 6
    assert set(randaugment_ops) <= set(OP_TYPES)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"preset": "strong"}, "augmentation.preset = 'strong'"),
        ({"copies": -1}, "augmentation.copies = -1"),
        ({"format": "gif"}, "augmentation.format = 'gif'"),
        ({"fill_mode": "mirror"}, "augmentation.fill_mode = 'mirror'"),
        ({"workers": 0}, "augmentation.workers = 0"),
        (
            {"presets": {"standard": [{"op": "rotate", "degrees": [0, 1]}]}},
            "augmentation.presets.standard[0]: unknown operation 'rotate'",
        ),
        (
            {"presets": {"standard": [{"op": "rotation", "degrees": [10, -10]}]}},
            "augmentation.presets.standard[0].degrees = [10, -10]",
        ),
        (
            {
                "presets": {
                    "standard": [{"op": "zoom", "probability": 2, "factor": [0, 0]}]
                }
            },
            "augmentation.presets.standard[0].probability = 2",
        ),
        (
            {"presets": {"standard": [{"op": "hue", "delta": [0, 0.1], "degree": 3}]}},
            "unknown keys ['degree']",
        ),
        ({"presets": {"none": []}}, "augmentation.presets.none is reserved"),
    ],
)
def test_bad_parameters_stop_with_a_message_naming_them(
    demo_manifest, model_params, change, message
):
    params = base_parameters()
    params.update(change)
    with pytest.raises((AugmentationError, PolicyError), match=None) as error:
        plan_augmentation(demo_manifest, model_params, params)
    assert message in str(error.value)


def test_a_manifest_without_train_images_or_columns_is_refused(
    demo_manifest, model_params, augmentation_params
):
    no_train = demo_manifest.assign(split="val")
    with pytest.raises(AugmentationError, match="no images in the train split"):
        plan_augmentation(no_train, model_params, augmentation_params)
    with pytest.raises(AugmentationError, match=r"lacks the columns \['split'\]"):
        plan_augmentation(
            demo_manifest.drop(columns="split"), model_params, augmentation_params
        )
