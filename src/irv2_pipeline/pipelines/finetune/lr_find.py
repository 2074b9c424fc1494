"""Learning-rate range test: sweep the rate up exponentially, watch the loss, suggest.

A sweep trains one batch per step while the learning rate grows exponentially from
``min_lr`` to ``max_lr`` (Smith, "Cyclical Learning Rates", 2017; fastai's
``lr_find``), records the training loss, and suggests a rate from the smoothed curve.

The trainee is left exactly as it was: the sweep trains a second functional model on
the trainee's own layers, compiled with a fresh optimizer of the same class and
configuration but a plain (float) learning rate, so the trainee's optimizer, its step
count and its compiled train function are never touched; and every variable of the
trainee's layers (weights, BatchNorm moving statistics, random-seed states) is saved
before the sweep and written back after it, even when the sweep fails.

The suggestion follows fastai's "valley" idea, re-implemented: the longest descending
stretch of the smoothed curve, and the rate at its middle (see :func:`valley`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from matplotlib.figure import Figure

# fastai's smoothing factor: the smoothed loss averages over roughly the last 50 steps.
SMOOTHING = 0.98
# The first tenth of a sweep is skipped by the suggestion: there the rate is too small
# to move the loss, and what little it moves is batch-to-batch noise.
SKIPPED_FRACTION = 0.1
# Fewer usable points than this give no valley worth the name.
MIN_POINTS = 5
# A valley must lower the smoothed loss by this fraction of its starting value; less is
# indistinguishable from the noise of which batches happened to come.
MIN_RELATIVE_DROP = 0.05
# The steep part of a valley leaves out this fraction of its drop at either end: its
# middle half, where noise on the flat stretches before and after cannot reach.
FALL_SPAN = 0.25
# Batches a tf.data input is shuffled over (whole batches, not examples): enough for
# different seeds to see different orders, little enough to hold in memory at 299 px.
SHUFFLED_BATCHES = 8


@dataclass(frozen=True)
class RangeTest:
    """One sweep.

    Attributes:
        learning_rates: The rate of each step taken.
        losses: The raw training loss of each step (of the batch, before its update).
        smoothed: ``losses`` exponentially smoothed and bias-corrected (fastai's).
        suggestion: The suggested rate; ``None`` when the curve has no valley.
        reason: How the suggestion was found, or why there is none.
    """

    learning_rates: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestion: float | None
    reason: str


def sweep_rates(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """``steps`` rates from ``min_lr`` to ``max_lr``, evenly spaced on a log scale."""
    if not 0.0 < min_lr < max_lr:
        raise ValueError(f"Need 0 < min_lr < max_lr, got {min_lr:g} and {max_lr:g}")
    if steps < 2:
        raise ValueError(f"A sweep needs at least 2 steps, got {steps}")
    return np.geomspace(min_lr, max_lr, steps)


def smooth(losses: np.ndarray, beta: float = SMOOTHING) -> np.ndarray:
    """Exponential moving average of ``losses``, bias-corrected as fastai does.

    The correction divides by ``1 - beta ** (i + 1)``, so early points are not pulled
    towards the zero the average starts from.
    """
    average = 0.0
    smoothed = np.empty(len(losses))
    for index, loss in enumerate(np.asarray(losses, dtype=float)):
        average = beta * average + (1.0 - beta) * loss
        smoothed[index] = average / (1.0 - beta ** (index + 1))
    return smoothed


def longest_descent(values: np.ndarray) -> tuple[int, int]:
    """Start and end index of the longest strictly decreasing subsequence.

    A subsequence, not a run of neighbours: a small bump of noise inside a long
    descent skips a point rather than cutting the descent in two.

    Returns:
        ``(start, end)``; equal when nothing decreases.
    """
    values = np.asarray(values, dtype=float)
    length = np.ones(len(values), dtype=int)
    start = np.arange(len(values))
    for index in range(1, len(values)):
        higher = np.flatnonzero(values[:index] > values[index])
        if higher.size:
            best = higher[np.argmax(length[higher])]
            length[index] = length[best] + 1
            start[index] = start[best]
    end = int(np.argmax(length))
    return int(start[end]), end


def valley(
    learning_rates: np.ndarray, smoothed: np.ndarray, planned_steps: int
) -> tuple[float | None, str]:
    """The suggested rate: the middle of the steep part of the longest valley.

    The first :data:`SKIPPED_FRACTION` of the planned steps are ignored, and so is
    everything from the first non-finite point on. In what remains:

    1. The valley, as in fastai: the longest strictly decreasing subsequence of the
       smoothed curve (:func:`longest_descent`). It must lower the loss by
       :data:`MIN_RELATIVE_DROP` of its start, else the curve is called flat.
    2. Its steep part: the middle half of the drop, from where the curve falls
       below the first quarter of the valley's drop for good to where it first
       reaches the last quarter (:data:`FALL_SPAN`).
    3. The suggestion: the geometric middle of the steep part.

    Step 2 is where this departs from fastai, which takes the middle of the valley
    counted in steps. A long flat stretch before the descent, in which noise still
    lets the loss edge down now and then, belongs to the longest decreasing
    subsequence and drags fastai's middle to rates that barely train; counting by
    the loss drop instead ignores it. On the S-shaped descent of a sweep, the
    middle of the fall's middle half is its steepest part. The smoothed curve lags
    the raw one by several steps, which moves the suggestion (as fastai's) towards
    higher rates; :func:`clip_to_rules` bounds it.

    Returns:
        The rate (or ``None``) and a sentence saying how it was found (or why not).
    """
    finite = np.isfinite(smoothed)
    usable = len(smoothed) if finite.all() else int(np.argmin(finite))
    skip = int(planned_steps * SKIPPED_FRACTION)
    if usable - skip < MIN_POINTS:
        return None, (
            f"only {max(usable - skip, 0)} usable steps after skipping the first "
            f"{skip}, too few for a valley (the sweep ended at rate "
            f"{learning_rates[-1]:.3g}): lower min_lr, or give more batches"
        )
    rates, losses = learning_rates[skip:usable], smoothed[skip:usable]
    first, last = longest_descent(losses)
    top, bottom = losses[first], losses[last]
    drop = (top - bottom) / abs(top) if first < last else 0.0
    if drop < MIN_RELATIVE_DROP:
        return None, (
            f"flat curve: the smoothed loss falls by {drop:.1%} at most "
            f"(needs {MIN_RELATIVE_DROP:.0%}) between rates {rates[0]:.3g} and "
            f"{rates[-1]:.3g}: no rate in this range lowers the training loss (the "
            "model may already sit in a minimum, or nothing trains)"
        )
    stretch = losses[first : last + 1]
    upper = top - FALL_SPAN * (top - bottom)
    # The last time above `upper`, not the first below it: on the flat stretch noise
    # may dip below it now and then before the descent proper begins.
    steep_start = first + int(np.flatnonzero(stretch > upper)[-1]) + 1
    below = stretch[steep_start - first :] <= bottom + FALL_SPAN * (top - bottom)
    steep_end = steep_start + int(np.argmax(below))
    rate = float(math.sqrt(rates[steep_start] * rates[steep_end]))
    return rate, (
        f"valley from {rates[first]:.3g} to {rates[last]:.3g} (smoothed loss "
        f"{top:.3g} to {bottom:.3g}, -{drop:.0%}), steepest between "
        f"{rates[steep_start]:.3g} and {rates[steep_end]:.3g}; suggestion at the "
        "geometric middle of that"
    )


def range_test(
    trainee: keras.Model,
    batches: tf.data.Dataset | Iterable,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    steps: int = 100,
    seed: int = 0,
    diverge_factor: float = 4.0,
    class_weight: Mapping[int, float] | None = None,
) -> RangeTest:
    """Sweeps the learning rate from ``min_lr`` to ``max_lr``, one batch per step.

    The trainee is restored afterwards (see the module docstring): training it next
    gives exactly what it would have given without the sweep.

    Args:
        trainee: A compiled functional Keras model; its optimizer (with a schedule or a
            float rate) is copied, not used.
        batches: ``(x, y)`` or ``(x, y, sample_weight)`` batches, cycled when fewer
            than ``steps``, a short last batch left out. A ``tf.data.Dataset`` is
            shuffled over :data:`SHUFFLED_BATCHES` whole batches; another iterable is
            read once, up to ``steps`` batches kept in memory, and each cycle
            shuffled.
        min_lr: The first step's rate.
        max_lr: The last step's rate.
        steps: Steps (batches) of the full sweep.
        seed: Seed of the batch order.
        diverge_factor: Stop once the smoothed loss exceeds this multiple of its
            minimum so far, or is not finite.
        class_weight: As in ``fit``; ``None`` for none.

    Returns:
        The curve and the suggestion; fewer than ``steps`` points when stopped early.
    """
    if trainee.optimizer is None or not trainee.compiled:
        raise ValueError(f"Compile {trainee.name!r} before its range test")
    rates = sweep_rates(min_lr, max_lr, steps)
    saved = [variable.numpy() for variable in trainee.variables]
    try:
        losses, stop = _sweep(
            _sweep_model(trainee, min_lr),
            _cycled(batches, steps, seed),
            rates,
            diverge_factor,
            class_weight,
        )
    finally:
        for variable, value in zip(trainee.variables, saved, strict=True):
            variable.assign(value)
    if not losses:
        raise ValueError("The range test got no batches")
    losses = np.asarray(losses)
    smoothed = smooth(losses)
    suggestion, reason = valley(rates[: len(losses)], smoothed, steps)
    return RangeTest(
        learning_rates=rates[: len(losses)],
        losses=losses,
        smoothed=smoothed,
        suggestion=suggestion,
        reason=f"{reason}; {stop}",
    )


def _sweep_model(trainee: keras.Model, learning_rate: float) -> keras.Model:
    """A model on ``trainee``'s layers, with a float-rate copy of its optimizer.

    Compiling a separate model keeps the trainee's compiled state (optimizer, train
    function, metrics) out of the sweep altogether.
    """
    config = trainee.optimizer.get_config()
    config["learning_rate"] = learning_rate
    optimizer = type(trainee.optimizer).from_config(config)
    model = keras.Model(trainee.inputs, trainee.outputs, name=f"{trainee.name}_sweep")
    model.compile(
        optimizer=optimizer, loss=trainee.loss, jit_compile=trainee.jit_compile
    )
    # Built now rather than inside the first traced step, which would trace it twice.
    optimizer.build(model.trainable_variables)
    return model


def _cycled(batches: tf.data.Dataset | Iterable, steps: int, seed: int) -> Iterator:
    """``steps`` batches in a seeded order, cycling through ``batches``.

    A batch smaller than one before it in the input's own order (a pass's short last
    batch) is left out before the shuffle: its loss would be a noisier point of the
    curve, and its other shape would trace the training step a second time (seconds
    for IRv2 on a CPU).
    """
    if isinstance(batches, tf.data.Dataset):
        order = _none_shorter_dataset(batches).shuffle(SHUFFLED_BATCHES, seed=seed)
        return iter(order.repeat().take(steps))
    kept = list(_none_shorter(itertools.islice(iter(batches), steps)))
    if not kept:
        raise ValueError("The range test got no batches")
    rng = np.random.default_rng(seed)
    cycles = -(-steps // len(kept))
    order = np.concatenate([rng.permutation(len(kept)) for _ in range(cycles)])
    return (kept[index] for index in order[:steps])


def _none_shorter(batches: Iterable) -> Iterator:
    """The batches, less each one smaller than a batch before it."""
    largest = 0
    for batch in batches:
        if len(batch[0]) >= largest:
            largest = len(batch[0])
            yield batch


def _none_shorter_dataset(batches: tf.data.Dataset) -> tf.data.Dataset:
    """:func:`_none_shorter` of a dataset of ``(x, y[, sample_weight])`` batches."""

    def step(largest: tf.Tensor, batch: tuple) -> tuple:
        size = tf.shape(batch[0], out_type=tf.int64)[0]
        return tf.maximum(largest, size), (size >= largest, batch)

    flagged = batches.scan(tf.constant(0, tf.int64), step)
    return flagged.filter(lambda keep, _: keep).map(lambda _, batch: batch)


def _sweep(
    model: keras.Model,
    batches: Iterator,
    rates: np.ndarray,
    diverge_factor: float,
    class_weight: Mapping[int, float] | None,
) -> tuple[list[float], str]:
    """Trains one batch per rate; returns the losses and how the sweep ended."""
    losses: list[float] = []
    smoothed, best = 0.0, math.inf
    for step, (rate, batch) in enumerate(zip(rates, batches, strict=False)):
        model.optimizer.learning_rate = float(rate)
        x, y, *weight = batch
        logs = model.train_on_batch(
            x,
            y,
            sample_weight=weight[0] if weight else None,
            class_weight=class_weight,
            return_dict=True,
        )
        loss = float(logs["loss"])
        losses.append(loss)
        smoothed = SMOOTHING * smoothed + (1.0 - SMOOTHING) * loss
        corrected = smoothed / (1.0 - SMOOTHING ** (step + 1))
        if not math.isfinite(corrected):
            return losses, f"stopped at step {step + 1}: loss not finite at {rate:.3g}"
        if corrected > diverge_factor * best:
            return losses, (
                f"stopped at step {step + 1}: smoothed loss above {diverge_factor:g}x "
                f"its minimum at {rate:.3g}"
            )
        best = min(best, corrected)
    if len(losses) < len(rates):
        return losses, f"the input ran out after {len(losses)} steps"
    return losses, f"no divergence up to {rates[-1]:.3g}"


def suggest_over_seeds(
    make_sweep: Callable[[int], RangeTest], seeds: Sequence[int]
) -> dict:
    """Repeats a sweep over seeds; summarizes the suggestions on a log scale.

    Args:
        make_sweep: Runs one sweep with the given seed (which should shuffle its
            batches, for example ``lambda s: range_test(model, data(s), seed=s)``).
        seeds: One sweep per seed.

    Returns:
        ``suggestion`` (the geometric median of the seeds' suggestions, ``None`` when
        no seed gave one), ``min``, ``max``, ``geometric_std`` (a factor: 1 means all
        agree; NaN without suggestions), ``suggestions`` (per seed, ``None`` where
        none), ``seeds``, ``reason``, and ``curve``: the sweep whose suggestion is
        nearest the median (the first when none), for :func:`lr_finder_figure`.
    """
    if not seeds:
        raise ValueError("suggest_over_seeds needs at least one seed")
    sweeps = [make_sweep(seed) for seed in seeds]
    found = [s.suggestion for s in sweeps if s.suggestion is not None]
    summary = {
        "suggestions": [s.suggestion for s in sweeps],
        "seeds": list(seeds),
        "curve": sweeps[0],
    }
    failed = sorted({s.reason for s in sweeps if s.suggestion is None})
    if not found:
        return summary | {
            "suggestion": None,
            "min": math.nan,
            "max": math.nan,
            "geometric_std": math.nan,
            "reason": f"no seed gave a valley: {' | '.join(failed)}",
        }
    logs = np.log(found)
    median = float(np.exp(np.median(logs)))
    nearest = min(
        (s for s in sweeps if s.suggestion is not None),
        key=lambda s: abs(math.log(s.suggestion) - math.log(median)),
    )
    reason = f"{len(found)} of {len(sweeps)} seeds gave a valley"
    if failed:
        reason += f"; the others: {' | '.join(failed)}"
    return summary | {
        "suggestion": median,
        "min": float(min(found)),
        "max": float(max(found)),
        "geometric_std": float(np.exp(np.std(logs))),
        "reason": reason,
        "curve": nearest,
    }


def clip_to_rules(
    rate: float, *, head_only: bool, plan_rules: Mapping
) -> tuple[float, str]:
    """Keeps a suggested rate within the plan's limits.

    Args:
        rate: The suggestion (positive).
        head_only: Whether the stage trains the head alone.
        plan_rules: ``feature_shift.plan_rules``: ``max_head_learning_rate`` caps
            head-only stages, ``max_backbone_learning_rate`` stages that unfreeze
            backbone layers (large updates there overwrite the pretrained features).

    Returns:
        The rate to use and a sentence saying what was done.
    """
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"A learning rate must be positive and finite, got {rate}")
    key = "max_head_learning_rate" if head_only else "max_backbone_learning_rate"
    limit = float(plan_rules[key])
    if rate > limit:
        return limit, f"suggestion {rate:.3g} above {key} {limit:g}: clipped to it"
    return rate, f"suggestion {rate:.3g} within {key} {limit:g}"


TABLE_COLUMNS = [
    "stage",
    "suggestion",
    "min",
    "max",
    "spread",
    "clipped_rate",
    "reason",
]


def lr_finder_table(sweeps: Mapping[str, dict]) -> pd.DataFrame:
    """One row per stage: the suggestion, its spread over seeds, the rate kept.

    Args:
        sweeps: Stage name to :func:`suggest_over_seeds`'s summary, optionally with
            ``clipped_rate`` and ``clip_note`` from :func:`clip_to_rules` added.

    Returns:
        Columns :data:`TABLE_COLUMNS`; ``spread`` is the geometric standard deviation
        (a factor), missing values are NaN.
    """
    rows = []
    for stage, summary in sweeps.items():
        suggestion = summary.get("suggestion")
        note = summary.get("clip_note")
        rows.append(
            {
                "stage": stage,
                "suggestion": math.nan if suggestion is None else suggestion,
                "min": summary.get("min", math.nan),
                "max": summary.get("max", math.nan),
                "spread": summary.get("geometric_std", math.nan),
                "clipped_rate": summary.get("clipped_rate", math.nan),
                "reason": "; ".join(p for p in (summary.get("reason"), note) if p),
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def lr_finder_figure(curves: Mapping[str, RangeTest]) -> Figure:
    """Loss against learning rate (log scale), one panel per stage.

    Each panel shows the raw loss (faint), the smoothed loss, and the suggestion as a
    dashed line; a panel without a suggestion says why in its title.
    """
    figure = Figure(figsize=(4.2 * max(1, len(curves)), 3.6), layout="constrained")
    if not curves:
        figure.text(0.5, 0.5, "no learning-rate sweeps", ha="center", va="center")
        return figure
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    for axis, (stage, curve) in zip(axes, curves.items(), strict=True):
        _draw_curve(axis, curve)
        title = stage if curve.suggestion is not None else f"{stage}: no suggestion"
        axis.set_title(title, fontsize=10)
    figure.suptitle("Learning-rate range test")
    return figure


def _draw_curve(axis, curve: RangeTest) -> None:
    axis.plot(curve.learning_rates, curve.losses, color="tab:blue", alpha=0.3)
    axis.plot(curve.learning_rates, curve.smoothed, color="tab:blue", label="smoothed")
    finite = curve.smoothed[np.isfinite(curve.smoothed)]
    if finite.size:
        # The raw loss of a diverging step would squash the rest of the curve.
        low, high = float(finite.min()), float(finite.max())
        margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
        axis.set_ylim(low - margin, high + margin)
    if curve.suggestion is not None:
        axis.axvline(
            curve.suggestion,
            color="tab:red",
            linestyle="--",
            label=f"suggestion {curve.suggestion:.2g}",
        )
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("training loss")
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)


@dataclass(frozen=True)
class RangeTestSettings:
    """How stages find their learning rate, from ``finetune.lr_find``.

    Attributes:
        seeds: One sweep per seed; the suggestion is their geometric median.
        steps: Training steps (batches) of one sweep.
        min_lr: The first step's rate.
        max_lr: The last step's rate.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 100
    min_lr: float = 1e-7
    max_lr: float = 1.0

    @classmethod
    def from_params(cls, params: Mapping | None) -> RangeTestSettings | None:
        """The settings, or ``None`` when ``enabled`` is false (or no block)."""
        if not params or not params.get("enabled", False):
            return None
        settings = cls(
            seeds=tuple(int(s) for s in params.get("seeds", cls.seeds)),
            steps=int(params.get("steps", cls.steps)),
            min_lr=float(params.get("min_lr", cls.min_lr)),
            max_lr=float(params.get("max_lr", cls.max_lr)),
        )
        if not settings.seeds or settings.steps < 2:
            raise ValueError(
                "finetune.lr_find needs at least one seed and two steps, got "
                f"seeds={list(settings.seeds)}, steps={settings.steps}"
            )
        if not 0 < settings.min_lr < settings.max_lr:
            raise ValueError(
                f"finetune.lr_find: min_lr {settings.min_lr:g} must be positive and "
                f"below max_lr {settings.max_lr:g}"
            )
        return settings


