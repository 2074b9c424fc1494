"""Tests of the parameter models: what they accept and what their messages say."""

from __future__ import annotations

import copy
from functools import cache

import pytest

from irv2_pipeline.parameters import parameter_problems
from tests.conftest import project_parameters


@cache
def _smoke() -> dict:
    return project_parameters("smoke")


def _with(path: str, value) -> dict:
    """The smoke parameters with one value, at a dotted path, replaced."""
    params = copy.deepcopy(_smoke())
    *parents, last = path.split(".")
    block = params
    for name in parents:
        block = block[name]
    block[last] = value
    return params


def _texts(params: dict) -> list[str]:
    return [problem.text for problem in parameter_problems(params)]


@pytest.mark.parametrize("env", ["base", "smoke"])
def test_the_shipped_parameters_keep_every_rule(env):
    assert parameter_problems(project_parameters(env)) == []


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("model.image_size", 74, "model.image_size = 74: must be at least 75"),
        ("model.image_size", 80.0, "model.image_size = 80.0: must be a valid integer"),
        ("model.image_size", "80", "model.image_size = '80': must be a valid integer"),
        ("model.seed", True, "model.seed = True: must be a valid integer"),
        (
            "model.weights",
            "ImageNet",
            "model.weights = 'ImageNet': must be 'imagenet', null, or the path of an "
            "existing weights file",
        ),
        ("images.max_pixels", 0, "images.max_pixels = 0: must be greater than 0"),
        (
            "images.min_size",
            0,
            "images.min_size = 0: must be greater than or equal to 1",
        ),
        (
            "images.background",
            [255, 256, 0],
            "images.background = [255, 256, 0]: item 1: must be less than or equal "
            "to 255",
        ),
        ("images.background", [255, 255], "item 2 of `images.background` is missing"),
        (
            "ingestion.split.train",
            -0.1,
            "ingestion.split.train = -0.1: must be greater than or equal to 0",
        ),
        (
            "ingestion.split.seed",
            "abc",
            "ingestion.split.seed = 'abc': must be a valid integer",
        ),
        (
            "ingestion.workers",
            0,
            "ingestion.workers = 0: use 'auto' or a positive whole number",
        ),
        (
            "ingestion.duplicates.group_key_pattern",
            "patient_\\d+",
            # As written in YAML, one backslash.
            "ingestion.duplicates.group_key_pattern = 'patient_\\d+': needs a "
            "capturing group",
        ),
        (
            "ingestion.duplicates.group_key_pattern",
            "patient_(",
            "is not a regular expression",
        ),
        (
            "ingestion.duplicates.max_hamming",
            65,
            "ingestion.duplicates.max_hamming = 65: must be less than or equal to 64",
        ),
        (
            "ingestion.duplicates.max_colour_distance",
            -1,
            "ingestion.duplicates.max_colour_distance = -1: must be greater than or "
            "equal to 0",
        ),
        (
            "ingestion.blank.min_pixel_std",
            -0.5,
            "ingestion.blank.min_pixel_std = -0.5: must be greater than or equal to 0",
        ),
        (
            "ingestion.blank.reject",
            "yes",
            "ingestion.blank.reject = 'yes': must be a valid boolean",
        ),
        (
            "inference.test_time_augmentation",
            "false",
            "inference.test_time_augmentation = 'false': must be a valid boolean",
        ),
        (
            "inference.false_alarm_rate",
            0,
            "inference.false_alarm_rate = 0: must be greater than 0",
        ),
        ("inference.top_k", 0, "inference.top_k = 0: must be greater than or equal"),
        (
            "inference.shift.alpha",
            1.0,
            "inference.shift.alpha = 1.0: must be less than 1",
        ),
        (
            "ingestion.apply_label_exclusions",
            1,
            "ingestion.apply_label_exclusions = 1: must be a valid boolean",
        ),
        (
            "evaluation.attribution.occlusion.random_patches",
            0,
            "evaluation.attribution.occlusion.random_patches = 0: must be greater "
            "than or equal to 1",
        ),
        (
            "evaluation.attribution.occlusion.border_fraction",
            0.2,
            "evaluation.attribution.occlusion.border_fraction = 0.2: must be less "
            "than or equal to 0.14",
        ),
        (
            "evaluation.diagnosis.shortcut.max_p_value",
            0,
            "evaluation.diagnosis.shortcut.max_p_value = 0: must be greater than 0",
        ),
    ],
)
def test_an_impossible_value_is_named_with_its_key_and_rule(path, value, expected):
    texts = _texts(_with(path, value))
    assert len(texts) == 1
    assert expected in texts[0]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("model.image_size", 75),
        ("model.weights", "imagenet"),
        ("model.weights", None),
        ("ingestion.workers", "auto"),
        ("ingestion.workers", 3),
        ("ingestion.split.train", 0),
        ("ingestion.duplicates.max_hamming", None),
        ("ingestion.duplicates.group_key_pattern", "patient_(\\d+)"),
        ("ingestion.duplicates.max_colour_distance", None),
        ("ingestion.blank.min_pixel_std", 0),
        ("inference.test_time_augmentation", True),
        ("inference.max_reference_images", None),
        ("inference.shift.max_images", None),
    ],
)
def test_a_possible_value_passes(path, value):
    params = _with(path, value)
    if path == "ingestion.split.train":
        params["ingestion"]["split"].update(val=0.5, test=0.5)
    assert parameter_problems(params) == []


