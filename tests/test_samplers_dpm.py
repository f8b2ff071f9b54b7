"""DPM-Solver / DPM-Solver++ samplers against the exact Gaussian(-mixture) oracle.

Convergence: error vs the exact PF-ODE solution to σ_min followed by the exact final denoise, slope of
log(err) against log(n). Equivalences: first-order DPM-Solver(++) = DDIM = Euler in σ; SDE forms with
eta = 0 are their ODE solvers; flow runs equal the VE runs mapped by x_flow = α·x_VE. Stochastic forms
(eta = 1) reproduce a 2-D mixture's mean and covariance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FlowModel

from latentforge.gmm import GaussianMixture
from latentforge.model_sampling import DiscreteFlow
from latentforge.samplers import SAMPLERS, dpm_solver, dpmpp
from latentforge.samplers.dpm_solver import sample_dpm_adaptive_exact
from latentforge.schedules import get_sigmas_karras

pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")  # torchsde endpoint rounding

SMIN, SMAX = 0.0291675, 14.614642
G1 = GaussianMixture.single(4)
D1 = G1.denoiser()

STOCHASTIC = [
    "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu",
]  # fmt: skip
ODE_ONLY = ("dpm_fast", "dpm_fast_exact", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_exact")
# every sampler as a deterministic ODE solver (stochastic ones with eta = 0)
DETERMINISTIC = {n: {} for n in ODE_ONLY} | {
    n: {"eta": 0.0}
    for n in STOCHASTIC
    + ["dpmpp_3m_sde_exact", "dpmpp_2s_ancestral_exact", "dpmpp_2s_ancestral_cfg_pp_exact"]
}
# the ComfyUI names that run k-diffusion's VE-form DPM-Solver on the model's own σ and stop at σ_min
COMFY_STOP_AT_SIGMA_MIN = ("dpm_fast", "dpm_adaptive")
# the ComfyUI names in the VE form on every model's own σ (not invariant under the flow map)
VE_FORM = COMFY_STOP_AT_SIGMA_MIN + ("dpmpp_2m", "dpmpp_2m_cfg_pp")
ALL_DPM = sorted(dpm_solver.SAMPLERS | dpm_solver.EXACT_SAMPLERS | dpmpp.SAMPLERS | dpmpp.EXACT_SAMPLERS)


def seeded(name: str, seed: int = 0) -> dict:
    """`seed` for the samplers that draw noise (the deterministic ones take no noise options)."""
    return {} if name in ODE_ONLY else {"seed": seed}


def karras(n: int) -> torch.Tensor:
    return get_sigmas_karras(n, SMIN, SMAX).double()


def start(s: torch.Tensor, batch: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * s[0]


def exact(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Exact ODE from σ₀ to the last positive σ, then the exact final denoise."""
    return G1.denoise_ve(G1.ode_solution_ve(x, float(s[0]), float(s[-2])), s[-2])


def max_err(name: str, n: int, **kw) -> float:
    s = karras(n)
    x = start(s)
    return float((SAMPLERS[name](D1, x, s, **kw) - exact(x, s)).abs().max())


def max_err_at_sigma_min(name: str, n: int, **kw) -> float:
    """Error against the exact ODE solution at the last positive σ (no final denoise)."""
    s = karras(n)
    x = start(s)
    return float(
        (SAMPLERS[name](D1, x, s, **kw) - G1.ode_solution_ve(x, float(s[0]), float(s[-2]))).abs().max()
    )


def slope(ns, errs) -> float:
    return float(-np.polyfit(np.log(ns), np.log(errs), 1)[0])


def ve_to_flow(s: torch.Tensor) -> torch.Tensor:
    """σ_flow = σ/(1 + σ): the same λ = −log σ_VE, so x_flow = x_VE/(1 + σ_VE) on the same trajectory."""
    return s / (1 + s)


# --- convergence -------------------------------------------------------------------------------

