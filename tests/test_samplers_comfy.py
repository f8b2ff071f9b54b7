"""Each ComfyUI sampler name computes what ComfyUI computes under that name.

1. The samplers ComfyUI takes from k-diffusion are compared with k-diffusion 0.1.1 itself, run on the
   same denoiser, schedule and noise. ComfyUI's versions equal k-diffusion's for eps/v models; its
   KSAMPLER calls `sample_dpm_fast(model, x, σ_min, σ₀, len(sigmas) − 1)` and
   `sample_dpm_adaptive(model, x, σ_min, σ₀)` with σ_min the last positive σ, and the rest with the
   schedule as given. k-diffusion is a test-only dependency installed without its dependencies
   (`pip install --no-deps k-diffusion==0.1.1`, scripts/venv.sh): only `k_diffusion/sampling.py` is
   loaded, by file, with its `utils.append_dims` and the unused `torchdiffeq` import stubbed, because
   the package's __init__ needs torchvision and clip. Without it these tests skip.
2. Samplers that exist only in ComfyUI have no installable reference. Their ComfyUI-name versions are
   checked against independent re-derivations here (written from the papers' equations and the facts
   read in ComfyUI's source, listed per test) and against closed-form answers (latentforge.gmm).
3. The `_exact` variants keep the formulas we measured to be more accurate; their measured orders are
   asserted next to the ComfyUI names' measured orders.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from latentforge.gmm import GaussianMixture
from latentforge.samplers import (
    ALL_SAMPLER_NAMES,
    EXACT_SAMPLER_NAMES,
    EXACT_VARIANT_OF,
    SAMPLER_NAMES,
    SAMPLERS,
)
from latentforge.schedules import get_sigmas_karras

pytestmark = [
    pytest.mark.filterwarnings("ignore:Should have t:UserWarning"),  # torchsde endpoint rounding
    pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning"),  # k-diffusion's own
]

SMIN, SMAX = 0.0291675, 14.614642
GMM = GaussianMixture.random(k=3, dim=4, seed=0)
D = GMM.denoiser()


def karras(n: int) -> torch.Tensor:
    return get_sigmas_karras(n, SMIN, SMAX).double()


def start(s: torch.Tensor, batch: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * s[0]


def shared_noise(batch: int = 64, seed: int = 5):
    """The same i.i.d. unit noise, in call order, for both implementations."""
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(batch, 4, generator=g, dtype=torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- k-diffusion 0.1.1 as the reference --------------------------------------------------------------


def _load_k_diffusion_sampling():
    """k_diffusion/sampling.py of the installed k-diffusion, without the package __init__."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = f"{spec.submodule_search_locations[0]}/sampling.py"
    pkg = types.ModuleType("_kdiffusion_ref")
    pkg.__path__ = []
    utils = types.ModuleType("_kdiffusion_ref.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]  # k_diffusion.utils.append_dims
    pkg.utils = utils
    saved = {k: sys.modules.get(k) for k in ("_kdiffusion_ref", "_kdiffusion_ref.utils", "torchdiffeq")}
    sys.modules.update({"_kdiffusion_ref": pkg, "_kdiffusion_ref.utils": utils})
    if saved["torchdiffeq"] is None:  # imported for log_likelihood only
        stub = types.ModuleType("torchdiffeq")
        stub.odeint = None
        sys.modules["torchdiffeq"] = stub
    try:
        mspec = importlib.util.spec_from_file_location("_kdiffusion_ref.sampling", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    except Exception:  # a k-diffusion we cannot load: the tests skip
        return None
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


KD = _load_k_diffusion_sampling()
needs_kd = pytest.mark.skipif(
    KD is None, reason="k-diffusion 0.1.1 not installed (pip install --no-deps k-diffusion==0.1.1)"
)


@contextlib.contextmanager
def float64_default():
    """k-diffusion builds DPM-Solver's λ grid with torch.linspace, in the default dtype: float64 here so
    that both sides compute in double precision (in float32 they differ by float32 rounding, ~1e-6)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def comfy_ksampler(name: str, x, sigmas, **kw):
    """What ComfyUI's KSAMPLER runs for `name` (comfy/samplers.py `ksampler`), on k-diffusion 0.1.1."""
    if name in ("dpm_fast", "dpm_adaptive"):
        sigma_min = sigmas[-1] if float(sigmas[-1]) > 0 else sigmas[-2]
        with float64_default():
            if name == "dpm_fast":
                return KD.sample_dpm_fast(D, x, sigma_min, sigmas[0], len(sigmas) - 1, disable=True, **kw)
            return KD.sample_dpm_adaptive(D, x, sigma_min, sigmas[0], disable=True, **kw)
    return getattr(KD, f"sample_{name}")(D, x, sigmas, disable=True, **kw)


# (ComfyUI name, options, uses noise). Every sampler of k-diffusion 0.1.1 that ComfyUI lists.
KD_CASES = [
    ("euler", {}, False),
    ("euler_ancestral", {"eta": 1.0}, True),
    ("heun", {}, False),
    ("dpm_2", {}, False),
    ("dpm_2_ancestral", {"eta": 1.0}, True),
    ("lms", {}, False),
    ("dpm_fast", {}, False),
    ("dpm_adaptive", {}, False),
    ("dpm_adaptive", {"order": 2, "rtol": 0.01}, False),
    ("dpm_adaptive", {"eta": 1.0, "rtol": 0.02}, True),
    ("dpmpp_2s_ancestral", {"eta": 1.0}, True),
    ("dpmpp_sde", {"eta": 1.0}, True),
    ("dpmpp_2m", {}, False),
    ("dpmpp_2m_sde", {"eta": 1.0}, True),
    ("dpmpp_2m_sde", {"eta": 1.0, "solver_type": "heun"}, True),
    ("dpmpp_3m_sde", {"eta": 0.0}, False),
    ("dpmpp_3m_sde", {"eta": 1.0}, True),
]


@needs_kd
@pytest.mark.parametrize("steps", [3, 10, 25])
@pytest.mark.parametrize(("name", "kw", "noisy"), KD_CASES)
def test_matches_k_diffusion(name, kw, noisy, steps):
    """Schedules ending in 0 (txt2img) and stopping above it (img2img-style `sigmas[:-2]`)."""
    for s in (karras(steps), karras(steps + 2)[:-2]):
        x = start(s)
        extra = {"noise_sampler": shared_noise()} if noisy else {}
        ref = comfy_ksampler(name, x.clone(), s, **kw, **extra)
        extra = {"noise_sampler": shared_noise()} if noisy else {}
        out = SAMPLERS[name](D, x.clone(), s, **kw, **extra)
        assert rel(out, ref) < 1e-12, (name, kw, rel(out, ref))


@needs_kd
def test_dpm_fast_float32_within_rounding():
    """In float32 (k-diffusion's λ grid then in float32 too) the difference is float32 rounding."""
    s = get_sigmas_karras(10, SMIN, SMAX)
    x = start(s.double()).float()
    ref = KD.sample_dpm_fast(GMM.denoiser(dtype=torch.float32), x, s[-2], s[0], len(s) - 1, disable=True)
    out = SAMPLERS["dpm_fast"](GMM.denoiser(dtype=torch.float32), x, s)
    assert rel(out, ref) < 1e-5


@needs_kd
@pytest.mark.parametrize(
    ("name", "kw", "at_least"),
    [
        ("dpm_fast_exact", {}, 1e-3),  # measured 4.2e-2 at 10 steps (N − 1 ODE calls + a final denoise)
        ("dpm_adaptive_exact", {}, 1e-3),  # measured 1.8e-2 (final denoise, per-image error norm)
        ("dpmpp_3m_sde_exact", {"eta": 0.0}, 1e-3),  # measured 3.2e-2
        ("dpmpp_3m_sde_exact", {"eta": 1.0}, 1e-2),  # measured 7.3e-1
    ],
)
def test_exact_variants_are_not_what_k_diffusion_computes(name, kw, at_least):
    s = karras(10)
    x = start(s)
    base = EXACT_VARIANT_OF[name]
    extra = {"noise_sampler": shared_noise()} if kw.get("eta") else {}
    ref = comfy_ksampler(base, x.clone(), s, **kw, **extra)
    extra = {"noise_sampler": shared_noise()} if kw.get("eta") else {}
    assert rel(SAMPLERS[name](D, x.clone(), s, **kw, **extra), ref) > at_least


# --- names ---------------------------------------------------------------------------------------------


def test_names():
    assert len(SAMPLER_NAMES) == 42 and set(SAMPLER_NAMES).isdisjoint(EXACT_SAMPLER_NAMES)
    assert ALL_SAMPLER_NAMES == SAMPLER_NAMES + EXACT_SAMPLER_NAMES
    for name in EXACT_SAMPLER_NAMES:
        assert name.endswith("_exact") and EXACT_VARIANT_OF[name] in SAMPLER_NAMES
        assert SAMPLERS[name].__doc__ and SAMPLERS[EXACT_VARIANT_OF[name]].__doc__


def _slope(ns, errs) -> float:
    return float(-np.polyfit(np.log(ns), np.log(errs), 1)[0])


# --- ComfyUI-only samplers: ipndm_v ---------------------------------------------------------------------
# ComfyUI's ipndm_v (comfy/k_diffusion/sampling.py, after zju-pi/diff-solvers) steps
# x + (σ_{i+1} − σ_i)·Σ b_j d_{i−j} with step-ratio coefficients that are Adams–Bashforth's only up to
# order 2; see multistep._ipndm_v_coeffs for the values and ipndm_v_exact for the Adams method.


def test_ipndm_v_coefficients():
    from latentforge.samplers.common import lagrange_integrals
    from latentforge.samplers.multistep import _ipndm_v_coeffs

    # uniform grid: AB3, and ComfyUI's order-4 step (57, −65, 43, −11)/24 (AB4: 55, −59, 37, −9)
    np.testing.assert_allclose(_ipndm_v_coeffs([-1.0] * 3), np.array([23, -16, 5]) / 12, rtol=1e-14)
    np.testing.assert_allclose(_ipndm_v_coeffs([-1.0] * 4), np.array([57, -65, 43, -11]) / 24, rtol=1e-14)
    sig = [14.6, 9.1, 5.5, 3.2, 1.4]  # σ_{i−3} … σ_{i+1}
    nodes = sig[3::-1]  # σ_i, σ_{i−1}, … (newest first)
    h = [sig[4] - sig[3], sig[3] - sig[2], sig[2] - sig[1], sig[1] - sig[0]]

    def adams(k):  # the exact variable-step Adams–Bashforth b, independently: ∫ of the Lagrange basis
        return np.array(lagrange_integrals(nodes[:k], sig[3], sig[4])) / h[0]

    np.testing.assert_allclose(_ipndm_v_coeffs(h[:2]), adams(2), rtol=1e-13)
    # order 3: Adams plus (T₁ − T₁_Adams) times the second difference (1, −(1 + h₁/h₂), h₁/h₂)
    h0, h1, h2, h3 = h
    t1 = (1 - h0 * h0 / (3 * h1 * (h1 + h2))) / 2
    t1_adams = (1 - h0 / (3 * (h0 + h1))) * h0 * (h0 + h1) / (2 * h1 * (h1 + h2))
    want = adams(3) + (t1 - t1_adams) * np.array([1, -(1 + h1 / h2), h1 / h2])
    np.testing.assert_allclose(_ipndm_v_coeffs(h[:3]), want, rtol=1e-13)
    # order 4: the b's sum to 1 only when h₁/h₂ = h₂/h₃ (consistent to first order on smooth grids)
    b = _ipndm_v_coeffs(h)
    t2 = ((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2))) * (
        h0 * (h0 + h1) * (h0 + h1 + h2) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    )
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    assert abs(sum(b) - 1 - t2 * q * (h2 / h3 - h1 / h2)) < 1e-13
    assert abs(sum(_ipndm_v_coeffs([-8.0, -4.0, -2.0, -1.0])) - 1) < 1e-14  # geometric: consistent


# --- deis --------------------------------------------------------------------------------------------
# ComfyUI's deis (comfy/k_diffusion/sampling.py sample_deis, deis.py get_deis_coeff_list, tab mode):
# d = (x − D)/σ on the model's own σ (flow models too), x ← x + Σ_j C_j d_{i−j}, order min(3, i + 1),
# an order-1 (Euler) step to σ = 0; C_j = ∫ L_j(t)·dσ/dt over the DEIS time t of σ, with the VP fit
# σ(t)² = exp(β_d t²/2 + β_min t) − 1 through σ(1e-3) = 0.002, σ(1) = 80, summed over 10,000 equispaced
# points with weight (t_{i+1} − t_i)/10,000.


def _comfy_deis_reference(model, x, sigmas, max_order=3, n_points=10_000):
    """An independent DEIS tAB in σ with ComfyUI's Riemann-sum coefficients (float64)."""
    eps_s, s_min, s_max = 1e-3, 0.002, 80.0
    beta_d = 2 * (np.log(s_min**2 + 1) / eps_s - np.log(s_max**2 + 1)) / (eps_s - 1)
    beta_min = np.log(s_max**2 + 1) - 0.5 * beta_d
    t_of = lambda sig: (np.sqrt(beta_min**2 + 2 * beta_d * np.log(sig**2 + 1)) - beta_min) / beta_d

    def dsigma_dt(t):  # σ = √(e^{E} − 1), E = β_d t²/2 + β_min t
        e = 0.5 * beta_d * t**2 + beta_min * t
        return (beta_d * t + beta_min) * np.exp(e) / (2 * np.sqrt(np.exp(e) - 1))

    sig = sigmas.double().numpy()
    ts = t_of(sig)
    hist = []
    for i in range(len(sig) - 1):
        s = torch.tensor([sig[i]] * x.shape[0], dtype=torch.float64)
        d = (x - model(x, s)) / sig[i]
        hist.insert(0, d)
        k = 1 if sig[i + 1] == 0 else min(max_order, i + 1)
        if k == 1:
            x = x + (sig[i + 1] - sig[i]) * d
        else:
            tau = np.linspace(ts[i], ts[i + 1], n_points)
            w = dsigma_dt(tau) * (ts[i + 1] - ts[i]) / n_points
            for j in range(k):
                poly = np.prod([(tau - ts[i - m]) / (ts[i - j] - ts[i - m]) for m in range(k) if m != j], 0)
                x = x + float(np.sum(w * poly)) * hist[j]
    return x


@pytest.mark.parametrize("flow", [False, True])
def test_deis_is_comfyuis(flow):
    """Against the reference above: the same up to the Riemann sum's error (~1e-5 of each step)."""
    from conftest import FlowModel

    g = GaussianMixture.random(k=2, dim=3, seed=1)
    s = karras(12)
    model, x = (
        g.denoiser(),
        torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
    )
    if flow:  # the model's own σ, used as is (no 1 → 0.9999 offset, no α)
        s, model = (
            torch.cat([torch.linspace(1.0, 0.05, 12, dtype=torch.float64), s.new_zeros(1)]),
            FlowModel(g),
        )
    else:
        x = x * s[0]
    ref = _comfy_deis_reference(model, x.clone(), s)
    assert rel(SAMPLERS["deis"](model, x.clone(), s), ref) < 1e-5


# --- res_multistep* ----------------------------------------------------------------------------------
# ComfyUI's res_multistep (comfy/k_diffusion/sampling.py `res_multistep`, all four names): λ = −log σ
# and the VE ancestral split on the model's own σ for every model; the first step and a step to
# σ_down = 0 are Euler (CFG++: D_cfg + σ_down·(x − D_uncond)/σ); later steps are RES 2M (Zhang et al.
# 2023, b₂ = φ₂/c₂, b₁ = φ₁ − b₂, c₂ = (λ_{i−1} − λ(σ_down,i−1))/h); CFG++ adds D_cfg − D_uncond to x first
# and combines the unconditional outputs; then σ_up of i.i.d. noise.


class Guided:
    """CFG stand-in: D = D_u + w·(D_c − D_u) with `with_uncond`; optional flow model_sampling."""

    def __init__(self, w: float, flow: bool = False):
        from latentforge.model_sampling import DiscreteFlow

        gc, gu = GaussianMixture.single(4, mean=0.8), GaussianMixture.single(4, mean=0.2, std=0.4)
        self.c, self.u, self.w = gc.denoiser(flow), gu.denoiser(flow), w
        if flow:
            self.model_sampling = DiscreteFlow(shift=1.0)

    def with_uncond(self, x, sigma, **kw):
        u = self.u(x, sigma)
        return u + self.w * (self.c(x, sigma) - u), u

    def __call__(self, x, sigma, **kw):
        return self.with_uncond(x, sigma)[0]


def _comfy_res_reference(model, x, sigmas, eta=0.0, cfg_pp=False, noise=None):
    sig = [float(v) for v in sigmas]
    lam = lambda v: -np.log(v)
    old = None  # (output kept for the next step, σ_down of this step)
    for i in range(len(sig) - 1):
        vec = torch.full((x.shape[0],), sig[i], dtype=torch.float64)
        d_out, u_out = model.with_uncond(x, vec) if cfg_pp else (model(x, vec),) * 2
        s, sn = sig[i], sig[i + 1]
        su = min(sn, eta * np.sqrt(sn**2 * (s**2 - sn**2) / s**2)) if eta else 0.0
        sd = np.sqrt(sn**2 - su**2)
        if sd == 0 or old is None:
            x = d_out + sd * (x - u_out) / s if cfg_pp else x + (x - d_out) / s * (sd - s)
        else:
            h = lam(sd) - lam(s)
            c2 = (lam(sig[i - 1]) - lam(old[1])) / h
            phi1 = np.expm1(-h) / -h  # φ₁(−h)
            phi2 = (phi1 - 1) / -h  # φ₂(−h)
            b2 = phi2 / c2
            b1 = phi1 - b2
            if cfg_pp:
                x = np.exp(-h) * (x + d_out - u_out) + h * (b1 * u_out + b2 * old[0])
            else:
                x = np.exp(-h) * x + h * (b1 * d_out + b2 * old[0])
        if sn > 0 and su > 0:
            x = x + noise(None, None) * su
        old = (u_out, sd)
    return x


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name", ["res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
                                  "res_multistep_ancestral_cfg_pp"])  # fmt: skip
