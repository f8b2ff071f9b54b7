"""Multistep samplers (latentforge.samplers.multistep) against the exact Gaussian(-mixture) oracle.

Convergence orders use the closed-form PF-ODE of a single Gaussian (reference: exact ODE to σ_min,
then the exact final denoise, which is what these samplers' step to σ = 0 is); flow mode uses
x_flow = (1 − s)·x_ve(s/(1 − s)); the ancestral sampler is checked on the moments of a 2-D mixture.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import Counter, FlowModel
from scipy.integrate import quad

from latentforge.gmm import GaussianMixture
from latentforge.samplers import SAMPLERS as CHECKED
from latentforge.samplers import multistep as M
from latentforge.samplers.common import get_ancestral_step, phi
from latentforge.schedules import get_sigmas_karras

SMIN, SMAX = 0.0291675, 14.614642
RAW = {**M.SAMPLERS, **M.EXACT_SAMPLERS}  # ComfyUI's names and our `_exact` variants
NAMES = list(RAW)
DETERMINISTIC = [n for n in NAMES if "ancestral" not in n]
# exponential integrators in the model's own α, λ (ComfyUI's deis and res_multistep* use the VE form on
# every model's σ, so they are not invariant under the flow map; see test_samplers_comfy.py)
# (and so do ComfyUI's uni_pc/uni_pc_bh2; their model-coordinate forms are uni_pc_exact/uni_pc_bh2_exact)
EXPONENTIAL = ["res_multistep_exact", "res_multistep_cfg_pp_exact", "uni_pc_exact", "uni_pc_bh2_exact"]
COMFY_LAST = {"uni_pc": 0.001, "uni_pc_bh2": 0.001}  # ComfyUI's UniPC stops at σ = 0.001, not at 0


class Guided:
    """A stand-in for CFG: guided D = D + δ, unconditional D (exposes `with_uncond` like CFGDenoiser)."""

    def __init__(self, model, delta=0.1):
        self.model, self.delta = model, delta
        self.model_sampling = getattr(model, "model_sampling", None)

    def __call__(self, x, sigma, **kw):
        return self.model(x, sigma) + self.delta

    def with_uncond(self, x, sigma, **kw):
        u = self.model(x, sigma)
        return u + self.delta, u


class ListNoise:
    def __init__(self, shape, seed):
        self.g, self.shape = torch.Generator().manual_seed(seed), shape

    def __call__(self, sigma, sigma_next):
        return torch.randn(self.shape, generator=self.g, dtype=torch.float64)


def to_flow(s):
    return s / (1 + s)


def errors(name, ns, flow=False, **kw):
    """max |out − ref| on g = N(0.5, 0.3²)^4, 512 points, Karras schedules of n steps ending in 0."""
    g = GaussianMixture.single(4)
    model = FlowModel(g) if flow else g.denoiser()
    errs = []
    for n in ns:
        s = get_sigmas_karras(n, SMIN, SMAX).double()
        x = torch.randn(512, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s[0]
        ref = g.denoise_ve(g.ode_solution_ve(x, float(s[0]), float(s[-2])), s[-2])
        if name in COMFY_LAST and not flow:  # the same order-1 step from σ_min, to 0.001 instead of 0
            r = COMFY_LAST[name] / float(s[-2])
            ref = r * g.ode_solution_ve(x, float(s[0]), float(s[-2])) + (1 - r) * ref
        if flow:  # same SNR levels; at σ = 0 flow and VE coordinates agree
            sf = to_flow(s)
            out = RAW[name](model, (1 - sf[0]) * x, sf, **kw)
        else:
            out = RAW[name](model, x, s, **kw)
        errs.append(float((out - ref).abs().max()))
    return errs


def slope(ns, errs):
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


# name -> (nominal order, "eq": |slope − p| ≤ 0.3 / "ge": slope ≥ p − 0.3, step counts).
# ipndm's fixed AB coefficients ignore the step ratios: on a non-uniform (Karras) grid the local error
# has an O(h³) term ∝ (Δσ_{i} − Δσ_{i−1}), so it is 2nd order there (measured 2.26; 4th on a uniform grid,
# where it equals ipndm_v_exact, see below). ipndm_v_exact: AB4 with warm start, measured 3.4 over
# n = 10..80. ComfyUI's ipndm_v (its coefficients are Adams' only up to order 2, see _ipndm_v_coeffs):
# order 2 asymptotically, measured 1.8 over n = 160..1280 (erratic below ~100 steps).
# deis tAB3: measured 2.9 over n = 20..160 (2.7 over 10..80, pre-asymptotic). res_multistep (and
# res_multistep_exact, the same on VE): 2.04.
# uni_pc / bh2 (UniP-3 + UniC, lower-order final steps): measured 4.4 / 4.5 (against the exact solution
# taken to σ_min, then the order-1 step to 0.001 ComfyUI ends with); the _exact forms (final denoise): the
# same.
ORDERS = {
    "ipndm": (2, "ge", (10, 20, 40, 80)),
    "ipndm_v_exact": (3, "ge", (10, 20, 40, 80)),
    "ipndm_v": (2, "eq", (160, 320, 640, 1280)),
    "deis": (3, "ge", (20, 40, 80, 160)),
    "res_multistep": (2, "eq", (10, 20, 40, 80)),
    "res_multistep_cfg_pp": (2, "eq", (10, 20, 40, 80)),
    "res_multistep_exact": (2, "eq", (10, 20, 40, 80)),
    "res_multistep_cfg_pp_exact": (2, "eq", (10, 20, 40, 80)),
    "uni_pc": (3, "ge", (10, 20, 40, 80)),
    "uni_pc_bh2": (3, "ge", (10, 20, 40, 80)),
    "uni_pc_exact": (3, "ge", (10, 20, 40, 80)),
    "uni_pc_bh2_exact": (3, "ge", (10, 20, 40, 80)),
}


def _check_order(name, errs, ns):
    p, mode, _ = ORDERS[name]
    k = slope(ns, errs)
    assert errs[-1] < errs[0] and errs[-1] < 2e-3, (name, errs)
    if mode == "eq":
        assert abs(k - p) <= 0.3, (name, k, errs)
    else:
        assert k >= p - 0.3, (name, k, errs)


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_convergence_order(name):
    ns = ORDERS[name][2]
    _check_order(name, errors(name, ns), ns)


@pytest.mark.parametrize(
    "name",
    ["uni_pc_exact", "uni_pc_bh2_exact", "res_multistep", "res_multistep_exact", "deis", "ipndm_v",
     "ipndm_v_exact"],
)  # fmt: skip
def test_flow_convergence_order(name):
    ns = ORDERS[name][2]
    _check_order(name, errors(name, ns, flow=True), ns)


def test_uni_pc_without_lower_order_final_converges():
    ns = (10, 20, 40, 80)
    _check_order("uni_pc_exact", errors("uni_pc_exact", ns, lower_order_final=False), ns)


@pytest.mark.parametrize("name", EXPONENTIAL)
def test_exponential_integrators_are_invariant_under_the_flow_map(name):
    """Data-/ε-prediction exponential integrators only see λ and x/α: on flow σ with the same SNR as a VE
    schedule they produce x_flow = α·x_VE at every step, hence the same x₀ at σ = 0 (to rounding)."""
    g = GaussianMixture.random(k=2, dim=3, seed=1)
    s = get_sigmas_karras(12, SMIN, SMAX).double()
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s[0]
    sf = to_flow(s)
    ve = RAW[name](g.denoiser(), x, s)
    fl = RAW[name](FlowModel(g), x * (1 - sf[0]), sf)
    assert float((ve - fl).abs().max()) < 1e-12


def test_flow_schedule_starting_at_one():
    """σ₀ = 1 (λ = −∞) is moved to 0.9999 for the exponential integrators (as ComfyUI does); the samplers
    stay finite and converge to the reference x(σ=1) = ε exactly, i.e. the VE ODE from σ_VE → ∞
    (measured max errors at 30 / 60 steps: res_multistep 5.2e-2 / 1.3e-2, deis 3.1e-2 / 5.2e-3,
    uni_pc 3.6e-2 / 6.7e-4, ipndm_v 1.8e-3 / 1.0e-4; this schedule's last steps are ~0.8 in λ at 30)."""
    g = GaussianMixture.single(4)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errs = {}
    for n in (30, 60):
        s = to_flow(get_sigmas_karras(n, SMIN, 1000.0).double())
        s[0] = 1.0
        smin = float(s[-2]) / (1 - float(s[-2]))
        ref = g.denoise_ve(g.ode_solution_ve(noise * 1e6, 1e6, smin), smin)
        for name in DETERMINISTIC:
            out = RAW[name](FlowModel(g), noise.clone(), s)
            errs.setdefault(name, []).append(float((out - ref).abs().max()))
    for name, (e30, e60) in errs.items():
        assert e60 < 0.02 and e60 < e30 / 3, (name, e30, e60)


def test_ipndm_equals_ipndm_v_on_a_uniform_grid():
    """The fixed AB coefficients are the variable-step ones for equal steps; ComfyUI's ipndm_v has them
    up to order 3 only (its order-4 step is (57, −65, 43, −11)/24, see _ipndm_v_coeffs)."""
    D = GaussianMixture.random(k=2, dim=3, seed=1).denoiser()
    s = torch.linspace(10, 0.5, 15, dtype=torch.float64)
    x = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s[0]
    for order in (2, 3, 4):
        a = M.sample_ipndm(D, x, s, max_order=order)
        b = M.sample_ipndm_v_exact(D, x, s, max_order=order)
        assert float((a - b).abs().max()) < 1e-12, order
        c = M.sample_ipndm_v(D, x, s, max_order=order)
        assert (float((a - c).abs().max()) < 1e-12) == (order < 4), order


@pytest.mark.parametrize("name", ["ipndm", "ipndm_v", "ipndm_v_exact", "deis"])
def test_first_order_is_euler(name):
    """max_order = 1 is Euler in σ (= DDIM for VE)."""
    D = GaussianMixture.random(k=2, dim=3, seed=1).denoiser()
    s = get_sigmas_karras(9, SMIN, SMAX).double()
    x = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s[0]
    ref = x
    for i in range(len(s) - 1):
        d = (ref - D(ref, s[i])) / s[i]
        ref = ref + (s[i + 1] - s[i]) * d
    out = RAW[name](D, x, s, max_order=1)
    assert float((out - ref).abs().max()) < 1e-12


def test_deis_coefficients_integrate_quadratics_in_t_exactly():
    """Σ_j C_j q(t_{i−j}) = ∫ q(t(ρ)) dρ for q of degree 2 (3 nodes), incl. the flow start ρ = 9999."""

    def q(t):
        return 1.3 - 0.7 * t + 2.1 * t * t

    for r0, r1, r2, r3 in [
        (14.6, 9.1, 5.5, 3.2),
        (0.2, 0.08, 0.0292, 0.02),
        (80, 60, 40, 30),
        (9999, 100, 20, 5),
    ]:
        ts = [M._deis_t(r) for r in (r2, r1, r0)]  # newest first
        c = M._deis_coeffs(ts, r2, r3)
        got = sum(cj * q(tj) for cj, tj in zip(c, ts, strict=True))
        want = quad(lambda r: q(M._deis_t(r)), r2, r3, epsabs=1e-13, epsrel=1e-13, limit=200)[0]
        assert abs(got - want) < 1e-11 * abs(want), (r0, got, want)
        assert abs(sum(c) - (r3 - r2)) < 1e-12 * abs(r3 - r2)


def test_phi_functions():
    """φ_k(z) = (e^z − Σ_{j<k} z^j/j!)/z^k, evaluated in 50-digit arithmetic as the reference."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    for z in (-40.0, -3.0, -0.6, -0.3, -1e-3, -1e-9, 0.2, 2.0):
        for k in (1, 2, 3, 4):
            zz = mpmath.mpf(z)
            want = float((mpmath.exp(zz) - sum(zz**j / mpmath.factorial(j) for j in range(k))) / zz**k)
            assert abs(phi(k, z) - want) < 1e-13 * max(1.0, abs(want)), (k, z)


@pytest.mark.parametrize("name", NAMES)
def test_one_step_schedules(name):
    """len(sigmas) == 2: a step to 0 is the final denoise (ComfyUI's UniPC: the same step to 0.001); to
    σ₁ > 0 the deterministic samplers take one exponential-Euler (DDIM) step x₁ = D + (σ₁/σ₀)(x − D)."""
    D = GaussianMixture.random(k=2, dim=3, seed=1).denoiser()
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5.0
    d0 = D(x, torch.tensor(5.0, dtype=torch.float64))
    kw = {"seed": 0} if "ancestral" in name else {}
    out = RAW[name](D, x, torch.tensor([5.0, 0.0], dtype=torch.float64), **kw)
    last = COMFY_LAST.get(name, 0.0) / 5.0
    assert torch.allclose(out, d0 + last * (x - d0), atol=1e-14)
    out = RAW[name](D, x, torch.tensor([5.0, 2.0], dtype=torch.float64), **kw)
    assert torch.isfinite(out).all()
    if name in DETERMINISTIC:
        assert torch.allclose(out, d0 + 0.4 * (x - d0), atol=1e-13)


@pytest.mark.parametrize("name", NAMES)
def test_nfe_equals_steps_and_callback(name):
    D = GaussianMixture.single(3)
    kw = {"seed": 0} if "ancestral" in name else {}
    for s in (get_sigmas_karras(7, SMIN, SMAX).double(), get_sigmas_karras(7, SMIN, SMAX).double()[:-3]):
        model, seen = Counter(D.denoiser()), []
        RAW[name](model, torch.ones(2, 3, dtype=torch.float64) * s[0], s, callback=seen.append, **kw)
        assert model.calls == len(s) - 1
        assert [c["i"] for c in seen] == list(range(len(s) - 1))


@pytest.mark.parametrize(
    "base",
    ["res_multistep", "res_multistep_ancestral", "res_multistep_exact", "res_multistep_ancestral_exact"],
)
def test_cfg_pp_equals_base_without_guidance(base):
    D = GaussianMixture.random(k=2, dim=3, seed=1).denoiser()
    s = get_sigmas_karras(10, SMIN, SMAX).double()
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s[0]
    kw = {"seed": 3} if "ancestral" in base else {}
    cfg_pp = base.replace("_exact", "") + "_cfg_pp" + ("_exact" if base.endswith("_exact") else "")
    a = RAW[base](D, x, s, **kw)
    b = RAW[cfg_pp](D, x, s, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize(("flow", "exact"), [(False, False), (False, True), (True, True)])
def test_cfg_pp_first_step_is_cfgpp_ddim(flow, exact):
    """CFG++ (Chung et al. 2024) first step: x₁ = α₁·D_cfg + σ₁·ε̂_uncond, ε̂_uncond = (x − α₀D_uncond)/σ₀;
    ancestral: the same to σ_down, then scale·x + σ_up·z. (ComfyUI's names use the VE form on a flow
    model's σ: test_samplers_comfy.py.)"""
    sfx = "_exact" if exact else ""
    g = GaussianMixture.random(k=2, dim=3, seed=1)
    inner = FlowModel(g) if flow else g.denoiser()
    model = Guided(inner)
    s = torch.tensor([0.8, 0.5] if flow else [5.0, 2.0], dtype=torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = inner(x, s[0])
    c = u + model.delta
    a0 = 1 - s[0] if flow else 1.0

    def cfgpp(sig):
        a = 1 - sig if flow else 1.0
        return a * c + sig * (x - a0 * u) / s[0]

    out = RAW["res_multistep_cfg_pp" + sfx](model, x, s)
    assert torch.allclose(out, cfgpp(s[1]), atol=1e-13)
    assert not torch.allclose(out, RAW["res_multistep" + sfx](model, x, s), atol=1e-3)
    sd, su, scale = get_ancestral_step(s[0], s[1], 1.0, flow)
    z = ListNoise(x.shape, 7)(None, None)
    out = RAW["res_multistep_ancestral_cfg_pp" + sfx](model, x, s, noise_sampler=ListNoise(x.shape, 7))
    assert torch.allclose(out, scale * cfgpp(sd) + su * z, atol=1e-13)


@pytest.mark.parametrize(
    ("name", "flow"),
    [
        ("res_multistep_ancestral", False),
        ("res_multistep_ancestral_cfg_pp", False),
        ("res_multistep_ancestral_exact", False),
        ("res_multistep_ancestral_exact", True),
        ("res_multistep_ancestral_cfg_pp_exact", True),
    ],
)
def test_ancestral_moments(name, flow):
    """2-D two-component mixture, 4000 samples started from the exact p_σ₀ (data + σ₀·ε), 100 steps.

    Tolerance: 4 standard errors, estimated from the samples themselves (mean: √(C_ii/n); covariance:
    std((x_i − m_i)(x_j − m_j))/√n), plus a small allowance for the discretisation bias (measured:
    |z| < 0.5 at 100 steps, < 2.6 at 30 steps)."""
    g = GaussianMixture.random(k=2, dim=2, seed=0)
    n = 4000
    gen = torch.Generator().manual_seed(1)
    s = get_sigmas_karras(100, SMIN, 80.0).double()
    x = g.sample(n, gen) + s[0] * torch.randn(n, 2, dtype=torch.float64, generator=gen)
    if flow:
        sf = to_flow(s)
        out = RAW[name](FlowModel(g), (1 - sf[0]) * x, sf, seed=0)
    else:
        out = RAW[name](g.denoiser(), x, s, seed=0)
    m, c = out.mean(0), torch.cov(out.T)
    xc = out - m
    se_m = (c.diagonal() / n).sqrt()
    se_c = (xc[:, :, None] * xc[:, None, :]).reshape(n, 4).std(0).reshape(2, 2) / math.sqrt(n)
    assert ((m - g.mean()).abs() < 4 * se_m + 0.005).all(), (m, g.mean())
    assert ((c - g.cov()).abs() < 4 * se_c + 0.005).all(), (c, g.cov())


def test_ancestral_seeding_and_eta_zero():
    D = GaussianMixture.random(k=2, dim=3, seed=1).denoiser()
    s = get_sigmas_karras(8, SMIN, SMAX).double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s[0]
    a = M.sample_res_multistep_ancestral(D, x, s, seed=5)
    assert torch.equal(a, M.sample_res_multistep_ancestral(D, x, s, seed=5))
    assert not torch.allclose(a, M.sample_res_multistep_ancestral(D, x, s, seed=6))
    assert torch.equal(M.sample_res_multistep_ancestral(D, x, s, eta=0.0), M.sample_res_multistep(D, x, s))


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_batch_and_image_shapes(dtype, flow):
    """Through the checked registry: [2, 4, 8, 8] latents, output in x's dtype, close to float64."""
    g = GaussianMixture.random(k=2, dim=4 * 8 * 8, seed=0)
    model = FlowModel(g) if flow else g.denoiser()
    s = torch.linspace(1.0, 0.03, 10) if flow else get_sigmas_karras(10, SMIN, SMAX)
    s = torch.cat([s, s.new_zeros(1)]) if flow else s
    x64 = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * float(
        s[0]
    )
    tol = 2e-3 if dtype == torch.float32 else 0.2  # bf16 keeps 8 mantissa bits
    for name in NAMES:
        kw = {"seed": 1} if "ancestral" in name else {}
        ref = CHECKED[name](model, x64, s.double(), **kw)
        out = CHECKED[name](model, x64.to(dtype), s, **kw)
        assert out.dtype == dtype and out.shape == x64.shape and torch.isfinite(out).all(), name
        assert float((out.double() - ref).abs().max()) < tol * max(1.0, float(ref.abs().max())), name


def test_bad_options():
    D = GaussianMixture.single(2).denoiser()
    s = get_sigmas_karras(4, SMIN, SMAX)
    x = torch.zeros(1, 2)
    for fn, order in ((M.sample_ipndm, 5), (M.sample_deis, 0), (M.sample_uni_pc, 4)):
        with pytest.raises(ValueError, match="max_order"):
            fn(D, x, s, max_order=order)