NS = (10, 20, 40, 80)
ORDER_CASES = [
    # name, options, schedule sizes, nominal order, "exact" (|slope − p| <= 0.3) or "min" (slope >= p − 0.3)
    ("dpmpp_2m", {}, NS, 2, "min"),  # multistep: measured 1.89
    ("dpmpp_2m_sde", {"eta": 0.0}, NS, 2, "min"),  # = dpmpp_2m
    ("dpmpp_2m_sde_heun", {"eta": 0.0}, NS, 2, "exact"),  # measured 2.04
    # the exact integral of the quadratic interpolant: measured 2.9 (3.5 incl. n=10: start-up)
    ("dpmpp_3m_sde_exact", {"eta": 0.0}, (40, 60, 80, 120), 3, "exact"),
    # ComfyUI's / k-diffusion's (half-weight second difference): measured 1.94
    ("dpmpp_3m_sde", {"eta": 0.0}, (40, 60, 80, 120), 2, "exact"),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, NS, 2, "exact"),  # measured 2.02
    ("dpmpp_sde", {"eta": 0.0}, NS, 2, "exact"),  # = DPM-Solver++(2S), 2.02
    # dpm_fast_exact over NFE: budget N−1 ≡ 2 (mod 3) ends [3,…,3,2] (order 3, measured 3.3);
    # N−1 ≡ 0 ends [3,…,3,2,1] whose last first-order step makes it order 2 (measured 1.9)
    ("dpm_fast_exact", {}, (24, 48, 96, 192), 3, "min"),
    ("dpm_fast_exact", {}, (49, 73, 97, 145), 2, "min"),
    # ComfyUI's dpm_fast: all N calls on the ODE to σ_min, measured there (it does not denoise):
    # N ≡ 2 (mod 3) ends [3,…,3,2] (measured 3.3); N ≡ 0 ends [3,…,3,2,1] (measured 1.9)
    ("dpm_fast", {}, (23, 47, 95, 191), 3, "min"),
    ("dpm_fast", {}, (48, 72, 96, 144), 2, "min"),
]


@pytest.mark.parametrize(("name", "kw", "ns", "order", "mode"), ORDER_CASES)
def test_convergence_order(name, kw, ns, order, mode):
    err = max_err_at_sigma_min if name in COMFY_STOP_AT_SIGMA_MIN else max_err
    errs = [err(name, n, **kw) for n in ns]
    p = slope(ns, errs)
    if mode == "exact":
        assert abs(p - order) <= 0.3, (errs, p)
    else:
        assert p >= order - 0.3, (errs, p)
    assert errs[-1] < 2e-3


def test_dpmpp_2m_error_matches_reference_report():
    # samplers.md §7 (k-diffusion sample_dpmpp_2m on the same oracle): 4.6e-2, 1.6e-2, 3.9e-3, 9.3e-4
    errs = [max_err("dpmpp_2m", n) for n in NS]
    np.testing.assert_allclose(errs, [4.6e-2, 1.6e-2, 3.9e-3, 9.3e-4], rtol=0.05)


def test_dpm_adaptive_default_tolerances():
    s = karras(20)
    x = start(s)
    calls = []

    def D(x, sigma, **kw):
        calls.append(1)
        return D1(x, sigma)

    out, info = sample_dpm_adaptive_exact(D, x, s, return_info=True)
    e = out - exact(x, s)
    # rtol = 0.05 of |x| ≈ 0.5 allows ~2.5e-2 per step: measured max 1.5e-2, RMS 4e-3 with 29 NFE
    assert float(e.abs().max()) < 2e-2 and float(e.pow(2).mean().sqrt()) < 1e-2
    assert info["nfe"] == len(calls) < 60  # NFE reported = model calls (incl. the final denoise)
    assert info["n_accept"] == len(info["steps"]) - 1 and info["steps"][-1] == pytest.approx(float(s[-2]))


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_tolerance_controls_error(order):
    s = karras(20)
    x = start(s)
    ref = exact(x, s)
    loose = float((SAMPLERS["dpm_adaptive_exact"](D1, x, s, order=order) - ref).abs().max())
    out, info = sample_dpm_adaptive_exact(D1, x, s, order=order, rtol=1e-3, atol=1e-4, return_info=True)
    tight = float((out - ref).abs().max())
    assert tight < 1e-3 and tight < loose / 10, (loose, tight, info["nfe"])  # measured 4.6e-4 / 8.2e-4
    # ComfyUI's dpm_adaptive stops at σ_min (no final denoise) and controls the RMS error over the whole
    # batch, not the worst image's: looser per image (measured 1.0e-3 / 5.7e-3 for order 2 / 3 at σ_min)
    at_min = G1.ode_solution_ve(x, float(s[0]), float(s[-2]))
    comfy = SAMPLERS["dpm_adaptive"](D1, x, s, order=order, rtol=1e-3, atol=1e-4)
    assert float((comfy - at_min).abs().max()) < 1e-2


