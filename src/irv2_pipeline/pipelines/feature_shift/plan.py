"""The fine-tuning plan: which stages to run, given what ``feature_shift`` measured.

:func:`plan_stages` turns the measurements into stages (their keys, and the rules
every plan keeps, are in :mod:`irv2_pipeline.plan_rules`). ``finetune`` runs the
stages in order; ``evaluation`` checks them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from irv2_pipeline.plan_rules import (
    FIRST_UNIT,
    GRAYSCALE_SHARE,
    OPTIONAL_KEYS,
    PlanError,
    shift_start,
    validate_stages,
)


@dataclass(frozen=True)
class Measurements:
    """What the plan rests on.

    Attributes:
        block_shift: BN shift per block group, in network order.
        logme: LogME per depth (unit name), in network order.
        probe_skill: Per depth, linear-probe validation accuracy scaled so that
            chance is 0 and perfect is 1.
        probe_accuracy: Per depth, the probe's validation accuracy.
        train_images_per_class: Training images of the smallest class.
        units: IRv2 unit names in network order.
        grayscale_share: The share of the measured training images that are grey.
    """

    block_shift: dict[str, float]
    logme: dict[str, float]
    probe_skill: dict[str, float]
    probe_accuracy: dict[str, float]
    train_images_per_class: int
    units: list[str]
    grayscale_share: float = 0.0


@dataclass(frozen=True)
class Plan:
    """The stages, a sentence per decision, and the cap that bound the depth.

    Attributes:
        stages: The stages, head first.
        rationale: Why, one sentence per decision.
        depth_limit: ``None``, or when a setting stopped the plan above the depth
            the measurements asked for: ``setting`` (its parameter), ``unit`` (where
            it stopped), ``wanted`` (the unit asked for) and ``reason``.
    """

    stages: list[dict[str, Any]]
    rationale: list[str]
    depth_limit: dict[str, Any] | None = None


def plan_stages(measured: Measurements, settings: Mapping[str, Any]) -> Plan:
    """Turns the measurements into stages, with a sentence for each decision.

    The rule (``settings`` is ``feature_shift.plan``):

    1. A head-only stage always comes first, so the new head's random gradients never
       reach the pretrained layers.
    2. The block where the shift starts (the shallowest whose BN shift reaches
       ``shift_threshold``; the stem is passed over for greyscale images, see
       ``plan_rules.shift_start``) is where fine-tuning must reach: its first unit is
       a candidate start.
    3. If LogME peaks at a shallower depth than the top, by at least ``logme_margin``,
       the layers above that depth make the classes less separable: the unit after it
       is a candidate start.
    4. If the top's linear-probe skill is below ``min_top_probe_skill``, the start goes
       one step (of ``unfreeze_steps``) deeper than the candidates so far.
    5. With no candidate: head only when data are scarce (fewer than
       ``scarce_images_per_class`` training images in the smallest class), else the
       first of ``unfreeze_steps`` (a light fine-tune of the top). With enough data
       a start above the first of ``unfreeze_steps`` moves down to it, so that more
       shift never means less fine-tuning than none.
    6. Scarce data never unfreeze below ``scarce_deepest_unit``; the plan records
       that cap as its ``depth_limit``.
    7. The backbone stages step down through ``unfreeze_steps`` that lie above the
       start, and end at the start; each step's learning rate is the previous one's
       times ``backbone.lr_factor_per_step``.
    8. ``bn_policy`` is ``adapt`` for every stage when the shift where it starts
       (rule 2's block) reaches ``adapt_bn_threshold``: the source's BN statistics
       are then wrong from there on. ``frozen`` otherwise. The blocks above carry the
       shift accumulated below them, so the largest shift would switch nearly every
       target to ``adapt``.

    Returns:
        The plan.

    Raises:
        PlanError: A setting names a unit IRv2 does not have.
    """
    position = {unit: index for index, unit in enumerate(measured.units)}
    steps = _unfreeze_steps(settings, position)
    rationale: list[str] = []
    candidates = [
        start
        for start in (
            _shift_start(measured, settings, rationale),
            _transfer_start(measured, settings, rationale),
        )
        if start is not None
    ]
    start = min(candidates, key=position.__getitem__) if candidates else None
    start = _deepen_for_probe(
        start, measured, settings, steps=steps, rationale=rationale
    )
    start, depth_limit = _fit_to_data(
        start, measured, settings, steps=steps, rationale=rationale
    )
    bn_policy = _bn_policy(measured, settings, rationale)

    head = settings["head"]
    stages = [
        {
            "name": "head",
            "unfreeze_from": None,
            "epochs": int(head["epochs"]),
            "learning_rate": float(head["learning_rate"]),
            "bn_policy": bn_policy,
        }
    ]
    if start is not None:
        backbone = settings["backbone"]
        descent = [step for step in steps if position[step] > position[start]]
        for index, unit in enumerate([*descent, start]):
            stage = {
                "name": f"from_{unit}",
                "unfreeze_from": unit,
                "epochs": int(backbone["epochs"]),
                "learning_rate": float(backbone["learning_rate"])
                * float(backbone["lr_factor_per_step"]) ** index,
                "bn_policy": bn_policy,
            }
            for key in OPTIONAL_KEYS:
                if backbone.get(key) is not None:
                    stage[key] = backbone[key]
            stages.append(stage)
    rationale.append(rate_sentence(stages, settings))
    return Plan(
        validate_stages(stages, "feature_shift.plan", measured.units),
        rationale,
        depth_limit,
    )


def rate_sentence(stages: list[dict[str, Any]], settings: Mapping[str, Any]) -> str:
    """Rule 7's rates, as the rationale states them (``finetune_stages`` records the
    same figures as ``planned_learning_rate``)."""
    rates = ", ".join(f"{stage['name']} {stage['learning_rate']:g}" for stage in stages)
    factor = float(settings["backbone"]["lr_factor_per_step"])
    return (
        f"Planned learning rates: {rates} (each backbone step {factor:g} of the one "
        "above). With finetune.lr_find on, the range test of the first stage of each "
        "kind (head only, backbone) multiplies the rates of its kind by one factor, "
        "so these ratios hold."
    )


def _unfreeze_steps(settings: Mapping[str, Any], position: dict[str, int]) -> list[str]:
    """``unfreeze_steps``, checked, top first."""
    steps = [str(unit) for unit in settings["unfreeze_steps"]]
    if not steps:
        raise PlanError("feature_shift.plan.unfreeze_steps is empty; name one unit")
    named = [("unfreeze_steps", step) for step in steps]
    named.append(("scarce_deepest_unit", str(settings["scarce_deepest_unit"])))
    for name, unit in named:
        if unit not in position:
            raise PlanError(
                f"feature_shift.plan.{name}: {unit!r} is not an IRv2 block; use one "
                f"of {', '.join(position)}"
            )
    return sorted(steps, key=position.__getitem__, reverse=True)


def _shift_start(
    measured: Measurements, settings: Mapping[str, Any], rationale: list[str]
) -> str | None:
    """Rule 2: the first unit of the block where the shift starts."""
    threshold = float(settings["shift_threshold"])
    shifts = measured.block_shift
    peak = max(shifts, key=shifts.__getitem__)
    block = shift_start(shifts, threshold, measured.grayscale_share)
    if measured.grayscale_share >= GRAYSCALE_SHARE and "stem" in shifts:
        rationale.append(
            f"{measured.grayscale_share:.0%} of the training images are greyscale: "
            f"the stem's shift ({shifts['stem']:.3g}) says that they have no colour, "
            "not how far their content is, so the shift is read from the blocks "
            "above it."
        )
    if block is None:
        rationale.append(
            f"No block's BN shift reaches shift_threshold {threshold:g} (largest: "
            f"{peak} {shifts[peak]:.3g}): the source's features fit these images at "
            "every depth."
        )
        return None
    rationale.append(
        f"The shift starts at {block}, the shallowest block whose BN shift reaches "
        f"shift_threshold {threshold:g} ({shifts[block]:.3g}; largest: {peak} "
        f"{shifts[peak]:.3g}): fine-tuning reaches down to {FIRST_UNIT[block]}."
    )
    return FIRST_UNIT[block]


def _transfer_start(
    measured: Measurements, settings: Mapping[str, Any], rationale: list[str]
) -> str | None:
    """Rule 3: the unit after a shallower depth whose LogME beats the top's."""
    scores = measured.logme
    top = list(scores)[-1]
    best = max(scores, key=scores.__getitem__)
    margin = float(settings["logme_margin"])
    gain = scores[best] - scores[top]
    after = measured.units.index(best) + 1
    if best == top or gain < margin or after >= len(measured.units):
        rationale.append(
            f"LogME is highest at {best} ({scores[best]:.3f}; {top}: "
            f"{scores[top]:.3f}, margin {margin:g}): the top features are as "
            "transferable as any shallower ones."
        )
        return None
    unit = measured.units[after]
    rationale.append(
        f"LogME peaks at {best} ({scores[best]:.3f}), {gain:.3f} above {top} "
        f"({scores[top]:.3f}, margin {margin:g}): the layers after {best} make the "
        f"classes less separable, so fine-tuning reaches {unit}."
    )
    return unit


