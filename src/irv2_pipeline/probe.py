"""The linear probe: multinomial logistic regression on standardized frozen features.

One probe serves two places. ``feature_shift`` scores how well each depth's frozen
features predict the labels (``transferability.probe_val_accuracy``, the figure every
run is held against); ``finetune`` trains its head stage as the same probe, run to
convergence by L-BFGS with the L2 strength chosen on validation (LP-FT, Kumar et al.,
2022: a converged linear head first, then fine-tuning).

Features are standardized with the training features' mean and spread before the
fit, and the standardization is then folded into the weights, so the probe is a plain
``logits = features @ kernel + bias`` on the raw features: it drops into a Keras
``Dense`` layer as it is. Not a ``keras.layers.Normalization`` in the head: that layer
normalizes with a copy of its statistics taken when it is adapted or loaded, not with
its variables, so restoring weights (a resumed checkpoint, the best stage kept) would
leave it normalizing with stale values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import log_softmax
from sklearn.linear_model import LogisticRegression

# Logit of a class with no training image: never predicted.
ABSENT_CLASS_LOGIT = -1e4


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe, on raw features.

    Attributes:
        kernel: ``(dims, classes)``.
        bias: ``(classes,)``.
        c: The inverse L2 strength it was fitted with (scikit-learn's ``C``).
    """

    kernel: np.ndarray
    bias: np.ndarray
    c: float

    def log_probabilities(self, features: np.ndarray) -> np.ndarray:
        """Log softmax of the logits, one row per image."""
        return log_softmax(
            np.asarray(features, np.float64) @ self.kernel + self.bias, 1
        )

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        """The share of images whose most probable class is their label."""
        predicted = np.argmax(self.log_probabilities(features), axis=1)
        return float(np.mean(predicted == np.asarray(labels)))

    def log_loss(
        self, features: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0
    ) -> float:
        """Mean cross-entropy of the labels, smoothed as Keras's
        ``CategoricalCrossentropy(label_smoothing=...)`` smooths them (the target is
        ``1 - s`` on the label plus ``s / classes`` on every class)."""
        log_p = self.log_probabilities(features)
        own = log_p[np.arange(len(log_p)), np.asarray(labels)]
        smoothing = float(label_smoothing)
        mixed = (1.0 - smoothing) * own + smoothing * log_p.mean(axis=1)
        return float(-np.mean(mixed))


def fit_probe(
    features: np.ndarray,
    labels: np.ndarray,
    classes: int,
    *,
    c: float,
    max_iter: int,
    seed: int,
    sample_weight: np.ndarray | None = None,
) -> LinearProbe:
    """Fits the probe on standardized features and folds the standardization in.

    Args:
        features: ``(images, dims)`` training features.
        labels: Class indices.
        classes: Number of classes of the model (some may have no training image).
        c: Inverse L2 strength.
        max_iter: L-BFGS iteration cap.
        seed: Of the solver.
        sample_weight: Per-image loss weights (class weights), or ``None``.

    Raises:
        ValueError: Fewer than two classes among the labels.
    """
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(f"A probe needs two classes; the labels hold {list(present)}")
    mean = features.mean(axis=0)
    # A constant feature carries nothing: scaled by 1, it stays 0 after centring.
    scale = features.std(axis=0)
    scale[scale == 0] = 1.0
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(
        (features - mean) / scale, labels, sample_weight=sample_weight
    )
    coef, intercept = model.coef_, model.intercept_
    if len(present) == 2:
        # scikit-learn keeps one logit for two classes (the second's, against 0).
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    kernel = np.zeros((features.shape[1], classes))
    bias = np.full(classes, ABSENT_CLASS_LOGIT)
    kernel[:, present] = (coef / scale).T
    bias[present] = intercept - (coef / scale) @ mean
    return LinearProbe(kernel=kernel, bias=bias, c=float(c))


def select_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    classes: int,
    *,
    c_grid: Sequence[float],
    max_iter: int,
    seed: int,
    sample_weight: np.ndarray | None = None,
    label_smoothing: float = 0.0,
) -> tuple[LinearProbe, pd.DataFrame]:
    """Fits one probe per L2 strength and keeps the best on validation.

    The best has the highest validation accuracy; ties go to the lower validation
    loss, smoothed by ``label_smoothing`` so that it is the loss the stages trained by
    gradient are compared with.

    Args:
        train: Training ``(features, labels)``.
        val: Validation ``(features, labels)``.
        classes: Number of classes.
        c_grid: Inverse L2 strengths to try.
        max_iter: L-BFGS iteration cap.
        seed: Of the solver.
        sample_weight: Per-training-image loss weights, or ``None``.
        label_smoothing: Of the validation loss (``finetune.label_smoothing``).

    Returns:
        The chosen probe and a table of every strength tried (``c``,
        ``train_accuracy``, ``val_accuracy``, ``val_loss``, ``selected``).
    """
    if not c_grid:
        raise ValueError("No L2 strengths to choose from (an empty c_grid)")
    probes, rows = [], []
    for c in c_grid:
        probe = fit_probe(
            *train,
            classes,
            c=float(c),
            max_iter=max_iter,
            seed=seed,
            sample_weight=sample_weight,
        )
        probes.append(probe)
        rows.append(
            {
                "c": float(c),
                "train_accuracy": probe.accuracy(*train),
                "val_accuracy": probe.accuracy(*val),
                "val_loss": probe.log_loss(*val, label_smoothing=label_smoothing),
            }
        )
    table = pd.DataFrame(rows)
    best = int(
        table.sort_values(
            ["val_accuracy", "val_loss"], ascending=[False, True], kind="stable"
        ).index[0]
    )
    table["selected"] = table.index == best
    return probes[best], table
