"""Drive diffusers schedulers with an exact Gaussian-mixture model, for the parity tests.

Every runner builds one diffusers scheduler with the SD1 betas (`scaled_linear` 0.00085..0.012),
steps it with an ε-prediction network derived from the exact VE denoiser D(x, σ), and returns
`Run(sigmas, out, noise)`:
- `sigmas`: the σ the scheduler visits, in VE units and float64 (what we feed to our sampler);
- `out`: its final sample in VE units (x_VE = x_VP·√(1 + σ²) for schedulers that work on VP samples);
- `noise`: the unit-normal tensors it added at step i (None where it added none), to replay.

The ε-network. diffusers calls `unet(x_in, t)` with x_in = x_VE/√(1 + σ²) (VP input: either the
VP sample itself or `scale_model_input` of a VE sample). We return ε = (x_VE − D(x_VE, σ))/σ at the σ
the scheduler itself uses to turn ε back into x̂₀ at that step (`scheduler.sigmas[step_index]`, or
√((1 − ᾱ_t)/ᾱ_t) for the integer-t schedulers). That is t → σ by log-σ interpolation of the SD1 table
wherever diffusers keeps fractional t, but diffusers rounds t to an integer in DPMSolverMultistep and
UniPC with Karras sigmas while still converting with the unrounded Karras σ: a real UNet would see a
slightly different noise level there. That is a property of diffusers' model call, not of the solver
arithmetic we compare, so the network is told the σ the solver uses.

Precision. diffusers keeps its tables in float32; we upcast the same float32 values to float64
(`sigmas`, `alphas_cumprod`) so both sides use identical σ and the arithmetic runs in float64.
Where diffusers casts the state itself to float32 inside `step` (Euler, Euler a, DPM-Solver, FlowMatch
Euler), `float64_steps` keeps it float64 during the run (f64=True, the default); f64=False runs the
stock float32 cast. LCM gets t as a Python int so that its c_skip(t), c_out(t) are float64.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field

import torch

SD1 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class Run:
    sigmas: torch.Tensor  # [n+1] float64, VE
    out: torch.Tensor  # final sample, VE units
    noise: list = field(default_factory=list)  # per step: tensor or None


def vp_factor(sigma) -> torch.Tensor:
    """√(1 + σ²) = 1/√ᾱ: x_VE = x_VP·√(1 + σ²)."""
    return (1 + torch.as_tensor(sigma, dtype=torch.float64) ** 2).sqrt()


def eps_net(D, x_in: torch.Tensor, sigma) -> torch.Tensor:
    """ε̂(x_in) for a VP input x_in = x_VE/√(1 + σ²), from the exact VE denoiser: ε = (x_VE − D)/σ."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    x_ve = x_in * vp_factor(sigma)
    return (x_ve - D(x_ve, sigma)) / sigma


def sigma_of_ac(ac) -> torch.Tensor:
    ac = torch.as_tensor(ac, dtype=torch.float64)
    return ((1 - ac) / ac).sqrt()


@contextlib.contextmanager
def recorded_randn(module_name: str):
    """Record every tensor diffusers' `randn_tensor` returns inside `module_name` (the scheduler's own
    draws), so the same tensors can be replayed to our sampler."""
    mod = importlib.import_module(module_name)
    draws: list[torch.Tensor] = []
    if not hasattr(mod, "randn_tensor"):  # a deterministic scheduler: nothing to record
        yield draws
        return
    orig = mod.randn_tensor

    def rec(*args, **kwargs):
        out = orig(*args, **kwargs)
        draws.append(out.clone())
        return out

    mod.randn_tensor = rec
    try:
        yield draws
    finally:
        mod.randn_tensor = orig


