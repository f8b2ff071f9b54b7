"""Properties every sampler must have, checked on all of them (ComfyUI's 42 names and our `_exact`
variants) against the exact Gaussian(-mixture) oracle.

Group-specific checks (equivalences, per-sampler moments) live in test_samplers_<group>.py; diffusers
parity in test_diffusers_parity.py.
"""

import inspect
import math

import numpy as np
import pytest
import torch
from conftest import FlowModel

from latentforge.gmm import GaussianMixture
from latentforge.model_sampling import DiscreteVP
from latentforge.noise import BrownianTreeNoiseSampler, randn_seeded
from latentforge.samplers import ALL_SAMPLER_NAMES, SAMPLER_NAMES, SAMPLERS, get_sampler, sigmas_for
from latentforge.schedules import get_sigmas_karras

SMIN, SMAX = 0.0291675, 14.614642

# Nominal convergence order of each deterministic sampler on a smooth ODE (issue: slope within 0.3 of
# nominal; "at least" for the multistep/exponential methods, whose measured slope can exceed nominal).
ORDERS = {
    "euler": (1, "eq"), "euler_cfg_pp": (1, "eq"), "ddim": (1, "eq"),
    "heun": (2, "eq"), "dpm_2": (2, "eq"), "dpmpp_2m": (2, "ge"), "dpmpp_2m_cfg_pp": (2, "ge"),
    "lms": (2, "ge"), "heunpp2": (1, "eq"), "ipndm": (2, "ge"), "ipndm_v": (2, "ge"), "deis": (2, "ge"),
    "res_multistep": (2, "ge"), "res_multistep_cfg_pp": (2, "ge"), "uni_pc": (2, "ge"),
    "uni_pc_bh2": (2, "ge"), "dpm_fast": (2, "ge"), "gradient_estimation": (1, "ge"),
    "gradient_estimation_cfg_pp": (1, "ge"), "dpm_fast_exact": (2, "ge"), "ipndm_v_exact": (2, "ge"),
    "res_multistep_exact": (2, "ge"), "res_multistep_cfg_pp_exact": (2, "ge"), "dpmpp_2m_exact": (2, "ge"),
    "uni_pc_exact": (2, "ge"), "uni_pc_bh2_exact": (2, "ge"),
}  # fmt: skip
# ComfyUI's ipndm_v is of order 2 only asymptotically (its error changes sign near 30 steps): measured
# on longer schedules (see multistep._ipndm_v_coeffs)
STEPS = {"ipndm_v": (160, 320, 640, 1280)}
DETERMINISTIC = set(ORDERS) | {"dpm_adaptive", "dpm_adaptive_exact"}
STOCHASTIC = [n for n in ALL_SAMPLER_NAMES if n not in DETERMINISTIC]


def _needs(name):
    if name not in SAMPLERS:
        pytest.fail(f"sampler {name!r} is missing from SAMPLERS")
    return SAMPLERS[name]


def test_all_42_names():
    assert len(SAMPLER_NAMES) == 42 and len(set(SAMPLER_NAMES)) == 42
    assert sorted(SAMPLERS) == sorted(ALL_SAMPLER_NAMES) and len(set(ALL_SAMPLER_NAMES)) == len(SAMPLERS)


def _slope(ns, errs):
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_convergence_order(name):
    """Single Gaussian N(0.5, 0.3²) in 4-D: the PF-ODE solution is closed form (gmm.py).

    The schedule stops at σ_min (no final step to 0), so every sampler is measured on the same
    integral: the final denoise is a convention (Euler's step to 0 is D; LMS integrates to σ = 0)."""
    fn = _needs(name)
    g = GaussianMixture.single(4)
    D = g.denoiser()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(256, 4, generator=gen, dtype=torch.float64)
    ns, errs = STEPS.get(name, (20, 40, 80, 160)), []
    for n in ns:
        s = get_sigmas_karras(n, SMIN, SMAX).double()[:-1]
        ref = g.ode_solution_ve(noise * s[0], float(s[0]), float(s[-1]))
        out = fn(D, noise * s[0], s)
        errs.append(float((out - ref).abs().max()))
    order, mode = ORDERS[name]
    slope = _slope(ns, errs)
    assert errs[-1] < errs[0], (name, errs)
    if mode == "eq":
        assert abs(slope - order) <= 0.3, (name, slope, errs)
    else:
        assert slope >= order - 0.3, (name, slope, errs)


