"""Parity with diffusers: same σ list, same exact model, same noise -> same final sample.

For each scheduler diffusers also has, `diffusers_ref` runs the diffusers scheduler (SD1 betas) with
an ε-network derived from the exact Gaussian-mixture denoiser, returns the σ it visited, its final
sample in VE units and the noise it drew; we run our sampler on exactly those σ (float64) with the
same starting point and the same noise tensors (replayed through `noise_sampler`) and compare.

Data: a 3-component 4-D Gaussian mixture (`GaussianMixture.random(k=3, dim=4, seed=0)`), so D is
nonlinear in x; 256 samples, float64.

Tolerances (max |ours − diffusers| in VE units, where |x| ≤ ~50 at σ_max = 14.6):
- TOL_EXACT = 1e-9 for samplers that are algebraically the same update. diffusers' tables are upcast
  to float64 (same values) and its "cast the sample to float32" lines are neutralised for the run
  (`diffusers_ref.float64_steps`), so the two differ only by float64 round-off (measured ~1e-14) in
  algebraically different but equivalent forms (e.g. σ-form vs VP-form DDIM). Trajectories near the
  boundary between mixture components amplify round-off, so we leave 4-5 orders of margin; any real
  algorithmic difference (a wrong coefficient, a missing correction, an off-by-one step) shows up
  at ≥1e-4.
- DDPM 1e-8: diffusers adds 1e-10·z on its last step (variance clamped at 1e-20), see `test_ddpm`.
- Stock diffusers (its own float32 cast of the state each step): 2e-5, see `test_euler_stock_float32`.
- Known diffusers deviations are configured away, not tolerated: DDIM `clip_sample=False` (the
  default True clamps x̂₀), DDIM `leading` spacing (with `linspace` its t_prev = t − 1000//n is not
  the next timestep), UniPC bh1 `final_sigmas_type="sigma_min"` (with "zero", B(h) = h = −∞ times 0
  gives NaN in diffusers 0.42), `lower_order_final` handled per sampler below.

Measured (diffusers 0.42.1): ≤ 6e-13 everywhere, 3.3e-10 for DDPM with `leading` spacing.
Deliberate changes tested at the same settings differ by 0.19 (DPM++ 2M midpoint vs heun) to 3
(Euler a η = 0.99 vs 1).
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers_ref as ref  # noqa: E402  (tests/ is on sys.path under pytest's default import mode)

from latentforge.gmm import GaussianMixture  # noqa: E402
from latentforge.model_sampling import DiscreteFlow, DiscreteVP  # noqa: E402
from latentforge.samplers import SAMPLERS  # noqa: E402

TOL_EXACT = 1e-9
SIGMA_MAX = 14.614642

GM = GaussianMixture.random(k=3, dim=4, seed=0)
D = GM.denoiser()


def sampler(name: str):
    if name not in SAMPLERS:
        pytest.skip(f"sampler {name!r} is not in SAMPLERS yet")
    return SAMPLERS[name]


def start(sigma0: float, n: int = 256, seed: int = 0) -> torch.Tensor:
    """x = z·σ₀ in VE units, as our samplers expect."""
    z = torch.randn(n, GM.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return z * sigma0


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a.double() - b.double()).abs().max())


def takes(fn, kw: str) -> bool:
    return kw in inspect.signature(inspect.unwrap(fn)).parameters


# --- the ε-network convention ---------------------------------------------------------------------


def test_network_sigma_is_the_timesteps_sigma():
    """Where diffusers keeps fractional t (Euler, Karras σ), t → σ by log-σ interpolation of the SD1
    table (DiscreteVP.sigma) gives the σ the scheduler steps with, so telling the network that σ
    (what diffusers_ref does) is the same model call. 5e-5 relative: the two float32 tables differ
    by ~6e-6 relative and diffusers' linspace σ is interpolated linearly in t, ours in log σ."""
    from diffusers import EulerDiscreteScheduler

    ms = DiscreteVP()
    for karras in (False, True):
        s = EulerDiscreteScheduler(**ref.SD1, use_karras_sigmas=karras)
        s.set_timesteps(25)
        got = ms.sigma(s.timesteps.double()).double()
        want = s.sigmas[:-1].double()
        assert float(((got - want) / want).abs().max()) < 5e-5


