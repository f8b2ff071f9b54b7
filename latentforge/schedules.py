"""Noise schedules: the σ values a sampler visits, always ending in 0.

`SCHEDULERS[name](model_sampling, steps)` under ComfyUI's names. They need only `sigmas` (ascending
table of a discrete model), `sigma_min`, `sigma_max`, `timestep(σ)` and `sigma(t)` from
`model_sampling`. The k-diffusion helpers keep k-diffusion's names and arguments.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# Discrete beta schedules (DDPM, Ho et al. 2020 §4; Nichol & Dhariwal 2021, Eq. 17)


def make_betas(
    schedule: str, timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
):
    """β_t for t = 0..T−1 under diffusers' names: `linear`, `scaled_linear` (ldm's "linear"), `cosine`."""
    if schedule == "linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "cosine":  # ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, β clipped at 0.999
        s = 0.008
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(
        f"unknown beta schedule {schedule!r}; expected one of 'linear', 'scaled_linear', 'cosine'"
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 ("Common diffusion noise schedules ... are flawed"), Algorithm 1: shift and scale
    √ᾱ so the last step has SNR 0 while the first keeps its value."""
    sqrt_ac = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return (1 - alphas).to(betas.dtype)


# --------------------------------------------------------------------------------------------
# k-diffusion-compatible helpers (same names and arguments)