def test_dpm_adaptive_reaches_tolerance():
    g = GaussianMixture.single(4)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = get_sigmas_karras(10, SMIN, SMAX).double()
    at_min = g.ode_solution_ve(noise * s[0], float(s[0]), float(s[-2]))
    out = _needs("dpm_adaptive_exact")(g.denoiser(), noise * s[0], s, rtol=1e-4, atol=1e-5)
    assert float((out - g.denoise_ve(at_min, s[-2])).abs().max()) < 1e-2
    # ComfyUI's dpm_adaptive stops at σ_min: no final denoise
    out = _needs("dpm_adaptive")(g.denoiser(), noise * s[0], s, rtol=1e-4, atol=1e-5)
    assert float((out - at_min).abs().max()) < 1e-2


def _takes(name, option):
    params = inspect.signature(inspect.unwrap(SAMPLERS[name])).parameters
    return option in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _kw(name, x, seed):
    """Stochastic samplers get a seed and use their default (per-image) noise."""
    return {"seed": seed} if _takes(name, "seed") else {}


@pytest.mark.parametrize("name", ALL_SAMPLER_NAMES)
def test_deterministic_for_a_seed_and_batch_independent(name):
    fn = _needs(name)
    D = GaussianMixture.random(k=2, dim=3, seed=1).denoiser()
    s = get_sigmas_karras(6, SMIN, SMAX).double()
    x = randn_seeded((3, 3), [10, 11, 12], dtype=torch.float64) * s[0]
    a = fn(D, x.clone(), s, **_kw(name, x, [10, 11, 12]))
    b = fn(D, x.clone(), s, **_kw(name, x, [10, 11, 12]))
    assert torch.equal(a, b)
    if name in ("dpm_adaptive", "dpm_adaptive_exact"):
        return  # its step-size controller uses the batch's error norm (as in the paper): batch-dependent
    # image 1 alone, with its own seed, gives the same result as inside the batch
    single = fn(D, x[1:2].clone(), s, **_kw(name, x[1:2], [11]))
    assert torch.allclose(single, a[1:2], atol=1e-12, rtol=0), (single, a[1:2])


@pytest.mark.parametrize("name", ALL_SAMPLER_NAMES)
def test_dtypes_and_step_counts(name):
    fn = _needs(name)
    g = GaussianMixture.random(k=2, dim=4, seed=2)
    for steps in (1, 2, 3):
        s = get_sigmas_karras(steps, SMIN, SMAX).double()
        x = randn_seeded((2, 4), [1, 2], dtype=torch.float64) * s[0]
        out = fn(g.denoiser(), x, s, **_kw(name, x, 5))
        assert out.shape == x.shape and torch.isfinite(out).all(), steps
    s = get_sigmas_karras(8, SMIN, SMAX)
    x64 = randn_seeded((2, 4), [1, 2], dtype=torch.float64) * float(s[0])
    ref = fn(g.denoiser(), x64, s.double(), **_kw(name, x64, 5))
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.15)):
        # bfloat16 keeps 8 mantissa bits: values of size ~3 carry errors ~1e-2 per step
        out = fn(g.denoiser(dtype=dtype), x64.to(dtype), s, **_kw(name, x64, 5))
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out.double() - ref).abs().max() < tol * max(1.0, float(ref.abs().max())), dtype