def test_res_multistep_is_comfyuis(name, flow):
    model = Guided(3.0, flow)
    s = (
        torch.cat([torch.linspace(1.0, 0.03, 14, dtype=torch.float64), torch.zeros(1)])
        if flow
        else karras(14)
    )
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x if flow else x * s[0]
    eta = 1.0 if "ancestral" in name else 0.0
    kw = {"noise_sampler": shared_noise()} if eta else {}
    ref = _comfy_res_reference(model, x.clone(), s, eta, "cfg_pp" in name, noise=shared_noise())
    assert rel(SAMPLERS[name](model, x.clone(), s, **kw), ref) < 1e-12
    # the `_exact` forms differ on flow models (all) and with guidance (CFG++ forms)
    exact = SAMPLERS[f"{name}_exact"](
        model, x.clone(), s, **({"noise_sampler": shared_noise()} if eta else {})
    )
    assert (rel(exact, ref) > 1e-3) == (flow or "cfg_pp" in name)


def test_res_multistep_cfg_pp_exact_is_closer_to_the_cfgpp_limit():
    """Both CFG++ forms tend to the many-step limit of euler_cfg_pp (CFG++ DDIM); the `_exact` one
    (guided outputs in the multistep combination) is closer at every step count (measured 0.53 / 0.34 /
    0.065 against ComfyUI's 0.83 / 0.49 / 0.073 at 10 / 20 / 80 steps; reference: 2000 steps)."""
    model = Guided(3.0)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fine = karras(2000)
    ref = SAMPLERS["euler_cfg_pp"](model, x * fine[0], fine)
    for n in (10, 20, 80):
        s = karras(n)
        err = {
            k: rel(SAMPLERS[k](model, x * s[0], s), ref)
            for k in ("res_multistep_cfg_pp", "res_multistep_cfg_pp_exact")
        }
        assert err["res_multistep_cfg_pp_exact"] < 0.95 * err["res_multistep_cfg_pp"], (n, err)


