"""Optimizers with layer-wise learning rates, and the warm-up + cosine schedule.

Core Keras has no per-layer learning rates. :class:`LayerwiseAdamW` and
:class:`LayerwiseSGD` multiply the learning rate of every variable by its own factor
inside ``update_step``, so the *update* scales, not the gradient (Adam normalizes
gradients away: scaling them would change nothing). Decoupled weight decay is applied
in the same place, at the same scaled rate, to kernels only (biases, BatchNorm
``gamma`` and ``beta`` are not decayed). Plain Keras ops only: any backend.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras

from irv2_pipeline.backbone import GROUPS, group_of, unit_map

OPTIMIZERS = ("adamw", "sgd", "adam")
# warmup_cosine: linear warm-up, then cosine decay (ours); constant: the stage's rate
# throughout, no schedule (the textbook recipes).
LR_SCHEDULES = ("warmup_cosine", "constant")


class _LayerwiseUpdates:
    """Mixin: per-variable learning-rate factors and decoupled weight decay.

    Args:
        lr_multipliers: Variable path to learning-rate factor; others get 1.
        decoupled_weight_decay: Weight decay, applied as ``w -= w * decay * lr``
            with the variable's own learning rate.
    """

    def __init__(
        self,
        *args,
        lr_multipliers: Mapping[str, float] | None = None,
        decoupled_weight_decay: float = 0.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.lr_multipliers = dict(lr_multipliers or {})
        self.decoupled_weight_decay = float(decoupled_weight_decay)
        self._factors: list[float] = []
        self._decayed: list[bool] = []

    def build(self, variables):
        if self.built:
            return
        paths = [variable.path for variable in variables]
        if len(set(paths)) != len(paths):
            repeated = sorted({p for p in paths if paths.count(p) > 1})
            raise ValueError(
                f"Variables share paths, factors are ambiguous: {repeated}"
            )
        super().build(variables)
        self._factors = [float(self.lr_multipliers.get(p, 1.0)) for p in paths]
        self._decayed = [len(variable.shape) > 1 for variable in variables]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        scaled = keras.ops.multiply(
            keras.ops.cast(learning_rate, variable.dtype), self._factors[index]
        )
        if self.decoupled_weight_decay and self._decayed[index]:
            self.assign_sub(
                variable,
                keras.ops.multiply(
                    variable, keras.ops.multiply(scaled, self.decoupled_weight_decay)
                ),
            )
        super().update_step(gradient, variable, scaled)

    def get_config(self):
        config = super().get_config()
        config["lr_multipliers"] = self.lr_multipliers
        config["decoupled_weight_decay"] = self.decoupled_weight_decay
        return config


class LayerwiseAdamW(_LayerwiseUpdates, keras.optimizers.Adam):
    """AdamW (Adam with decoupled weight decay) with per-variable learning rates."""


class LayerwiseSGD(_LayerwiseUpdates, keras.optimizers.SGD):
    """SGD with momentum, decoupled weight decay and per-variable learning rates."""


def layerwise_multipliers(backbone: keras.Model, decay: float) -> dict[str, float]:
    """Learning-rate factors of the backbone's variables: ``decay ** distance``.

    The head has distance 0 (factor 1); ``conv_7b`` 1, ``block8`` 2, ... ``stem`` 7,
    following ``backbone.GROUPS`` from the output back to the input.

    Args:
        backbone: IRv2.
        decay: Factor per block group, in ``(0, 1]``; 1 turns the decay off.

    Returns:
        Variable path to factor, for every variable of the backbone.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"finetune.layerwise_lr_decay = {decay} must be in (0, 1]")
    units = unit_map(backbone)
    factors = {}
    for layer in backbone.layers:
        distance = len(GROUPS) - GROUPS.index(group_of(units[layer.name]))
        for variable in layer.weights:
            factors[variable.path] = decay**distance
    return factors


def make_optimizer(
    name: str,
    schedule: keras.optimizers.schedules.LearningRateSchedule,
    weight_decay: float,
    lr_multipliers: Mapping[str, float],
) -> keras.optimizers.Optimizer:
    """The stage's optimizer: ``adamw`` (default), ``sgd`` (momentum 0.9, Nesterov)
    or ``adam`` (Keras's plain Adam, as the textbook recipes use it: no weight decay,
    one learning rate for every layer).

    Args:
        name: One of :data:`OPTIMIZERS`.
        schedule: The learning rate: a schedule, or a number for a constant rate.
        weight_decay: Decoupled weight decay (``adam`` takes none).
        lr_multipliers: Variable path to learning-rate factor (``adam``: all 1).
    """
    if name == "adam":
        uneven = sorted({f for f in lr_multipliers.values() if f != 1.0})
        if weight_decay or uneven:
            raise ValueError(
                "finetune.optimizer = 'adam' is plain Adam: set the stages' "
                f"weight_decay to 0 (got {weight_decay}) and finetune."
                f"layerwise_lr_decay to 1 (factors {uneven}), or use adamw"
            )
        return keras.optimizers.Adam(learning_rate=schedule)
    common = {
        "learning_rate": schedule,
        "lr_multipliers": lr_multipliers,
        "decoupled_weight_decay": weight_decay,
    }
    if name == "adamw":
        return LayerwiseAdamW(**common)
    if name == "sgd":
        return LayerwiseSGD(momentum=0.9, nesterov=True, **common)
    raise ValueError(
        f"finetune.optimizer = {name!r}; use one of {', '.join(OPTIMIZERS)}"
    )


def warmup_cosine(
    learning_rate: float,
    epochs: int,
    warmup_epochs: int,
    steps_per_epoch: int,
    final_fraction: float,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 to ``learning_rate``, then cosine decay.

    Args:
        learning_rate: The peak rate.
        epochs: The stage's epochs.
        warmup_epochs: Epochs of linear warm-up (fewer than ``epochs``).
        steps_per_epoch: Optimizer steps per epoch.
        final_fraction: The rate at the end, as a fraction of the peak.
    """
    warmup_steps = warmup_epochs * steps_per_epoch
    decay_steps = max(1, epochs * steps_per_epoch - warmup_steps)
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps, alpha=final_fraction
        )
    return keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps,
        alpha=final_fraction,
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )


def stage_schedule(
    kind: str,
    learning_rate: float,
    *,
    epochs: int,
    warmup_epochs: int,
    steps_per_epoch: int,
    final_fraction: float,
) -> keras.optimizers.schedules.LearningRateSchedule | float:
    """A stage's learning rate: :func:`warmup_cosine`, or the plain number for
    ``constant`` (one of :data:`LR_SCHEDULES`; the other arguments as there)."""
    if kind == "constant":
        return float(learning_rate)
    if kind == "warmup_cosine":
        return warmup_cosine(
            learning_rate, epochs, warmup_epochs, steps_per_epoch, final_fraction
        )
    raise ValueError(
        f"finetune.lr_schedule = {kind!r}; use one of {', '.join(LR_SCHEDULES)}"
    )
