"""Karras-family samplers (latentforge.samplers.karras) against the exact Gaussian(-mixture) oracle.

Convergence orders use the closed-form PF-ODE of a single Gaussian; stochastic samplers are checked
on the mean and covariance of a 2-D mixture; flow mode uses x_flow = (1 − s)·x_ve(s/(1 − s)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FlowModel

from latentforge.gmm import GaussianMixture
from latentforge.samplers import karras as K
from latentforge.schedules import get_sigmas_karras

SMIN, SMAX = 0.0291675, 14.614642
RAW = {**K.SAMPLERS, **K.EXACT_SAMPLERS}  # ComfyUI's names and our `_exact` variants
NS = (10, 20, 40, 80)
NEW = [
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "ddpm",
    "lcm",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
]


class ListNoise:
    """One shared noise stream: two samplers given ListNoise(seed) see the same z at each call."""

    def __init__(self, shape, seed, dtype=torch.float64):
        self.g, self.shape, self.dtype = torch.Generator().manual_seed(seed), shape, dtype

    def __call__(self, sigma, sigma_next):
        return torch.randn(self.shape, generator=self.g, dtype=torch.float64).to(self.dtype)


def to_flow(s: torch.Tensor) -> torch.Tensor:
    """VE σ ↦ flow σ with the same SNR: s/(1 + s)."""
    return s / (1 + s)


def order_and_errors(name, final="denoise", flow=False, ns=NS, **kw):
    """Least-squares slope of −log err vs log n and the errors, on g = N(0.5, 0.3²)^4.

    final="denoise": reference = exact ODE to σ_min, then the exact final denoise D(·, σ_min) (what a
    sampler whose last step is Euler returns). final="ode": exact ODE all the way to σ = 0 (what a pure
    ODE integrator such as LMS, which also integrates the last interval, converges to).
    """
    g = GaussianMixture.single(4)
    model = FlowModel(g) if flow else g.denoiser()
    errs = []
    for n in ns:
        s = get_sigmas_karras(n, SMIN, SMAX).double()
        x = torch.randn(512, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s[0]
        if final == "ode":
            ref = g.ode_solution_ve(x, float(s[0]), 0.0)
        else:
            ref = g.denoise_ve(g.ode_solution_ve(x, float(s[0]), float(s[-2])), s[-2])
        if flow:  # same SNR levels; x_flow = (1 − σ_f)·x_ve; at σ = 0 both coordinates agree
            sf = to_flow(s)
            out = RAW[name](model, (1 - sf[0]) * x, sf, **kw)
        else:
            out = RAW[name](model, x, s, **kw)
        errs.append(float((out - ref).abs().max()))
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    return slope, errs


# --- deterministic convergence orders ----------------------------------------------------------
# Measured (VE, n = 10..80): euler 1.00, heun 2.15, dpm_2 2.14, heunpp2 1.01, lms 3.42 (vs the exact
# ODE to 0), gradient_estimation 0.69 (0.88 over n = 20..160; ratio → 2, i.e. order 1 asymptotically).


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name,nominal", [("euler", 1), ("heun", 2), ("dpm_2", 2)])
def test_convergence_order(name, nominal, flow):
    slope, errs = order_and_errors(name, flow=flow)
    assert abs(slope - nominal) < 0.3, (slope, errs)
    assert errs[-1] < (3e-2 if nominal == 1 else 2e-3), errs


@pytest.mark.parametrize("flow", [False, True])
def test_lms_order(flow):
    # LMS also integrates the last interval [σ_min, 0] with the multistep formula, so it converges to
    # the exact ODE solution at σ = 0 (not to D(x(σ_min), σ_min), which differs by O(σ_min²)).
    slope, errs = order_and_errors("lms", final="ode", flow=flow)
    assert slope >= 3.0, (slope, errs)  # order 4 with a 1-2-3 start-up; measured 3.4
    assert errs[-1] < 2e-4, errs


def test_lms_coefficients_exact():
    # Σ_j c_j = σ_{i+1} − σ_i (ℓ_j sum to 1) and the rule integrates cubics exactly.
    sig = [14.6, 9.1, 5.5, 3.2, 1.7]
    c = K._lms_coeffs(sig, 3, 4)
    assert sum(c) == pytest.approx(sig[4] - sig[3], rel=1e-13)
    p = np.polynomial.Polynomial([0.3, -1.0, 0.2, 0.05])
    exact = p.integ()(sig[4]) - p.integ()(sig[3])
    assert sum(cj * p(sig[3 - j]) for j, cj in enumerate(c)) == pytest.approx(exact, rel=1e-12)


def test_heunpp2_is_first_order():
    # Heun++ weights w₂ = σ_{i+1}/(3σ₀), w₃ = σ_{i+2}/(3σ₀) fade to 0 as σ falls, so it is a weighted
    # Euler (consistent, order 1; Heun's order-2 condition needs w₂ = ½). Measured slope 1.01, errors
    # about 5% below Euler's at every n.
    slope, errs = order_and_errors("heunpp2")
    _, euler = order_and_errors("euler")
    assert abs(slope - 1) < 0.3, (slope, errs)
    assert all(e < u for e, u in zip(errs, euler, strict=True))


def test_gradient_estimation_converges_and_beats_euler():
    ns = (20, 40, 80, 160)
    slope, errs = order_and_errors("gradient_estimation", ns=ns)
    _, euler = order_and_errors("euler", ns=ns)
    assert slope > 0.7, (slope, errs)  # order ~1 (measured 0.88 here, error ratio 1.95 at the end)
    assert errs[0] < euler[0], (errs, euler)  # n = 20: 7.1e-2 vs 9.6e-2
    slope_f, errs_f = order_and_errors("gradient_estimation", flow=True, ns=ns)
    assert slope_f > 0.7, (slope_f, errs_f)


# --- equivalences --------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddpm_equals_euler_ancestral_ve(eta):
    # VE posterior: μ = D + (σ_s²/σ_t²)(x − D), σ̃² = σ_s²(σ_t² − σ_s²)/σ_t²  ==  σ_down = σ_s²/σ_t, σ_up = σ̃.
    g = GaussianMixture.random(k=2, dim=2, seed=0)
    s = get_sigmas_karras(12, SMIN, SMAX).double()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * s[0]
    a = K.sample_ddpm(g.denoiser(), x, s, eta=eta, noise_sampler=ListNoise((64, 2), 5))
    b = K.sample_euler_ancestral(g.denoiser(), x, s, eta=eta, noise_sampler=ListNoise((64, 2), 5))
    assert (a - b).abs().max() < 1e-10


def test_ddpm_flow_equals_ve():
    # The posterior q(x_s | x_t, x₀) is the same distribution in both coordinates (x_flow = α·x_ve), so
    # with shared noise the flow run reproduces the VE run: checks the general-α derivation of
    # ddpm_exact (ComfyUI's ddpm takes the VE form on a flow model's σ: test_samplers_comfy.py).
    g = GaussianMixture.random(k=2, dim=2, seed=0)
    s = get_sigmas_karras(12, SMIN, SMAX).double()
    sf = to_flow(s)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * s[0]
    ve = K.sample_ddpm_exact(g.denoiser(), x, s, noise_sampler=ListNoise((64, 2), 5))
    fl = K.sample_ddpm_exact(FlowModel(g), (1 - sf[0]) * x, sf, noise_sampler=ListNoise((64, 2), 5))
    assert (ve - fl).abs().max() < 1e-10
    assert (K.sample_ddpm(g.denoiser(), x, s, noise_sampler=ListNoise((64, 2), 5)) - ve).abs().max() < 1e-10


def test_lcm_flow_equals_ve():
    # x_flow = (1 − σ)D + σz is a VE state D + σ/(1 − σ)·z scaled by 1 − σ, so LCM agrees exactly.
    g = GaussianMixture.random(k=2, dim=2, seed=0)
    s = get_sigmas_karras(6, SMIN, SMAX).double()
    sf = to_flow(s)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * s[0]
    ve = K.sample_lcm(g.denoiser(), x, s, noise_sampler=ListNoise((64, 2), 5))
    fl = K.sample_lcm(FlowModel(g), (1 - sf[0]) * x, sf, noise_sampler=ListNoise((64, 2), 5))
    assert (ve - fl).abs().max() < 1e-10


@pytest.mark.parametrize("flow", [False, True])
def test_cfg_pp_equals_base_without_guidance(flow):
    g = GaussianMixture.random(k=2, dim=2, seed=0)
    model = FlowModel(g) if flow else g.denoiser()
    s = get_sigmas_karras(10, SMIN, SMAX).double()
    s = to_flow(s) if flow else s
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * s[0]
    a = K.sample_gradient_estimation_cfg_pp(model, x, s)
    b = K.sample_gradient_estimation(model, x, s)
    assert (a - b).abs().max() < 1e-11


class Guided:
    """A guided model with distinct conditional / unconditional data: D_cfg = D_u + w(D_c − D_u)."""

    def __init__(self, w=3.0):
        self.c = GaussianMixture.single(2, mean=1.0, std=0.4).denoiser()
        self.u = GaussianMixture.single(2, mean=-0.5, std=0.8).denoiser()
        self.w = w

    def with_uncond(self, x, sigma, **kw):
        du = self.u(x, sigma)
        return du + self.w * (self.c(x, sigma) - du), du

    def __call__(self, x, sigma, **kw):
        return self.with_uncond(x, sigma)[0]


def test_gradient_estimation_cfg_pp_with_guidance():
    m = Guided()
    s = torch.tensor([5.0, 1.0, 0.2], dtype=torch.float64)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * s[0]
    out = K.sample_gradient_estimation_cfg_pp(m, x, s, ge_gamma=2.0)
    # by hand: CFG++ Euler, then CFG++ Euler + (γ − 1)(d₁ − d₀)Δσ with unconditional d
    sv = lambda v: torch.full((8,), float(v), dtype=torch.float64)
    D0, U0 = m.with_uncond(x, sv(s[0]))
    d0 = (x - U0) / s[0]
    x1 = D0 + s[1] * d0
    D1, U1 = m.with_uncond(x1, sv(s[1]))
    d1 = (x1 - U1) / s[1]
    x2 = D1 + s[2] * d1 + (d1 - d0) * (s[2] - s[1])
    assert (out - x2).abs().max() < 1e-12
    # one step is exactly CFG++ Euler, and guidance changes the result vs the base sampler
    one = K.sample_gradient_estimation_cfg_pp(m, x, s[:2])
    assert (one - K.sample_euler_cfg_pp(m, x, s[:2])).abs().max() < 1e-12
    assert (out - K.sample_gradient_estimation(m, x, s)).abs().max() > 1e-3


def test_eta_zero_reduces_to_deterministic_samplers():
    # η = 0: DDIM posterior (ddpm) is Euler in VE form (Song et al. 2021: DDIM(η=0) = Euler in σ);
    # dpm_2_ancestral has σ_down = σ_next and no noise, i.e. dpm_2.
    g = GaussianMixture.random(k=2, dim=2, seed=0)
    s = get_sigmas_karras(8, SMIN, SMAX).double()
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * s[0]
    D = g.denoiser()
    assert (K.sample_ddpm(D, x, s, eta=0.0) - K.sample_euler(D, x, s)).abs().max() < 1e-10
    assert (K.sample_dpm_2_ancestral(D, x, s, eta=0.0) - K.sample_dpm_2(D, x, s)).abs().max() < 1e-12


def test_gradient_estimation_gamma_one_is_euler():
    g = GaussianMixture.single(4)
    s = get_sigmas_karras(8, SMIN, SMAX).double()
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * s[0]
    a = K.sample_gradient_estimation(g.denoiser(), x, s, ge_gamma=1.0)
    assert (a - K.sample_euler(g.denoiser(), x, s)).abs().max() < 1e-12


# --- stochastic samplers: moments of a 2-D mixture ---------------------------------------------


def _moment_check(name, flow, steps=100, n=4000, **kw):
    """Start from the exact marginal at σ_max (so only the sampler's error is measured) and compare the
    sample mean / covariance with the mixture's. Tolerance: 4 standard errors of each statistic,
    estimated from the samples (SE of mean_i = √(C_ii/n); SE of C_ij = std((x_i − m_i)(x_j − m_j))/√n).
    The mixture (means ≈ (2.3, −0.4) and (−3.3, 0.9), stds 0.2-0.4) is strongly bimodal; the residual
    weak discretisation bias at 100 Karras steps is ≈ 1 SE for Euler ancestral (about 4.5 SE at 60)."""
    g = GaussianMixture.random(k=2, dim=2, seed=0)
    s = get_sigmas_karras(steps, 0.002, 80.0).double()
    gen = torch.Generator().manual_seed(11)
    x0, z = g.sample(n, gen), torch.randn(n, 2, generator=gen, dtype=torch.float64)
    if flow:
        s = to_flow(s)
        model, x = FlowModel(g), (1 - s[0]) * x0 + s[0] * z
    else:
        model, x = g.denoiser(), x0 + s[0] * z
    out = RAW[name](model, x, s, noise_sampler=ListNoise((n, 2), 12), **kw)
    m, C = out.mean(0), torch.cov(out.T)
    xc = out - m
    se_m = (torch.diag(C) / n).sqrt()
    se_C = (
        torch.stack([(xc[:, i] * xc[:, j]).std() for i in range(2) for j in range(2)]).reshape(2, 2) / n**0.5
    )
    zm, zc = (m - g.mean()) / se_m, (C - g.cov()) / se_C
    assert zm.abs().max() < 4 and zc.abs().max() < 4, (name, flow, zm, zc)


@pytest.mark.parametrize(
    "name,flow",
    [
        ("euler_ancestral", False),
        ("dpm_2_ancestral", False),
        ("dpm_2_ancestral", True),
        ("ddpm", False),
        ("ddpm_exact", True),
        ("euler_ancestral_cfg_pp", True),
    ],  # fmt: skip
)
def test_stochastic_moments(name, flow):
    _moment_check(name, flow)


def test_lcm_with_exact_denoiser_is_shrunk_posterior_mean():
    # LCM is a consistency sampler: it expects f(x, σ) = the ODE end point. With an exact *denoiser*,
    # D = E[x₀ | x] is a posterior mean, so the output is not distributed as the data and the moment test
    # does not apply. For one Gaussian N(μ, s²) the law is exact: each stage maps the variance
    # v ↦ k²v (k = s²/(s² + σ²), D's slope), then adds σ_next²; the mean stays μ.
    g = GaussianMixture.single(4, mean=0.5, std=0.3)
    s = get_sigmas_karras(4, SMIN, SMAX).double()
    n = 4000
    gen = torch.Generator().manual_seed(5)
    x = g.sample(n, gen) + s[0] * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    out = K.sample_lcm(g.denoiser(), x, s, noise_sampler=ListNoise((n, 4), 6))
    v = 0.3**2 + float(s[0]) ** 2
    for i in range(len(s) - 1):
        v *= (0.09 / (0.09 + float(s[i]) ** 2)) ** 2
        v += float(s[i + 1]) ** 2
    assert v < 0.09 * 0.99  # shrunk relative to the data variance
    var = out.var(0)  # 4 coordinates, n samples each: SE(var) = v·√(2/(n−1)), SE(mean) = √(v/n)
    assert ((var - v).abs() < 4 * v * (2 / (n - 1)) ** 0.5).all(), (var, v)
    assert ((out.mean(0) - 0.5).abs() < 4 * (v / n) ** 0.5).all()


# --- contract: determinism, dtypes, batch, short schedules, callbacks ---------------------------


@pytest.mark.parametrize("name", ["euler", "heun", "heunpp2", "dpm_2"])
def test_churn_is_deterministic_for_a_seed(name):
    g = GaussianMixture.single(4)
    s = get_sigmas_karras(8, SMIN, SMAX).double()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s[0]
    kw = dict(s_churn=2.0, s_tmin=0.05, s_tmax=10.0)
    a = RAW[name](g.denoiser(), x, s, seed=123, **kw)
    b = RAW[name](g.denoiser(), x, s, seed=123, **kw)
    c = RAW[name](g.denoiser(), x, s, seed=124, **kw)
    plain = RAW[name](g.denoiser(), x, s)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-6 and (a - plain).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["dpm_2_ancestral", "ddpm", "lcm"])
def test_stochastic_seeded(name):
    g = GaussianMixture.single(4)
    s = get_sigmas_karras(6, SMIN, SMAX).double()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s[0]
    a = RAW[name](g.denoiser(), x, s, seed=7)
    assert torch.equal(a, RAW[name](g.denoiser(), x, s, seed=7))
    assert not torch.equal(a, RAW[name](g.denoiser(), x, s, seed=8))


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NEW)
def test_dtypes_batch_short_schedules(name, dtype, flow):
    g = GaussianMixture.single(4)
    model = FlowModel(g) if flow else g.denoiser()
    for s in (
        get_sigmas_karras(5, SMIN, SMAX),  # ends in 0
        get_sigmas_karras(5, SMIN, SMAX)[:-1],  # ends at σ_min > 0
        torch.tensor([SMAX, 0.0]),  # one step
        torch.tensor([SMAX, 1.0]),  # one step ending above 0
    ):
        s = to_flow(s) if flow else s
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(dtype) * s[0]
        calls: list[int] = []
        out = RAW[name](model, x, s, callback=lambda info, c=calls: c.append(info["i"]))
        assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
        assert calls == list(range(len(s) - 1))


def test_registry():
    from latentforge.samplers import SAMPLERS

    for name in NEW:
        assert RAW[name].__name__ == f"sample_{name}"
        assert name in SAMPLERS
    g = GaussianMixture.single(4)
    s = get_sigmas_karras(10, SMIN, SMAX)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)) * s[0]
    out = SAMPLERS["lcm"](FlowModel(g), x * (1 - to_flow(s)[0]), to_flow(s), seed=1)
    assert torch.isfinite(out).all()