CURVE_COLUMNS = ["stage", "step", "learning_rate", "loss", "smoothed", "suggestion"]


def curves_table(curves: Mapping[str, RangeTest]) -> pd.DataFrame:
    """The sweeps as one long table (``lr_finder_curves``), one row per step."""
    frames = [
        pd.DataFrame(
            {
                "stage": stage,
                "step": np.arange(1, len(curve.losses) + 1),
                "learning_rate": curve.learning_rates,
                "loss": curve.losses,
                "smoothed": curve.smoothed,
                "suggestion": math.nan
                if curve.suggestion is None
                else curve.suggestion,
            }
        )
        for stage, curve in curves.items()
    ]
    if not frames:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[CURVE_COLUMNS]


def curves_from_table(table: pd.DataFrame) -> dict[str, RangeTest]:
    """:func:`curves_table` read back: stage name to its sweep."""
    curves = {}
    for stage, rows in table.groupby("stage", sort=False):
        suggestion = rows["suggestion"].iloc[0]
        curves[str(stage)] = RangeTest(
            learning_rates=rows["learning_rate"].to_numpy(float),
            losses=rows["loss"].to_numpy(float),
            smoothed=rows["smoothed"].to_numpy(float),
            suggestion=None if pd.isna(suggestion) else float(suggestion),
            reason="",
        )
    return curves
