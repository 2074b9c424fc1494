"""Do two sets of images come from the same conditions? Two-sample statistics on features.

Both sets are standardized and projected together onto their leading principal
components (fitted on the pooled sample, so swapping images between the sets leaves
the projection unchanged and the permutation test stays exact). In that space:

- the Fréchet distance of the two Gaussians fitted to the sets (as in FID), and
- the unbiased MMD² with an RBF kernel whose bandwidth is the median pairwise
  distance, with a permutation-test p-value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TwoSampleResult:
    """The statistics of one comparison."""

    n_reference: int
    n_compared: int
    components: int
    frechet: float
    mmd2: float
    p_value: float


def project_together(
    reference: np.ndarray, compared: np.ndarray, max_components: int
) -> tuple[np.ndarray, np.ndarray]:
    """Standardizes both sets with pooled statistics and projects them onto PCs.

    Args:
        reference: ``(n, features)``.
        compared: ``(m, features)``.
        max_components: At most this many components; never more than ``n + m - 2``
            (a covariance needs more images than dimensions to be of full rank).

    Returns:
        Both sets in the shared principal-component space.
    """
    pooled = np.concatenate([reference, compared]).astype(np.float64)
    spread = pooled.std(axis=0)
    # Constant features carry nothing; dividing by 1 leaves them at zero.
    spread[spread < 1e-12] = 1.0
    standardized = (pooled - pooled.mean(axis=0)) / spread
    components = max(1, min(max_components, len(pooled) - 2, pooled.shape[1]))
    _, _, directions = np.linalg.svd(standardized, full_matrices=False)
    projected = standardized @ directions[:components].T
    return projected[: len(reference)], projected[len(reference) :]


def frechet_distance(reference: np.ndarray, compared: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of two samples.

    The trace of the matrix square root is the sum of the square roots of the
    eigenvalues of ``S_a S_b``, which are real and non-negative up to rounding.
    """
    mean_gap = reference.mean(axis=0) - compared.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(reference, rowvar=False))
    cov_b = np.atleast_2d(np.cov(compared, rowvar=False))
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b)
    root_trace = np.sqrt(np.clip(eigenvalues.real, 0.0, None)).sum()
    distance = mean_gap @ mean_gap + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace
    return float(max(distance, 0.0))


def rbf_kernel(points: np.ndarray) -> np.ndarray:
    """The RBF kernel matrix ``exp(-d^2 / (2 h^2))``, ``h`` the median distance."""
    squares = (points**2).sum(axis=1)
    distances2 = np.clip(
        squares[:, None] + squares[None, :] - 2 * points @ points.T, 0, None
    )
    off_diagonal = distances2[~np.eye(len(points), dtype=bool)]
    bandwidth2 = float(np.median(off_diagonal)) if off_diagonal.size else 1.0
    if bandwidth2 <= 0.0:
        bandwidth2 = 1.0
    return np.exp(-distances2 / (2.0 * bandwidth2))


def mmd2_unbiased(kernel: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """Unbiased MMD² for one or many assignments of the pooled points to two sets.

    Args:
        kernel: ``(N, N)`` kernel matrix of the pooled points, ones on the diagonal.
        membership: ``(N,)`` or ``(N, P)``: 1 where a point is in the first set.

    Returns:
        MMD² per assignment (a scalar array for one).
    """
    first = membership.astype(np.float64)
    second = 1.0 - first
    n = first.sum(axis=0)
    m = second.sum(axis=0)
    diagonal = np.diag(kernel)
    to_first = kernel @ first
    # One product instead of two: each point's kernel row sums to its two parts.
    to_second = kernel.sum(axis=1).reshape((-1,) + (1,) * (first.ndim - 1)) - to_first
    within_first = (first * to_first).sum(axis=0) - diagonal @ first
    within_second = (second * to_second).sum(axis=0) - diagonal @ second
    between = (first * to_second).sum(axis=0)
    return (
        within_first / (n * (n - 1))
        + within_second / (m * (m - 1))
        - 2.0 * between / (n * m)
    )


def compare(
    reference: np.ndarray,
    compared: np.ndarray,
    *,
    max_components: int,
    permutations: int,
    seed: int,
) -> TwoSampleResult:
    """Fréchet distance, MMD² and its permutation p-value of two feature sets.

    The p-value is ``(1 + #{permuted MMD² >= observed}) / (1 + permutations)``.

    Args:
        reference: ``(n, features)``, at least 2 rows.
        compared: ``(m, features)``, at least 2 rows.
        max_components: Principal components kept (see :func:`project_together`).
        permutations: Random relabellings of the pooled images.
        seed: Seed of the relabellings.
    """
    a, b = project_together(reference, compared, max_components)
    pooled = np.concatenate([a, b])
    kernel = rbf_kernel(pooled)
    membership = np.zeros(len(pooled))
    membership[: len(a)] = 1.0
    observed = float(mmd2_unbiased(kernel, membership))
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(membership) for _ in range(permutations)], 1)
    null = mmd2_unbiased(kernel, shuffled)
    # A relative tolerance: permutations equal to the observed split up to rounding
    # must count as "at least as extreme".
    at_least = int((null >= observed - 1e-12 * max(1.0, abs(observed))).sum())
    return TwoSampleResult(
        n_reference=len(a),
        n_compared=len(b),
        components=a.shape[1],
        frechet=frechet_distance(a, b),
        mmd2=observed,
        p_value=(1 + at_least) / (1 + permutations),
    )