# --- gradient_estimation* -----------------------------------------------------------------------------
# ComfyUI's sample_gradient_estimation: d = (x − D)/σ (CFG++: (x − D_uncond)/σ); a step to σ = 0 is
# x = D_cfg; otherwise Euler (CFG++: D_cfg + σ_{i+1}·d) plus (γ − 1)(d_i − d_{i−1})·Δσ from the second
# step on; γ = 2. The same on every model's own σ.


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name", ["gradient_estimation", "gradient_estimation_cfg_pp"])
def test_gradient_estimation_is_comfyuis(name, flow):
    model = Guided(3.0, flow)
    s = torch.cat([torch.linspace(1.0, 0.03, 9, dtype=torch.float64), torch.zeros(1)]) if flow else karras(9)
    x0 = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x0 if flow else x0 * s[0]
    cfg_pp, ref, d_old = "cfg_pp" in name, x.clone(), None
    for i in range(len(s) - 1):
        dc, du = model.with_uncond(ref, torch.full((16,), float(s[i]), dtype=torch.float64))
        d = (ref - (du if cfg_pp else dc)) / s[i]
        if s[i + 1] == 0:
            ref = dc
            break
        ref = dc + s[i + 1] * d if cfg_pp else ref + d * (s[i + 1] - s[i])
        if d_old is not None:
            ref = ref + (d - d_old) * (s[i + 1] - s[i])
        d_old = d
    assert rel(SAMPLERS[name](model, x.clone(), s), ref) < 1e-13


