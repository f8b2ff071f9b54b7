"""The batched counter-based Brownian tree (latentforge.brownian) and its noise sampler.

Statistical bounds are 4 standard errors (SE) of the statistic: a two-sided chance of ≈6e-5 per check
for a Gaussian statistic, and the checks run on fixed seeds, so they either always pass or always fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from latentforge import brownian
from latentforge.brownian import BrownianTree, _philox_stacked, bridge, philox4x32, philox_keys
from latentforge.gmm import GaussianMixture
from latentforge.noise import BrownianTreeNoiseSampler, SeededBrownianNoiseSampler, default_noise_sampler
from latentforge.samplers import SAMPLERS
from latentforge.schedules import get_sigmas_karras

SMIN, SMAX = 0.0291675, 14.614642


def normals(seeds, node: int, m: int) -> torch.Tensor:
    """The standard normals z(seed_k, node) of a tree of m elements per image, [B, m]."""
    keys = philox_keys(seeds)
    w = torch.zeros(len(seeds), 4, math.ceil(m / 64) * 16, dtype=torch.float64)
    return bridge(w, w, 0.0, 1.0, keys, node).reshape(len(seeds), -1)[:, :m]


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# --- Philox4x32-10 and its normals ----------------------------------------------------------------------

# Random123's known-answer vectors for philox4x32_10 (kat_vectors): counter, key, output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("ctr", "key", "out"), KAT)
def test_philox_known_answers(ctr, key, out):
    """Both forms (four words; stacked pairs with precomputed round keys) give Random123's outputs, so the
    int64 products wrap as the 32 × 32 → 64-bit multiply needs."""
    t = lambda v: torch.tensor([v], dtype=torch.int64)
    assert tuple(int(w) for w in philox4x32([t(c) for c in ctr], [t(k) for k in key])) == out
    x = torch.tensor([[[ctr[0]]], [[ctr[2]]]])
    y = torch.tensor([[[ctr[1]]], [[ctr[3]]]])
    u, v = _philox_stacked(x, y, philox_keys([key[0] | key[1] << 32]))
    assert (int(u[0]), int(v[0]), int(u[1]), int(v[1])) == out


def test_normals_are_standard_normal():
    """2²⁰ normals (4 seeds × 2¹⁸): mean, variance and the CDF at 9 quantiles within 4 SE
    (SE: 1/√N; √(2/N) for the variance; √(p(1 − p)/N) for the CDF at its p-quantile); the cos and sin of
    each Box–Muller pair, consecutive nodes and different seeds uncorrelated within 4/√N."""
    z = normals([0, 1, 2**40 + 7, 2**63 - 1], 12345, 2**18)
    n = z.numel()
    assert abs(float(z.mean())) < 4 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / n)
    for p in (0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999):
        q = math.sqrt(2) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64))
        assert abs(float((z <= q).double().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n), p
    blocks = z.reshape(4, 4, -1)  # [seed, q, block]: q = 0, 1 and q = 2, 3 are Box–Muller pairs
    assert abs(corr(blocks[:, 0], blocks[:, 1])) < 4 / math.sqrt(n / 4)
    assert abs(corr(blocks[:, 2], blocks[:, 3])) < 4 / math.sqrt(n / 4)
    assert abs(corr(z, normals([0, 1, 2**40 + 7, 2**63 - 1], 12346, 2**18))) < 4 / math.sqrt(n)
    assert abs(corr(z[0], z[1])) < 4 / math.sqrt(n / 4)


@pytest.mark.parametrize("chunk", [16, 512])
def test_chunking_does_not_change_the_normals(monkeypatch, chunk):
    """CHUNK only groups the work: 16 blocks splits each image, 512 takes two images at a time."""
    a = normals([5, 6, 7], 99, 1000)
    monkeypatch.setattr(brownian, "CHUNK", chunk)
    assert torch.equal(normals([5, 6, 7], 99, 1000), a)


def test_normals_are_a_function_of_seed_and_node():
    a = normals([5, 6, 7], 99, 1000)
    torch.testing.assert_close(normals([6], 99, 1000)[0], a[1], rtol=0, atol=0)
    torch.testing.assert_close(normals([7, 5], 99, 1000), a[[2, 0]], rtol=0, atol=0)
    assert not torch.equal(normals([5], 98, 1000)[0], a[0])


# --- the tree ---------------------------------------------------------------------------------------------

POINTS = [SMAX, 9.0, 3.1, 1.0, 0.3, 0.29995, 0.1, 0.0301, SMIN]  # 0.3 → 0.29995: a 1.7e-4 relative step


def tree(seeds=(0, 1, 2, 3), m=2**16, rtol=1e-4) -> BrownianTree:
    return BrownianTree(list(seeds), m, SMIN, SMAX, rtol=rtol)


def test_increments_are_independent_gaussians():
    """Increments over disjoint intervals (from a Δσ/σ of 1.7e-4, near the leaf width 1e-4, to 5.6): each
    N(0, Δ) (mean within 4 SE = 4/√N of the normalised increment, variance within 4·√(2/N)),
    uncorrelated with each other within 4/√N and across images within 4/√m (N = 4 images × 2¹⁶)."""
    t = tree()
    incs = [t.increment(a, b) / math.sqrt(a - b) for a, b in zip(POINTS[:-1], POINTS[1:], strict=True)]
    n = incs[0].numel()
    for z in incs:
        assert abs(float(z.mean())) < 4 / math.sqrt(n)
        assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / n)
        assert abs(corr(z[0], z[1])) < 4 / math.sqrt(n / 4)
    for i in range(len(incs)):
        for j in range(i):
            assert abs(corr(incs[i], incs[j])) < 4 / math.sqrt(n), (i, j)


def test_path_is_a_function_of_t():
    """W(t) does not depend on what else was asked or in which order, so W(a, c) = W(a, b) + W(b, c)
    (to float64 rounding of the sums, 1e-12 on increments of order 1)."""
    a, b = tree(m=256), tree(m=256)
    wa = {p: a(p).clone() for p in POINTS}
    wb = {p: b(p).clone() for p in POINTS[::-1] + [2.0, 0.2, 0.05]}
    for p in POINTS:
        assert torch.equal(wa[p], wb[p])
    for x, y, z in [(SMAX, 3.1, 0.1), (9.0, 0.29995, SMIN), (1.0, 0.3, 0.29995)]:
        two = a.increment(x, y) + a.increment(y, z)
        torch.testing.assert_close(a.increment(x, z), two, rtol=0, atol=1e-12)


def test_depth_and_cost():
    """Leaves are rtol wide in log σ; a 25-step Karras schedule costs ≤ 15 tree nodes per step (measured
    13.75), against ≈ 52 torchsde nodes per step for k-diffusion's tree."""
    t = tree(m=16)
    assert t.depth == math.ceil(math.log2(math.log(SMAX / SMIN) / 1e-4))
    s = get_sigmas_karras(25, SMIN, SMAX).double()
    for i in range(len(s) - 2):
        t.increment(float(s[i]), float(s[i + 1]))
    assert t.nodes <= 15 * (len(s) - 2)