def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    """Karras et al. 2022, Eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas.float()).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device="cpu"):
    """Uniform in log σ."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return append_zero(sigmas.float()).to(device)


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0, device="cpu"):
    """Polynomial in log σ: ρ = 1 is exponential."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return append_zero(sigmas.float()).to(device)


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device="cpu"):
    """Continuous VP (Song et al. 2021, Eq. 33): σ(t) = √(exp(½β_d t² + β_min t) − 1), t from 1 to ε_s."""
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    sigmas = torch.sqrt(torch.expm1(beta_d * t**2 / 2 + beta_min * t))
    return append_zero(sigmas.float()).to(device)


# --------------------------------------------------------------------------------------------
# Align Your Steps (Sabour et al. 2024): the published 10-step tables, log-linearly interpolated.

AYS_SIGMAS = {
    "sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
    "svd": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def get_sigmas_ays(n: int, model_type: str = "sd1") -> torch.Tensor:
    """n steps from the AYS table for `model_type` (sd1, sdxl, svd): the 11 levels interpolated in log σ
    to n+1 points, the last replaced by 0 (ComfyUI's AlignYourStepsScheduler convention)."""
    if model_type not in AYS_SIGMAS:
        raise ValueError(f"unknown AYS model type {model_type!r}; expected one of {sorted(AYS_SIGMAS)}")
    _check_steps(n)
    table = np.log(np.array(AYS_SIGMAS[model_type]))
    out = np.interp(np.linspace(0, 1, n + 1), np.linspace(0, 1, len(table)), table)
    sig = torch.tensor(np.exp(out), dtype=torch.float32)
    sig[-1] = 0
    return sig


# --------------------------------------------------------------------------------------------
# The ComfyUI scheduler set, over any model sampling.


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def simple(ms, steps: int) -> torch.Tensor:
    """Stride down the model's σ table from the top: σ_x = table[−(1 + ⌊x·T/steps⌋)]."""
    _check_steps(steps)
    table = ms.sigmas
    stride = len(table) / steps
    sig = [float(table[-(1 + int(x * stride))]) for x in range(steps)]
    return append_zero(torch.tensor(sig, dtype=torch.float32))


def _normal(ms, steps: int, sgm: bool) -> torch.Tensor:
    _check_steps(steps)
    start, end = float(ms.timestep(ms.sigma_max)), float(ms.timestep(ms.sigma_min))
    append = True
    if math.isclose(float(ms.sigma(torch.tensor(end))), 0, abs_tol=1e-5):
        steps, append = steps + 1, False  # the table already ends at σ ≈ 0 (zero terminal SNR)
    if sgm:
        ts = torch.linspace(start, end, steps + 1, dtype=torch.float64)[:-1]
    else:
        ts = torch.linspace(start, end, steps, dtype=torch.float64)
    sig = torch.stack([torch.as_tensor(ms.sigma(t)).float().reshape(()) for t in ts])
    return append_zero(sig) if append else sig


def normal(ms, steps: int) -> torch.Tensor:
    """Uniform in timestep from t(σ_max) to t(σ_min) (diffusers' `linspace` spacing)."""
    return _normal(ms, steps, sgm=False)


def sgm_uniform(ms, steps: int) -> torch.Tensor:
    """Uniform in timestep over steps+1 points, dropping the last (the SGM/"trailing"-like spacing)."""
    return _normal(ms, steps, sgm=True)


def karras(ms, steps: int) -> torch.Tensor:
    _check_steps(steps)
    return get_sigmas_karras(steps, float(ms.sigma_min), float(ms.sigma_max))


def exponential(ms, steps: int) -> torch.Tensor:
    _check_steps(steps)
    return get_sigmas_exponential(steps, float(ms.sigma_min), float(ms.sigma_max))


def ddim_uniform(ms, steps: int) -> torch.Tensor:
    """LDM's DDIM "uniform" timesteps 1, 1+c, 1+2c, ... with c = T//steps, from the top down, then 0."""
    _check_steps(steps)
    table = ms.sigmas
    c = max(len(table) // steps, 1)
    idx = list(range(1, len(table), c))[:steps]
    sig = [float(table[i]) for i in reversed(idx)]
    return append_zero(torch.tensor(sig, dtype=torch.float32))


def beta(ms, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """Lee et al. 2024 (arXiv 2407.12173): timesteps at Beta(α, β) quantiles, α = β = 0.6."""
    from scipy import stats

    _check_steps(steps)
    table = ms.sigmas
    total = len(table) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(stats.beta.ppf(ts, alpha, beta_) * total).astype(int)
    sig, last = [], None
    for t in ts:
        if t != last:
            sig.append(float(table[t]))
        last = t
    return append_zero(torch.tensor(sig, dtype=torch.float32))


def linear_quadratic(ms, steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None):
    """Mochi's schedule (genmo): linear to `threshold_noise` over the first half, quadratic to 1 after."""
    _check_steps(steps)
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        linear_steps = steps // 2 if linear_steps is None else linear_steps
        lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        threshold_step_diff = linear_steps - threshold_noise * steps
        quad_steps = steps - linear_steps
        quad_coef = threshold_step_diff / (linear_steps * quad_steps**2)
        lin_coef = threshold_noise / linear_steps - 2 * threshold_step_diff / quad_steps**2
        const = quad_coef * linear_steps**2
        quad = [quad_coef * i**2 + lin_coef * i + const for i in range(linear_steps, steps)]
        sched = [1.0 - x for x in lin + quad + [1.0]]
    return torch.tensor(sched, dtype=torch.float32) * float(ms.sigma_max)


def kl_optimal(ms, steps: int) -> torch.Tensor:
    """Sabour et al. 2024, Eq. 11 (the KL-optimal schedule): σ_i = tan((1−s)·atan σ_max + s·atan σ_min)."""
    _check_steps(steps)
    s = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = math.atan(float(ms.sigma_min)), math.atan(float(ms.sigma_max))
    return append_zero(torch.tan(s * lo + (1 - s) * hi).float())


SCHEDULERS: dict[str, Callable[..., torch.Tensor]] = {
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "karras": karras,
    "exponential": exponential,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "normal": normal,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
}


def unknown_name_error(kind: str, name: str, valid) -> ValueError:
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Valid names: {', '.join(valid)}")


def get_sigmas(model_sampling, scheduler: str, steps: int) -> torch.Tensor:
    """The σ schedule for `steps` steps of `scheduler` on `model_sampling`, ending in 0."""
    if scheduler not in SCHEDULERS:
        raise unknown_name_error("scheduler", scheduler, SCHEDULERS)
    return SCHEDULERS[scheduler](model_sampling, steps)