# --- er_sde ----------------------------------------------------------------------------------------------
# ComfyUI's sample_er_sde (VP ER-SDE-Solver-3 after the paper's code): v = σ/α (flow: σ = 1 → 0.9999),
# stage = min(3, i + 1), r = φ(v_t)/φ(v_s) with φ(v) = v(e^{v^0.3} + 10); x ← (α_t/α_s)r·x + α_t(1 − r)D;
# stage 2 adds α_t(Δv + φ_t·S₀)·(D − D_{i−1})/(v_s − v_{i−1}), stage 3 α_t(Δv²/2 + φ_t·S₁)·
# (D′ − D′_{i−1})/((v_s − v_{i−2})/2), S₀, S₁ left Riemann sums over 200 points from v_t; then
# α_t·√(v_t² − r²v_s²)·z with i.i.d. z; x = D on the step to σ = 0.


def _comfy_er_sde_reference(model, x, sigmas, flow, noise):
    phi = lambda v: v * (np.exp(v**0.3) + 10.0)
    sig = [float(v) for v in sigmas]
    if flow and sig[0] >= 1:
        sig[0] = 0.9999
    alpha = [1 - v if flow else 1.0 for v in sig]
    lam = [v / a if v > 0 else 0.0 for v, a in zip(sig, alpha, strict=True)]
    old_d = old_dd = None
    for i in range(len(sig) - 1):
        den = model(x, torch.full((x.shape[0],), sig[i], dtype=torch.float64))
        if sig[i + 1] == 0:
            return den
        vs, vt = lam[i], lam[i + 1]
        r = phi(vt) / phi(vs)
        x = alpha[i + 1] / alpha[i] * r * x + alpha[i + 1] * (1 - r) * den
        stage = min(3, i + 1)
        if stage >= 2:
            dv = vt - vs
            pos = vt + np.arange(200) * (-dv / 200)
            s0 = float(np.sum(1 / phi(pos)) * (-dv / 200))
            dd = (den - old_d) / (vs - lam[i - 1])
            x = x + alpha[i + 1] * (dv + s0 * phi(vt)) * dd
            if stage >= 3:
                s1 = float(np.sum((pos - vs) / phi(pos)) * (-dv / 200))
                du = (dd - old_dd) / ((vs - lam[i - 2]) / 2)
                x = x + alpha[i + 1] * (dv**2 / 2 + s1 * phi(vt)) * du
            old_dd = dd
        x = x + alpha[i + 1] * noise(None, None) * np.sqrt(max(vt**2 - vs**2 * r**2, 0.0))
        old_d = den
    return x


@pytest.mark.parametrize("flow", [False, True])
def test_er_sde_is_comfyuis(flow):
    from conftest import FlowModel

    g = GaussianMixture.random(k=2, dim=4, seed=3)
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if flow:
        s, model = (
            torch.cat([torch.linspace(1.0, 0.03, 12, dtype=torch.float64), torch.zeros(1)]),
            FlowModel(g),
        )
    else:
        s, model = karras(12), g.denoiser()
        x = x * s[0]
    ref = _comfy_er_sde_reference(model, x.clone(), s, flow, shared_noise())
    assert rel(SAMPLERS["er_sde"](model, x.clone(), s, noise_sampler=shared_noise()), ref) < 1e-12
    exact = SAMPLERS["er_sde_exact"](model, x.clone(), s, noise_sampler=shared_noise())
    assert rel(exact, ref) > 1e-4  # the same noise; D′ and the integrals differ


# --- seeds_2, seeds_3 ----------------------------------------------------------------------------------
# ComfyUI's sample_seeds_2 / _3 (SEEDS, Gonzalez et al. 2023, data prediction in λ, flow σ = 1 → 0.9999):
# stages at λ_s + r·h (r = ½; r₁ = ⅓, r₂ = ⅔), c = 1 + η, each stage point and the end get
# (σ/σ_s)e^{−ηrh}·x − α·[φ-combination of the D's] plus σ·ν with ν carried over the sub-intervals
# (ν ← e^{−η(r′−r)h}ν + √(1 − e^{−2η(r′−r)h})·z, one i.i.d. z per sub-interval, in order).