# --- the noise sampler -------------------------------------------------------------------------------------


def x_like(batch=3, dtype=torch.float64):
    return torch.zeros(batch, 4, 5, 7, dtype=dtype)


def test_noise_sampler_normalisation_and_sign():
    ns = SeededBrownianNoiseSampler(x_like(), SMIN, SMAX, [1, 2, 3])
    s, t = torch.tensor(2.0), torch.tensor(0.5)
    n = ns(s, t)
    assert n.shape == (3, 4, 5, 7) and n.dtype == torch.float64
    w = (ns.tree(0.5) - ns.tree(2.0)).reshape(3, -1)[:, :140].reshape(n.shape)
    torch.testing.assert_close(n, w / math.sqrt(1.5), rtol=0, atol=1e-14)  # ·(1/√Δ) vs /√Δ: an ulp
    torch.testing.assert_close(ns(t, s), -n, rtol=0, atol=0)
    assert torch.equal(ns(s, s), torch.zeros_like(n))
    torch.testing.assert_close(ns(torch.tensor(100.0), t), ns(torch.tensor(SMAX * 2), t), rtol=0, atol=0)


def test_noise_sampler_checks_its_arguments():
    with pytest.raises(ValueError, match="sigma_min"):
        SeededBrownianNoiseSampler(x_like(), 0.0, SMAX, [1, 2, 3])
    with pytest.raises(ValueError, match="seeds"):
        SeededBrownianNoiseSampler(x_like(), SMIN, SMAX, [1, 2])