# --- Euler family (VE samples) --------------------------------------------------------------------


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("n", [10, 25])
def test_euler(n, karras):
    """EulerDiscreteScheduler (linspace = our `normal` on SD1; use_karras_sigmas = our `karras`)."""
    x = start(SIGMA_MAX)
    r = ref.run_ve_scheduler("EulerDiscreteScheduler", D, x, n, use_karras_sigmas=karras)
    out = sampler("euler")(D, x, r.sigmas)
    assert maxdiff(out, r.out) < TOL_EXACT


def test_euler_stock_float32():
    """The unmodified diffusers step rounds the state to float32 every step (`sample.to(float32)`):
    ½ ulp at |x| ≤ ~50 is ≤ 2e-6 per step, so over 10 steps ≤ 2e-5 unless a trajectory near a
    mixture boundary amplifies it (measured 1.0e-6)."""
    x = start(SIGMA_MAX)
    r = ref.run_ve_scheduler("EulerDiscreteScheduler", D, x, 10, use_karras_sigmas=True, f64=False)
    out = sampler("euler")(D, x, r.sigmas)
    assert maxdiff(out, r.out) < 2e-5


@pytest.mark.parametrize("n", [10, 25])
def test_euler_ancestral(n):
    """EulerAncestralDiscreteScheduler draws its own noise: record it, replay it to ours."""
    x = start(SIGMA_MAX)
    r = ref.run_ve_scheduler("EulerAncestralDiscreteScheduler", D, x, n, seed=n)
    ns = ref.ReplayNoise(r.sigmas, r.noise)
    out = sampler("euler_ancestral")(D, x, r.sigmas, noise_sampler=ns)
    assert ns.calls == list(range(n - 1))  # noise on every step but the last (σ_next = 0)
    assert maxdiff(out, r.out) < TOL_EXACT


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("n", [10, 25])
def test_heun(n, karras):
    """HeunDiscreteScheduler: 2n − 1 model calls, Euler on the last step (σ_next = 0), like ours."""
    x = start(SIGMA_MAX)
    r = ref.run_ve_scheduler("HeunDiscreteScheduler", D, x, n, use_karras_sigmas=karras)
    out = sampler("heun")(D, x, r.sigmas)
    assert maxdiff(out, r.out) < TOL_EXACT


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("n", [10, 25])
def test_lms(n, karras):
    """LMSDiscreteScheduler, order 4. diffusers integrates the Lagrange basis with scipy `quad`
    (21-point Gauss-Kronrod, exact for these cubics up to round-off), so it is exact too."""
    x = start(SIGMA_MAX)
    r = ref.run_ve_scheduler("LMSDiscreteScheduler", D, x, n, use_karras_sigmas=karras)
    out = sampler("lms")(D, x, r.sigmas)
    assert maxdiff(out, r.out) < TOL_EXACT


# --- DPM-Solver++ (VP samples) --------------------------------------------------------------------

# lower_order_final: for < 15 steps diffusers drops to lower order near the end. For a 2nd-order
# solver that only changes the last step, which is already first order in DPM++(2M) when σ_next = 0
# (x = D); the final_sigmas_type="zero" rule forces the same. So 2M matches for any n; we check both
# sides of the 15-step switch.


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("n", [10, 20])
def test_dpmpp_2m(n, karras):
    x = start(SIGMA_MAX)
    r = ref.run_vp_multistep(
        "DPMSolverMultistepScheduler",
        D,
        x,
        n,
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=karras,
    )
    out = sampler("dpmpp_2m")(D, x, r.sigmas)
    assert maxdiff(out, r.out) < TOL_EXACT


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("n", [10, 20])
def test_dpmpp_2m_sde(n, karras):
    """SDE-DPM-Solver++(2M), midpoint, η = 1. diffusers takes `variance_noise`; our sampler would use a
    Brownian tree, so it gets the same tensors through a replaying noise_sampler."""
    x = start(SIGMA_MAX)
    gen = torch.Generator().manual_seed(100 + n)
    noise = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for _ in range(n)]
    r = ref.run_vp_multistep(
        "DPMSolverMultistepScheduler",
        D,
        x,
        n,
        noise=noise,
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        use_karras_sigmas=karras,
    )
    ns = ref.ReplayNoise(r.sigmas, r.noise)
    out = sampler("dpmpp_2m_sde")(D, x, r.sigmas, noise_sampler=ns)
    assert set(range(n - 1)) <= set(ns.calls)  # every step with σ_next > 0 used diffusers' noise
    assert maxdiff(out, r.out) < TOL_EXACT


