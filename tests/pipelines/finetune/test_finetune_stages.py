"""The stage list is checked before any training: plan, override, and every refusal."""

from __future__ import annotations

import pytest

from irv2_pipeline.keys import content_key
from irv2_pipeline.pipelines.finetune.stages import StageConfigError, resolve_stages

from .conftest import MINI_UNITS

PLAN = {
    "stages": [
        {
            "name": "head",
            "unfreeze_from": None,
            "epochs": 2,
            "learning_rate": 1e-3,
            "bn_policy": "frozen",
        },
        {
            "name": "top",
            "unfreeze_from": "block8_1",
            "epochs": 3,
            "learning_rate": 1e-4,
            "bn_policy": "adapt",
            "warmup_epochs": 1,
            "weight_decay": 1e-4,
        },
    ],
    "rationale": ["a test plan"],
}
FINETUNE = {"stages": None, "warmup_epochs": 0, "weight_decay": 1e-5}


def stage(name, unfreeze_from, learning_rate=1e-4, **extra):
    return {
        "name": name,
        "unfreeze_from": unfreeze_from,
        "epochs": 2,
        "learning_rate": learning_rate,
        "bn_policy": "frozen",
        **extra,
    }


def test_the_plan_is_followed_with_defaults_for_what_it_leaves_out(plan_rules):
    stages = resolve_stages(PLAN, FINETUNE, plan_rules, MINI_UNITS)
    assert [s.name for s in stages] == ["head", "top"]
    head, top = stages
    assert head.head_only and head.warmup_epochs == 0 and head.weight_decay == 1e-5
    assert (top.unfreeze_from, top.bn_policy, top.epochs) == ("block8_1", "adapt", 3)
    assert (top.warmup_epochs, top.weight_decay) == (1, 1e-4)


def test_parameters_override_the_plan(plan_rules):
    override = {**FINETUNE, "stages": [stage("only", "conv_7b")]}
    stages = resolve_stages(PLAN, override, plan_rules, MINI_UNITS)
    assert [(s.name, s.unfreeze_from) for s in stages] == [("only", "conv_7b")]


def test_an_unknown_layer_name_lists_the_blocks(plan_rules):
    override = {**FINETUNE, "stages": [stage("typo", "block8_01")]}
    with pytest.raises(
        StageConfigError, match=r"block8_01.*not an IRv2 block.*block8_1"
    ):
        resolve_stages(PLAN, override, plan_rules, MINI_UNITS)


def test_a_stage_that_unfreezes_less_than_the_one_before_is_refused(plan_rules):
    override = {
        **FINETUNE,
        "stages": [stage("deep", "block17_1"), stage("shallow", "block8_1")],
    }
    with pytest.raises(
        StageConfigError, match=r"'shallow' unfreezes from block8_1, less"
    ):
        resolve_stages(PLAN, override, plan_rules, MINI_UNITS)


def test_head_only_after_a_backbone_stage_is_refused(plan_rules):
    override = {**FINETUNE, "stages": [stage("top", "conv_7b"), stage("head", None)]}
    with pytest.raises(StageConfigError, match="'head' unfreezes from nothing"):
        resolve_stages(PLAN, override, plan_rules, MINI_UNITS)


def test_a_learning_rate_the_plan_rules_flag_is_refused(plan_rules):
    too_high = plan_rules["max_backbone_learning_rate"] * 10
    override = {**FINETUNE, "stages": [stage("hot", "block8_1", too_high)]}
    with pytest.raises(StageConfigError, match="'hot'.*max_backbone_learning_rate"):
        resolve_stages(PLAN, override, plan_rules, MINI_UNITS)


def test_a_warmup_as_long_as_the_stage_is_refused(plan_rules):
    override = {**FINETUNE, "stages": [stage("warm", None, 1e-3, warmup_epochs=2)]}
    with pytest.raises(StageConfigError, match="warmup_epochs 2 must be fewer"):
        resolve_stages(PLAN, override, plan_rules, MINI_UNITS)


def test_a_bad_bn_policy_and_repeated_names_are_refused(plan_rules):
    bad = {**FINETUNE, "stages": [stage("a", None, 1e-3, bn_policy="eval")]}
    with pytest.raises(StageConfigError, match="bn_policy = 'eval'"):
        resolve_stages(PLAN, bad, plan_rules, MINI_UNITS)
    twice = {**FINETUNE, "stages": [stage("a", None, 1e-3), stage("a", "conv_7b")]}
    with pytest.raises(StageConfigError, match="repeated: \\['a'\\]"):
        resolve_stages(PLAN, twice, plan_rules, MINI_UNITS)


def test_no_plan_and_no_override_names_the_pipeline_to_run():
    with pytest.raises(StageConfigError, match="feature_shift"):
        resolve_stages({}, FINETUNE, {}, MINI_UNITS)


def test_checkpoint_keys_change_with_any_parameter_or_input():
    base = ({"batch_size": 16}, {"seed": 1}, ["bag", "shoe"])
    assert content_key(*base) == content_key(*base)
    assert content_key({"batch_size": 8}, *base[1:]) != content_key(*base)
    assert content_key(*base[:2], ["bag", "boot"]) != content_key(*base)
