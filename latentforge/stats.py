"""Distances between sample sets used by the benchmarks: the one Fréchet distance of the repo."""

from __future__ import annotations

import numpy as np


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau 1982), the FID formula
    of Heusel et al. 2017 (arXiv 1706.08500, Eq. 6):

        d² = |μ₁ − μ₂|² + tr(C₁ + C₂ − 2(C₁C₂)^½).

    tr((C₁C₂)^½) is taken as tr((C₂^½ C₁ C₂^½)^½), the same eigenvalues but of a symmetric PSD matrix, so
    rank-deficient covariances (constant features) need no jitter and nothing turns complex.
    Returns d² (the quantity FID reports) in float64, clamped at 0 against rounding. Any array-likes:
    mu [D], cov [D, D] (a scalar mean and variance for D = 1).
    """
    m1, m2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    c1, c2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    r = _psd_sqrt(c2)
    m = r @ c1 @ r
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None)).sum()
    diff = m1 - m2
    return float(max(0.0, diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * tr_sqrt))