# --- UniPC (VP samples) ---------------------------------------------------------------------------


def _unipc_ours(name: str, order: int):
    fn = sampler(name)
    if not takes(fn, "max_order"):
        pytest.skip(f"{name} takes no `max_order`")
    return lambda x, sig: fn(D, x, sig, max_order=order)


# UniPC: diffusers' `lower_order_final` (order min(p, steps left), at any n) is our `lower_order_final`.
# A final σ = 0 is the final denoise in diffusers and in our `_exact` names; ComfyUI's names stop at 0.001
# (tests/test_samplers_comfy.py). Ending at σ_min > 0 on a VP model, both of our forms are diffusers'.
UNIPC_CASES = [
    # (our name, diffusers solver_type, order, n, karras)
    ("uni_pc_bh2_exact", "bh2", 2, 10, False),
    ("uni_pc_bh2_exact", "bh2", 2, 10, True),
    ("uni_pc_bh2_exact", "bh2", 2, 20, True),
    ("uni_pc_bh2_exact", "bh2", 3, 10, False),
    ("uni_pc_bh2_exact", "bh2", 3, 20, True),
    ("uni_pc", "bh1", 2, 10, False),
    ("uni_pc", "bh1", 3, 20, False),
    ("uni_pc_exact", "bh1", 3, 20, False),
]


@pytest.mark.parametrize("name,variant,order,n,karras", UNIPC_CASES)
def test_uni_pc(name, variant, order, n, karras):
    """UniPCMultistepScheduler(solver_type=variant, solver_order=order) vs our `name` with
    max_order=order.

    bh1: with a final σ = 0, B(h) = h = −∞ on the last step and diffusers multiplies it by a zero
    correction (NaN in 0.42), so both run to σ_min instead (final_sigmas_type="sigma_min") and the
    sample is compared there. Only with linspace σ: with Karras σ, which already end at σ_min,
    diffusers appends σ_min again, i.e. a zero-length last step (cf. diffusers PR #6477)."""
    x = start(SIGMA_MAX)
    cfg = dict(solver_type=variant, solver_order=order, use_karras_sigmas=karras)
    if variant == "bh1":
        cfg["final_sigmas_type"] = "sigma_min"
    r = ref.run_vp_multistep("UniPCMultistepScheduler", D, x, n, **cfg)
    assert (float(r.sigmas[-1]) > 0) == (variant == "bh1")
    out = _unipc_ours(name, order)(x, r.sigmas)
    assert maxdiff(out, r.out) < TOL_EXACT


# --- DDIM / DDPM / LCM (integer timesteps, VP samples) ---------------------------------------------


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim(eta, set_alpha_to_one):
    """DDIMScheduler(clip_sample=False). set_alpha_to_one=False ends at σ(t=0) = 0.0292 instead of 0:
    our sampler gets that σ list (ending > 0) and the comparison is at that σ.
    η > 0: diffusers takes `variance_noise`; the same tensors are replayed to ours."""
    n = 20
    x = start(SIGMA_MAX)
    r = ref.run_ddim(D, x, n, eta=eta, set_alpha_to_one=set_alpha_to_one, seed=7)
    assert (float(r.sigmas[-1]) == 0) == set_alpha_to_one
    kw = {"eta": eta}
    if eta > 0:
        kw["noise_sampler"] = ns = ref.ReplayNoise(r.sigmas, r.noise)
    out = sampler("ddim")(D, x, r.sigmas, **kw)
    if eta > 0:
        assert ns.calls == list(range(n - 1 if set_alpha_to_one else n))
    assert maxdiff(out, r.out) < TOL_EXACT


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_ddpm(spacing):
    """DDPMScheduler (fixed_small variance = the posterior β̃, clip_sample=False), noise recorded and
    replayed. Tolerance 1e-8: on its last step (t_prev = −1, ᾱ_prev = 1) diffusers still adds noise
    with variance clamped to 1e-20, i.e. 1e-10·z, where ours adds none (σ_next = 0)."""
    n = 20
    x = start(SIGMA_MAX)
    r = ref.run_ddpm(D, x, n, seed=3, spacing=spacing)
    ns = ref.ReplayNoise(r.sigmas, r.noise)
    out = sampler("ddpm")(D, x, r.sigmas, noise_sampler=ns)
    assert set(range(n - 1)) <= set(ns.calls)
    assert maxdiff(out, r.out) < 1e-8