def _comfy_seeds_reference(model, x, sigmas, flow, noise, stages, eta=1.0):
    sig = [float(v) for v in sigmas]
    if flow and sig[0] >= 1:
        sig[0] = 0.9999
    lam = lambda v: np.log((1 - v) / v) if flow else -np.log(v)
    sig_of = lambda lm: 1 / (1 + np.exp(lm)) if flow else np.exp(-lm)
    alpha = lambda v: 1 - v if flow else 1.0
    e1 = lambda z: -np.expm1(-z)  # 1 − e^{−z}
    psi = lambda z: 1 - e1(z) / z  # 1 − (1 − e^{−z})/z
    call = lambda y, v: model(y, torch.full((y.shape[0],), v, dtype=torch.float64))
    c = 1 + eta
    for i in range(len(sig) - 1):
        d0 = call(x, sig[i])
        if sig[i + 1] == 0:
            return d0
        h = lam(sig[i + 1]) - lam(sig[i])
        rs = [0.5, 1.0] if stages == 2 else [1 / 3, 2 / 3, 1.0]
        ds, nu, r_prev = [d0], 0.0, 0.0
        for k, r in enumerate(rs):
            sr = sig[i + 1] if r == 1.0 else sig_of(lam(sig[i]) + r * h)
            if stages == 2 and r == 1.0:  # phi_1: the midpoint combination
                data = e1(c * h) * ((1 - 1 / (2 * 0.5)) * d0 + ds[1] / (2 * 0.5))
            elif k == 0:
                data = e1(c * r * h) * d0
            else:  # the exact integral of the line through D_s and the previous stage's D
                data = e1(c * r * h) * d0 + (r / rs[k - 1]) * psi(c * r * h) * (ds[k] - d0)
            dr = r - r_prev
            nu = nu * np.exp(-eta * dr * h) + np.sqrt(-np.expm1(-2 * eta * dr * h)) * noise(None, None)
            y = sr / sig[i] * np.exp(-eta * r * h) * x + alpha(sr) * data + sr * nu
            if r == 1.0:
                x = y
            else:
                ds.append(call(y, sr))
            r_prev = r
    return x


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name", ["seeds_2", "seeds_3"])
def test_seeds_is_comfyuis(name, flow):
    from conftest import FlowModel

    g = GaussianMixture.random(k=2, dim=4, seed=3)
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if flow:
        s, model = (
            torch.cat([torch.linspace(1.0, 0.03, 10, dtype=torch.float64), torch.zeros(1)]),
            FlowModel(g),
        )
    else:
        s, model = karras(10), g.denoiser()
        x = x * s[0]
    ref = _comfy_seeds_reference(model, x.clone(), s, flow, shared_noise(), int(name[-1]))
    assert rel(SAMPLERS[name](model, x.clone(), s, noise_sampler=shared_noise()), ref) < 1e-12


# --- sa_solver, sa_solver_pece ---------------------------------------------------------------------------
# ComfyUI's sample_sa_solver (SA-Solver, Xue et al. 2023; comfy/k_diffusion/sa_solver.py): τ = 1 for σ in
# [σ(80 %), σ(20 %)] of the model's range, else 0; predictor order p = min(3, #D), corrector order
# min(4, #D) (none on step 0, nor on the last step without PECE); on a schedule ending in 0 also
# p ≤ n − 1 − i and corrector ≤ n − i; b_j = α_t·∫_{λ_s}^{λ_t} (1 + τ²)e^{−(1+τ²)(λ_t − λ)}ℓ_j(λ) dλ;
# x_t = (σ_t/σ_s)e^{−τ²h}x_s + Σ b_j D_j + σ_t√(1 − e^{−2τ²h})·z (the corrector reuses the predictor's z
# and τ); PECE re-evaluates D at the corrected point. The step to σ = 0 returns that D.


def _comfy_sa_solver_reference(model, x, sigmas, noise, pece, tau_of):
    from scipy.integrate import quad

    sig = [float(v) for v in sigmas]
    lam = [-np.log(v) if v > 0 else np.inf for v in sig]
    n = len(sig) - 1
    lower = sig[-1] == 0

    def b(nodes, ls, lt, tau):
        c = 1 + tau**2

        def integrand(u, j):
            basis = np.prod([(u - lk) / (nodes[j] - lk) for k, lk in enumerate(nodes) if k != j])
            return c * np.exp(-c * (lt - u)) * basis

        return [quad(integrand, ls, lt, args=(j,), epsabs=1e-14, epsrel=1e-13)[0] for j in range(len(nodes))]

    call = lambda y, v: model(y, torch.full((y.shape[0],), v, dtype=torch.float64))
    preds, x_pred, tau, h, z = [], x, 0.0, 0.0, None
    for i in range(n):
        den = call(x_pred, sig[i])
        preds = (preds + [den])[-4:]
        p = min(3, len(preds))
        cor = 0 if i == 0 or (sig[i + 1] == 0 and not pece) else min(4, len(preds))
        if lower:
            p, cor = min(p, n - 1 - i), min(cor, n - i)
        if cor == 0:
            x = x_pred
        else:
            nodes = lam[i - cor + 1 : i + 1]
            coef = b(nodes, lam[i - 1], lam[i], tau)
            x = sig[i] / sig[i - 1] * np.exp(-(tau**2) * h) * x + sum(
                cj * dj for cj, dj in zip(coef, preds[-cor:], strict=True)
            )
            if tau > 0:
                x = x + z
            if pece:
                den = call(x, sig[i])
                preds[-1] = den
        if sig[i + 1] == 0:
            return den
        tau = tau_of(sig[i + 1])
        nodes = lam[i - p + 1 : i + 1]
        coef = b(nodes, lam[i], lam[i + 1], tau)
        h = lam[i + 1] - lam[i]
        x_pred = sig[i + 1] / sig[i] * np.exp(-(tau**2) * h) * x + sum(
            cj * dj for cj, dj in zip(coef, preds[-p:], strict=True)
        )
        if tau > 0:
            z = noise(None, None) * sig[i + 1] * np.sqrt(-np.expm1(-2 * tau**2 * h))
            x_pred = x_pred + z
    return x_pred


@pytest.mark.parametrize("steps", [5, 12])
@pytest.mark.parametrize("name", ["sa_solver", "sa_solver_pece"])
def test_sa_solver_is_comfyuis(name, steps):
    from latentforge.samplers.stochastic import sa_solver_tau_interval

    hi, lo = sa_solver_tau_interval(D)  # a plain VE denoiser: SD1's table, σ ∈ [0.571, 5.09]
    tau_of = lambda v: 1.0 if lo <= v <= hi else 0.0
    for s in (karras(steps), karras(steps + 2)[:-2]):  # ending in 0 (orders lowered at the end) or not
        x = start(s)
        ref = _comfy_sa_solver_reference(D, x.clone(), s, shared_noise(), name.endswith("pece"), tau_of)
        assert rel(SAMPLERS[name](D, x.clone(), s, noise_sampler=shared_noise()), ref) < 1e-11


# --- heunpp2, ipndm: already ComfyUI's ------------------------------------------------------------------
# heunpp2 (ComfyUI, from Carzit/sd-webui-samplers-scheduler): Euler when σ_{i+1} is the last σ; when
# σ_{i+2} is, Heun with weights 1 − w, w = σ_{i+1}/(2σ₀); else a three-point chain with
# w₂ = σ_{i+1}/(3σ₀), w₃ = σ_{i+2}/(3σ₀). ipndm (zju-pi): x = D on a step to 0, else AB1..AB4 with the
# uniform-grid coefficients, order min(4, i + 1). Both on the model's own σ; re-derived here.