def test_dpm_adaptive_rejects_bad_order():
    s = karras(5)
    with pytest.raises(ValueError, match="order"):
        SAMPLERS["dpm_adaptive"](D1, start(s, 2), s, order=1)


# --- equivalences ------------------------------------------------------------------------------


SINGLE_STEP_2ND = (
    "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2s_ancestral_exact", "dpmpp_2s_ancestral_cfg_pp_exact",
)  # fmt: skip


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name", sorted(set(DETERMINISTIC) - set(SINGLE_STEP_2ND)))
def test_first_order_step_equals_euler(name, flow):
    """DPM-Solver(++) of order 1 is DDIM, i.e. Euler in σ (Lu et al. 2022a §4.1, 2022b §3.1): a single
    step to σ₁ > 0 (1st-order start of every multistep method; DPM-Solver-fast with one NFE)."""
    s = karras(10)[:2]
    model = D1
    if flow:
        s, model = ve_to_flow(s), FlowModel(G1)
    x = start(s, 64)
    out = SAMPLERS[name](model, x, s, **DETERMINISTIC[name])
    ref = SAMPLERS["euler"](model, x, s)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_sde_forms_with_eta0_are_their_ode_solvers():
    s = karras(15)
    x = start(s, 64)
    two_m = SAMPLERS["dpmpp_2m"](D1, x, s)
    torch.testing.assert_close(SAMPLERS["dpmpp_2m_sde"](D1, x, s, eta=0.0), two_m, rtol=0, atol=1e-12)
    two_s = SAMPLERS["dpmpp_2s_ancestral"](D1, x, s, eta=0.0)
    torch.testing.assert_close(SAMPLERS["dpmpp_sde"](D1, x, s, eta=0.0), two_s, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(set(DETERMINISTIC) - set(VE_FORM)))
def test_flow_run_equals_ve_run(name):
    """λ_flow(σ/(1+σ)) = λ_VE(σ), and x_flow = α·x_VE: a flow run on the mapped schedule must give the
    VE result (both end in x₀). Tests that α, λ and σ(λ) are used in the model's own coordinates."""
    s = karras(12)
    x = start(s, 64)
    ve = SAMPLERS[name](D1, x, s, **DETERMINISTIC[name])
    sf = ve_to_flow(s)
    flow = SAMPLERS[name](FlowModel(G1), x * (1 - sf[0]), sf, **DETERMINISTIC[name])
    torch.testing.assert_close(flow, ve, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "dpmpp_3m_sde_exact"])
def test_flow_sde_noise_matches_ve_with_shared_noise(name):
    """eta = 1 with the same unit noise per step: the flow run equals the VE run (noise σ_t·z scales
    with α like the state), so the SDE noise injection is right in flow coordinates."""
    s = karras(12)
    x = start(s, 64)

    def shared():
        g = torch.Generator().manual_seed(5)
        return lambda a, b: torch.randn(64, 4, generator=g, dtype=torch.float64)

    ve = SAMPLERS[name](D1, x, s, noise_sampler=shared())
    sf = ve_to_flow(s)
    flow = SAMPLERS[name](FlowModel(G1), x * (1 - sf[0]), sf, noise_sampler=shared())
    torch.testing.assert_close(flow, ve, rtol=0, atol=1e-10)


