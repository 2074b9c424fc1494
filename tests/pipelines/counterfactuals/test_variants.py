"""What each variant trains, from conf/base's variants: no TensorFlow needed.

The single-factor ablations must differ from ours in exactly the setting their factor
names (everything the training node receives is compared), every variant keeps ours'
epoch budget and writes checkpoints in its own folder, and a variant added in YAML
becomes a namespace of the pipeline without code.
"""

from __future__ import annotations

import pandas as pd
import pytest

from irv2_pipeline.pipeline_registry import counterfactual_variants
from irv2_pipeline.pipelines.counterfactuals.nodes import configure_variant
from irv2_pipeline.pipelines.counterfactuals.variants import (
    VariantError,
    selected_variants,
)
from tests.conftest import copy_project, planned_source, project_parameters

# Ours with ImageNet weights: feature_shift's kind of plan (head, then two steps).
IMAGENET_PLAN = {
    "stages": [
        {
            "name": "head",
            "unfreeze_from": None,
            "epochs": 5,
            "learning_rate": 1e-3,
            "bn_policy": "frozen",
        },
        {
            "name": "from_block8_1",
            "unfreeze_from": "block8_1",
            "epochs": 10,
            "learning_rate": 1e-4,
            "bn_policy": "frozen",
            "warmup_epochs": 1,
            "weight_decay": 0.02,
        },
        {
            "name": "from_block17_1",
            "unfreeze_from": "block17_1",
            "epochs": 6,
            "learning_rate": 5e-5,
            "bn_policy": "frozen",
            "warmup_epochs": 1,
            "weight_decay": 0.02,
        },
    ],
    "source": planned_source("imagenet"),
}
COPIES = pd.DataFrame(
    {"path": ["a/x__c1.jpg"], "source_path": ["a/x.png"], "label": ["a"]}
)
# Each ablation and the only part of the training node's inputs it may change.
ABLATIONS = {
    "zero_to_one_scaling": {
        "finetune.input_scaling",
        "finetune.input_scaling_override",
    },
    "batchnorm_training_mode": {f"stages.{i}.bn_policy" for i in range(3)},
    "no_augmented_copies": {"augmented_copies"},
    "all_unfrozen_one_stage": {"stages"},
    "no_head_stage_first": {"stages"},
}


@pytest.fixture(scope="module")
def params() -> dict:
    return project_parameters("base")


def configured(params: dict, name: str) -> dict:
    """What the training node receives for a variant, flattened to dotted keys."""
    finetune, plan, copies, rules = configure_variant(
        variant=params["counterfactuals"]["variants"][name],
        finetune=params["finetune"],
        finetune_plan=IMAGENET_PLAN,
        augmented_manifest=COPIES,
        plan_rules=params["feature_shift"]["plan_rules"],
        variant_name=name,
    )
    inputs = {
        "finetune": {
            k: v
            for k, v in finetune.items()
            if k not in ("checkpoint_dir", "tensorboard_dir")
        },
        "augmented_copies": len(copies),
        "plan_rules": rules,
    }
    return {**flatten(inputs), "stages": plan["stages"]}


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(a: dict, b: dict) -> set[str]:
    """Keys whose values differ; stage by stage when both have as many stages."""
    changed = {
        key
        for key in (a.keys() | b.keys()) - {"stages"}
        if a.get(key, "∅") != b.get(key, "∅")
    }
    if len(a["stages"]) != len(b["stages"]):
        return changed | {"stages"}
    for index, (x, y) in enumerate(zip(a["stages"], b["stages"], strict=True)):
        changed |= {
            f"stages.{index}.{key}"
            for key in x.keys() | y.keys()
            if x.get(key) != y.get(key)
        }
    return changed


@pytest.mark.parametrize("name", ABLATIONS)
def test_an_ablation_changes_one_setting_of_ours(params, name):
    ours = configured(params, "ours")
    assert differences(ours, configured(params, name)) == ABLATIONS[name]


def test_the_stage_ablations_change_what_their_factor_says(params):
    budget = sum(stage["epochs"] for stage in IMAGENET_PLAN["stages"])
    (one,) = configured(params, "all_unfrozen_one_stage")["stages"]
    last = IMAGENET_PLAN["stages"][-1]
    assert one == {
        **last,
        "name": "one_stage",
        "unfreeze_from": "stem",
        "epochs": budget,
    }
    kept = configured(params, "no_head_stage_first")["stages"]
    assert [s["name"] for s in kept] == ["from_block8_1", "from_block17_1"]
    assert kept[0] == {**IMAGENET_PLAN["stages"][1], "epochs": 15}
    assert kept[1] == IMAGENET_PLAN["stages"][2]


@pytest.mark.parametrize(
    "name", list(project_parameters("base")["counterfactuals"]["variants"])
)
def test_every_variant_keeps_the_epoch_budget_and_its_own_folders(params, name):
    finetune, plan, _, _ = configure_variant(
        variant=params["counterfactuals"]["variants"][name],
        finetune=params["finetune"],
        finetune_plan=IMAGENET_PLAN,
        augmented_manifest=COPIES,
        plan_rules=params["feature_shift"]["plan_rules"],
        variant_name=name,
    )
    assert sum(s["epochs"] for s in plan["stages"]) == 21
    # A variant changes the recipe, never the source our plan chose.
    assert plan["source"] == IMAGENET_PLAN["source"]
    root = params["finetune"]["checkpoint_dir"]
    assert finetune["checkpoint_dir"] == f"{root}/counterfactuals/{name}"
    assert finetune["stages"] is None


def test_textbook_recipes_run_outside_our_limits_ours_within(params):
    variants = params["counterfactuals"]["variants"]
    kinds = {name: v.get("kind", "ablation") for name, v in variants.items()}
    assert sorted(n for n, k in kinds.items() if k == "textbook") == [
        "all_frozen",
        "high_rate_thin_head",
        "no_augmentation_wrong_scaling",
    ]
    limits = configured(params, "high_rate_thin_head")
    assert limits["plan_rules.max_backbone_learning_rate"] == float("inf")
    assert configured(params, "ours")["plan_rules.max_backbone_learning_rate"] == 1e-4


def test_a_variant_added_in_yaml_becomes_a_namespace(tmp_path, monkeypatch):
    project = copy_project(tmp_path / "project")
    (project / "conf" / "local" / "parameters_counterfactuals.yml").write_text(
        "counterfactuals:\n"
        "  only: [ours, label_smoothing_off]\n"
        "  variants:\n"
        "    label_smoothing_off:\n"
        "      factor: no label smoothing\n"
        "      finetune: {label_smoothing: 0.0}\n"
    )
    monkeypatch.chdir(project)
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    assert counterfactual_variants() == ["ours", "label_smoothing_off"]


def test_a_misspelt_variant_is_named(params):
    counterfactuals = {
        **params["counterfactuals"],
        "variants": {**params["counterfactuals"]["variants"], "typo": {"factr": "x"}},
    }
    with pytest.raises(VariantError, match=r"variants\.typo: unknown keys \['factr'\]"):
        selected_variants(counterfactuals)
    with pytest.raises(VariantError, match="unknown variants"):
        selected_variants({**params["counterfactuals"], "only": ["ours", "nope"]})