def _comfy_heunpp2_reference(model, x, s):
    call = lambda y, v: model(y, torch.full((y.shape[0],), float(v), dtype=torch.float64))
    to_d = lambda y, v: (y - call(y, v)) / v
    n = len(s) - 1
    for i in range(n):
        d, dt = to_d(x, s[i]), s[i + 1] - s[i]
        if i == n - 1:
            x = x + d * dt
        elif i == n - 2:
            w = s[i + 1] / (2 * s[0])
            x2 = x + d * dt
            x = x + ((1 - w) * d + w * to_d(x2, s[i + 1])) * dt
        else:
            x2 = x + d * dt
            d2 = to_d(x2, s[i + 1])
            x3 = x2 + d2 * (s[i + 2] - s[i + 1])
            w2, w3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
            x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * to_d(x3, s[i + 2])) * dt
    return x


def _comfy_ipndm_reference(model, x, s):
    ab = {
        1: [1],
        2: [3 / 2, -1 / 2],
        3: [23 / 12, -16 / 12, 5 / 12],
        4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    }
    ds = []
    for i in range(len(s) - 1):
        den = model(x, torch.full((x.shape[0],), float(s[i]), dtype=torch.float64))
        ds.insert(0, (x - den) / s[i])
        if s[i + 1] == 0:
            return den
        k = min(4, i + 1)
        x = x + (s[i + 1] - s[i]) * sum(c * d for c, d in zip(ab[k], ds[:k], strict=True))
    return x


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name", ["heunpp2", "ipndm"])
def test_heunpp2_and_ipndm_are_comfyuis(name, flow):
    from conftest import FlowModel

    g = GaussianMixture.random(k=2, dim=4, seed=3)
    x = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if flow:
        s, model = (
            torch.cat([torch.linspace(1.0, 0.03, 9, dtype=torch.float64), torch.zeros(1)]),
            FlowModel(g),
        )
    else:
        s, model = karras(9), g.denoiser()
        x = x * s[0]
    ref = {"heunpp2": _comfy_heunpp2_reference, "ipndm": _comfy_ipndm_reference}[name]
    for sig in (s, s[:-2]):  # ending in 0, or stopping above it
        assert rel(SAMPLERS[name](model, x.clone(), sig), ref(model, x.clone(), sig)) < 1e-13


# --- the names in `latentforge info` and the sampler benchmark -------------------------------------------