def test_dpmpp_2m_flow_convergence():
    ns = NS
    errs = []
    for n in ns:
        s = karras(n)
        x = start(s)
        sf = ve_to_flow(s)
        out = SAMPLERS["dpmpp_2m"](FlowModel(G1), x * (1 - sf[0]), sf)
        errs.append(float((out - exact(x, s)).abs().max()))
    assert slope(ns, errs) >= 1.7, errs


@pytest.mark.parametrize(
    "name", sorted(set(DETERMINISTIC) - set(COMFY_STOP_AT_SIGMA_MIN)) + ["dpm_adaptive_exact"]
)
def test_flow_from_pure_noise(name):
    """Flow schedules start at σ = 1 (λ = −∞): the samplers start at σ = 0.9999
    (common.first_sigma_for_log_snr).
    Exact answer: x_VE(σ) = μ + ε·√(s² + σ²) is the σ_T → ∞ limit of the single-Gaussian ODE solution."""
    n = 100  # linear flow schedule: the first step spans λ ∈ [−9.2, −4.6] (σ 0.9999 → 0.99)
    sf = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    eps = start(torch.ones(1), 256)
    kw = DETERMINISTIC.get(name, {"rtol": 1e-3, "atol": 1e-4})  # adaptive: tolerances ~ |x| ≈ 1 here
    out = SAMPLERS[name](FlowModel(G1), eps, sf, **kw)
    s_ve = float(sf[-2] / (1 - sf[-2]))
    mu, sd = G1.means[0], G1.stds[0]
    ref = G1.denoise_ve(mu + eps * math.sqrt(sd[0] ** 2 + s_ve**2), torch.tensor(s_ve))
    assert float((out - ref).abs().max()) < 5e-3  # measured ≤ 3.5e-3 (heun), 1e-4 (dpm_fast)


# --- CFG++ -------------------------------------------------------------------------------------


class Guided:
    """A CFG wrapper: D = D_u + w·(D_c − D_u), exposing the unconditional prediction."""

    def __init__(self, w: float, flow: bool = False):
        gc, gu = GaussianMixture.single(4, mean=0.8), GaussianMixture.single(4, mean=0.2, std=0.4)
        self.c, self.u, self.w = gc.denoiser(flow), gu.denoiser(flow), w
        if flow:
            self.model_sampling = DiscreteFlow(shift=1.0)

    def with_uncond(self, x, sigma, **kw):
        u = self.u(x, sigma)
        return u + self.w * (self.c(x, sigma) - u), u

    def __call__(self, x, sigma, **kw):
        return self.with_uncond(x, sigma)[0]


@pytest.mark.parametrize(
    "name", ["dpmpp_2m_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp_exact"]
)
def test_cfg_pp_equals_base_without_guidance(name):
    base = name.replace("_cfg_pp", "")
    s = karras(8)
    x = start(s, 32)
    kw = {"seed": 3} if "ancestral" in name else {}
    for model in (D1, Guided(0.0)):  # plain denoiser; guidance wrapper with D = D_uncond
        torch.testing.assert_close(SAMPLERS[name](model, x, s, **kw), SAMPLERS[base](model, x, s, **kw))
    guided = Guided(3.0)
    assert not torch.allclose(SAMPLERS[name](guided, x, s, **kw), SAMPLERS[base](guided, x, s, **kw))


@pytest.mark.parametrize("flow", [False])  # ComfyUI's dpmpp_2m_cfg_pp takes the VE form on a flow model's σ
def test_dpmpp_2m_cfg_pp_first_step_equals_euler_cfg_pp(flow):
    s = karras(10)[:2]
    if flow:
        s = ve_to_flow(s)
    model = Guided(4.0, flow)
    x = start(s, 32)
    ref = SAMPLERS["euler_cfg_pp"](model, x, s)
    torch.testing.assert_close(SAMPLERS["dpmpp_2m_cfg_pp"](model, x, s), ref, rtol=0, atol=1e-12)


