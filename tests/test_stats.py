"""stats.frechet_distance: closed forms and the scipy.linalg.sqrtm form of the FID formula."""

import numpy as np
import pytest
from scipy import linalg

from latentforge.stats import frechet_distance


def test_one_dimensional_closed_form():
    # N(m1, s1²) vs N(m2, s2²): (m1 − m2)² + (s1 − s2)²
    assert frechet_distance(0.5, 4.0, -1.0, 0.25) == pytest.approx(1.5**2 + 1.5**2, rel=1e-14)
    assert frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)) == 0.0


def test_commuting_covariances():
    # diagonal covariances: Σ_k (√a_k − √b_k)² plus the mean term
    a, b = np.array([1.0, 4.0, 9.0]), np.array([0.25, 4.0, 1.0])
    m = np.array([1.0, 0.0, -2.0])
    want = m @ m + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m, np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(want, rel=1e-14)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # sqrtm of a singular product
@pytest.mark.parametrize("dim", [3, 16])
def test_matches_the_sqrtm_form_incl_rank_deficient(dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(200, dim))
    a[:, 0] = 1.0  # a constant feature: cov1 is singular
    b = rng.normal(size=(150, dim)) @ rng.normal(size=(dim, dim)) + 0.3
    m1, c1, m2, c2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(c1 @ c2))
    want = (m1 - m2) @ (m1 - m2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(frechet_distance(m2, c2, m1, c1), rel=1e-9)
