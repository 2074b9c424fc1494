"""What a counterfactual variant trains: our settings with the variant's changes.

A variant (``counterfactuals.variants.<name>`` in ``parameters_counterfactuals.yml``)
is configuration for ``finetune``'s own training node, never a second training loop:

- ``finetune``: keys merged over ``params:finetune`` (nested blocks key by key);
- ``stages``: absent or null for our stages (``finetune_plan``, or
  ``finetune.stages`` when set); a list of stages for a recipe of its own (a stage's
  ``epochs: null`` takes the whole epoch budget, the epochs our stages add up to);
  or edits of our stages, applied in this order: ``drop_head_only`` (head-only
  stages are dropped, their epochs go to the stage after them, so the budget stays),
  ``merge`` (all stages become one, with the settings of the last and all the
  epochs), ``edit`` (keys set on every stage);
- ``augmented_copies``: false trains on the original images only;
- ``plan_rules``: false trains outside our learning-rate limits
  (``feature_shift.plan_rules``), as the textbook recipes do.

Plain Python: this module is read when the pipelines are registered.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

VARIANT_KEYS = (
    "factor",
    "kind",
    "finetune",
    "stages",
    "augmented_copies",
    "plan_rules",
)
KINDS = ("reference", "ablation", "textbook")
STAGE_EDITS = ("drop_head_only", "merge", "edit")
# Where finetune writes files, not how it trains: a variant may not move them (each
# variant gets its own folders, below).
LOCATION_KEYS = ("checkpoint_dir", "tensorboard_dir", "feature_cache_dir")
# Variants whose backbone maps images to the same pooled features share them here,
# under finetune.checkpoint_dir (cached_head.shared_pooled_features).
FEATURE_CACHE = "feature_cache"


class VariantError(ValueError):
    """A variant that cannot be trained as written; the message names it."""


def check_variant(name: str, variant: Mapping[str, Any]) -> None:
    """Stops with a clear message when a variant has unknown keys or bad values."""
    where = f"counterfactuals.variants.{name}"
    if not isinstance(variant, Mapping):
        raise VariantError(f"{where} must be a mapping of settings")
    unknown = sorted(set(variant) - set(VARIANT_KEYS))
    if unknown:
        raise VariantError(
            f"{where}: unknown keys {unknown}; a variant has {', '.join(VARIANT_KEYS)}"
        )
    if not str(variant.get("factor") or "").strip():
        raise VariantError(f"{where}.factor: say what the variant changes")
    if variant.get("kind", "ablation") not in KINDS:
        raise VariantError(f"{where}.kind = {variant['kind']!r}; use one of {KINDS}")
    moved = sorted(set(variant.get("finetune") or {}) & set(LOCATION_KEYS))
    if moved:
        raise VariantError(
            f"{where}.finetune sets {moved}: each variant writes into its own "
            "folder under finetune's"
        )
    stages = variant.get("stages")
    if isinstance(stages, Mapping):
        edits = sorted(set(stages) - set(STAGE_EDITS))
        if edits:
            raise VariantError(
                f"{where}.stages: unknown edits {edits}; use {', '.join(STAGE_EDITS)}"
            )
    elif stages is not None and not isinstance(stages, Sequence):
        raise VariantError(
            f"{where}.stages: null (our stages), a list of stages, or edits "
            f"({', '.join(STAGE_EDITS)})"
        )


def merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` over it, nested mappings merged key by key."""
    result = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def variant_folder(root: str | None, name: str) -> str | None:
    """A variant's own folder under one of finetune's (``None`` stays ``None``)."""
    return None if root is None else str(Path(root) / "counterfactuals" / name)


def variant_finetune(
    name: str, variant: Mapping[str, Any], finetune: Mapping[str, Any]
) -> dict[str, Any]:
    """``params:finetune`` with the variant's changes, its checkpoints in its folder.

    ``finetune.stages`` is cleared: the variant's stages come as its plan
    (:func:`variant_stages`).
    """
    check_variant(name, variant)
    params = merged(finetune, variant.get("finetune") or {})
    for key in ("checkpoint_dir", "tensorboard_dir"):
        params[key] = variant_folder(finetune.get(key), name)
    params["feature_cache_dir"] = variant_folder(
        finetune.get("checkpoint_dir"), FEATURE_CACHE
    )
    params["stages"] = None
    return params


def our_stages(
    finetune: Mapping[str, Any], finetune_plan: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The stages our recipe trains: ``finetune.stages`` if set, else the plan's."""
    stages = finetune.get("stages")
    if stages is None:
        stages = finetune_plan.get("stages")
    if not stages:
        raise VariantError(
            "finetune_plan has no stages (and finetune.stages is null): rerun "
            "`kedro run --pipeline feature_shift`"
        )
    return [dict(stage) for stage in stages]


def variant_stages(
    name: str,
    variant: Mapping[str, Any],
    ours: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The stages a variant trains (see the module docstring).

    Args:
        name: The variant's name, for messages.
        variant: Its settings.
        ours: Our stages (:func:`our_stages`); their epochs add up to the budget.

    Returns:
        Stage dicts as ``finetune_plan`` holds them.
    """
    check_variant(name, variant)
    budget = sum(int(stage["epochs"]) for stage in ours)
    spec = variant.get("stages")
    if spec is None:
        return [dict(stage) for stage in ours]
    if not isinstance(spec, Mapping):
        return [
            {
                **stage,
                "epochs": budget if stage.get("epochs") is None else stage["epochs"],
            }
            for stage in spec
        ]
    stages = [dict(stage) for stage in ours]
    if spec.get("drop_head_only"):
        stages = _without_head_stages(name, stages)
    if spec.get("merge"):
        stages = [{**stages[-1], "name": "one_stage", "epochs": budget}]
    edit = spec.get("edit") or {}
    return [{**stage, **edit} for stage in stages]


def _without_head_stages(
    name: str, stages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    kept: list[dict[str, Any]] = []
    carried = 0
    for stage in stages:
        if stage["unfreeze_from"] is None:
            carried += int(stage["epochs"])
            continue
        kept.append({**stage, "epochs": int(stage["epochs"]) + carried})
        carried = 0
    if not kept:
        raise VariantError(
            f"counterfactuals.variants.{name}: our stages are all head-only; "
            "without them nothing is left to train"
        )
    if carried:
        kept[-1]["epochs"] += carried
    return kept


def variant_plan_rules(
    variant: Mapping[str, Any], plan_rules: Mapping[str, Any]
) -> dict[str, Any]:
    """Our learning-rate limits, or none when the variant sets ``plan_rules: false``."""
    if variant.get("plan_rules", True):
        return dict(plan_rules)
    return {key: math.inf for key in plan_rules}


def selected_variants(counterfactuals: Mapping[str, Any]) -> list[str]:
    """The variants the pipeline holds: ``only``, or all; the reference first.

    Raises:
        VariantError: No reference variant, or ``only`` names unknown variants.
    """
    variants = counterfactuals.get("variants") or {}
    reference = counterfactuals.get("reference")
    if reference not in variants:
        raise VariantError(
            f"counterfactuals.reference = {reference!r} is not among the variants "
            f"({', '.join(variants)})"
        )
    only = counterfactuals.get("only")
    names = list(variants) if only is None else list(only)
    unknown = sorted(set(names) - set(variants))
    if unknown:
        raise VariantError(
            f"counterfactuals.only names unknown variants {unknown}; known: "
            f"{', '.join(variants)}"
        )
    for name in names:
        check_variant(name, variants[name])
    return [reference, *[name for name in names if name != reference]]