def test_info_lists_the_exact_variants(capsys):
    import json

    from latentforge.cli import main

    assert main(["info"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samplers"] == SAMPLER_NAMES and out["exact_samplers"] == EXACT_VARIANT_OF


def test_bench_measures_the_order_of_both_forms():
    """bench.measured_order over 20..160 steps (measured: dpmpp_3m_sde 2.06 / _exact 2.72, ipndm_v 1.1 /
    _exact 3.7); the table prints it."""
    from latentforge.bench import format_table, measured_order

    orders = {n: measured_order(n)["value"] for n in ("dpmpp_3m_sde", "dpmpp_3m_sde_exact", "ipndm_v_exact")}
    assert abs(orders["dpmpp_3m_sde"] - 2) < 0.3 and orders["dpmpp_3m_sde_exact"] > 2.5
    assert orders["ipndm_v_exact"] > 3.3
    assert measured_order("lcm") is None and measured_order("dpm_adaptive_exact") is None
    run = {"nfe": 10, "rmse": 1e-3}
    report = {"sw_floor": 0.01, "seconds": 1.0, "samplers": {
        "dpmpp_3m_sde_exact": {"kind": "stochastic", "runs": [{"nfe": 10, "sliced_w1": 0.02}] * 4,
                               "order": {"value": 2.72}},
        "lcm": {"kind": "stochastic", "runs": [{"nfe": 10, "sliced_w1": 0.02}] * 4, "order": None},
        "euler": {"kind": "deterministic", "runs": [run] * 4, "order": {"value": 1.0}},
    }}  # fmt: skip
    table = format_table(report)
    assert "order" in table.splitlines()[0]
    assert table.splitlines()[2].rstrip().endswith("2.72") and table.splitlines()[3].rstrip().endswith("-")


# --- dpmpp_2m (flow), dpmpp_2m_cfg_pp, dpmpp_2s_ancestral(_cfg_pp) ----------------------------------------
# ComfyUI's sample_dpmpp_2m and _2m_cfg_pp have no flow branch: t = −log σ on the model's own σ.
# dpmpp_2m_cfg_pp: x = D + e^{−h}(x − U) + (1 − e^{−h})/(2r)·(D − U_{i−1}) (no last term on the first
# step and the step to 0). dpmpp_2s_ancestral(_cfg_pp) for flow (CONST) models: σ_down = σ_{i+1}(1 +
# (σ_{i+1}/σ_i − 1)η), midpoint σ(λ_i + h/2) in the flow's λ (0.9999 when σ_i = 1), the ratio steps
# (σ_m/σ_i)x + (1 − σ_m/σ_i)X, renoise (α_{i+1}/α_down)x + √(σ_{i+1}² − σ_down²α_{i+1}²/α_down²)·z;
# CFG++ takes X = the unconditional outputs and adds α_{i+1}(D − U) of the step's start at the end.


def _comfy_2m_reference(model, x, s, cfg_pp):
    old, call = None, lambda y, v: model.with_uncond(y, torch.full((y.shape[0],), v, dtype=torch.float64))
    for i in range(len(s) - 1):
        si, sn = float(s[i]), float(s[i + 1])
        d, u = call(x, si) if cfg_pp else (model(x, torch.full((x.shape[0],), si, dtype=torch.float64)),) * 2
        h = np.log(si / sn) if sn > 0 else np.inf
        r = np.log(float(s[i - 1]) / si) / h if i > 0 else None
        if cfg_pp:
            mix = -np.exp(-h) * u
            if old is not None and sn > 0:
                mix = mix - np.expm1(-h) * (1 / (2 * r)) * (d - old)
            x = d + mix + np.exp(-h) * x
        else:
            dd = d if old is None or sn == 0 else (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
            x = (sn / si) * x - np.expm1(-h) * dd
        old = u
    return x


def _comfy_2s_reference(model, x, s, flow, cfg_pp, eta, noise):
    lam = (lambda v: np.log((1 - v) / v)) if flow else (lambda v: -np.log(v))
    sig_of = (lambda lm: 1 / (1 + np.exp(lm))) if flow else (lambda lm: np.exp(-lm))
    vec = lambda v: torch.full((x.shape[0],), v, dtype=torch.float64)
    for i in range(len(s) - 1):
        si, sn = float(s[i]), float(s[i + 1])
        d, u = model.with_uncond(x, vec(si)) if cfg_pp else (model(x, vec(si)),) * 2
        if flow:
            sd = sn * (1 + (sn / si - 1) * eta)
            a_n, a_d = 1 - sn, 1 - sd
            renoise = np.sqrt(max(sn**2 - sd**2 * a_n**2 / a_d**2, 0.0))
        else:
            su = min(sn, eta * np.sqrt(sn**2 * (si**2 - sn**2) / si**2)) if eta else 0.0
            sd, a_n, a_d, renoise = np.sqrt(sn**2 - su**2), 1.0, 1.0, su
        if sd == 0:
            x = u
        else:
            sm = 0.9999 if flow and si == 1.0 else sig_of(lam(si) + 0.5 * (lam(sd) - lam(si)))
            y = (sm / si) * x + (1 - sm / si) * u
            y_out = model.with_uncond(y, vec(sm))[1] if cfg_pp else model(y, vec(sm))
            x = (sd / si) * x + (1 - sd / si) * y_out
        if sn > 0 and eta > 0:
            x = (a_n / a_d) * x + noise(None, None) * renoise
        if cfg_pp:
            x = x + a_n * (d - u)
    return x


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize(
    "name", ["dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp"]
)
def test_dpmpp_2m_and_2s_are_comfyuis(name, flow):
    model = Guided(3.0, flow)
    s = (
        torch.cat([torch.linspace(1.0, 0.03, 12, dtype=torch.float64), torch.zeros(1)])
        if flow
        else karras(12)
    )
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x if flow else x * s[0]
    cfg_pp = "cfg_pp" in name
    for eta in (0.0, 1.0) if "2s" in name else (None,):
        if eta is None:
            ref, out = _comfy_2m_reference(model, x.clone(), s, cfg_pp), SAMPLERS[name](model, x.clone(), s)
        else:
            ref = _comfy_2s_reference(model, x.clone(), s, flow, cfg_pp, eta, shared_noise())
            out = SAMPLERS[name](model, x.clone(), s, eta=eta, noise_sampler=shared_noise())
        assert rel(out, ref) < 1e-12, (name, eta)


def test_dpmpp_exact_variants_are_more_accurate():
    """dpmpp_2m_exact on a flow model (the flow's λ in the step ratios; measured 0.7-0.9× the error);
    dpmpp_2s_ancestral_cfg_pp_exact against the many-step CFG++ DDIM limit (0.28 against 0.36 at 10
    steps); ComfyUI's dpmpp_2m_cfg_pp is the closer one there (0.13 against 0.22 at 20 steps)."""
    from conftest import FlowModel

    g = GaussianMixture.single(4)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s_ve, s_min = 0.95 / 0.05, 0.02 / 0.98
    x_ve = 0.5 + noise * (0.09 + s_ve**2) ** 0.5
    ref = g.denoise_ve(g.ode_solution_ve(x_ve, s_ve, s_min), torch.tensor(s_min))
    for n in (10, 40):
        s = torch.cat([torch.linspace(0.95, 0.02, n, dtype=torch.float64), torch.zeros(1)])
        err = {k: rel(SAMPLERS[k](FlowModel(g), 0.05 * x_ve, s), ref) for k in ("dpmpp_2m", "dpmpp_2m_exact")}
        assert err["dpmpp_2m_exact"] < 0.95 * err["dpmpp_2m"], (n, err)
    model = Guided(3.0)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fine = karras(2000)
    limit = SAMPLERS["euler_cfg_pp"](model, x * fine[0], fine)
    s = karras(10)
    names = ("dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp_exact")
    e = {k: rel(SAMPLERS[k](model, x * s[0], s, eta=0.0), limit) for k in names}
    assert e["dpmpp_2s_ancestral_cfg_pp_exact"] < 0.9 * e["dpmpp_2s_ancestral_cfg_pp"], e
    s = karras(20)
    assert rel(SAMPLERS["dpmpp_2m_cfg_pp"](model, x * s[0], s), limit) < 0.2


@pytest.mark.parametrize(
    "name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "er_sde", "seeds_2", "sa_solver"]
)
def test_flow_start_at_one_is_offset_like_comfyui(name):
    """ComfyUI's offset_first_sigma_for_snr: a flow schedule's σ = 1 becomes the model's σ at sampling
    fraction 10⁻⁴, time_snr_shift(shift, 1 − 10⁻⁴): 0.99997 for SD3's shift 3 (0.9999 for shift 1)."""
    from latentforge.model_sampling import DiscreteFlow

    g = GaussianMixture.single(4)
    seen = []

    class Shift3:
        model_sampling = DiscreteFlow(shift=3.0)

        def __call__(self, x, sigma, **kw):
            seen.append(float(sigma[0]))
            return g.denoiser(flow=True)(x, sigma)

    s = torch.tensor([1.0, 0.6, 0.3, 0.0], dtype=torch.float64)
    SAMPLERS[name](Shift3(), torch.randn(4, 4, dtype=torch.float64), s, seed=0)
    assert seen[0] == pytest.approx(3 * 0.9999 / (1 + 2 * 0.9999), rel=1e-12)


# --- euler_ancestral_cfg_pp, ddpm ---------------------------------------------------------------------------
# ComfyUI's sample_euler_ancestral_cfg_pp (all models): α = σ·e^{λ} (1, or 1 − σ for flow), d = (x −
# α_s·U)/σ, the DDIM split of σ_s/α_s → σ_t/α_t, σ_down ← α_t·σ_down, x = α_t·D + σ_down·d + α_t·σ_up·z;
# x = D on the step to 0. Its sample_ddpm: DDPMSampler_step on x/√(1 + σ²) with ᾱ = 1/(1 + σ²), ε = (x − D)/σ,
# μ = (x_VP − (1 − a)ε/√(1 − ᾱ))/√a (a = ᾱ/ᾱ_next) plus √((1 − a)(1 − ᾱ_next)/(1 − ᾱ))·z, rescaled by
# √(1 + σ_next²) — on every model's own σ.


def _comfy_euler_ancestral_cfg_pp_reference(model, x, s, flow, noise, eta=1.0):
    for i in range(len(s) - 1):
        si, sn = float(s[i]), float(s[i + 1])
        d_out, u = model.with_uncond(x, torch.full((x.shape[0],), si, dtype=torch.float64))
        if sn == 0:
            x = d_out
            continue
        a_s, a_t = (1 - si, 1 - sn) if flow else (1.0, 1.0)
        d = (x - a_s * u) / si
        vs, vt = si / a_s, sn / a_t
        su = min(vt, eta * np.sqrt(vt**2 * (vs**2 - vt**2) / vs**2))
        sd = a_t * np.sqrt(vt**2 - su**2)
        x = a_t * d_out + sd * d + a_t * noise(None, None) * su
    return x


def _comfy_ddpm_reference(model, x, s, noise):
    for i in range(len(s) - 1):
        si, sn = float(s[i]), float(s[i + 1])
        den = model(x, torch.full((x.shape[0],), si, dtype=torch.float64))
        eps = (x - den) / si
        ac, ac_next = 1 / (si**2 + 1), 1 / (sn**2 + 1)
        a = ac / ac_next
        mu = np.sqrt(1 / a) * (x / np.sqrt(1 + si**2) - (1 - a) * eps / np.sqrt(1 - ac))
        if sn > 0:
            mu = mu + np.sqrt((1 - a) * (1 - ac_next) / (1 - ac)) * noise(None, None)
        x = mu * np.sqrt(1 + sn**2) if sn != 0 else mu
    return x


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name", ["euler_ancestral_cfg_pp", "ddpm"])
def test_euler_ancestral_cfg_pp_and_ddpm_are_comfyuis(name, flow):
    model = Guided(3.0, flow)
    s = (
        torch.cat([torch.linspace(0.98, 0.03, 12, dtype=torch.float64), torch.zeros(1)])
        if flow
        else karras(12)
    )
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x * (1 - s[0]) if flow else x * s[0]
    if name == "ddpm":
        ref = _comfy_ddpm_reference(model, x.clone(), s, shared_noise())
    else:
        ref = _comfy_euler_ancestral_cfg_pp_reference(model, x.clone(), s, flow, shared_noise())
    assert rel(SAMPLERS[name](model, x.clone(), s, noise_sampler=shared_noise()), ref) < 1e-11
    if name == "ddpm":  # ddpm_exact: the same on VE models, the flow's α on flow models
        exact = SAMPLERS["ddpm_exact"](model, x.clone(), s, noise_sampler=shared_noise())
        assert (rel(exact, ref) > 1e-3) == flow


# --- uni_pc, uni_pc_bh2 ---------------------------------------------------------------------------------
# Facts read in ComfyUI's comfy/extra_samplers/uni_pc.py (`sample_unipc`, `SigmaConvert`, `UniPC.sample`,
# `multistep_uni_pc_bh_update`): the model's own σ, whatever the model, is read as a VE σ and converted to
# VP (α = 1/√(1 + σ²), σ_vp = σ·α, λ = −log σ); x enters as x_ve/√(1 + σ₀²); the model is wrapped as an
# ε-predictor ε = (x_ve − D)/σ and read back as data x₀ = (x_vp − σ_vp·ε)/α; a final σ = 0 becomes 0.001;
# order = min(3, len(σ) − 2); target j = 1..n takes order j while j < order, then min(order, n + 1 − j);
# every step but the last runs the corrector (whose model output is the next step's history); order-2
# predictor and order-1 corrector weights are ½; the output is x_vp/α at the last σ. Written here from the
# UniPC paper (Zhao et al. 2023, Alg. 1-3) with those facts, in VP coordinates, independently of ours.


def _comfy_unipc_reference(model, x, s, variant):
    s = s.clone()
    if float(s[-1]) == 0:
        s[-1] = 0.001
    n, order = len(s) - 1, min(3, len(s) - 2)
    a = lambda v: 1 / np.sqrt(1 + v * v)  # noqa: E731
    lam = lambda v: -np.log(v)  # noqa: E731

    def data(xvp, v):
        xve = xvp / a(v)
        eps = (xve - model(xve, torch.full((x.shape[0],), v, dtype=torch.float64))) / v
        return (xvp - v * a(v) * eps) / a(v)

    sv = [float(v) for v in s]
    xvp = x / np.sqrt(1 + sv[0] ** 2)
    hist = [(lam(sv[0]), data(xvp, sv[0]))]
    for j in range(1, n + 1):
        p = j if j < order else min(order, n + 1 - j)
        vs, vt = sv[j - 1], sv[j]
        (ls, m0), lt = hist[-1], lam(vt)
        h = lt - ls
        hh = -h
        prev = hist[-p:-1][::-1]
        rks = [(lk - ls) / h for lk, _ in prev]
        d1s = [(mk - m0) / r for r, (_, mk) in zip(rks, prev, strict=True)]
        B = hh if variant == "bh1" else np.expm1(hh)
        b, hphi, fact = [], np.expm1(hh) / hh - 1, 1
        for i in range(1, p + 1):
            b.append(hphi * fact / B)
            fact *= i + 1
            hphi = hphi / hh - 1 / fact
        R = np.array([[r ** (i - 1) for r in [*rks, 1.0]] for i in range(1, p + 1)])
        a_t = a(vt)
        base = (vt * a(vt)) / (vs * a(vs)) * xvp - a_t * np.expm1(hh) * m0
        x_t = base
        if p > 1:
            rho = [0.5] if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            x_t = base - a_t * B * sum(float(c) * d for c, d in zip(rho, d1s, strict=True))
        if j < n:
            m_t = data(x_t, vt)
            rho = [0.5] if p == 1 else np.linalg.solve(R, b)
            corr = sum(float(c) * d for c, d in zip(rho[:-1], d1s, strict=True)) + float(rho[-1]) * (m_t - m0)
            x_t = base - a_t * B * corr
            hist = [*hist, (lt, m_t)][-order:]
        xvp = x_t
    return xvp / a(sv[-1])


@pytest.mark.parametrize("steps", [3, 4, 10])
@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2"])
def test_uni_pc_is_comfyuis(name, flow, steps):
    """Against the re-derivation above (float64; the two differ in arithmetic order only: measured
    ≤ 1e-14 relative), on a VP/VE mixture and on a flow model (whose σ ComfyUI reads as VE σ); and the
    `_exact` form, which ends with the final denoise in the model's own coordinates, is not it."""
    from conftest import FlowModel

    g = GaussianMixture.random(k=2, dim=3, seed=1)
    if flow:
        s = torch.cat(
            [torch.linspace(1.0, 0.05, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
        )
        model = FlowModel(g)
    else:
        s, model = karras(steps), g.denoiser()
    x = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s[0]
    variant = "bh1" if name == "uni_pc" else "bh2"
    ref = _comfy_unipc_reference(model, x.clone(), s, variant)
    assert rel(SAMPLERS[name](model, x.clone(), s), ref) < 1e-12
    assert rel(SAMPLERS[f"{name}_exact"](model, x.clone(), s), ref) > 1e-6