def _deepen_for_probe(
    start: str | None,
    measured: Measurements,
    settings: Mapping[str, Any],
    *,
    steps: list[str],
    rationale: list[str],
) -> str | None:
    """Rule 4: one step deeper when a linear probe on the frozen top does poorly."""
    top = list(measured.logme)[-1]
    skill = measured.probe_skill.get(top, math.nan)
    accuracy = measured.probe_accuracy.get(top, math.nan)
    minimum = float(settings["min_top_probe_skill"])
    if math.isnan(skill):
        rationale.append(
            f"No linear probe was fitted on {top} features (no validation images)."
        )
        return start
    probe = (
        f"A linear probe on frozen {top} features reaches {accuracy:.3f} validation "
        f"accuracy (skill {skill:.3f} between chance 0 and perfect 1"
    )
    if skill >= minimum:
        rationale.append(f"{probe}, at least min_top_probe_skill {minimum:g}).")
        return start
    deeper = _step_below(start, steps, measured.units)
    rationale.append(
        f"{probe}, under min_top_probe_skill {minimum:g}): the frozen top is not "
        "enough"
        + (
            f", so fine-tuning goes one step deeper, to {deeper}."
            if deeper != start
            else "; no deeper step is left in unfreeze_steps."
        )
    )
    return deeper