class _Float64Torch:
    """Stands in for the `torch` module inside a scheduler's module while it steps: `torch.float32`
    reads as float64, so diffusers' "upcast the sample to float32" lines (Euler, Euler a, DPM-Solver,
    FlowMatch Euler `step`) keep float64 instead of rounding the state to float32 every step. Nothing
    else changes: the schedule tables are built by diffusers (in float32) before this is in effect."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def float64_steps(module_name: str, enabled: bool = True):
    mod = importlib.import_module(module_name)
    orig = mod.torch
    if enabled:
        mod.torch = _Float64Torch()
    try:
        yield
    finally:
        mod.torch = orig


def _upcast_sigmas(s) -> None:
    s.sigmas = s.sigmas.to(torch.float64)


def _current_sigma(s, t) -> torch.Tensor:
    if s.step_index is None:
        s._init_step_index(t)
    return s.sigmas[s.step_index]


# --- schedulers stepping VE samples (scale_model_input divides by √(σ² + 1)) ----------------------


def run_ve_scheduler(
    cls_name: str, D, x_ve: torch.Tensor, n: int, seed: int = 0, f64: bool = True, **config
) -> Run:
    """Euler, Euler a, Heun, LMS: the sample is x_VE; the UNet sees scale_model_input(x_VE)."""
    import diffusers

    s = getattr(diffusers, cls_name)(**SD1, **config)
    s.set_timesteps(n)
    _upcast_sigmas(s)
    module = type(s).__module__
    gen = torch.Generator().manual_seed(seed)
    x = x_ve.clone()
    with recorded_randn(module) as draws, float64_steps(module, f64):
        for t in s.timesteps:
            x_in = s.scale_model_input(x, t)
            eps = eps_net(D, x_in, s.sigmas[s.step_index])
            kw = {"generator": gen} if cls_name == "EulerAncestralDiscreteScheduler" else {}
            x = s.step(eps, t, x, **kw).prev_sample
    sig = s.sigmas
    if cls_name == "HeunDiscreteScheduler":  # [σ0, σ1, σ1, σ2, σ2, ..., 0] -> [σ0, σ1, ..., 0]
        sig = torch.cat([sig[:1], sig[1:-1:2], sig[-1:]])
    return Run(sig.clone(), x, list(draws))


# --- multistep exponential integrators on VP samples ------------------------------------------------


def run_vp_multistep(
    cls_name: str, D, x_ve: torch.Tensor, n: int, noise=None, f64: bool = True, **config
) -> Run:
    """DPMSolverMultistep / UniPCMultistep: the sample is x_VP = x_VE/√(1 + σ²).
    `noise`: list of tensors passed as `variance_noise` (SDE variants), one per step."""
    import diffusers

    s = getattr(diffusers, cls_name)(**SD1, **config)
    s.set_timesteps(n)
    _upcast_sigmas(s)
    sig = s.sigmas.clone()
    x = x_ve / vp_factor(sig[0])
    with float64_steps(type(s).__module__, f64):
        for i, t in enumerate(s.timesteps):
            sigma = _current_sigma(s, t)
            eps = eps_net(D, s.scale_model_input(x, t), sigma)
            kw = {"variance_noise": noise[i]} if noise is not None else {}
            x = s.step(eps, t, x, **kw).prev_sample
    return Run(sig, x * vp_factor(sig[-1]), list(noise) if noise is not None else [])


# --- DDIM / DDPM / LCM: integer timesteps on the ᾱ table, VP samples --------------------------------


def _upcast_alphas(s) -> None:
    s.alphas_cumprod = s.alphas_cumprod.to(torch.float64)
    for name in ("final_alpha_cumprod", "one"):
        if hasattr(s, name):
            setattr(s, name, torch.as_tensor(getattr(s, name)).to(torch.float64))


def run_ddim(D, x_ve: torch.Tensor, n: int, eta: float = 0.0, set_alpha_to_one: bool = True, seed: int = 0):
    """DDIMScheduler, clip_sample=False, `leading` spacing with steps_offset=1 (the SD1 config): the
    timesteps are then exactly `1000//n` apart, which is what DDIM's step assumes for t_prev."""
    from diffusers import DDIMScheduler

    s = DDIMScheduler(
        **SD1,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=1,
        timestep_spacing="leading",
    )
    s.set_timesteps(n)
    _upcast_alphas(s)
    ac = s.alphas_cumprod
    stride = s.config.num_train_timesteps // n
    ts = [int(t) for t in s.timesteps]
    prev = [t - stride for t in ts]
    acs = [ac[t] for t in ts] + [ac[prev[-1]] if prev[-1] >= 0 else s.final_alpha_cumprod]
    sig = sigma_of_ac(torch.stack(acs))
    gen = torch.Generator().manual_seed(seed)
    noise = [torch.randn(x_ve.shape, generator=gen, dtype=x_ve.dtype) if eta > 0 else None for _ in ts]
    x = x_ve / vp_factor(sig[0])
    for i, t in enumerate(s.timesteps):
        eps = eps_net(D, x, sig[i])
        kw = {"variance_noise": noise[i]} if eta > 0 else {}
        x = s.step(eps, t, x, eta=eta, **kw).prev_sample
    return Run(sig, x * vp_factor(sig[-1]), noise)