@pytest.mark.parametrize("name", ALL_SAMPLER_NAMES)
def test_callback_and_sigmas_not_ending_in_zero(name):
    fn = _needs(name)
    D = GaussianMixture.single(2).denoiser()
    s = get_sigmas_karras(5, SMIN, SMAX).double()
    seen = []
    fn(D, torch.ones(2, 2, dtype=torch.float64) * s[0], s, callback=seen.append, **_kw(name, None, 1))
    assert seen and {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(seen[0])
    out = fn(
        D, torch.ones(2, 2, dtype=torch.float64) * s[0], s[:-2], **_kw(name, None, 1)
    )  # img2img-style stop
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_flow_model_convergence(name):
    """Flow coordinates x = (1−σ)x₀ + σε from pure noise at σ = 1 on SD3-style linear σ steps: the exact
    ODE solution is the VE one mapped by x = (1−σ)·x_VE; each sampler converges at its order."""
    fn = _needs(name)
    g = GaussianMixture.single(4)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ns, errs = STEPS.get(name, (40, 80, 160))[-3:], []
    for n in ns:
        s = torch.linspace(1.0, 0.02, n + 1, dtype=torch.float64)
        smin = float(s[-1])
        # from σ = 1 (σ_VE → ∞): start the closed form at a huge σ_VE with x_VE = ε·σ_VE
        ref = (1 - smin) * g.ode_solution_ve(noise * 1e8, 1e8, smin / (1 - smin))
        out = fn(FlowModel(g), noise.clone(), s)
        errs.append(float((out - ref).abs().max()))
    order, mode = ORDERS[name]
    slope = _slope(ns, errs)
    assert errs[-1] < 0.05, (name, errs)
    if mode == "eq":
        assert abs(slope - order) <= 0.3, (name, slope, errs)
    else:
        # the exponential integrators start at σ = 0.9999 (λ = −∞ at 1), an error floor of ~1e-4
        assert slope >= order - 0.3 or errs[-1] < 3e-4, (name, slope, errs)


def _batched_tree(x, seed=0):
    return BrownianTreeNoiseSampler(x, SMIN * 0.5, SMAX, [seed], per_image=False, tol=1e-4)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_moments(name):
    """A 2-D two-component mixture: sample mean and covariance within sampling error of the exact ones.

    n = 3000 samples: the standard error of a mean is ≈ std/√n ≈ 0.03 and of a (co)variance ≈
    var·√(2/n) ≈ 0.04 here; we allow 4 standard errors plus the discretisation bias of 60 steps."""
    fn = _needs(name)
    g = GaussianMixture.random(k=2, dim=2, seed=0)
    s = get_sigmas_karras(60, SMIN, SMAX).double()
    x = torch.randn(3000, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * s[0]
    kw = {"noise_sampler": _batched_tree(x)} if _takes(name, "noise_sampler") else {}
    out = fn(g.denoiser(), x, s, **kw)
    mean, cov = g.mean(), g.cov()
    sd = cov.diagonal().sqrt()
    assert ((out.mean(0) - mean).abs() < 4 * sd / math.sqrt(3000) + 0.02).all(), (out.mean(0), mean)
    assert ((torch.cov(out.T) - cov).abs() < 4 * cov.diagonal().max() * math.sqrt(2 / 3000) + 0.05).all(), (
        torch.cov(out.T),
        cov,
    )


def test_unknown_sampler_suggests():
    with pytest.raises(ValueError, match="Did you mean 'dpmpp_2m'") as e:
        get_sampler("dpmpp2m")
    assert "uni_pc_bh2" in str(e.value)


@pytest.mark.parametrize(
    "sigmas, match",
    [
        ([5.0, 5.0, 0.0], "strictly decreasing: step 0"),
        ([5.0, 1.0, 2.0, 0.0], "strictly decreasing: step 1"),
        ([5.0], "at least 2 values"),
        ([5.0, float("nan"), 0.0], "not finite"),
        ([5.0, -1.0], "negative"),
    ],
)
def test_bad_sigmas(sigmas, match):
    D = GaussianMixture.single(2).denoiser()
    with pytest.raises(ValueError, match=match):
        SAMPLERS["euler"](D, torch.zeros(1, 2), torch.tensor(sigmas))


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "heun", "euler_ancestral"])
def test_nan_model_output_names_the_step(name):
    s = get_sigmas_karras(6, SMIN, SMAX)

    def D(x, sigma, **kw):
        return torch.full_like(x, float("nan")) if float(sigma[0]) < 3 else x * 0

    with pytest.raises(FloatingPointError, match=r"at step 2 of 6 \(σ=2\.23"):
        _needs(name)(D, torch.zeros(1, 2), s)


def test_sigmas_for_discards_penultimate():
    ms = DiscreteVP()
    a = sigmas_for("dpm_2", "karras", ms, 10)
    b = sigmas_for("euler", "karras", ms, 10)
    assert len(a) == len(b) == 11 and a[-1] == 0 and float(a[-2]) > float(b[-2])