@pytest.mark.parametrize("n", [1, 4, 8])
def test_lcm(n):
    """LCMScheduler (defaults: 50 original steps, timestep_scaling 10). Its boundary condition
    f = c_skip·x_VP + c_out·x̂₀ is part of an LCM model, so our sampler gets the exact D wrapped the
    same way (`lcm_consistency_model`); the sampler is x ← f, then re-noise to σ_next."""
    x = start(SIGMA_MAX)
    r = ref.run_lcm(D, x, n, seed=11)
    model = ref.lcm_consistency_model(D)
    ns = ref.ReplayNoise(r.sigmas, r.noise)
    out = sampler("lcm")(model, x, r.sigmas, noise_sampler=ns)
    assert ns.calls == list(range(n - 1))
    assert maxdiff(out, r.out) < TOL_EXACT


# --- rectified flow -------------------------------------------------------------------------------


class FlowModel:
    """An SD3-style flow model (shift 3) whose denoiser is the exact mixture posterior mean."""

    model_sampling = DiscreteFlow(shift=3.0)

    def __init__(self):
        self.D = ref.flow_denoiser(GM)

    def __call__(self, x, sigma, **_):
        return self.D(x, sigma)


@pytest.mark.parametrize("n", [4, 28])
def test_flow_match_euler(n):
    """FlowMatchEulerDiscreteScheduler(shift=3.0): x ← x + (σ_next − σ)·v with v = (x − D)/σ, which
    is our Euler on a flow model. Starts at σ = 1 (x = pure noise)."""
    m = FlowModel()
    x = start(1.0)
    r = ref.run_flow_match_euler(m.D, x, n, shift=3.0)
    assert float(r.sigmas[0]) == 1.0
    out = sampler("euler")(m, x, r.sigmas)
    assert maxdiff(out, r.out) < TOL_EXACT


FLOW_MULTISTEP_CASES = [
    # (our name, diffusers class, config, stochastic)
    # ComfyUI's dpmpp_2m steps in the VE λ on a flow model; the flow-coordinate form is dpmpp_2m_exact
    ("dpmpp_2m_exact", "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++"), False),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), True),
    # ComfyUI's uni_pc_bh2 takes the VE form on a flow model's σ; the flow-coordinate form is _exact
    ("uni_pc_bh2_exact", "UniPCMultistepScheduler", dict(solver_type="bh2"), False),
]


@pytest.mark.parametrize("name,cls_name,config,stochastic", FLOW_MULTISTEP_CASES)
def test_flow_exponential_integrators(name, cls_name, config, stochastic):
    """DPM-Solver++(2M), its SDE form and UniPC on a flow model (diffusers `use_flow_sigmas`,
    `flow_prediction`): checks that our exponential integrators use α = 1 − σ and
    λ = log((1 − σ)/σ) in flow coordinates (also the SDE noise level σ_t·√(1 − e^{−2h}))."""
    n = 12
    m = FlowModel()
    x = start(1.0)
    noise = None
    if stochastic:
        gen = torch.Generator().manual_seed(5)
        noise = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for _ in range(n)]
    r = ref.run_flow_multistep(cls_name, m.D, x, n, shift=3.0, noise=noise, solver_order=2, **config)
    assert 0.99 < float(r.sigmas[0]) < 1  # both start from the same x (pure noise z at σ₀ ≈ 1)
    kw = {"noise_sampler": ref.ReplayNoise(r.sigmas, r.noise)} if stochastic else {}
    if name.startswith("uni_pc"):
        kw["max_order"] = 2
    out = sampler(name)(m, x, r.sigmas, **kw)
    assert maxdiff(out, r.out) < TOL_EXACT
