"""The rules every fine-tuning plan keeps, whoever wrote it.

A plan is a list of stages: dicts with ``name``, ``unfreeze_from`` (``None`` for the
head only, an IRv2 unit name such as ``block8_1``, or an index into Keras's list of
IRv2's layers, ``500`` for the textbook ``layers[500:]``), ``epochs``, ``learning_rate``,
``bn_policy`` (one of ``backbone.BN_POLICIES``) and optionally ``warmup_epochs`` and
``weight_decay``. Every plan, whether ``feature_shift`` measured it or a user wrote it
in ``finetune.stages``, must pass :func:`validate_stages` and keep the learning-rate
limits of ``feature_shift.plan_rules`` (:func:`learning_rate_problems`).

Three pipelines check them: ``feature_shift`` before it writes ``finetune_plan``,
``finetune`` before it trains a stage, and ``evaluation``, whose diagnosis names the
stages that broke them. They live here, outside any one pipeline, so that all three
apply the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from irv2_pipeline.backbone import BN_POLICIES

REQUIRED_KEYS = ("name", "unfreeze_from", "epochs", "learning_rate", "bn_policy")
OPTIONAL_KEYS = ("warmup_epochs", "weight_decay")

# The first unit of each block group, where unfreezing a group starts.
FIRST_UNIT = {
    "stem": "stem",
    "block35": "block35_1",
    "mixed_6a": "mixed_6a",
    "block17": "block17_1",
    "mixed_7a": "mixed_7a",
    "block8": "block8_1",
    "conv_7b": "conv_7b",
}


# From this share of greyscale images on, the stem's shift is not read as a domain
# shift (shift_start).
GRAYSCALE_SHARE = 0.5


class PlanError(ValueError):
    """A stage list or plan setting that cannot be used; the message names it."""


def validate_stages(
    stages: Sequence[Mapping[str, Any]],
    where: str,
    units: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Checks a list of stages and returns it as plain dicts.

    Args:
        stages: The stages.
        where: The parameter or dataset they come from, for error messages.
        units: IRv2 unit names in network order; when given, ``unfreeze_from`` must
            be one of them.

    Returns:
        The stages, with numbers as ``int`` and ``float``.

    Raises:
        PlanError: An empty list, a missing or unknown key, a bad value.
    """
    if not stages:
        raise PlanError(f"{where}: no stages; at least one is needed")
    checked = []
    for index, stage in enumerate(stages):
        label = f"{where}[{index}]"
        if not isinstance(stage, Mapping):
            raise PlanError(f"{label} is not a mapping of stage settings")
        missing = [key for key in REQUIRED_KEYS if key not in stage]
        unknown = [key for key in stage if key not in (*REQUIRED_KEYS, *OPTIONAL_KEYS)]
        if missing or unknown:
            raise PlanError(
                f"{label}: "
                + "; ".join(
                    part
                    for part in (
                        missing and f"missing {', '.join(missing)}",
                        unknown and f"unknown {', '.join(unknown)}",
                    )
                    if part
                )
                + f" (a stage has {', '.join(REQUIRED_KEYS)}, optionally "
                f"{', '.join(OPTIONAL_KEYS)})"
            )
        start = stage["unfreeze_from"]
        if isinstance(start, int) and not isinstance(start, bool):
            if start < 0:
                raise PlanError(
                    f"{label}.unfreeze_from = {start}: a layer index must not be "
                    "negative"
                )
        elif start is not None and units is not None and start not in units:
            raise PlanError(
                f"{label}.unfreeze_from = {start!r} is not an IRv2 block; use null "
                f"(head only), a layer index, or one of {', '.join(units)}"
            )
        if stage["bn_policy"] not in BN_POLICIES:
            raise PlanError(
                f"{label}.bn_policy = {stage['bn_policy']!r}; use one of "
                f"{', '.join(BN_POLICIES)}"
            )
        epochs = _number(stage["epochs"], f"{label}.epochs", int)
        learning_rate = _number(stage["learning_rate"], f"{label}.learning_rate", float)
        if epochs < 1 or learning_rate <= 0:
            raise PlanError(
                f"{label}: epochs ({epochs}) must be at least 1 and learning_rate "
                f"({learning_rate}) positive"
            )
        clean = {
            "name": str(stage["name"]),
            "unfreeze_from": start,
            "epochs": epochs,
            "learning_rate": learning_rate,
            "bn_policy": stage["bn_policy"],
        }
        for key, kind in (("warmup_epochs", int), ("weight_decay", float)):
            if stage.get(key) is not None:
                value = _number(stage[key], f"{label}.{key}", kind)
                if value < 0:
                    raise PlanError(f"{label}.{key} = {value} must not be negative")
                clean[key] = value
        checked.append(clean)
    return checked