def run_ddpm(D, x_ve: torch.Tensor, n: int, seed: int = 0, spacing: str = "leading") -> Run:
    """DDPMScheduler (fixed_small variance, clip_sample=False). It draws its noise itself (no
    `variance_noise` argument): we record the draws."""
    from diffusers import DDPMScheduler

    s = DDPMScheduler(**SD1, clip_sample=False, steps_offset=1, timestep_spacing=spacing)
    s.set_timesteps(n)
    _upcast_alphas(s)
    ac = s.alphas_cumprod
    sig = torch.cat([sigma_of_ac(ac[s.timesteps]), torch.zeros(1, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(seed)
    x = x_ve / vp_factor(sig[0])
    noise = []
    with recorded_randn("diffusers.schedulers.scheduling_ddpm") as draws:
        for i, t in enumerate(s.timesteps):
            eps = eps_net(D, x, sig[i])
            k = len(draws)
            x = s.step(eps, t, x, generator=gen).prev_sample
            noise.append(draws[k] if len(draws) > k else None)
    return Run(sig, x, noise)


def lcm_consistency_model(D, timestep_scaling: float = 10.0):
    """The LCM boundary condition (Luo et al. 2023, Eq. 9 with c_skip, c_out of Song et al. 2023):
    f(x, t) = c_skip(t)·x_VP + c_out(t)·x̂₀, c_skip = σ_d²/((s·t)² + σ_d²), c_out = s·t/√((s·t)² + σ_d²),
    σ_d = 0.5, s = timestep_scaling. In an LCM this is part of the model; here it wraps the exact D so
    that our `lcm` sampler (x ← f, re-noise) sees the same x̂₀ as diffusers' LCMScheduler.
    t is the SD1 table index nearest to σ in log σ (the LCM schedule visits table entries only)."""
    from diffusers import LCMScheduler

    log_table = sigma_of_ac(LCMScheduler(**SD1).alphas_cumprod).log()

    def f(x, sigma, **_):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)[:1]
        t = int((log_table - sigma.log()).abs().argmin())
        st = t * timestep_scaling
        c_skip = 0.25 / (st**2 + 0.25)
        c_out = st / (st**2 + 0.25) ** 0.5
        return c_out * D(x, sigma) + c_skip * x / vp_factor(sigma)

    return f


def run_lcm(D, x_ve: torch.Tensor, n: int, seed: int = 0) -> Run:
    """LCMScheduler with its defaults (SD1 betas, 50 original steps, set_alpha_to_one)."""
    from diffusers import LCMScheduler

    s = LCMScheduler(**SD1)
    s.set_timesteps(n)
    _upcast_alphas(s)
    ac = s.alphas_cumprod
    sig = torch.cat([sigma_of_ac(ac[s.timesteps]), torch.zeros(1, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(seed)
    x = x_ve / vp_factor(sig[0])
    noise = []
    with recorded_randn("diffusers.schedulers.scheduling_lcm") as draws:
        for i, t in enumerate(s.timesteps):
            eps = eps_net(D, x, sig[i])
            k = len(draws)
            # t as a Python int: c_skip(t), c_out(t) are then computed in float64 (an int64 tensor
            # times timestep_scaling would give float32 scalings: 6e-8 relative error in x̂₀).
            x = s.step(eps, int(t), x, generator=gen).prev_sample
            noise.append(draws[k] if len(draws) > k else None)
    return Run(sig, x, noise)


# --- rectified flow -----------------------------------------------------------------------------


def run_flow_match_euler(D_flow, x: torch.Tensor, n: int, shift: float = 3.0, f64: bool = True) -> Run:
    """FlowMatchEulerDiscreteScheduler: the transformer predicts v = ε − x₀ = (x − D)/σ at t = 1000·σ."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(n)
    _upcast_sigmas(s)
    x = x.clone()
    with float64_steps(type(s).__module__, f64):
        for t in s.timesteps:
            sigma = _current_sigma(s, t)
            v = (x - D_flow(x, sigma)) / sigma
            x = s.step(v, t, x).prev_sample
    return Run(s.sigmas.clone(), x)


def flow_denoiser(gm):
    """Exact E[x₀ | x] for rectified-flow coordinates x = a·x₀ + σ·ε, a = 1 − σ, of a diagonal
    Gaussian mixture, written directly in (a, σ) so that σ = 1 (a = 0, where x carries no signal and
    D = E[x₀]) is finite. (`GaussianMixture.denoiser(flow=True)` maps to VE via x/(1 − σ), which is
    inf/NaN at σ = 1, the first σ of every flow schedule.) Per component k:
    x ~ N(a·μ_k, a²s_k² + σ²), E[x₀ | x, k] = μ_k + a·s_k²/(a²s_k² + σ²)·(x − a·μ_k)."""
    mu, var, logw = gm.means, gm.stds**2, gm.weights.log()  # [K, D], [K, D], [K]

    def D(x, sigma, **_):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)  # [B|1, 1, 1]
        a = 1 - s
        xf = x.reshape(x.shape[0], 1, -1).to(torch.float64)  # [B, 1, D]
        tot = a**2 * var[None] + s**2  # [B|1, K, D]
        diff = xf - a * mu[None]  # [B, K, D]
        logp = -0.5 * (diff**2 / tot + tot.log()).sum(-1) + logw[None]  # [B, K]
        r = torch.softmax(logp, dim=1)
        post = mu[None] + a * var[None] / tot * diff  # [B, K, D]
        return (r[..., None] * post).sum(1).reshape(x.shape).to(x.dtype)

    return D


def run_flow_multistep(
    cls_name: str, D_flow, x: torch.Tensor, n: int, shift: float = 3.0, noise=None, f64: bool = True, **config
) -> Run:
    """DPMSolverMultistep / UniPCMultistep on a rectified-flow model (`use_flow_sigmas`,
    `prediction_type="flow_prediction"`): the sample is x = (1 − σ)x₀ + σε itself, the network predicts
    v = (x − D)/σ, and the solvers use α = 1 − σ, λ = log((1 − σ)/σ). diffusers' flow σ start at
    shift·(1 − 1/1000)/(1 + (shift − 1)(1 − 1/1000)) < 1, so λ is finite from the first step."""
    import diffusers

    s = getattr(diffusers, cls_name)(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift, **config
    )
    s.set_timesteps(n)
    _upcast_sigmas(s)
    sig = s.sigmas.clone()
    x = x.clone()
    with float64_steps(type(s).__module__, f64):
        for i, t in enumerate(s.timesteps):
            sigma = _current_sigma(s, t)
            v = (x - D_flow(x, sigma)) / sigma
            kw = {"variance_noise": noise[i]} if noise is not None else {}
            x = s.step(v, t, x, **kw).prev_sample
    return Run(sig, x, list(noise) if noise is not None else [])


class ReplayNoise:
    """noise_sampler(σ, σ_next) that returns the tensor diffusers drew at the step σ → σ_next.

    The step is found from σ (nearest schedule entry); σ_next must be that step's next σ, so a
    sampler asking for noise on any other interval fails loudly instead of silently diverging."""

    def __init__(self, sigmas: torch.Tensor, noise: list):
        self.sigmas = sigmas.double()
        self.noise = noise
        self.calls: list[int] = []

    def __call__(self, sigma, sigma_next):
        i = int((self.sigmas[:-1] - float(sigma)).abs().argmin())
        want = float(self.sigmas[i + 1])
        if abs(float(sigma_next) - want) > 1e-9 * max(1.0, want):
            raise AssertionError(
                f"noise requested on ({float(sigma)}, {float(sigma_next)}), not a schedule step"
            )
        if self.noise[i] is None:
            raise AssertionError(f"the diffusers run added no noise at step {i} (σ={float(sigma)})")
        self.calls.append(i)
        return self.noise[i]