def _fit_to_data(
    start: str | None,
    measured: Measurements,
    settings: Mapping[str, Any],
    *,
    steps: list[str],
    rationale: list[str],
) -> tuple[str | None, dict[str, Any] | None]:
    """Rules 5 and 6: the training-set size decides between head-only and a light
    fine-tune, and caps the depth when data are scarce; returns the start and the
    cap that bound it, if one did."""
    per_class = measured.train_images_per_class
    limit = int(settings["scarce_images_per_class"])
    deepest = str(settings["scarce_deepest_unit"])
    scarce = per_class < limit
    position = measured.units.index
    if start is None and scarce:
        rationale.append(
            f"With little shift and scarce data (smallest class: {per_class} training "
            f"images, under scarce_images_per_class {limit}), only the head is "
            "trained."
        )
        return None, None
    if start is None or (not scarce and position(start) > position(steps[0])):
        reason = (
            "With little shift"
            if start is None
            else f"Fine-tuning only from {start} would train less than with no shift; "
            "with"
        )
        rationale.append(
            f"{reason} {per_class} training images in the smallest class (at least "
            f"scarce_images_per_class {limit}), the top is fine-tuned from "
            f"{steps[0]}."
        )
        return steps[0], None
    if scarce and position(start) < position(deepest):
        rationale.append(
            f"Only {per_class} training images in the smallest class (under "
            f"scarce_images_per_class {limit}): unfreezing from {start} would overfit, "
            f"so fine-tuning stops at {deepest}."
        )
        return deepest, {
            "setting": "feature_shift.plan.scarce_deepest_unit",
            "unit": deepest,
            "wanted": start,
            "reason": f"{per_class} training images in the smallest class, under "
            f"scarce_images_per_class {limit}",
        }
    return start, None


def _bn_policy(
    measured: Measurements, settings: Mapping[str, Any], rationale: list[str]
) -> str:
    """Rule 8: re-estimate BN statistics when the shift is large where it starts."""
    threshold = float(settings["adapt_bn_threshold"])
    block = shift_start(
        measured.block_shift,
        float(settings["shift_threshold"]),
        measured.grayscale_share,
    )
    if block is None:
        rationale.append(
            "With no shifted block, BN keeps the source's statistics in inference "
            "mode (bn_policy frozen)."
        )
        return "frozen"
    value = measured.block_shift[block]
    if value >= threshold:
        rationale.append(
            f"The shift where it starts, {block} {value:.3g}, reaches "
            f"adapt_bn_threshold {threshold:g}: BN statistics are re-estimated on "
            "your images (bn_policy adapt)."
        )
        return "adapt"
    rationale.append(
        f"The shift where it starts, {block} {value:.3g}, is under adapt_bn_threshold "
        f"{threshold:g} (the blocks above carry what accumulates from it): BN keeps "
        "the source's statistics in inference mode (bn_policy frozen)."
    )
    return "frozen"


def _step_below(start: str | None, steps: list[str], units: list[str]) -> str | None:
    """The first of ``steps`` (top first) that unfreezes more than ``start``."""
    if start is None:
        return steps[0]
    deeper = [step for step in steps if units.index(step) < units.index(start)]
    return deeper[0] if deeper else start
