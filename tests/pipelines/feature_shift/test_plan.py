"""The plan rule, the stage checks and the learning-rate rules."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from irv2_pipeline.backbone import CARD_SUFFIX
from irv2_pipeline.pipelines.feature_shift.nodes import image_size_warning
from irv2_pipeline.pipelines.feature_shift.plan import Measurements, plan_stages
from irv2_pipeline.plan_rules import PlanError, learning_rate_problems, validate_stages
from irv2_pipeline.sources import candidate_sources

from .conftest import DEPTHS, GROUPS, UNITS, feature_shift_params


@pytest.fixture
def settings() -> dict:
    return copy.deepcopy(feature_shift_params()["plan"])


def measured(
    shift: dict[str, float] | None = None,
    logme: dict[str, float] | None = None,
    top_skill: float = 0.9,
    per_class: int = 500,
) -> Measurements:
    """Measurements with small shift, LogME rising to the top and a good probe."""
    return Measurements(
        block_shift={group: 0.1 for group in GROUPS} | (shift or {}),
        logme=dict(zip(DEPTHS, (0.1, 0.2, 0.3, 0.4), strict=True)) | (logme or {}),
        probe_skill={depth: top_skill for depth in DEPTHS},
        probe_accuracy={depth: 0.5 + top_skill / 2 for depth in DEPTHS},
        train_images_per_class=per_class,
        units=UNITS,
    )


def starts(stages: list[dict]) -> list[str | None]:
    return [stage["unfreeze_from"] for stage in stages]


def test_small_shift_and_plenty_of_data_fine_tunes_the_top_lightly(settings):
    plan = plan_stages(measured(), settings)
    assert starts(plan.stages) == [None, "block8_1"]
    assert {stage["bn_policy"] for stage in plan.stages} == {"frozen"}
    assert any("0.1" in line and "shift_threshold" in line for line in plan.rationale)


def test_small_shift_and_scarce_data_trains_the_head_only(settings):
    plan = plan_stages(measured(per_class=20), settings)
    assert starts(plan.stages) == [None]
    assert any("20 training images" in line for line in plan.rationale)


def test_a_shifted_block_is_reached_through_the_steps_above_it(settings):
    plan = plan_stages(measured(shift={"block17": 2.2, "block8": 4.5}), settings)
    assert starts(plan.stages) == [None, "block8_1", "block17_1"]
    backbone = settings["backbone"]
    assert plan.stages[1]["learning_rate"] == pytest.approx(backbone["learning_rate"])
    assert plan.stages[2]["learning_rate"] == pytest.approx(
        backbone["learning_rate"] * backbone["lr_factor_per_step"]
    )
    assert plan.stages[2]["warmup_epochs"] == backbone["warmup_epochs"]
    # block17's 2.2, where the shift starts, reaches adapt_bn_threshold 2.0: BN is
    # re-estimated everywhere.
    assert {stage["bn_policy"] for stage in plan.stages} == {"adapt"}
    assert any("block17" in line and "2.2" in line for line in plan.rationale)


def test_a_larger_shift_unfreezes_more(settings):
    shallow = plan_stages(measured(shift={"block8": 1.5}), settings).stages
    deep = plan_stages(measured(shift={"stem": 1.5, "block8": 1.5}), settings).stages
    assert starts(shallow)[-1] == "block8_1"
    assert starts(deep)[-1] == "stem"
    assert UNITS.index(starts(deep)[-1]) < UNITS.index(starts(shallow)[-1])


def test_logme_peaking_below_the_top_pulls_the_start_down(settings):
    plan = plan_stages(measured(logme={"mixed_6a": 0.9, "conv_7b": 0.4}), settings)
    assert starts(plan.stages)[-1] == "block17_1"
    assert any("LogME peaks at mixed_6a" in line for line in plan.rationale)


def test_a_weak_probe_at_the_top_goes_one_step_deeper(settings):
    base = plan_stages(measured(shift={"block8": 1.5}), settings).stages
    weak = plan_stages(measured(shift={"block8": 1.5}, top_skill=0.2), settings)
    assert starts(base)[-1] == "block8_1"
    assert starts(weak.stages)[-1] == "block17_1"
    assert any("0.200" in line for line in weak.rationale)


def test_scarce_data_caps_the_depth(settings):
    plan = plan_stages(measured(shift={"stem": 3.0}, per_class=30), settings)
    assert starts(plan.stages)[-1] == settings["scarce_deepest_unit"]
    assert any("overfit" in line for line in plan.rationale)


def test_the_scarce_cap_is_recorded_as_the_plans_depth_limit(settings):
    capped = plan_stages(measured(shift={"stem": 3.0}, per_class=30), settings)
    assert capped.depth_limit == {
        "setting": "feature_shift.plan.scarce_deepest_unit",
        "unit": settings["scarce_deepest_unit"],
        "wanted": "stem",
        "reason": "30 training images in the smallest class, under "
        f"scarce_images_per_class {settings['scarce_images_per_class']}",
    }
    assert plan_stages(measured(shift={"stem": 3.0}), settings).depth_limit is None
    assert plan_stages(measured(per_class=30), settings).depth_limit is None


@pytest.mark.parametrize("per_class", [30, 500])
def test_more_shift_never_fine_tunes_less(settings, per_class):
    """Adding shift to any one block never moves the start up (fewer layers)."""

    def depth(shift):
        deepest = starts(
            plan_stages(measured(shift, per_class=per_class), settings).stages
        )[-1]
        return len(UNITS) if deepest is None else UNITS.index(deepest)

    unshifted = depth({})
    for group in GROUPS:
        for value in (1.0, 1.5, 3.0, 9.0):
            assert depth({group: value}) <= unshifted, (group, value)
            assert depth({group: value, "conv_7b": 9.0}) <= depth({group: value})


def test_only_the_top_shifted_with_plenty_of_data_still_fine_tunes_from_block8_1(
    settings,
):
    plan = plan_stages(measured(shift={"conv_7b": 1.5}), settings)
    assert starts(plan.stages) == [None, "block8_1"]
    assert any("less than with no shift" in line for line in plan.rationale)


def test_the_bn_switch_reads_the_shift_where_it_starts_not_the_largest(settings):
    # The shift starts at block35 (1.2) and accumulates to 6 at the top.
    accumulated = measured(
        shift={"block35": 1.2, "mixed_6a": 1.6, "block17": 2.5, "block8": 6.0}
    )
    plan = plan_stages(accumulated, settings)
    assert starts(plan.stages)[-1] == "block35_1"
    assert {stage["bn_policy"] for stage in plan.stages} == {"frozen"}
    assert any("where it starts, block35 1.2" in line for line in plan.rationale)
    far = plan_stages(measured(shift={"block35": 2.4, "block8": 6.0}), settings)
    assert {stage["bn_policy"] for stage in far.stages} == {"adapt"}


def test_a_greyscale_stem_shift_alone_does_not_unfreeze_the_network(settings):
    # R = G = B collapses the stem's colour channels: a stem shift of ~2 by itself.
    grey = {"stem": 2.2, "block35": 0.4}
    colour = plan_stages(measured(shift=grey), settings)
    assert starts(colour.stages)[-1] == "stem"
    plan = plan_stages(
        dataclasses.replace(measured(shift=grey), grayscale_share=1.0), settings
    )
    assert starts(plan.stages) == [None, "block8_1"]
    assert {stage["bn_policy"] for stage in plan.stages} == {"frozen"}
    assert any("greyscale" in line and "2.2" in line for line in plan.rationale)
    # Above the stem a grey target's shift still counts.
    shifted = dataclasses.replace(
        measured(shift=grey | {"block35": 1.3}), grayscale_share=1.0
    )
    assert starts(plan_stages(shifted, settings).stages)[-1] == "block35_1"


def test_thresholds_are_parameters_not_constants(settings):
    shift = measured(shift={"block17": 0.6})
    assert starts(plan_stages(shift, settings).stages)[-1] == "block8_1"
    settings["shift_threshold"] = 0.5
    assert starts(plan_stages(shift, settings).stages)[-1] == "block17_1"


def test_every_planned_stage_keeps_the_rules_of_conf_base(settings):
    rules = feature_shift_params()["plan_rules"]
    for shift in ({}, {"block35": 5.0}, {"stem": 9.0}):
        plan = plan_stages(measured(shift=shift), settings)
        assert learning_rate_problems(plan.stages, rules) == []


def test_an_unknown_unit_in_the_settings_is_named(settings):
    settings["unfreeze_steps"] = ["block8_1", "block99_1"]
    with pytest.raises(
        PlanError, match=r"feature_shift\.plan\.unfreeze_steps.*block99_1"
    ):
        plan_stages(measured(), settings)


@pytest.mark.parametrize("env", ["base", "smoke"])
def test_default_stages_are_valid_and_keep_the_rules(env):
    params = feature_shift_params(env)
    stages = validate_stages(params["default_stages"], "default_stages", UNITS)
    assert starts(stages) == [None, "block8_1"]
    assert learning_rate_problems(stages, params["plan_rules"]) == []
    # Random weights store the initializer's BN statistics: frozen BN would
    # normalize nothing, so the stages used without ImageNet weights adapt it.
    assert {stage["bn_policy"] for stage in stages} == {"adapt"}
    # Decoupled weight decay: learning_rate * weight_decay a step; 1e-5 would be off.
    assert all(stage["weight_decay"] >= 0.01 for stage in stages[1:])
    if env == "smoke":
        assert all(stage["epochs"] == 1 for stage in stages)


def test_learning_rate_problems_name_the_stage_and_the_limit():
    rules = {"max_backbone_learning_rate": 1e-4, "max_head_learning_rate": 1e-2}
    stages = [
        {"name": "head", "unfreeze_from": None, "learning_rate": 0.05},
        {"name": "top", "unfreeze_from": "block8_1", "learning_rate": 1e-3},
        {"name": "fine", "unfreeze_from": "block17_1", "learning_rate": 1e-5},
    ]
    problems = learning_rate_problems(stages, rules)
    assert len(problems) == 2
    assert "'head'" in problems[0] and "max_head_learning_rate 0.01" in problems[0]
    assert "'top'" in problems[1] and "max_backbone_learning_rate 0.0001" in problems[1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bn_policy": "sometimes"}, r"stages\[0\]\.bn_policy"),
        ({"unfreeze_from": "block99"}, r"stages\[0\]\.unfreeze_from = 'block99'"),
        ({"epochs": 0}, r"stages\[0\]: epochs \(0\)"),
        ({"learning_rate": "1e-3"}, r"stages\[0\]\.learning_rate = '1e-3' is not a"),
        ({"momentum": 0.9}, r"unknown momentum"),
    ],
)
def test_bad_stages_are_refused_with_the_setting_named(change, message):
    stage = {
        "name": "head",
        "unfreeze_from": None,
        "epochs": 1,
        "learning_rate": 1e-3,
        "bn_policy": "frozen",
    } | change
    with pytest.raises(PlanError, match=message):
        validate_stages([stage], "stages", UNITS)


def test_an_image_size_other_than_the_weights_own_is_warned_about(tmp_path):
    weights = tmp_path / "irv2_notop.weights.h5"
    weights.write_bytes(b"")
    (tmp_path / f"{weights.name}{CARD_SUFFIX}").write_text('{"image_size": 75}')

    def warning(weights, image_size: int) -> str | None:
        (source,) = candidate_sources({"weights": weights}, {})
        return image_size_warning(source, image_size)

    assert warning(str(weights), 75) is None
    assert "139 px" in warning(str(weights), 139)
    assert "75 px" in warning(str(weights), 139)
    assert "source `irv2_notop`" in warning(str(weights), 139)
    assert warning("imagenet", 299) is None
    assert "299 px" in warning("imagenet", 75)
    # Random weights and a file without a card: no size to compare with.
    assert warning(None, 75) is None
    (tmp_path / f"{weights.name}{CARD_SUFFIX}").unlink()
    assert warning(str(weights), 139) is None
    # A listed source says its own size.
    listed = {"sources": [{"name": "rad", "weights": None, "image_size": 256}]}
    (source,) = candidate_sources(listed, {})
    assert "trained at 256 px" in image_size_warning(source, 299)
