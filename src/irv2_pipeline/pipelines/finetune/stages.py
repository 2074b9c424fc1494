"""The stages to train: from ``finetune_plan`` or ``finetune.stages``, checked first.

A stage trains the head and the backbone from ``unfreeze_from`` on (``None``: the
head only; a unit name, or a layer index for Keras's ``layers[index:]``), for ``epochs`` epochs at a peak ``learning_rate`` reached after
``warmup_epochs`` of linear warm-up and followed by cosine decay, with decoupled
``weight_decay`` and a BatchNorm policy (``backbone.BN_POLICIES``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from irv2_pipeline.plan_rules import learning_rate_problems, validate_stages


class StageConfigError(ValueError):
    """Stages that must not be trained as configured; the message says why."""


@dataclass(frozen=True)
class Stage:
    """One training stage (see the module docstring)."""

    name: str
    unfreeze_from: str | int | None
    epochs: int
    learning_rate: float
    bn_policy: str
    warmup_epochs: int
    weight_decay: float

    @property
    def head_only(self) -> bool:
        """Whether the whole backbone stays frozen."""
        return self.unfreeze_from is None

    def as_dict(self) -> dict[str, Any]:
        """The stage as plain JSON-able values."""
        return asdict(self)


def resolve_stages(
    finetune_plan: Mapping[str, Any],
    finetune: Mapping[str, Any],
    plan_rules: Mapping[str, Any],
    units: Sequence[str],
) -> list[Stage]:
    """The stages to train, checked before any training starts.

    ``finetune.stages`` overrides the plan when it is not null. Stages without
    ``warmup_epochs`` or ``weight_decay`` take ``finetune.warmup_epochs`` and
    ``finetune.weight_decay``.

    Args:
        finetune_plan: The ``finetune_plan`` dataset (``{"stages": [...], ...}``).
        finetune: The ``finetune`` parameters.
        plan_rules: ``feature_shift.plan_rules``, the learning-rate limits every plan
            keeps.
        units: IRv2's unit names, input to output (``backbone.unit_order``).

    Returns:
        The stages, in training order.

    Raises:
        StageConfigError: Unknown keys or layer names, bad values, a stage that
            unfreezes less than the one before, a warm-up as long as the stage, or a
            learning rate the plan rules flag (the message names the stage).
    """
    override = finetune.get("stages")
    if override is not None:
        raw, where = override, "finetune.stages"
    else:
        if "stages" not in finetune_plan:
            raise StageConfigError(
                "finetune_plan has no `stages`; rerun `kedro run --pipeline "
                "feature_shift`, or set finetune.stages in conf/local/parameters.yml"
            )
        raw, where = finetune_plan["stages"], "finetune_plan.stages"
    try:
        checked = validate_stages(raw, where, units)
    except ValueError as exc:
        raise StageConfigError(str(exc)) from exc
    stages = [
        Stage(
            name=stage["name"],
            unfreeze_from=stage["unfreeze_from"],
            epochs=stage["epochs"],
            learning_rate=stage["learning_rate"],
            bn_policy=stage["bn_policy"],
            warmup_epochs=int(
                stage.get("warmup_epochs", finetune.get("warmup_epochs", 0))
            ),
            weight_decay=float(
                stage.get("weight_decay", finetune.get("weight_decay", 0.0))
            ),
        )
        for stage in checked
    ]
    problems = _order_problems(stages, list(units)) + _warmup_problems(stages)
    problems += learning_rate_problems([s.as_dict() for s in stages], plan_rules)
    if problems:
        raise StageConfigError(
            f"{where} cannot be trained as it is:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
            + "\nChange the plan's settings (feature_shift.plan) or override the "
            "stages with finetune.stages."
        )
    return stages


def _order_problems(stages: Sequence[Stage], units: list[str]) -> list[str]:
    """Stage names must be unique; each stage unfreezes at least what the last did."""
    problems = []
    names = [stage.name for stage in stages]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        problems.append(f"stage names must be unique; repeated: {repeated}")
    by_index = {type(s.unfreeze_from) for s in stages if not s.head_only}
    if len(by_index) > 1:
        # A layer index and a unit name only compare on the built network.
        return [
            *problems,
            "stages unfreeze by unit name and by layer index at once; use one kind",
        ]
    depth = math.inf  # head only: nothing of the backbone is unfrozen
    for before, stage in zip([None, *stages[:-1]], stages, strict=True):
        start = (
            math.inf
            if stage.head_only
            else stage.unfreeze_from
            if isinstance(stage.unfreeze_from, int)
            else units.index(stage.unfreeze_from)
        )
        if start > depth:
            problems.append(
                f"stage {stage.name!r} unfreezes from {stage.unfreeze_from or 'nothing (head only)'}, "
                f"less than stage {before.name!r} before it ({before.unfreeze_from}): "
                "layers trained in one stage would be frozen again in the next"
            )
        depth = min(depth, start)
    return problems


def _warmup_problems(stages: Sequence[Stage]) -> list[str]:
    return [
        f"stage {stage.name!r}: warmup_epochs {stage.warmup_epochs} must be fewer "
        f"than its epochs ({stage.epochs}), or the cosine decay has no steps"
        for stage in stages
        if stage.warmup_epochs >= stage.epochs
    ]