# --- stochastic samplers: distribution ----------------------------------------------------------

GMM = GaussianMixture.random(k=2, dim=2, seed=0)
N_SAMPLES = 4000


def moment_z_scores(out: torch.Tensor):
    """|sample − true| / standard error for the mean and the 3 covariance entries. Standard errors from
    the samples: SE(mean) = std/√N; SE(cov_ij) = std of the centred products (x_i − m_i)(x_j − m_j) / √N."""
    n = out.shape[0]
    m = out.mean(0)
    dev = out - m
    prods = torch.stack([dev[:, 0] ** 2, dev[:, 0] * dev[:, 1], dev[:, 1] ** 2], 1)
    cov, true = torch.cov(out.T), GMM.cov()
    cerr = torch.stack([cov[0, 0] - true[0, 0], cov[0, 1] - true[0, 1], cov[1, 1] - true[1, 1]])
    return ((m - GMM.mean()) / (out.std(0) / n**0.5)).abs(), (cerr / (prods.std(0) / n**0.5)).abs()


MOMENT_CASES = [
    (name, flow)
    for name in [
        "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde",
        "dpmpp_3m_sde_exact",
    ]
    for flow in (False, True)
] + [("dpm_adaptive_exact", False)]  # fmt: skip


@pytest.mark.parametrize(("name", "flow"), MOMENT_CASES)
def test_eta1_reproduces_mixture_moments(name, flow):
    """eta = 1 (default), 50 Karras steps, 4000 samples drawn from the exact marginal at σ₀ (so the only
    errors are sampling noise and discretisation). Batch layout [1, 4000, 2]: one Brownian tree over all
    samples (the denoiser sees [4000, 2]). Bound: 4 standard errors (≈6e-5 two-sided chance per entry for
    a Gaussian statistic; measured z ≤ 2.2); the discretisation bias at 50 steps is far below 1 SE."""
    gen = torch.Generator().manual_seed(1)
    s = karras(50)
    x0, z = GMM.sample(N_SAMPLES, gen), torch.randn(N_SAMPLES, 2, generator=gen, dtype=torch.float64)
    if flow:
        s = ve_to_flow(s)
        model = FlowModel(GMM, reshape_dim=2)
        x = (1 - s[0]) * x0 + s[0] * z
    else:
        D = GMM.denoiser()
        model = lambda x, sigma, **kw: D(x.reshape(-1, 2), sigma).reshape(x.shape)
        x = x0 + s[0] * z
    kw = {"eta": 1.0, "rtol": 0.01} if name == "dpm_adaptive_exact" else {}  # adaptive: ODE by default
    out = SAMPLERS[name](model, x[None], s, seed=7, **kw)[0]
    zm, zc = moment_z_scores(out)
    assert float(zm.max()) < 4 and float(zc.max()) < 4, (zm, zc)


# --- noise, seeds, devices ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"])
def test_gpu_variants_match_on_cpu_and_are_seeded(name):
    """On CPU tensors the `_gpu` tree lives on the CPU too, so both names give the same samples."""
    s = karras(8)
    x = start(s, 3)
    a = SAMPLERS[name](D1, x, s, seed=11)
    torch.testing.assert_close(SAMPLERS[name](D1, x, s, seed=11), a, rtol=0, atol=0)
    torch.testing.assert_close(SAMPLERS[name + "_gpu"](D1, x, s, seed=11), a, rtol=0, atol=0)
    assert not torch.allclose(SAMPLERS[name](D1, x, s, seed=12), a)