def test_same_seed_same_noise_and_different_seeds_differ():
    s, t = torch.tensor(3.0), torch.tensor(1.0)
    a = SeededBrownianNoiseSampler(x_like(), SMIN, SMAX, [10, 11, 12])(s, t)
    assert torch.equal(a, SeededBrownianNoiseSampler(x_like(), SMIN, SMAX, [10, 11, 12])(s, t))
    b = SeededBrownianNoiseSampler(x_like(), SMIN, SMAX, [10, 11, 13])(s, t)
    assert torch.equal(a[:2], b[:2]) and not torch.allclose(a[2], b[2])
    assert not torch.allclose(a[0], a[1])


def test_image_noise_does_not_depend_on_the_batch():
    """Image k with seeds [s0, s1, s2] equals image 0 with seeds [s1], bit for bit (conftest runs one
    thread; with more, SIMD and scalar tails of log/cos/sin could round an ulp apart)."""
    seeds, s = [101, 202, 303], get_sigmas_karras(6, SMIN, SMAX).double()
    big = SeededBrownianNoiseSampler(x_like(3), SMIN, SMAX, seeds)
    one = SeededBrownianNoiseSampler(x_like(1), SMIN, SMAX, seeds[1:2])
    for i in range(len(s) - 2):
        assert torch.equal(big(s[i], s[i + 1])[1:2], one(s[i], s[i + 1]))


def test_float32_and_float64_schedules_and_latents_give_the_same_noise():
    """The tree's ends are rounded to 6 digits, so a float32 schedule builds the tree of the float64 one;
    queried at the same σ the noise is the same, and it is computed in float64 whatever x's dtype."""
    s64 = get_sigmas_karras(8, SMIN, SMAX).double()
    s32 = s64.float()
    a = SeededBrownianNoiseSampler(x_like(), float(s32[-2]), float(s32[0]), [4, 5, 6])
    b = SeededBrownianNoiseSampler(x_like(dtype=torch.float32), float(s64[-2]), float(s64[0]), [4, 5, 6])
    assert (a.t0, a.t1) == (b.t0, b.t1)
    for i in range(len(s32) - 2):
        na, nb = a(s32[i], s32[i + 1]), b(s32[i].double(), s32[i + 1].double())
        assert nb.dtype == torch.float32 and torch.equal(na.float(), nb)


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")  # torchsde endpoint rounding
def test_default_brownian_noise_is_the_seeded_tree():
    """The samplers' default Brownian noise is SeededBrownianNoiseSampler over the schedule's positive σ
    with seeds seed + k; the torchsde sampler is used only when passed."""
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * SMAX
    s = get_sigmas_karras(6, SMIN, SMAX).double()
    assert isinstance(default_noise_sampler(x, 5, s, brownian=True), SeededBrownianNoiseSampler)
    D = GaussianMixture.single(4).denoiser()
    ref = SAMPLERS["dpmpp_2m_sde"](D, x, s, noise_sampler=SeededBrownianNoiseSampler(x, SMIN, SMAX, [5, 6]))
    assert torch.equal(SAMPLERS["dpmpp_2m_sde"](D, x, s, seed=5), ref)
    old = SAMPLERS["dpmpp_2m_sde"](D, x, s, noise_sampler=BrownianTreeNoiseSampler(x, SMIN, SMAX, [5, 6]))
    assert not torch.allclose(old, ref)


@pytest.mark.parametrize(("name", "min_order"), [("dpmpp_2m_sde", 0.8), ("dpmpp_sde", 0.5)])
def test_sde_samplers_converge_strongly(name, min_order):
    """Strong convergence on one Brownian path: single-Gaussian data (its exact denoiser is linear, so the
    SDE is linear with additive noise), 64 points, the same seed at 8, 16, 32, 64 Karras steps against
    256 steps. The RMS error falls at every doubling, and its slope over the range is at least min_order
    (measured against 512 steps: 1.1–1.6 per doubling for dpmpp_2m_sde, 0.7–0.9 for dpmpp_sde)."""
    D = GaussianMixture.single(8).denoiser()
    x = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * SMAX
    run = lambda n: SAMPLERS[name](D, x, get_sigmas_karras(n, SMIN, SMAX).double(), seed=3)
    ref = run(256)
    errs = [float((run(n) - ref).pow(2).mean().sqrt()) for n in (8, 16, 32, 64)]
    assert all(e1 < e0 for e0, e1 in zip(errs[:-1], errs[1:], strict=True)), errs
    assert math.log2(errs[0] / errs[-1]) / 3 >= min_order, errs