def learning_rate_problems(
    stages: Sequence[Mapping[str, Any]], rules: Mapping[str, Any]
) -> list[str]:
    """Learning rates that would wreck the pretrained features or the head.

    Args:
        stages: Stages as in :func:`validate_stages`.
        rules: ``feature_shift.plan_rules``: ``max_backbone_learning_rate`` (for any
            stage that unfreezes backbone layers) and ``max_head_learning_rate``.

    Returns:
        One sentence per problem, naming the stage, its rate and the limit; empty when
        the plan keeps the rules.
    """
    max_backbone = float(rules["max_backbone_learning_rate"])
    max_head = float(rules["max_head_learning_rate"])
    problems = []
    for stage in stages:
        rate = float(stage["learning_rate"])
        start = stage.get("unfreeze_from")
        if start is not None and rate > max_backbone:
            problems.append(
                f"stage {stage['name']!r} unfreezes the backbone from {start} with "
                f"learning_rate {rate:g}, above max_backbone_learning_rate "
                f"{max_backbone:g}: updates that large overwrite the pretrained "
                "features the fine-tuning is meant to keep"
            )
        elif start is None and rate > max_head:
            problems.append(
                f"stage {stage['name']!r} trains the head with learning_rate "
                f"{rate:g}, above max_head_learning_rate {max_head:g}: the head "
                "diverges or lands on a poor solution"
            )
    return problems


def blocks_reaching(block_shift: Mapping[str, float], threshold: float) -> list[str]:
    """The blocks whose BN shift reaches ``threshold``, in the given order.

    One comparison (``>=``) for every shift threshold: the plan's ``shift_threshold``
    and ``adapt_bn_threshold`` and the evaluation's ``domain_gap.max_block_shift``.
    The diagnosis suggests a ``shift_threshold`` equal to its own threshold, and that
    plan must then reach the very blocks the diagnosis named.

    Args:
        block_shift: BN shift per block group, in network order.
        threshold: The shift from which a block counts as far from the source.

    Returns:
        The blocks at or above ``threshold``, shallowest first.
    """
    return [block for block, shift in block_shift.items() if shift >= threshold]


def shift_start(
    block_shift: Mapping[str, float], threshold: float, grayscale_share: float = 0.0
) -> str | None:
    """Where the shift starts: the shallowest block whose shift reaches ``threshold``.

    In inference mode a shift accumulates: every block above the first shifted one
    also sees inputs off its statistics, and the top's shift is often 4-10x the
    stem's. Where it starts is what the target changed; the plan, the BatchNorm
    switch and the ``domain_gap`` finding all read this block.

    When most images are greyscale (``grayscale_share`` at least
    :data:`GRAYSCALE_SHARE`) the stem is passed over: R = G = B leaves the stem's
    colour-opponent filters nothing to see, and their collapsed variance alone is a
    shift of about 2 (a variance ratio of 0.1) whatever the images show. The shift of
    a grey target's content starts at the first block above the stem.

    Args:
        block_shift: Shift per block group, in network order.
        threshold: The shift from which a block counts as far from the source.
        grayscale_share: The share of the measured images whose channels are equal.

    Returns:
        The block, or ``None`` when no block (the stem aside, for grey images)
        reaches ``threshold``.
    """
    grayscale = grayscale_share >= GRAYSCALE_SHARE
    considered = {
        block: value
        for block, value in block_shift.items()
        if not (grayscale and block == "stem")
    }
    reached = blocks_reaching(considered, threshold)
    return reached[0] if reached else None


def _number(value: Any, name: str, kind: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanError(f"{name} = {value!r} is not a number")
    if kind is int and value != int(value):
        raise PlanError(f"{name} = {value!r} is not a whole number")
    return kind(value)