@pytest.mark.parametrize("name", STOCHASTIC + ["dpm_adaptive"])
def test_stochastic_samplers_are_deterministic_for_a_seed(name):
    s = karras(6)
    x = start(s, 3)
    kw = {"eta": 1.0} if name == "dpm_adaptive" else {}
    a = SAMPLERS[name](D1, x, s, seed=5, **kw)
    torch.testing.assert_close(SAMPLERS[name](D1, x, s, seed=5, **kw), a, rtol=0, atol=0)
    assert not torch.allclose(SAMPLERS[name](D1, x, s, seed=6, **kw), a)
    if name != "dpm_adaptive":  # image k's noise does not depend on the batch (adaptive steps are shared)
        torch.testing.assert_close(SAMPLERS[name](D1, x[:1], s, seed=5), a[:1], rtol=0, atol=1e-12)


# --- contract ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_DPM)
def test_one_step_to_zero_is_a_denoise(name):
    s = torch.tensor([SMAX, 0.0], dtype=torch.float64)
    x = start(s, 5)
    # ComfyUI's dpm_fast / dpm_adaptive stop at the last positive σ, here σ₀: x comes back unchanged
    want = x if name in COMFY_STOP_AT_SIGMA_MIN else D1(x, s[0])
    torch.testing.assert_close(SAMPLERS[name](D1, x, s, **seeded(name)), want, rtol=0, atol=1e-12)
    # one step to σ₁ > 0 and a schedule ending above 0 also work
    for sig in (torch.tensor([SMAX, 1.0], dtype=torch.float64), karras(4)[:-1]):
        out = SAMPLERS[name](D1, x, sig, **seeded(name))
        assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ALL_DPM)
def test_dtypes_and_image_batches(name, dtype):
    g = GaussianMixture.single(8)
    s = get_sigmas_karras(12, SMIN, SMAX)  # float32 schedule
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(s[0])
    ref = SAMPLERS[name](g.denoiser(), x, s.double(), **seeded(name, 1))
    out = SAMPLERS[name](g.denoiser(), x.to(dtype), s, **seeded(name, 1))
    assert out.dtype == dtype and out.shape == x.shape
    # measured: float32 ≤ 2.6e-4 (adaptive; others ≤ 6e-7), bfloat16 ≤ 3.7e-2 (data ≈ 0.5 ± 0.3)
    tol = 1e-3 if dtype == torch.float32 else 0.1
    assert float((out.double() - ref).abs().max()) < tol


def test_model_calls_and_callbacks():
    s = karras(9)  # 9 steps ending in 0
    x = start(s, 2)
    expected_calls = {
        "dpm_fast_exact": 9,  # NFE = len(sigmas) − 1: 8 for the ODE ([3, 3, 2]) + the final denoise
        "dpm_fast": 9,  # all 9 for the ODE to σ_min ([3, 3, 2, 1]), no final denoise
        "dpmpp_2m": 9,
        "dpmpp_2m_sde": 9,
        "dpmpp_3m_sde": 9,
        "dpmpp_3m_sde_exact": 9,
        "dpmpp_2s_ancestral": 17,  # 2 per step, 1 on the step to 0
        "dpmpp_sde": 17,
    }
    calls, reports = [], []

    def D(x, sigma, **kw):
        calls.append(float(sigma[0]))
        return D1(x, sigma)

    for name, n_calls in expected_calls.items():
        calls.clear()
        reports.clear()
        SAMPLERS[name](D, x, s, callback=reports.append, **seeded(name))
        assert len(calls) == n_calls, name
        steps = 4 if name.startswith("dpm_fast") else 9  # 3 solver steps + final denoise; 4 solver steps
        assert [r["i"] for r in reports] == list(range(steps)), name
        assert calls[0] == float(s[0])
        assert (calls[-1] == float(s[-2])) == (name != "dpm_fast"), name  # dpm_fast: last call before σ_min
    # dpm_fast(_exact) without a final 0: all N calls go to the ODE
    for name in ("dpm_fast", "dpm_fast_exact"):
        calls.clear()
        SAMPLERS[name](D, x, s[:-1])
        assert len(calls) == 8