def test_a_local_weights_file_passes_and_a_missing_one_does_not(tmp_path):
    weights = tmp_path / "irv2_notop.h5"
    weights.write_bytes(b"")
    assert parameter_problems(_with("model.weights", str(weights))) == []
    missing = str(tmp_path / "elsewhere.h5")
    assert _texts(_with("model.weights", missing)) == [
        f"model.weights = {missing!r}: must be 'imagenet', null, or the path of an "
        "existing weights file"
    ]


def test_split_fractions_must_sum_to_one():
    params = _with("ingestion.split.train", 0.8)
    problems = parameter_problems(params)
    assert [p.key for p in problems] == ["ingestion.split"]
    assert problems[0].text == (
        "ingestion.split: train + val + test = 0.8 + 0.15 + 0.15 = 1.1; "
        "the fractions must sum to 1"
    )


def test_a_p_value_threshold_the_random_squares_cannot_reach_is_refused():
    # 16 random squares give p-values of 1/17 = 0.059 and up.
    texts = _texts(_with("evaluation.diagnosis.shortcut.max_p_value", 0.05))
    assert texts == [
        "evaluation: diagnosis.shortcut.max_p_value 0.05 is below 1 / (1 + "
        "attribution.occlusion.random_patches) = 0.059, the smallest p-value 16 "
        "random squares can give: the shortcut rule could never fire (raise "
        "random_patches or max_p_value)"
    ]
    params = _with("evaluation.diagnosis.shortcut.max_p_value", 0.05)
    params["evaluation"]["attribution"]["occlusion"]["random_patches"] = 19
    assert parameter_problems(params) == []


def test_a_calibration_alpha_its_draws_cannot_reach_is_refused():
    # 19 draws give p-values of 1/20 = 0.05 and up: p < alpha = 0.05 never holds.
    texts = _texts(_with("evaluation.bootstrap.resamples", 19))
    assert texts == [
        "evaluation: diagnosis.miscalibration.alpha 0.05 is at most 1 / (1 + "
        "bootstrap.resamples) = 0.05, the smallest p-value 19 draws of the "
        "calibration test can give: the miscalibration rule could never fire (raise "
        "bootstrap.resamples or alpha)"
    ]
    assert parameter_problems(_with("evaluation.bootstrap.resamples", 20)) == []


def test_a_minimum_size_no_image_can_reach_is_refused():
    texts = _texts(_with("images.min_size", 100_000))
    assert texts == [
        "images: min_size 100000 squared is more than max_pixels 50000000: every "
        "image would be rejected"
    ]


@pytest.mark.parametrize(
    ("path", "key", "suggestion"),
    [
        ("model.image_sise", "model.image_sise", "image_size"),
        ("images.backgroud", "images.backgroud", "background"),
        ("ingestion.split.sed", "ingestion.split.sed", "seed"),
        (
            "ingestion.duplicates.max_haming",
            "ingestion.duplicates.max_haming",
            "max_hamming",
        ),
        ("ingestion.colour", "ingestion.colour", None),
    ],
)
def test_an_unknown_key_is_refused_with_the_closest_known_one(path, key, suggestion):
    problems = parameter_problems(_with(path, 1))
    assert [p.key for p in problems] == [key]
    assert problems[0].text.startswith(f"unknown key `{key}`")
    hint = f" (did you mean `{suggestion}`?)" if suggestion else ""
    assert problems[0].text == f"unknown key `{key}`{hint}"


def test_every_problem_is_reported_at_once():
    params = _with("model.image_size", 32)
    params["images"]["max_pixels"] = -1
    params["ingestion"]["split"]["seed"] = None
    assert [p.key for p in parameter_problems(params)] == [
        "model.image_size",
        "images.max_pixels",
        "ingestion.split.seed",
    ]


def test_a_missing_key_is_named():
    params = copy.deepcopy(_smoke())
    del params["ingestion"]["split"]["seed"]
    assert _texts(params) == ["`ingestion.split.seed` is missing"]
